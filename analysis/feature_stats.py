"""Every feature's statistics and examples from held-out text, in two streaming passes.

Pass 1 computes, per feature: how often it fires (density), the sum and max of its activations, and
its top-k max-activating tokens with a window of tokens around each and the feature's activation on
every token of the window. Pass 2 re-reads the same contexts and, now that each feature's max is known,
fills an activation histogram of `bins` equal-width bins over (0, max] and samples examples from
`intervals` equal-width intervals of (0, max] ("quantile" examples, as in Anthropic's dashboards).

Exact, not approximate:
- top-k values are exact (the positions shown for equal activations are unspecified);
- histogram bin of an activation a > 0: floor(a * bins / max) (in float64), the max itself in the last bin;
  interval likewise with `intervals`;
- the examples of an interval are the `per_interval` firings in it with the smallest `sample_key`
  (a fixed hash of the token's global index and the feature): a uniform sample without replacement,
  reproducible, and checkable by brute force.
Memory is bounded by features × (k + intervals × per_interval) × window, whatever the number of tokens,
plus at most `cache_mb` of hook activations kept from pass 1 so pass 2 need not run the model again.
Positions the SAE was not trained on (each context's first token, special tokens; `store.keep_mask`)
never count and show activation 0 inside windows. Window slots outside the context hold token -1.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from activations.models import LoadedModel
from activations.options import check_fields, option
from activations.sources import Document
from activations.tokens import ContextBatch
from analysis.heldout import heldout_batches
from sae.base import SAE
from sae.runs import check_sae_fits

EMPTY_KEY = torch.iinfo(torch.int64).max  # sample slot with no example
_P = 2_147_483_647  # 2^31 - 1: the hash works modulo this prime without int64 overflow


@dataclass
class StatsConfig:
    """How much text to read and how many examples to keep per feature."""

    tokens: int = option(32768, "held-out tokens to read (whole model batches, so slightly more)", low=1)
    top_k: int = option(16, "max-activating examples per feature", low=1)
    left: int = option(20, "tokens shown before an example's token", low=0)
    right: int = option(6, "tokens shown after it", low=0)
    intervals: int = option(5, "equal-width activation intervals of (0, max] to sample examples from", low=1)
    per_interval: int = option(3, "examples sampled per interval", low=1)
    bins: int = option(32, "activation histogram bins over (0, max]", low=1)
    context_size: int | None = option(
        None, "tokens per context (default: the SAE's training context size)", low=2, cli=False
    )
    model_batch_size: int = option(8, "contexts per model forward", low=1)
    seed: int = option(0, "seed of the interval samples")
    cache_mb: int = option(
        512, "hook activations kept in memory between the two passes up to this size (MB)", low=0, cli=False
    )

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def window(self) -> int:
        return self.left + 1 + self.right


# Per-example fields kept for top-k and interval examples. "g" is the token's global index
# (context index × context size + position), the others its provenance and window.
_EXAMPLE_FIELDS = ("act", "g", "doc", "doc_pos", "tokens", "window_acts")


@dataclass
class FeatureStats:
    """The result of `feature_stats`, feature-major ([F, ...]) CPU tensors; see the module docstring."""

    cfg: StatsConfig
    tokens: int  # kept tokens read
    contexts: int  # contexts read
    context_size: int
    count: Tensor  # [F] int64: tokens where the feature is > 0
    act_sum: Tensor  # [F] float64: sum of its activations
    max: Tensor  # [F] float32 (0 for a feature that never fired)
    hist: Tensor  # [F, bins] int64 over (0, max]
    top_act: Tensor  # [F, k] float32, descending; 0 = no example
    top_g: Tensor  # [F, k] int64 global token index (-1 none)
    top_doc: Tensor  # [F, k] int64 document id of the token (-1: inserted token / none)
    top_doc_pos: Tensor  # [F, k] int64 offset of the token in its document
    top_tokens: Tensor  # [F, k, W] int32 token ids of the window (-1 outside the context)
    top_window_acts: Tensor  # [F, k, W] float32 the feature's activation on each window token
    interval_count: Tensor  # [F, intervals] int64 firings in each interval
    sample_key: Tensor  # [F, intervals, m] int64 (EMPTY_KEY: no example), ascending
    sample_act: Tensor  # [F, intervals, m] float32
    sample_g: Tensor  # [F, intervals, m] int64
    sample_doc: Tensor
    sample_doc_pos: Tensor
    sample_tokens: Tensor  # [F, intervals, m, W] int32
    sample_window_acts: Tensor  # [F, intervals, m, W] float32
    meta: dict  # provenance: model, hook, dataset, split

    @property
    def d_sae(self) -> int:
        return len(self.count)

    @property
    def density(self) -> Tensor:
        """Fraction of tokens on which each feature fires."""
        return self.count.double() / max(self.tokens, 1)

    @property
    def mean(self) -> Tensor:
        """Mean activation over the tokens where the feature fires (0 if it never does)."""
        return self.act_sum / self.count.clamp_min(1)

    def position(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """(context index, position in context) of global token indices."""
        return g // self.context_size, g % self.context_size

    # ---- files ------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write stats.safetensors + stats.json into folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f.name: getattr(self, f.name).contiguous()
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        save_file(tensors, folder / "stats.safetensors")
        info = {
            "cfg": asdict(self.cfg),
            "tokens": self.tokens,
            "contexts": self.contexts,
            "context_size": self.context_size,
            "meta": self.meta,
        }
        (folder / "stats.json").write_text(json.dumps(info, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        folder = Path(folder)
        if not (folder / "stats.safetensors").is_file() or not (folder / "stats.json").is_file():
            raise UserError(
                f"{folder} holds no feature statistics (stats.safetensors, stats.json); run 'sae inspect RUN' first."
            )
        info = json.loads((folder / "stats.json").read_text())
        tensors = load_file(folder / "stats.safetensors")
        return cls(
            cfg=StatsConfig(**info["cfg"]),
            tokens=info["tokens"],
            contexts=info["contexts"],
            context_size=info["context_size"],
            meta=info["meta"],
            **tensors,
        )


def sample_key(g: Tensor, feature: Tensor, seed: int = 0) -> Tensor:
    """A fixed pseudo-random int64 key per (global token index, feature), unique per token for a feature.

    A small non-linear hash modulo 2^31-1 (every product stays below 2^62, so no int64 overflow),
    with g's low 32 bits appended to break ties. Interval examples are the smallest keys.
    """
    g, feature = g.long(), feature.long()
    h = (g % _P * 48271 + feature + 1) % _P
    h = (h * h + seed % _P + 12345) % _P
    h = (h * 69621 + (feature * 40692) % _P) % _P
    h = (h * h + 2_654_435) % _P
    return (h << 32) | (g & 0xFFFFFFFF)


# ---- the passes -------------------------------------------------------------------------


def _hook_batches(
    sae: SAE, lm: LoadedModel, source: Iterable[Document], cfg: StatsConfig, desc: str
) -> Iterator[tuple[ContextBatch, int, Tensor, Tensor, Tensor]]:
    """(batch, first context index, tokens [B,T], hook activations [B,T,d], keep mask [B,T]) on the SAE's device,
    for whole model batches until at least cfg.tokens kept tokens were read."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    device = sae.device
    first = 0
    for batch, tokens, keep in heldout_batches(
        sae, lm, source, cfg.tokens, cfg.model_batch_size, cfg.context_size, desc
    ):
        x = run_with_cache(lm.model, tokens, [hp])[hp.name]
        yield batch, first, tokens.to(device), x.to(device), keep.to(device)
        first += len(tokens)


