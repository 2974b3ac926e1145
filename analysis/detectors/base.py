"""What every detector works on (`Subject`) and what it returns (`DetectorResult`).

A Subject is anything that maps token batches to feature activations `[B, T, F]`, plus optional
output-side weights (decoder directions and the effective unembedding). An SAE on a model is one
Subject (analysis.catalogue.sae_subject); a bank of planted synthetic features is another
(analysis.detectors.planted), which is how the detectors are validated in isolation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

FIRE_FRACTION = 0.1  # a feature "fires" where its activation exceeds this fraction of its reference scale


@dataclass
class Subject:
    """The features under test: how they respond to tokens, and (optionally) what they write."""

    encode: Callable[[Tensor], Tensor]  # tokens [B, T] (long) -> activations [B, T, F] (float, >= 0)
    n_features: int
    tokenizer: Any  # builds word/script/ordinal probes and decodes evidence
    text: Tensor | None = None  # [B, T] held-out text contexts (token statistics, position 0 included)
    directions: Tensor | None = None  # [F, d] decoder directions in the model's raw residual space
    unembed: Tensor | None = None  # [V, d] effective unembedding: W_U with the final norm's gain folded in
    centre: bool = False  # the final norm is a LayerNorm: directions are mean-centred first
    final_resid: Tensor | None = None  # [P, d] sampled residuals entering the final norm (norm-scale evidence)
    batch_tokens: int = 2048  # tokens per encode() call
    seed: int = 0
    cache: dict = field(default_factory=dict)  # shared intermediate results between detectors

    # ---- activations --------------------------------------------------------------------------
    @torch.inference_mode()
    def acts(self, tokens: Tensor) -> Tensor:
        """Activations [B, T, F] on CPU, running encode() on batch_tokens tokens at a time."""
        rows = max(1, self.batch_tokens // max(tokens.shape[1], 1))
        out = [
            self.encode(tokens[start : start + rows]).float().clamp_min(0).cpu()
            for start in range(0, len(tokens), rows)
        ]
        return torch.cat(out) if out else torch.zeros(*tokens.shape, self.n_features)

    def text_acts(self) -> Tensor:
        """Activations on the held-out text [B, T, F] (computed once, shared by detectors)."""
        if "text_acts" not in self.cache:
            if self.text is None:
                raise ValueError("this detector needs held-out text (Subject.text)")
            self.cache["text_acts"] = self.acts(self.text)
        return self.cache["text_acts"]

    def reference(self, probe_acts: Tensor | None = None) -> Tensor:
        """Per-feature activation scale [F]: max on held-out text past position 0, else on the probe."""
        if "reference" not in self.cache:
            ref = torch.zeros(self.n_features)
            if self.text is not None:
                ref = self.text_acts()[:, 1:].reshape(-1, self.n_features).amax(0)
            self.cache["reference"] = ref
        ref = self.cache["reference"]
        if probe_acts is not None and len(probe_acts):
            probe_max = probe_acts.reshape(-1, self.n_features).amax(0)
            ref = torch.where(ref > 0, ref, probe_max)
        return ref

    def generator(self, salt: int) -> torch.Generator:
        """A seeded generator per probe, so every probe is reproducible on its own."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    @property
    def has_output(self) -> bool:
        return self.directions is not None and self.unembed is not None


@dataclass
class DetectorResult:
    """One detector's verdict on every feature: a score in [0, 1] and the numbers behind it."""

    mechanism: str
    score: Tensor  # [F] in [0, 1]
    stats: dict[str, Tensor]  # named per-feature numbers [F] behind the score
    probe: str  # the probe inputs used, in words
    details: Callable[[int], dict] | None = None  # extra evidence for one feature (examples, tokens)

    def evidence(self, feature: int) -> dict:
        """The statistics for one feature as plain numbers, plus any detector-specific details."""
        ev = {name: _plain(values[feature]) for name, values in self.stats.items()}
        ev["probe"] = self.probe
        if self.details is not None:
            ev.update(self.details(feature))
        return ev


def run_once(subject: Subject, name: str, detector: Callable[[Subject], DetectorResult]) -> DetectorResult:
    """Run `detector` (registered as `name`) on `subject` once, timing it; later calls return the stored result.

    Lives here so a detector can reuse another's result without importing the detector table.
    """
    key = f"result:{name}"
    if key not in subject.cache:
        started = time.perf_counter()
        subject.cache[key] = detector(subject)
        subject.cache[f"seconds:{name}"] = time.perf_counter() - started
    return subject.cache[key]


def _plain(x: Tensor) -> float | int | bool:
    v = x.item()
    return round(v, 4) if isinstance(v, float) else v


# ---- shared statistics ---------------------------------------------------------------------------


def contrast(cond: Tensor, ctrl: Tensor, ref: Tensor) -> dict[str, Tensor]:
    """Condition-vs-control statistics for all features at once; `cond` [n1, F], `ctrl` [n2, F].

    selectivity = (mean_cond - mean_ctrl) / (mean_cond + mean_ctrl), clipped at 0;
    reliability = fraction of condition positions where the feature fires (> FIRE_FRACTION * ref);
    score = sqrt(selectivity * reliability).
    """
    f = cond.shape[-1] if cond.ndim == 2 else ctrl.shape[-1]
    mean_c = cond.mean(0) if len(cond) else torch.zeros(f)
    mean_n = ctrl.mean(0) if len(ctrl) else torch.zeros(f)
    selectivity = ((mean_c - mean_n) / (mean_c + mean_n).clamp_min(1e-12)).clamp(0, 1)
    threshold = FIRE_FRACTION * ref
    fires = (cond > threshold) & (cond > 0)
    reliability = fires.float().mean(0) if len(cond) else torch.zeros(f)
    rate_ctrl = ((ctrl > threshold) & (ctrl > 0)).float().mean(0) if len(ctrl) else torch.zeros(f)
    return {
        "score": (selectivity * reliability).sqrt(),
        "selectivity": selectivity,
        "reliability": reliability,
        "mean_condition": mean_c,
        "mean_control": mean_n,
        "fire_rate_control": rate_ctrl,
    }


def masked_contrast(acts: Tensor, cond: Tensor, ctrl: Tensor, ref: Tensor) -> dict[str, Tensor]:
    """`contrast` where each feature has its own condition/control positions: acts, cond, ctrl [n, F]."""
    n_c, n_n = cond.sum(0).clamp_min(1), ctrl.sum(0).clamp_min(1)
    mean_c = (acts * cond).sum(0) / n_c
    mean_n = (acts * ctrl).sum(0) / n_n
    selectivity = ((mean_c - mean_n) / (mean_c + mean_n).clamp_min(1e-12)).clamp(0, 1)
    fires = (acts > FIRE_FRACTION * ref) & (acts > 0)
    reliability = (fires & cond).sum(0) / n_c
    measured = cond.any(0)
    return {
        "score": torch.where(measured, (selectivity * reliability).sqrt(), torch.zeros_like(mean_c)),
        "selectivity": selectivity,
        "reliability": reliability,
        "mean_condition": mean_c,
        "mean_control": mean_n,
        "fire_rate_control": (fires & ctrl).sum(0) / n_n,
    }


def zero_result(mechanism: str, n_features: int, why: str) -> DetectorResult:
    """A detector that could not run (missing inputs): everything stays unlabelled, with the reason."""
    return DetectorResult(mechanism, torch.zeros(n_features), {}, f"not run: {why}")
