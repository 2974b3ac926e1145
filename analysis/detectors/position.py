"""Position detectors: positional features (activation explained by absolute position 1..T-1) and
attention-sink / massive-activation features (firing on position 0, the first token or BOS)."""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.detectors import probes
from analysis.detectors.base import DetectorResult, Subject, contrast, masked_contrast

SWEEP_ROWS = 8
SWEEP_LENGTH = 128


def log_bins(length: int) -> Tensor:
    """Bin index of positions 1..length-1: single positions up to 4, then bins doubling every two steps."""
    edges, e, step = [1, 2, 3, 4, 5], 5, 2
    while e < length:
        for _ in range(2):
            e += step
            edges.append(e)
        step *= 2
    edges = torch.tensor([x for x in edges if x < length] + [length])
    return torch.bucketize(torch.arange(1, length), edges, right=True) - 1


def eta_squared(acts: Tensor) -> tuple[Tensor, Tensor]:
    """Fraction of variance [F] explained by position bin for acts [B, T, F] (positions 1..T-1), and
    the per-bin mean activation [n_bins, F]."""
    b, t, f = acts.shape
    bins = log_bins(t)
    a = acts[:, 1:].reshape(b, t - 1, f)
    n_bins = int(bins.max()) + 1
    sums = torch.zeros(n_bins, f).index_add_(0, bins, a.sum(0))
    counts = torch.bincount(bins, minlength=n_bins).float()[:, None] * b
    means = sums / counts
    grand = a.mean((0, 1))
    between = (counts * (means - grand).pow(2)).sum(0)
    total = (a - grand).pow(2).sum((0, 1))
    return (between / total.clamp_min(1e-12)).clamp(0, 1), means


def peak_contrast(acts: Tensor, peak: Tensor, ref: Tensor) -> dict[str, Tensor]:
    """Contrast of each feature's peak position bin (`peak` [F]) against its other positions 1..T-1."""
    b, t, f = acts.shape
    bins = log_bins(t)
    a = acts[:, 1:].reshape(-1, f)  # [B * (T-1), F]
    in_peak = bins[None, :].expand(b, -1).reshape(-1)[:, None] == peak[None, :]  # [B * (T-1), F]
    return masked_contrast(a, in_peak, ~in_peak, ref)


def _sweep(subject: Subject) -> Tensor:
    """Activations on random-token sequences [B, T, F] (shared by both detectors)."""
    if "sweep" not in subject.cache:
        length = subject.text.shape[1] if subject.text is not None else SWEEP_LENGTH
        tokens = probes.position_sweep(probes.token_pool(subject), SWEEP_ROWS, length, subject.generator(5))
        subject.cache["sweep"] = subject.acts(tokens)
    return subject.cache["sweep"]


def positional(subject: Subject) -> DetectorResult:
    """Activation explained by absolute position (past the first), on text and on random tokens:
    max(eta squared, contrast of the peak position bin), each the smaller over the two sources."""
    sources = [_sweep(subject)] + ([subject.text_acts()] if subject.text is not None else [])
    etas, profiles = zip(*(eta_squared(a) for a in sources))
    eta = torch.stack(etas).amin(0)
    peak = torch.stack(profiles).mean(0).argmax(0)  # [F] bin with the highest mean
    peaks = [peak_contrast(a, peak, subject.reference(a[:, 1:])) for a in sources]
    peak_score = torch.stack([p["score"] for p in peaks]).amin(0)
    score = torch.maximum(eta, peak_score)
    means = profiles[-1]
    stats = {
        "eta2": eta,
        "peak_score": peak_score,
        "peak_reliability": torch.stack([p["reliability"] for p in peaks]).amin(0),
    }
    length = sources[0].shape[1]
    bins = log_bins(length)
    ranges = [
        (int((bins == i).nonzero()[0]) + 1, int((bins == i).nonzero()[-1]) + 1) for i in range(int(bins.max()) + 1)
    ]

    def details(f: int) -> dict:
        return {
            "mean_by_position": [
                [f"{lo}-{hi}" if hi > lo else str(lo), round(float(m), 3)] for (lo, hi), m in zip(ranges, means[:, f])
            ],
            "peak_positions": "{}-{}".format(*ranges[int(peak[f])]),
        }

    probe = (
        f"{SWEEP_ROWS} random-token sequences of {length} tokens"
        + (f" and {len(subject.text)} held-out text contexts" if subject.text is not None else "")
        + f"; positions 1..{length - 1} in {len(ranges)} log-spaced bins"
    )
    return DetectorResult("positional", score, stats, probe, details)


def attention_sink(subject: Subject) -> DetectorResult:
    """Fires on position 0 whatever the token is: text contexts, random tokens, and BOS-first rows."""
    parts = [_sweep(subject)]
    described = [f"{SWEEP_ROWS} random-token sequences"]
    bos = getattr(subject.tokenizer, "bos_token_id", None)
    if bos is not None:
        tokens = probes.position_sweep(probes.token_pool(subject), SWEEP_ROWS, 32, subject.generator(7))
        tokens[:, 0] = bos
        parts.append(subject.acts(tokens))
        described.append(f"{SWEEP_ROWS} BOS-first sequences")
    if subject.text is not None:
        parts.append(subject.text_acts())
        described.append(f"{len(subject.text)} held-out text contexts")
    first = torch.cat([p[:, 0] for p in parts])
    rest = torch.cat([p[:, 1:].reshape(-1, subject.n_features) for p in parts])
    c = contrast(first, rest, subject.reference(rest))
    massive = first.mean(0) / rest.amax(0).clamp_min(1e-12)
    stats = {k: c[k] for k in ("selectivity", "reliability", "mean_condition", "mean_control")}
    stats["first_vs_max_elsewhere"] = massive.clamp(max=1e6)
    return DetectorResult(
        "attention_sink", c["score"], stats, "position 0 against positions 1.. of " + ", ".join(described)
    )