def _with_acts(sae: SAE, batches: Iterable[tuple]) -> Iterator[tuple[ContextBatch, int, Tensor, Tensor, Tensor]]:
    """The same tuples with the hook activations replaced by feature activations [B,T,F], 0 where not kept."""
    for batch, first, tokens, x, keep in batches:
        yield batch, first, tokens, sae.encode_raw(x.float()).float() * keep[..., None], keep


class _Replay:
    """Keeps pass 1's hook batches for pass 2 while they fit in `mb` megabytes; past that, `items` becomes
    None and pass 2 runs the model again (same text, same batches, same numbers)."""

    def __init__(self, mb: int):
        self.items: list[tuple] | None = []
        self.room = mb * 2**20

    def record(self, batches: Iterable[tuple]) -> Iterator[tuple]:
        for item in batches:
            if self.items is not None:
                self.room -= sum(t.numel() * t.element_size() for t in item[2:])
                if self.room >= 0:
                    self.items.append(item)
                else:
                    self.items = None
            yield item


def _windows(tokens: Tensor, acts: Tensor, rows: Tensor, feats: Tensor, cfg: StatsConfig) -> tuple[Tensor, Tensor]:
    """Token ids [n, W] (int32, -1 outside the context) and feature activations [n, W] around flat rows
    (b*T + t) of a batch, for the paired features."""
    B, T, F = acts.shape
    b, t = rows // T, rows % T
    p = t[:, None] + torch.arange(-cfg.left, cfg.right + 1, device=rows.device)  # [n, W]
    inside = (p >= 0) & (p < T)
    p = p.clamp(0, T - 1)
    win_tokens = torch.where(inside, tokens[b[:, None], p], -1).int()
    win_acts = acts.reshape(-1)[((b[:, None] * T + p) * F + feats[:, None])] * inside
    return win_tokens, win_acts


