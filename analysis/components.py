"""What computes a feature: its pre-activation on one token split exactly into the model components that wrote it.

An SAE at a residual-stream hook reads x = embeddings + sum of attention outputs + sum of MLP outputs (pre-norm
blocks add their sublayers' raw outputs), and pre_f = (norm_scale * x - b_dec) . W_enc[:, f] + b_enc[f] is linear
in x, so every component's direct contribution is (norm_scale * its output) . W_enc[:, f], and they add up to pre_f:
- `embed` (token embedding), `pos_embed` (GPT-2's position embedding);
- `L3H1`: head 1 of layer 3, z_h W_O_h with z_h = sum_s A[t, s] v_s, so it splits over source positions s;
- `L5.mlp`: layer 5's MLP less its output bias, the sum over neurons j of act_j (W_out[:, j] . w_f) (`L5.mlp[j]`);
- `bias`: encode_pre(0) (b_enc - b_dec . W_enc[:, f]) plus the output biases of attention and MLPs (GPT-2's c_proj);
- `remainder`: pre_f minus all of the above (float rounding, ~0).
At `hook_mlp_in` (or a transcoder reading it) the hook is the MLP's normed input, which is not linear in x: the norm's
divisor is frozen at its value for that token (`linearisation` says so), and the split is exact for that linear map.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from activations.errors import UserError
from activations.files import atomic_write_json
from activations.hookpoints import parse_hook
from activations.models import LoadedModel
from activations.sources import Document
from analysis.component_capture import Capture, block_maps, capture, heads, mlp_norm, span_of
from analysis.component_types import ComponentTypes, label, neuron_name, type_shares
from analysis.feature_stats import FeatureStats
from analysis.heldout import heldout_batches
from sae.base import SAE


@dataclass(frozen=True)
class Detail:
    """How much finer detail each example keeps (None: all): heads split by source position, positions kept per
    head, MLPs split by neuron, neurons kept per MLP; the largest |contribution| first."""

    heads: int | None = 3
    sources: int | None = 5
    mlps: int | None = 2
    neurons: int | None = 5


@dataclass
class SourceReport:
    """Per example (a feature on one token): its pre-activation and the direct contribution of every component."""

    hook: str
    names: list[str]  # [C] component names, `bias` last
    positions: Tensor  # [N, 2] int64 (row of the tokens given, position)
    features: Tensor  # [N] int64
    pre: Tensor  # [N] float32 pre-activation from the hook activation of the same forward
    contributions: Tensor  # [N, C] float32
    head_sources: list[dict[str, list[tuple[int, float]]]]  # per example: head -> [(source position, value)]
    neurons: list[dict[str, list[tuple[int, float]]]]  # per example: MLP -> [(neuron, value)]
    linearisation: str = ""  # empty: exact; else what was frozen

    @property
    def remainder(self) -> Tensor:
        """[N] pre-activation not accounted for by the components (float rounding for exact splits)."""
        return self.pre - self.contributions.sum(1)

    def top(self, i: int, n: int | None = None) -> list[tuple[str, float]]:
        """Example i's components, largest |contribution| first (n of them, or all)."""
        row = self.contributions[i]
        order = row.abs().argsort(descending=True)[:n].tolist()
        return [(self.names[c], float(row[c])) for c in order]

    def examples_json(self, n: int | None = None) -> list[dict]:
        """Every example as a JSON-ready dict with its n largest-|contribution| components (all when None);
        one top-k over all examples, so thousands of examples take milliseconds."""
        k = len(self.names) if n is None else min(n, len(self.names))
        idx = self.contributions.abs().topk(k, dim=1).indices
        values = self.contributions.gather(1, idx)
        rows = zip(
            self.positions.tolist(),
            self.features.tolist(),
            self.pre.tolist(),
            self.remainder.tolist(),
            idx.tolist(),
            values.tolist(),
            self.head_sources,
            self.neurons,
        )
        return [
            {
                "row": b,
                "position": t,
                "feature": f,
                "pre": pre,
                "remainder": rem,
                "top": [[self.names[c], round(v, 6)] for c, v in zip(cs, vs)],
                "head_sources": hs,
                "neurons": ns,
            }
            for (b, t), f, pre, rem, cs, vs, hs, ns in rows
        ]

    def to_json(self, n: int | None = None) -> dict:
        """A JSON-ready dict: every example with its n largest components (all when None)."""
        return {
            "hook": self.hook,
            "linearisation": self.linearisation,
            "components": self.names,
            "examples": self.examples_json(n),
        }

    @staticmethod
    def concat(reports: list[SourceReport]) -> SourceReport:
        first = reports[0]
        return SourceReport(
            hook=first.hook,
            names=first.names,
            positions=torch.cat([r.positions for r in reports]),
            features=torch.cat([r.features for r in reports]),
            pre=torch.cat([r.pre for r in reports]),
            contributions=torch.cat([r.contributions for r in reports]),
            head_sources=[h for r in reports for h in r.head_sources],
            neurons=[n for r in reports for n in r.neurons],
            linearisation=first.linearisation,
        )


