"""Output-side detectors: what a feature's decoder direction does to the logits along the direct path
(final norm, then unembedding). token_promoting and suppression read the shape of the direct logit
effect against random directions; entropy measures how much of the direction lies in the
unembedding's effective null space, where it can only rescale the logits (Stolfo et al. 2024).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from analysis.detectors.base import DetectorResult, Subject, zero_result
from analysis.detectors.token import text_token_stats

TOP_K = 5  # tokens averaged for the promoted / suppressed z statistics
SHOW_K = 10  # tokens listed in the evidence
N_RANDOM = 512  # random directions for the null distribution
NULL_QUANTILE = 0.99
NULL_FRACTION = 0.02  # the bottom 2% of singular directions form the effective null space
SHARED = 2  # top singular directions removed before z-scoring (they move most logits together)


def _centred(x: Tensor, centre: bool) -> Tensor:
    return x - x.mean(-1, keepdim=True) if centre else x


def _z_stats(directions: Tensor, unembed: Tensor, centre: bool, shared: Tensor, chunk: int = 256) -> dict[str, Tensor]:
    """Per direction: std of the direct logit effect, mean z of the top/bottom TOP_K tokens and the ids
    and z of the SHOW_K most promoted and suppressed tokens. The components along `shared` [d, k] (the
    unembedding's top right singular vectors, which move most logits together, by token frequency and
    for a few outlier tokens, rather than selecting tokens) are removed first."""
    out: dict[str, list[Tensor]] = {
        k: [] for k in ("mean", "std", "z_top", "z_bottom", "top_ids", "bottom_ids", "top_z", "bottom_z")
    }
    for start in range(0, len(directions), chunk):
        d = _centred(directions[start : start + chunk].float(), centre)
        d = d - (d @ shared) @ shared.T
        logits = d @ unembed.T  # [c, V]
        mean, std = logits.mean(-1, keepdim=True), logits.std(-1, keepdim=True).clamp_min(1e-12)
        z = (logits - mean) / std
        top = z.topk(SHOW_K, dim=-1)
        bottom = (-z).topk(SHOW_K, dim=-1)
        out["mean"].append(mean.squeeze(-1))
        out["std"].append(std.squeeze(-1))
        out["z_top"].append(top.values[:, :TOP_K].mean(-1))
        out["z_bottom"].append(bottom.values[:, :TOP_K].mean(-1))
        out["top_ids"].append(top.indices)
        out["bottom_ids"].append(bottom.indices)
        out["top_z"].append(top.values)
        out["bottom_z"].append(-bottom.values)
    return {k: torch.cat(v) for k, v in out.items()}


def logit_summary(subject: Subject) -> dict[str, Tensor]:
    """Direct logit-effect statistics of every feature and of random directions (cached)."""
    if "logits" in subject.cache:
        return subject.cache["logits"]
    unembed = subject.unembed.float()
    shared = _subject_spectrum(subject)[1][:, -SHARED:]
    stats = _z_stats(subject.directions, unembed, subject.centre, shared)
    gen = subject.generator(17)
    random_dirs = torch.randn(N_RANDOM, unembed.shape[1], generator=gen)
    null = _z_stats(random_dirs, unembed, subject.centre, shared)
    both = torch.cat([null["z_top"], null["z_bottom"]])
    stats["z_null"] = torch.quantile(both, NULL_QUANTILE)
    # spread of a random direction with the typical norm of the features' directions
    norm = subject.directions.float().norm(dim=-1).median()
    stats["std_null"] = null["std"].median() * norm / random_dirs.norm(dim=-1).median()
    subject.cache["logits"] = stats
    return stats


def logit_z(subject: Subject, ids: Tensor) -> Tensor:
    """[F, n] z-scores of the tokens `ids` in every feature's direct logit effect (as logit_summary
    computes them: shared directions removed, standardised over the vocabulary)."""
    s = logit_summary(subject)
    shared = _subject_spectrum(subject)[1][:, -SHARED:]
    d = _centred(subject.directions.float(), subject.centre)
    d = d - (d @ shared) @ shared.T
    logits = d @ subject.unembed.float()[ids].T
    return (logits - s["mean"][:, None]) / s["std"][:, None]


def _tokens(subject: Subject, ids: Tensor, z: Tensor) -> list[list]:
    return [[subject.tokenizer.decode([int(i)]), round(float(v), 2)] for i, v in zip(ids, z)]


def _output_detector(subject: Subject, mechanism: str, side: str) -> DetectorResult:
    """Shared body of token_promoting (side 'top') and suppression (side 'bottom')."""
    if not subject.has_output:
        return zero_result(mechanism, subject.n_features, "no decoder directions / unembedding given")
    s = logit_summary(subject)
    other = "bottom" if side == "top" else "top"
    z_null = s["z_null"]
    strength = ((s[f"z_{side}"] - torch.maximum(s[f"z_{other}"], z_null)) / z_null).clamp(0, 1)
    magnitude = ((s["std"] / s["std_null"] - 0.6) / 0.3).clamp(0, 1)  # 0 at 0.6 of a random spread, 1 from 0.9
    score = strength * magnitude
    stats = {
        f"z_{side}": s[f"z_{side}"],
        f"z_{other}": s[f"z_{other}"],
        "z_null": z_null.expand(subject.n_features),
        "magnitude": magnitude,
    }
    if side == "bottom":
        stats["own_token_percentile"] = _own_token_percentile(subject)

    def details(f: int) -> dict:
        ids, z = s[f"{side}_ids"][f], s[f"{side}_z"][f]
        key = "promoted_tokens" if side == "top" else "suppressed_tokens"
        return {key: _tokens(subject, ids, z)}

    probe = f"direct logit effect (final norm + unembedding) against {N_RANDOM} random directions"
    return DetectorResult(mechanism, score, stats, probe, details)


def _own_token_percentile(subject: Subject) -> Tensor:
    """Copy-suppression evidence: where the tokens a feature fires on (its top 3 tokens on held-out
    text) sit in its own direct logit effect, as a percentile (0 = most suppressed); 0.5 = no relation."""
    if subject.text is None:
        return torch.full((subject.n_features,), float("nan"))
    top_ids = text_token_stats(subject)["cur_top_ids"]  # [F, 3]
    out = []
    unembed = subject.unembed.float()
    for start in range(0, subject.n_features, 256):
        logits = _centred(subject.directions[start : start + 256].float(), subject.centre) @ unembed.T
        own = logits.gather(1, top_ids[start : start + 256])  # [c, 3]
        pct = (logits[:, None, :] < own[:, :, None]).float().mean(-1).mean(-1)  # [c]
        out.append(pct)
    return torch.cat(out)


def token_promoting(subject: Subject) -> DetectorResult:
    """A few tokens' logits raised far above the rest by the decoder direction."""
    return _output_detector(subject, "token_promoting", "top")