def _example_fields(
    batch: ContextBatch, first: int, tokens: Tensor, acts: Tensor, rows: Tensor, feats: Tensor, cfg: StatsConfig
) -> dict[str, Tensor]:
    """Every _EXAMPLE_FIELDS tensor for examples at flat rows `rows` of the batch, feature `feats`."""
    T = tokens.shape[1]
    win_tokens, win_acts = _windows(tokens, acts, rows, feats, cfg)
    doc = batch.doc_ids.reshape(-1).to(rows.device)[rows]
    doc_pos = batch.positions.reshape(-1).to(rows.device)[rows]
    return {
        "act": acts.reshape(-1, acts.shape[-1])[rows, feats],
        "g": first * T + rows,
        "doc": doc,
        "doc_pos": doc_pos,
        "tokens": win_tokens,
        "window_acts": win_acts,
    }


@torch.inference_mode()
def feature_stats(
    sae: SAE, lm: LoadedModel, source: Iterable[Document], cfg: StatsConfig = StatsConfig(), meta: dict | None = None
) -> FeatureStats:
    """Two passes over `cfg.tokens` held-out tokens of `source` (re-iterable); see the module docstring."""
    check_sae_fits(sae, lm)
    F, k, W, device = sae.cfg.d_sae, cfg.top_k, cfg.window, sae.device

    # ---- pass 1: counts, sums, max, top-k ------------------------------------------------
    count = torch.zeros(F, dtype=torch.long, device=device)
    act_sum = torch.zeros(F, dtype=torch.float64, device=device)
    mx = torch.zeros(F, device=device)
    top = _empty_examples((k, F), W, device)  # [k, F, ...]: topk runs along dim 0
    tokens_read, contexts, T = 0, 0, 0
    replay = _Replay(cfg.cache_mb)
    for batch, first, tokens, acts, keep in _with_acts(
        sae, replay.record(_hook_batches(sae, lm, source, cfg, "features 1/2"))
    ):
        T = tokens.shape[1]
        flat = acts.reshape(-1, F)
        count += (flat > 0).sum(0)
        act_sum += flat.sum(0, dtype=torch.float64)
        mx = torch.maximum(mx, flat.max(0).values)
        cand_act, cand_rows = flat.topk(min(k, len(flat)), dim=0)  # [k', F]
        feats = torch.arange(F, device=device).expand_as(cand_rows)
        cand = _example_fields(batch, first, tokens, acts, cand_rows.reshape(-1), feats.reshape(-1), cfg)
        cand = {name: value.reshape(*cand_rows.shape, *value.shape[1:]) for name, value in cand.items()}
        merged = {name: torch.cat([top[name], cand[name]]) for name in _EXAMPLE_FIELDS}
        sel = merged["act"].topk(k, dim=0).indices  # [k, F]
        top = {name: _take(value, sel, dim=0) for name, value in merged.items()}
        tokens_read += int(keep.sum())
        contexts = first + len(tokens)
    if tokens_read == 0:
        raise UserError("the held-out text produced no tokens to inspect; give a larger source (--dataset/--split).")
    top = {name: value.transpose(0, 1).contiguous() for name, value in top.items()}  # [F, k, ...]
    _clear(top, top["act"] <= 0)

    # ---- pass 2: histogram and interval samples over (0, max] ----------------------------
    n, m = cfg.intervals, cfg.per_interval
    hist = torch.zeros(F * cfg.bins, dtype=torch.long, device=device)
    interval_count = torch.zeros(F * n, dtype=torch.long, device=device)
    samples = _empty_examples((F * n, m), W, device)
    samples["key"] = torch.full((F * n, m), EMPTY_KEY, dtype=torch.long, device=device)
    cfg2 = StatsConfig(**{**asdict(cfg), "tokens": tokens_read})  # exactly the same batches as pass 1
    again = replay.items if replay.items is not None else _hook_batches(sae, lm, source, cfg2, "features 2/2")
    for batch, first, tokens, acts, _keep in _with_acts(sae, again):
        flat = acts.reshape(-1, F)
        rows, feats = (flat > 0).nonzero(as_tuple=True)
        a = flat[rows, feats].double()
        top_of = mx[feats].double()
        hist.index_add_(
            0, feats * cfg.bins + (a * cfg.bins / top_of).floor().long().clamp(max=cfg.bins - 1), torch.ones_like(feats)
        )
        group = feats * n + (a * n / top_of).floor().long().clamp(max=n - 1)
        interval_count.index_add_(0, group, torch.ones_like(feats))
        key = sample_key(first * T + rows, feats, cfg.seed)
        _merge_samples(
            samples, group, key, lambda i: _example_fields(batch, first, tokens, acts, rows[i], feats[i], cfg), m
        )

    _clear(samples, samples["key"] == EMPTY_KEY)
    samples = {name: value.reshape(F, n, m, *value.shape[2:]) for name, value in samples.items()}
    cpu = lambda t: t.cpu()  # noqa: E731
    return FeatureStats(
        cfg=cfg,
        tokens=tokens_read,
        contexts=contexts,
        context_size=T,
        count=cpu(count),
        act_sum=cpu(act_sum),
        max=cpu(mx),
        hist=cpu(hist.reshape(F, cfg.bins)),
        top_act=cpu(top["act"]),
        top_g=cpu(top["g"]),
        top_doc=cpu(top["doc"]),
        top_doc_pos=cpu(top["doc_pos"]),
        top_tokens=cpu(top["tokens"]),
        top_window_acts=cpu(top["window_acts"]),
        interval_count=cpu(interval_count.reshape(F, n)),
        sample_key=cpu(samples["key"]),
        sample_act=cpu(samples["act"]),
        sample_g=cpu(samples["g"]),
        sample_doc=cpu(samples["doc"]),
        sample_doc_pos=cpu(samples["doc_pos"]),
        sample_tokens=cpu(samples["tokens"]),
        sample_window_acts=cpu(samples["window_acts"]),
        meta={"model": lm.name, "hook": sae.cfg.hook_name, **(meta or {})},
    )