# ---- the split of one batch --------------------------------------------------------------------------


@dataclass
class _Reader:
    """How the SAE reads raw residual components: pre_f = scale * (component . u_f) summed, + constant_f."""

    u: Tensor  # [E, d] read direction in raw-residual space
    scale: Tensor  # [E] 1, or 1 / the frozen norm divisor at the example's token
    constant: Tensor  # [E]


def _constant(sae: SAE, feats: Tensor) -> Tensor:
    """[E] the pre-activation at a zero input, encode_pre(0) (b_enc - b_dec . W_enc[:, f] for a plain SAE)."""
    return sae.encode_pre(torch.zeros(1, sae.cfg.d_in, device=sae.device)).float()[0, feats]


def _reader(sae: SAE, lm: LoadedModel, hook: str, feats: Tensor, cap: Capture, p: Tensor) -> _Reader:
    hp = parse_hook(hook, lm.model)
    w = sae.W_enc.detach().float()[:, feats].T * sae.cfg.norm_scale  # [E, d]
    constant = _constant(sae, feats)
    if not span_of(hp).frozen_norm:
        return _Reader(w, torch.ones(len(feats), device=w.device), constant)
    norm = mlp_norm(lm.model, hp.layer)
    u = w * norm.gain
    if norm.center:
        u = u - u.mean(-1, keepdim=True)
    if norm.bias is not None:
        constant = constant + w @ norm.bias
    return _Reader(u, 1 / norm.sigma(cap.norm_in[p]), constant)


@dataclass
class _Columns:
    """Component names in order (embeddings, then per layer its heads and MLP, then `bias`) and where each is."""

    names: list[str]
    index: dict[str, int]
    heads: list[tuple[int, int]]  # (layer, head) of each head column, in column order
    mlps: list[int]  # layer of each MLP column, in column order


def _columns(lm: LoadedModel, hook: str) -> _Columns:
    span, H = span_of(parse_hook(hook, lm.model)), heads(lm.model)[0]
    names = ["embed"] if span.embed else []
    if span.embed and lm.model.config.model_type == "gpt2":
        names.append("pos_embed")
    head_cols, mlp_cols = [], []
    for layer in sorted(set(span.attn_layers) | set(span.mlp_layers)):
        if layer in span.attn_layers:
            names += [f"L{layer}H{h}" for h in range(H)]
            head_cols += [(layer, h) for h in range(H)]
        if layer in span.mlp_layers:
            names.append(f"L{layer}.mlp")
            mlp_cols.append(layer)
    names.append("bias")
    return _Columns(names, {name: i for i, name in enumerate(names)}, head_cols, mlp_cols)


