"""The examples `sae explain` shows and scores, from `sae inspect`'s statistics: the explainer sees half the top
examples and one sample per activation interval; the scorers get the rest (activating, from across the range) plus
non-activating windows the SAE is run on, half of them hard (holding the feature's own top tokens)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from activations.hookpoints import parse_hook, run_with_cache
from activations.models import LoadedModel
from analysis.explain_scoring import Example
from analysis.feature_stats import FeatureStats
from sae.base import SAE

CANDIDATES = 4  # windows run per negative kept
TOP_TOKENS = 5  # the feature's most frequent top-example tokens: the trivial baseline and the hard negatives


@dataclass
class FeatureExamples:
    """One feature's examples: what the explainer sees, what the scorers get, and its top tokens."""

    feature: int
    shown: list[Example]
    activating: list[Example]
    top_tokens: list[str]
    top_token_ids: list[int]
    negatives: list[Example] | None = None

    @property
    def scoring(self) -> list[Example]:
        return self.activating + (self.negatives or [])


def _window(tokens: Tensor, acts: Tensor, decode) -> Example | None:
    keep = tokens >= 0
    if int(keep.sum()) < 2:
        return None
    ids = tokens[keep].tolist()
    return Example(tokens=[decode(i) for i in ids], acts=[round(float(a), 4) for a in acts[keep]])


def feature_examples(stats: FeatureStats, feature: int, decode) -> FeatureExamples:
    """The explainer's examples (top 1st, 3rd, 5th, ... and each interval's first sample) and the scorers'
    activating ones (the other top examples and interval samples), decoded."""
    top = [
        _window(stats.top_tokens[feature, i], stats.top_window_acts[feature, i], decode)
        for i in range(stats.top_tokens.shape[1])
        if float(stats.top_act[feature, i]) > 0
    ]
    top = [e for e in top if e is not None]
    shown, held = top[0::2], top[1::2]
    for interval in range(stats.sample_tokens.shape[1]):
        samples = [
            _window(stats.sample_tokens[feature, interval, j], stats.sample_window_acts[feature, interval, j], decode)
            for j in range(stats.sample_tokens.shape[2])
            if float(stats.sample_act[feature, interval, j]) > 0
        ]
        samples = [e for e in samples if e is not None]
        shown += samples[:1]
        held += samples[1:]
    centre = stats.cfg.left
    counts: dict[int, int] = {}
    for i in range(stats.top_tokens.shape[1]):
        if float(stats.top_act[feature, i]) > 0:
            token = int(stats.top_tokens[feature, i, centre])
            counts[token] = counts.get(token, 0) + 1
    ids = [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:TOP_TOKENS] if t >= 0]
    return FeatureExamples(feature, shown, held, [decode(i) for i in ids], ids)


def _candidate_windows(stats: FeatureStats) -> Tensor:
    """[N, W] every stored top-example window that lies wholly inside its context (the pool negatives come from)."""
    windows = stats.top_tokens.flatten(0, 1)
    return windows[(windows >= 0).all(-1)]


def _quiet_stretch(fires: Tensor, shortest: int) -> tuple[int, int] | None:
    """The longest run of positions (from 1 on: position 0 of a window-as-context is the sink) where a feature
    stays silent, as (start, end), if it is at least `shortest` long."""
    best, start = None, None
    for t in range(1, len(fires) + 1):
        quiet = t < len(fires) and not bool(fires[t])
        if quiet and start is None:
            start = t
        elif not quiet and start is not None:
            if t - start >= shortest and (best is None or t - start > best[1] - best[0]):
                best = (start, t)
            start = None
    return best


@torch.no_grad()
def _window_acts(lm: LoadedModel, sae: SAE, windows: Tensor, features: list[int]) -> Tensor:
    """[N, W, F] the features' activations on each window run alone as a context (the model stops at the hook)."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    out = []
    for start in range(0, len(windows), 32):
        ids = windows[start : start + 32].long().to(lm.device)
        x = run_with_cache(lm.model, ids, [hp])[hp.name].float().to(sae.W_dec.device)
        out.append(sae.encode_raw(x)[..., features].cpu())
    return torch.cat(out) if out else torch.zeros(0, windows.shape[1], len(features))


@torch.no_grad()
def add_negatives(
    lm: LoadedModel, sae: SAE, stats: FeatureStats, items: list[FeatureExamples], per_feature: int = 16, seed: int = 0
) -> None:
    """Give each feature `per_feature` windows on which the SAE says it does not fire (run on the window alone),
    half of them holding one of its top tokens (hard) and half random; sets items[i].negatives.

    Candidates for the whole batch of features go through the model once. A dense or positional feature (one that
    fires early in any short context) may have too few wholly quiet windows; it is then given the longest quiet
    stretch of a window, at least half a window long, and the example is flagged `partial`."""
    pool = _candidate_windows(stats)
    rng = random.Random(seed)
    decode = token_decoder(lm)
    draws: list[tuple[list[int], int]] = []
    for item in items:
        hard = torch.zeros(len(pool), dtype=torch.bool)
        for token in item.top_token_ids:
            hard |= (pool == token).any(-1)
        hard_rows = hard.nonzero().flatten().tolist()
        easy_rows = (~hard).nonzero().flatten().tolist()
        draw = CANDIDATES * per_feature  # dense features fire on most windows: draw more than are kept
        n_hard = min(len(hard_rows), draw)
        draws.append((rng.sample(hard_rows, n_hard) + rng.sample(easy_rows, min(len(easy_rows), draw)), n_hard))
    union = sorted({r for rows, _ in draws for r in rows})
    where = {r: i for i, r in enumerate(union)}
    acts = _window_acts(lm, sae, pool[union], [item.feature for item in items])
    shortest = max(2, (pool.shape[1] - 1) // 2)
    for f, (item, (rows, n_hard)) in enumerate(zip(items, draws)):
        fires = acts[[where[r] for r in rows], :, f] > 0 if rows else torch.zeros(0, pool.shape[1], dtype=torch.bool)
        quiet = (~fires[:, 1:]).all(-1).tolist()
        chosen_hard = [i for i in range(n_hard) if quiet[i]][: per_feature // 2]
        chosen_easy = [i for i in range(n_hard, len(rows)) if quiet[i]][: per_feature - len(chosen_hard)]
        negatives = [_quiet_example(pool[rows[i]], 1, pool.shape[1], decode) for i in chosen_hard + chosen_easy]
        for i in range(len(rows)):
            if len(negatives) >= per_feature:
                break
            stretch = None if quiet[i] else _quiet_stretch(fires[i], shortest)
            if stretch is not None:
                negatives.append(_quiet_example(pool[rows[i]], *stretch, decode, partial=True))
        item.negatives = negatives


def _quiet_example(window: Tensor, start: int, end: int, decode, partial: bool = False) -> Example:
    ids = window[start:end].tolist()
    return Example(tokens=[decode(t) for t in ids], acts=[0.0] * len(ids), partial=partial)


def token_decoder(lm: LoadedModel):
    """Token id -> its text, each id decoded once."""
    cache: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in cache:
            cache[token] = lm.tokenizer.decode([token])
        return cache[token]

    return decode