def suppression(subject: Subject) -> DetectorResult:
    """A few tokens' logits pushed far below the rest; evidence says whether it suppresses its own tokens."""
    return _output_detector(subject, "suppression", "bottom")


def spectrum(unembed: Tensor, centre: bool) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors [d, d] of W^T W for the effective unembedding W, i.e. its
    squared singular values and right singular vectors (for a LayerNorm, after removing the mean)."""
    w = unembed.double()
    d = w.shape[1]
    gram = w.T @ w
    if centre:
        p = torch.eye(d, dtype=w.dtype) - 1.0 / d
        gram = p @ gram @ p
    evals, evecs = torch.linalg.eigh(gram)
    if centre:  # the all-ones direction is removed by the norm itself: not part of either end
        ones = torch.full((d,), 1 / math.sqrt(d), dtype=w.dtype)
        keep = (evecs.T @ ones).abs() < 0.5
        evals, evecs = evals[keep], evecs[:, keep]
    return evals.float(), evecs.float()


def null_space(unembed: Tensor, centre: bool) -> Tensor:
    """[k, d] orthonormal basis of the effective null space: the bottom NULL_FRACTION right singular
    vectors of the unembedding."""
    _, evecs = spectrum(unembed, centre)
    k = max(4, round(NULL_FRACTION * unembed.shape[1]))
    return evecs[:, :k].T.contiguous()


def _subject_spectrum(subject: Subject) -> tuple[Tensor, Tensor]:
    if "spectrum" not in subject.cache:
        subject.cache["spectrum"] = spectrum(subject.unembed.float(), subject.centre)
    return subject.cache["spectrum"]


def entropy(subject: Subject) -> DetectorResult:
    """Fraction of the direction's squared norm in the unembedding's effective null space."""
    if not subject.has_output:
        return zero_result("entropy", subject.n_features, "no decoder directions / unembedding given")
    _, evecs = _subject_spectrum(subject)
    k = max(4, round(NULL_FRACTION * subject.unembed.shape[1]))
    basis = evecs[:, :k].T  # [k, d]
    dirs = _centred(subject.directions.float(), subject.centre)
    frac = ((dirs @ basis.T).pow(2).sum(-1) / dirs.pow(2).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    stats = {"null_space_fraction": frac, "random_expectation": torch.full_like(frac, basis.shape[0] / basis.shape[1])}
    scale = subject.reference() if subject.text is not None else torch.ones(subject.n_features)
    if subject.final_resid is not None:
        stats["final_norm_change"] = _norm_change(subject, scale)

    def details(f: int) -> dict:
        if subject.final_resid is None:
            return {}
        return {
            "entropy_change_nats": round(_entropy_change(subject, f, float(scale[f])), 4),
            "at_activation": round(float(scale[f]), 4),
        }

    probe = (
        f"decoder direction against the bottom {basis.shape[0]} of {basis.shape[1]} singular directions "
        "of the unembedding; final-norm change at the feature's max activation on sampled final residuals"
    )
    return DetectorResult("entropy", frac, stats, probe, details)


def _norm_change(subject: Subject, scale: Tensor) -> Tensor:
    """Mean relative change of the final norm's RMS when a_f * direction_f is added to each sampled
    final residual (a_f = the feature's max activation on held-out text)."""
    x = _centred(subject.final_resid.float(), subject.centre)  # [P, d]
    dirs = _centred(subject.directions.float(), subject.centre) * scale[:, None]  # [F, d]
    base = x.pow(2).sum(-1, keepdim=True)  # [P, 1]
    new = base + 2 * x @ dirs.T + dirs.pow(2).sum(-1)[None]  # [P, F]
    return (new.clamp_min(0) / base.clamp_min(1e-12)).sqrt().mean(0) - 1


def _entropy_change(subject: Subject, f: int, a: float) -> float:
    """Mean change of next-token entropy (nats) on the sampled final residuals when a * direction
    is added, through the final norm's rescaling and the unembedding (direct path)."""
    x = _centred(subject.final_resid.float(), subject.centre)
    u = _centred(subject.directions[f].float(), subject.centre)

    def ent(h: Tensor) -> Tensor:
        h = h / h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        logp = torch.log_softmax(h @ subject.unembed.float().T, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    return float((ent(x + a * u) - ent(x)).mean())