def _split(
    sae: SAE, lm: LoadedModel, hook: str, cap: Capture, p: Tensor, b: Tensor, feats: Tensor, detail: Detail
) -> tuple[Tensor, Tensor, list[dict], list[dict]]:
    """(pre [E], contributions [E, C], head sources, neurons) of examples at captured positions p (batch rows b)."""
    cols = _columns(lm, hook)
    span = span_of(parse_hook(hook, lm.model))
    H, _, dh = heads(lm.model)
    r = _reader(sae, lm, hook, feats, cap, p)
    E = len(feats)
    out = torch.zeros(E, len(cols.names), device=r.u.device)
    dot = lambda comp: (comp * r.u).sum(-1) * r.scale  # noqa: E731  [E, d] -> [E]
    if cap.embed is not None:
        out[:, cols.index["embed"]] = dot(cap.embed[p])
    if cap.pos_embed is not None:
        out[:, cols.index["pos_embed"]] = dot(cap.pos_embed[p])
    bias = r.constant.clone()
    maps = {layer: block_maps(lm.model, layer) for layer in set(span.attn_layers) | set(span.mlp_layers)}
    for layer in span.attn_layers:
        g = (r.u @ maps[layer].W_O).view(E, H, dh)  # [E, H, dh]: W_O_h^T u per head
        first = cols.index[f"L{layer}H0"]
        out[:, first : first + H] = (cap.z[layer][p].view(E, H, dh) * g).sum(-1) * r.scale[:, None]
        if maps[layer].b_O is not None:
            bias += (r.u @ maps[layer].b_O) * r.scale
    for layer in span.mlp_layers:
        b_out = maps[layer].b_out
        out[:, cols.index[f"L{layer}.mlp"]] = dot(cap.mlp_out[layer][p] - (0 if b_out is None else b_out))
        if b_out is not None:
            bias += (r.u @ b_out) * r.scale
    out[:, cols.index["bias"]] = bias
    # The real pre-activation, from the hook activation itself (for a frozen norm: the norm's own output).
    w = sae.W_enc.detach().float()[:, feats].T
    pre = (cap.x[p] * sae.cfg.norm_scale * w).sum(-1) + _constant(sae, feats)
    sources = _head_sources(lm, cap, p, b, r, out, cols, maps, detail)
    neurons = _neuron_split(cap, p, r, out, cols, maps, detail)
    return pre, out, sources, neurons


def _picks(values: Tensor, n: int | None) -> Tensor:
    """[E, k] column indices of the k = n (all: None) largest |values| of each row, largest first."""
    k = values.shape[1] if n is None else min(n, values.shape[1])
    return values.abs().topk(k, dim=1).indices


def _listed(values: Tensor, n: int | None) -> list[list[tuple[int, float]]]:
    """Per row of values [n_rows, m], its n largest-|value| entries as (index, value)."""
    idx = _picks(values, n)
    kept = values.gather(1, idx)
    return [[(j, round(v, 6)) for j, v in zip(i, x)] for i, x in zip(idx.tolist(), kept.tolist())]