def _empty_examples(shape: tuple[int, int], W: int, device) -> dict[str, Tensor]:
    return {
        "act": torch.zeros(shape, device=device),
        "g": torch.full(shape, -1, dtype=torch.long, device=device),
        "doc": torch.full(shape, -1, dtype=torch.long, device=device),
        "doc_pos": torch.full(shape, -1, dtype=torch.long, device=device),
        "tokens": torch.full((*shape, W), -1, dtype=torch.int32, device=device),
        "window_acts": torch.zeros((*shape, W), device=device),
    }


def _clear(examples: dict[str, Tensor], empty: Tensor) -> None:
    """Reset the slots that hold no example to the empty values (act 0, ids -1)."""
    for name in ("g", "doc", "doc_pos", "tokens"):
        examples[name][empty] = -1
    for name in ("act", "window_acts"):
        examples[name][empty] = 0


def _take(value: Tensor, index: Tensor, dim: int) -> Tensor:
    """value gathered along `dim` with `index` (which has value's leading dims), trailing dims carried along."""
    index = index.reshape(*index.shape, *([1] * (value.ndim - index.ndim))).expand(
        *index.shape, *value.shape[index.ndim :]
    )
    return value.gather(dim, index)


def _merge_samples(samples: dict[str, Tensor], group: Tensor, key: Tensor, fields_of, m: int) -> None:
    """Keep, per group (feature × interval), the m smallest keys among the stored and the new firings.

    `fields_of(i)` builds the example fields of new firings i (only computed for the few that win).
    """
    if len(key) == 0:
        return
    # Drop firings that cannot beat their group's current m-th smallest key.
    worth = key < samples["key"][group, m - 1]
    group, key, idx = group[worth], key[worth], worth.nonzero().squeeze(1)
    if len(key) == 0:
        return
    # The m smallest new keys of each group: sort by key, then stably by group, and rank within group.
    order = key.argsort()
    order = order[group[order].argsort(stable=True)]
    group, key, idx = group[order], key[order], idx[order]
    uniq, inverse, counts = torch.unique_consecutive(group, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(group), device=group.device) - starts[inverse]
    keep = rank < m
    group, key, idx, inverse, rank = group[keep], key[keep], idx[keep], inverse[keep], rank[keep]
    new = fields_of(idx)
    new["key"] = key
    # Merge each touched group's m stored slots with its (up to m) new ones; keep the m smallest keys.
    U = len(uniq)
    merged_key = torch.cat(
        [samples["key"][uniq], torch.full((U, m), EMPTY_KEY, dtype=torch.long, device=key.device)], 1
    )
    merged_key[inverse, m + rank] = key
    sel = merged_key.argsort(dim=1)[:, :m]
    for name, stored in samples.items():
        slots = torch.cat([stored[uniq], stored.new_zeros((U, m, *stored.shape[2:]))], 1)
        slots[inverse, m + rank] = new[name].to(stored.dtype)
        stored[uniq] = _take(slots, sel, dim=1)
