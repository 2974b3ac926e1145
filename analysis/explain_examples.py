"""The examples `sae explain` shows and scores, from `sae inspect`'s statistics: the explainer sees half the top
examples and one sample per activation interval; the scorers get the rest (activating, from across the range) plus
non-activating windows the SAE is run on, half of them hard (holding the feature's own top tokens)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from activations.models import LoadedModel
from analysis.explain_scoring import Example
from analysis.feature_stats import FeatureStats
from analysis.splice import spliced
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


@torch.no_grad()
def add_negatives(
    lm: LoadedModel, sae: SAE, stats: FeatureStats, items: list[FeatureExamples], per_feature: int = 16, seed: int = 0
) -> None:
    """Give each feature `per_feature` windows on which the SAE says it does not fire (run on the window alone),
    half of them holding one of its top tokens (hard) and half random; sets items[i].negatives."""
    pool = _candidate_windows(stats)
    rng = random.Random(seed)
    hook = getattr(sae.cfg, "hook_name_out", "") or sae.cfg.hook_name
    decode = token_decoder(lm)
    for item in items:
        hard = torch.zeros(len(pool), dtype=torch.bool)
        for token in item.top_token_ids:
            hard |= (pool == token).any(-1)
        hard_rows = hard.nonzero().flatten().tolist()
        easy_rows = (~hard).nonzero().flatten().tolist()
        draw = CANDIDATES * per_feature  # dense features fire on most windows: draw more than are kept
        n_hard = min(len(hard_rows), draw)
        rows = rng.sample(hard_rows, n_hard) + rng.sample(easy_rows, min(len(easy_rows), draw))
        if not rows:
            item.negatives = []
            continue
        batch = pool[rows].long()
        acts = []
        for start in range(0, len(batch), 32):
            with spliced(lm, [sae]) as nodes:
                lm.model(input_ids=batch[start : start + 32].to(lm.device), use_cache=False)
                acts.append(nodes.features[hook][..., item.feature].float().cpu())
        act = torch.cat(acts)
        act[:, 0] = 0  # the first position of a window-as-context is no example position (the sink)
        quiet = (act.amax(-1) <= 0).tolist()
        chosen_hard = [i for i in range(n_hard) if quiet[i]][: per_feature // 2]
        chosen_easy = [i for i in range(n_hard, len(rows)) if quiet[i]][: per_feature - len(chosen_hard)]
        item.negatives = [
            Example(tokens=[decode(t) for t in batch[i, 1:].tolist()], acts=[0.0] * (batch.shape[1] - 1))
            for i in chosen_hard + chosen_easy
        ]


def token_decoder(lm: LoadedModel):
    """Token id -> its text, each id decoded once."""
    cache: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in cache:
            cache[token] = lm.tokenizer.decode([token])
        return cache[token]

    return decode