def _head_sources(lm, cap: Capture, p, b, r: _Reader, out: Tensor, cols: _Columns, maps, detail: Detail) -> list[dict]:
    """Per example, its top heads split over source positions s: A[t, s] * (v_s . W_O_h^T u) * scale."""
    H, KV, dh = heads(lm.model)
    result: list[dict] = [{} for _ in range(len(out))]
    if not cols.heads or detail.heads == 0:
        return result
    head_cols = [cols.index[f"L{layer}H{h}"] for layer, h in cols.heads]
    picks = _picks(out[:, head_cols], detail.heads)  # [E, k] into cols.heads
    layer_of = torch.tensor([layer for layer, _ in cols.heads], device=picks.device)[picks]  # [E, k]
    head_of = torch.tensor([h for _, h in cols.heads], device=picks.device)[picks]
    for layer in sorted({layer for layer, _ in cols.heads}):
        e, k = (layer_of == layer).nonzero(as_tuple=True)
        if len(e) == 0:
            continue
        h = head_of[e, k]  # [n]
        g = (r.u[e] @ maps[layer].W_O).view(len(e), H, dh)[torch.arange(len(e)), h]  # [n, dh]
        v = cap.values[layer][b[e], :, h // (H // KV)]  # [n, T, dh]
        split = cap.pattern[layer][p[e], h] * torch.einsum("ntd,nd->nt", v, g) * r.scale[e, None]  # [n, T]
        for i, row, pairs in zip(e.tolist(), h.tolist(), _listed(split, detail.sources)):
            result[i][f"L{layer}H{row}"] = pairs
    return result


def _neuron_split(cap: Capture, p, r: _Reader, out: Tensor, cols: _Columns, maps, detail: Detail) -> list[dict]:
    """Per example, its top MLPs split over neurons j: act_j * (W_out[:, j] . u) * scale."""
    result: list[dict] = [{} for _ in range(len(out))]
    if not cols.mlps or detail.mlps == 0:
        return result
    mlp_cols = [cols.index[f"L{layer}.mlp"] for layer in cols.mlps]
    picks = _picks(out[:, mlp_cols], detail.mlps)  # [E, k] into cols.mlps
    for c, layer in enumerate(cols.mlps):
        rows = (picks == c).any(1).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        split = cap.neurons[layer][p[rows]] * (r.u[rows] @ maps[layer].W_out) * r.scale[rows, None]  # [n, I]
        for e, pairs in zip(rows.tolist(), _listed(split, detail.neurons)):
            result[e][f"L{layer}.mlp"] = pairs
    return result


# ---- the public entry points --------------------------------------------------------------------------


@torch.inference_mode()
def paired_sources(
    sae: SAE,
    lm: LoadedModel,
    tokens: Tensor,
    rows: Tensor,
    cols: Tensor,
    feats: Tensor,
    detail: Detail = Detail(),
    chunk: int = 512,
    batch_size: int = 8,
) -> SourceReport:
    """The split of example i = feature feats[i] at tokens[rows[i], cols[i]], `batch_size` token rows per forward
    (each cut after its last needed position) and `chunk` examples at a time, so memory stays bounded."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    rows, cols, feats = (torch.as_tensor(a, dtype=torch.long).cpu() for a in (rows, cols, feats))
    if len(feats) and (feats.min() < 0 or feats.max() >= sae.cfg.d_sae):
        raise UserError(f"feature out of range: this SAE has features 0..{sae.cfg.d_sae - 1}.")
    if len(rows) and (cols.min() < 0 or cols.max() >= tokens.shape[1] or rows.min() < 0 or rows.max() >= len(tokens)):
        raise UserError(f"a position lies outside the tokens given (shape {tuple(tokens.shape)}).")
    names = _columns(lm, hp.name).names
    order = rows.argsort(stable=True)
    parts, where = [], []
    for start in range(0, len(tokens), batch_size):
        mine = order[(rows[order] >= start) & (rows[order] < start + batch_size)]
        if len(mine) == 0:
            continue
        here = torch.stack([rows[mine] - start, cols[mine]], 1)
        unique, inverse = here.unique(dim=0, return_inverse=True)
        batch = tokens[start : start + batch_size, : int(cols[mine].max()) + 1].to(lm.device)
        cap = capture(lm.model, hp.name, batch, unique[:, 0].to(lm.device), unique[:, 1].to(lm.device))
        for lo in range(0, len(mine), chunk):
            sel = slice(lo, lo + chunk)
            p, b = inverse[sel].to(lm.device), here[sel, 0].to(lm.device)
            pre, out, sources, neurons = _split(sae, lm, hp.name, cap, p, b, feats[mine[sel]].to(lm.device), detail)
            parts.append((pre.cpu(), out.cpu(), sources, neurons))
            where.append(mine[sel])
    if not parts:
        raise UserError("no examples to decompose: give at least one position and one feature.")
    index = torch.cat(where).argsort()  # back to the caller's order
    pre, out = torch.cat([q[0] for q in parts])[index], torch.cat([q[1] for q in parts])[index]
    sources = [s for q in parts for s in q[2]]
    neurons = [n for q in parts for n in q[3]]
    frozen = span_of(hp).frozen_norm
    return SourceReport(
        hook=hp.name,
        names=names,
        positions=torch.stack([rows, cols], 1),
        features=feats,
        pre=pre,
        contributions=out,
        head_sources=[sources[i] for i in index.tolist()],
        neurons=[neurons[i] for i in index.tolist()],
        linearisation=(
            f"the layer-{hp.layer} MLP input norm's divisor is frozen at its value on each example's token; "
            "the split is exact for that linear map"
            if frozen
            else ""
        ),
    )


def feature_sources(
    sae: SAE,
    lm: LoadedModel,
    tokens: Tensor,
    positions: list[tuple[int, int]],
    features: list[int],
    detail: Detail = Detail(),
    chunk: int = 512,
) -> SourceReport:
    """Every feature of `features` at every (row, position) of `positions` in tokens [B, T] (position-major)."""
    pairs = [(b, t, f) for b, t in positions for f in features]
    rows, cols, feats = (torch.tensor([q[i] for q in pairs], dtype=torch.long) for i in range(3))
    return paired_sources(sae, lm, tokens, rows, cols, feats, detail, chunk)


def feature_means(report: SourceReport) -> tuple[list[int], Tensor]:
    """(the report's features, ascending; [F, C] each one's mean contribution over its examples)."""
    feats, inverse, counts = report.features.unique(return_inverse=True, return_counts=True)
    means = torch.zeros(len(feats), len(report.names)).index_add_(0, inverse, report.contributions.float())
    return feats.tolist(), means / counts[:, None]


def fractions(names: list[str], means: Tensor, n: int | None = None) -> list[list[tuple[str, float]]]:
    """Per row of means [F, C], its positive components as fractions of the positive total, largest first
    (n of them, or all); [] for a row with no positive contribution."""
    k = means.shape[1] if n is None else min(n, means.shape[1])
    total = means.clamp_min(0).sum(1, keepdim=True)
    values, idx = means.topk(k, dim=1)
    share = values / total.clamp_min(torch.finfo(means.dtype).tiny)
    return [
        [(names[c], s) for c, v, s in zip(cs, vs, ss) if v > 0]
        for cs, vs, ss in zip(idx.tolist(), values.tolist(), share.tolist())
    ]


def feature_fractions(report: SourceReport, feature: int) -> list[tuple[str, float]]:
    """The feature's components by mean contribution over its examples, as fractions of the positive total."""
    mean = report.contributions[report.features == feature].float().mean(0, keepdim=True)
    return fractions(report.names, mean)[0]


def neuron_fractions(per_example: list[dict[str, list]], total: float) -> list[tuple[str, float]]:
    """The neurons recorded in a feature's examples (MLP -> [(neuron, value)] each), by mean contribution over
    the examples (unrecorded: 0) as fractions of the feature's positive total, positive ones, largest first."""
    if total <= 0 or not per_example:
        return []
    sums: dict[str, float] = {}
    for example in per_example:
        for mlp, pairs in example.items():
            for neuron, value in pairs:
                sums[neuron_name(mlp, neuron)] = sums.get(neuron_name(mlp, neuron), 0.0) + value
    scale = 1 / (len(per_example) * total)
    return sorted(((n, v * scale) for n, v in sums.items() if v > 0), key=lambda t: -t[1])


def describe(parts: list[tuple[str, float]], top: int = 5) -> str:
    """Fractions as text, e.g. 'L8H4 58 %, L3H1 12 %, embed 9 %'."""
    return ", ".join(f"{name} {100 * frac:.0f} %" for name, frac in parts[:top]) or "no positive contribution"


def summarise_one(report: SourceReport, feature: int, top: int = 5) -> str:
    """One feature's top components as fractions of its positive total, e.g. 'L8H4 58 %, L3H1 12 %, embed 9 %'."""
    return describe(feature_fractions(report, feature), top)


def summarise(report: SourceReport, top: int = 5) -> dict[int, str]:
    """summarise_one for every feature of the report."""
    feats, means = feature_means(report)
    return {f: describe(parts, top) for f, parts in zip(feats, fractions(report.names, means, top))}


def feature_entries(report: SourceReport, types: ComponentTypes, extra: list[dict] | None = None) -> dict[str, dict]:
    """Per feature of the report (its id as a string): the summary, its top fractions, neurons, the catalogue types
    of those components, its share per type and its examples (each merged with `extra[i]` when given)."""
    feats, means = feature_means(report)
    totals = means.clamp_min(0).sum(1).tolist()
    examples = report.examples_json(8)
    by_feature: dict[int, list[int]] = {}
    for i, feature in enumerate(report.features.tolist()):
        by_feature.setdefault(feature, []).append(i)
    entries = {}
    for feature, parts, total in zip(feats, fractions(report.names, means), totals):
        mine = by_feature[feature]
        neurons = neuron_fractions([report.neurons[i] for i in mine], total)
        named = {name: types.of(name) for name, _ in [*parts[:8], *neurons[:8]]}
        entries[str(feature)] = {
            "summary": describe([(label(n, named[n]), x) for n, x in parts[:5]]),
            "fractions": [[name, round(frac, 4)] for name, frac in parts[:8]],
            "neurons": [[name, round(frac, 4)] for name, frac in neurons[:8]],
            "types": {name: [[k, s] for k, s in kinds] for name, kinds in named.items() if kinds},
            "type_shares": type_shares(parts, neurons, types),
            "examples": [(extra[i] if extra else {}) | examples[i] for i in mine],
        }
    return entries


# ---- every feature of an inspected run ----------------------------------------------------------------


def _examples(stats: FeatureStats, per_feature: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(feature, slot, context, position) [E] of each feature's top `per_feature` recorded examples."""
    k = min(per_feature, stats.top_act.shape[1])
    f, j = (stats.top_act[:, :k] > 0).nonzero(as_tuple=True)
    context, position = stats.position(stats.top_g[f, j])
    return f, j, context, position


def _exact_contexts(
    sae: SAE, lm: LoadedModel, stats: FeatureStats, source: Iterable[Document], wanted: Tensor
) -> dict[int, Tensor]:
    """The token rows of the wanted contexts, re-read from held-out text exactly as `sae inspect` packed them."""
    want, rows, index = set(wanted.tolist()), {}, 0
    for _, ids, _ in heldout_batches(
        sae, lm, source, stats.tokens, stats.cfg.model_batch_size, stats.context_size, "components"
    ):
        for row in ids.cpu():
            if index in want:
                rows[index] = row
            index += 1
        if index > max(want):
            break
    return rows


def _check_windows(stats: FeatureStats, f: Tensor, j: Tensor, tokens: Tensor, position: Tensor) -> None:
    """UserError unless the re-read contexts hold the tokens `sae inspect` recorded before each example."""
    left = stats.cfg.left
    p = position[:, None] + torch.arange(-left, 1)  # [E, left + 1]
    seen = torch.where(p >= 0, tokens.gather(1, p.clamp_min(0)), -1)
    if not torch.equal(seen.int(), stats.top_tokens[f, j, : left + 1]):
        raise UserError(
            "the held-out text re-read for feature sources differs from the one 'sae inspect' read; pass the same "
            "source (dataset, split, context size), or none to use the stored token windows."
        )


def features_sources_for_run(
    sae: SAE,
    lm: LoadedModel,
    stats: FeatureStats,
    examples_per_feature: int = 4,
    chunk: int = 1024,
    source: Iterable[Document] | None = None,
    out: str | Path | None = None,
    batch_size: int = 8,
    detail: Detail = Detail(heads=2, sources=3, mlps=1, neurons=3),
    types: ComponentTypes | None = None,
) -> dict:
    """Split each feature's top recorded examples into components; writes OUT/components.json (OUT defaults to
    the run's features/ folder) and returns what it wrote.

    With `source` (the held-out text `sae inspect` read) each example is rerun in its exact context. Without it,
    only the stored window is known (`stats.cfg.left` tokens before the example): the context is then that window,
    which starts a fresh sequence, and the contributions are exact for that shorter context only.
    With `types` (the model's head and neuron catalogues) each component is named with its catalogue types and
    every feature gets its share per type (analysis.component_types).
    """
    started = time.time()
    f, j, context, position = _examples(stats, examples_per_feature)
    acts = stats.top_act[f, j].tolist()
    if len(f) == 0:
        raise UserError("no feature fired on the inspected text, so there are no examples to decompose.")
    if source is not None:
        needed = context.unique()
        rows = _exact_contexts(sae, lm, stats, source, needed)
        if len(rows) < len(needed):
            raise UserError(
                "the held-out text ran out before the inspected contexts; pass the source 'sae inspect' read."
            )
        slot = {c: i for i, c in enumerate(needed.tolist())}
        tokens = torch.stack([rows[c] for c in needed.tolist()])  # [n_contexts, T]
        row = torch.tensor([slot[c] for c in context.tolist()])
        _check_windows(stats, f, j, tokens[row], position)
        report = paired_sources(sae, lm, tokens, row, position, f, detail, chunk, batch_size)
        mode = "exact: each example rerun in its own held-out context"
    else:
        report = _window_sources(sae, lm, stats, f, j, detail, chunk, batch_size)
        mode = f"window: each example rerun on its stored {stats.cfg.left} tokens of left context only"
    extra = [{"context": c, "position": p, "act": a} for c, p, a in zip(context.tolist(), position.tolist(), acts)]
    features = feature_entries(report, types or ComponentTypes(), extra)
    result = {
        "hook": report.hook,
        "components": report.names,
        "mode": mode,
        "linearisation": report.linearisation,
        "examples_per_feature": examples_per_feature,
        "examples": len(f),
        "max_abs_remainder": float(report.remainder.abs().max()),
        "seconds": round(time.time() - started, 2),
        "features": features,
    }
    path = Path(out) if out is not None else Path(stats.meta.get("run", ".")) / "features"
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "components.json", result, indent=None)
    return result


def _window_sources(sae, lm, stats: FeatureStats, f, j, detail: Detail, chunk: int, batch_size: int) -> SourceReport:
    """Examples rerun on their stored left windows (slots before the context start, -1, dropped), by length."""
    windows = stats.top_tokens[f, j, : stats.cfg.left + 1].long()  # [E, left + 1]
    lengths = (windows >= 0).sum(1)
    parts, where = [], []
    for n in lengths.unique().tolist():
        mine = (lengths == n).nonzero().squeeze(1)
        tokens = windows[mine, -n:]
        rows, cols = torch.arange(len(mine)), torch.full((len(mine),), n - 1)
        parts.append(paired_sources(sae, lm, tokens, rows, cols, f[mine], detail, chunk, batch_size))
        where.append(mine)
    report = SourceReport.concat(parts)
    order = torch.cat(where).argsort()
    report.positions = torch.stack([torch.arange(len(f)), report.positions[order, 1]], 1)
    report.features, report.pre, report.contributions = (
        report.features[order],
        report.pre[order],
        report.contributions[order],
    )
    report.head_sources = [report.head_sources[i] for i in order.tolist()]
    report.neurons = [report.neurons[i] for i in order.tolist()]
    return report
