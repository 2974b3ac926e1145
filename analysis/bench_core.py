"""SAEBench's "core" metrics for `sae bench`: the one evaluation pass of analysis/evaluate.py under SAEBench's
names, plus the decoder's pairwise cosine similarities.

Definitions follow SAEBench 0.6.0 (sae_bench/evals/core/main.py) except two formulas it ships with bugs that
SAELens has since fixed, where we take the fixed (intended) one: `explained_variance` (variance about the
per-dimension mean, SAELens PR #665; 0.6.0 measures it nearly about zero, which inflates it) and `mse` (mean over
tokens of ||x - x_hat||^2, SAELens PR #711; 0.6.0 also divides by the batch's token count). The other
differences are where the metrics are taken: saelab splices and ablates only the positions an SAE is trained on
(not a context's first position or special tokens) and averages every metric over those positions, where SAEBench
replaces (and zero-ablates) every position and averages over all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from activations.models import LoadedModel
from activations.sources import Document
from analysis.evaluate import EvalConfig, evaluate
from sae.base import SAE


class SAEBenchName(NamedTuple):
    """Where a saelab number sits in SAEBench's core output, and how its convention compares."""

    name: str  # the SAEBench key
    group: str  # the SAEBench eval_result_metrics group holding it
    note: str  # the definition, and any difference from SAEBench's


# saelab field (EvalResult, or computed here) -> SAEBench core name. "per token" = computed per token, then the
# mean over tokens (SAEBench's way for these); "pooled" = sums over all tokens, then one ratio.
SAEBENCH_CORE: dict[str, SAEBenchName] = {
    "kl_div_score": SAEBenchName(
        "kl_div_score", "model_behavior_preservation", "(kl_zero - kl_sae) / kl_zero, as SAEBench"
    ),
    "kl_zero": SAEBenchName(
        "kl_div_with_ablation",
        "model_behavior_preservation",
        "KL(clean || activation zeroed) per prediction; SAEBench zeroes every position, saelab the spliced ones",
    ),
    "kl_sae": SAEBenchName("kl_div_with_sae", "model_behavior_preservation", "KL(clean || SAE spliced) per prediction"),
    "ce_recovered": SAEBenchName(
        "ce_loss_score",
        "model_performance_preservation",
        "(ce_zero - ce_sae) / (ce_zero - ce_clean), as SAEBench (saelab's ce_recovered)",
    ),
    "ce_loss_zero": SAEBenchName("ce_loss_with_ablation", "model_performance_preservation", "next-token CE, zeroed"),
    "ce_loss_sae": SAEBenchName("ce_loss_with_sae", "model_performance_preservation", "next-token CE, SAE spliced"),
    "ce_loss_clean": SAEBenchName("ce_loss_without_sae", "model_performance_preservation", "next-token CE, clean"),
    "explained_variance": SAEBenchName(
        "explained_variance",
        "reconstruction_quality",
        "pooled 1 - FVU, variance about the mean (SAELens #665's fix; SAEBench 0.6.0's is about ~zero)",
    ),
    "mse": SAEBenchName(
        "mse",
        "reconstruction_quality",
        "mean over tokens of ||x - x_hat||^2 (SAELens #711's fix; SAEBench 0.6.0 divides it by tokens per batch)",
    ),
    "cossim": SAEBenchName(
        "cossim", "reconstruction_quality", "per token cos(x, x_hat); 0 where a vector is zero (SAEBench: NaN)"
    ),
    "l2_norm_in": SAEBenchName("l2_norm_in", "shrinkage", "per token ||x||"),
    "l2_norm_out": SAEBenchName("l2_norm_out", "shrinkage", "per token ||x_hat||"),
    "l2_ratio": SAEBenchName("l2_ratio", "shrinkage", "per token ||x_hat|| / ||x|| (||x|| < 1e-4 read as 1)"),
    "relative_reconstruction_bias": SAEBenchName(
        "relative_reconstruction_bias",
        "shrinkage",
        "sum ||x_hat||^2 / sum <x, x_hat> pooled over all tokens (SAEBench: per batch, then the batches' mean)",
    ),
    "l0": SAEBenchName("l0", "sparsity", "per token count of active latents"),
    "l1": SAEBenchName("l1", "sparsity", "per token sum of |latent acts| (SAEBench: signed; the same, acts >= 0)"),
    "frac_alive": SAEBenchName("frac_alive", "misc_metrics", "latents firing on some token (1 - dead_fraction)"),
    "freq_over_1_percent": SAEBenchName("freq_over_1_percent", "misc_metrics", "latents with density > 1%"),
    "freq_over_10_percent": SAEBenchName("freq_over_10_percent", "misc_metrics", "latents with density > 10%"),
    "normalized_freq_over_1_percent": SAEBenchName(
        "normalized_freq_over_1_percent", "misc_metrics", "density share of the > 1% latents"
    ),
    "normalized_freq_over_10_percent": SAEBenchName(
        "normalized_freq_over_10_percent", "misc_metrics", "density share of the > 10% latents"
    ),
    "decoder_mean_max_cos": SAEBenchName(
        "average_max_decoder_cosine_sim",
        "misc_metrics",
        "mean over latents of the largest signed cosine of its decoder row with another latent's, as SAEBench",
    ),
}

# saelab numbers with no SAEBench counterpart that `core_metrics` reports under their own names.
SAELAB_EXTRAS = ("fvu", "dead_fraction", "decoder_max_abs_cos", "decoder_mean_max_abs_cos", "tokens", "hook")


def decoder_max_cosine(W_dec: torch.Tensor, chunk: int | None = None) -> dict[str, float]:
    """Each latent's largest cosine similarity with another latent's decoder row (W_dec [d_sae, d_in]), signed and
    absolute, summarised: {"decoder_mean_max_cos", "decoder_mean_max_abs_cos", "decoder_max_abs_cos"} (the last is
    the most parallel pair's |cos|; NaN with one latent). `chunk` rows at a time (default: a [chunk, d_sae] block of
    2^24 elements), so a wide dictionary never needs a d_sae x d_sae matrix."""
    d_sae = W_dec.shape[0]
    if d_sae < 2:
        nan = float("nan")
        return {"decoder_mean_max_cos": nan, "decoder_mean_max_abs_cos": nan, "decoder_max_abs_cos": nan}
    unit = F.normalize(W_dec.detach().float(), dim=1)  # zero rows stay zero: cos 0 with everything
    chunk = chunk or max(1, 2**24 // d_sae)
    best = torch.empty(d_sae, device=unit.device)
    best_abs = torch.empty(d_sae, device=unit.device)
    with torch.no_grad():
        for lo in range(0, d_sae, chunk):
            sims = unit[lo : lo + chunk] @ unit.T  # [c, d_sae]
            own = sims[:, lo : lo + chunk].diagonal()  # each row's cosine with itself
            own.fill_(float("-inf"))
            best[lo : lo + chunk] = sims.max(dim=1).values
            own.fill_(float("inf"))
            best_abs[lo : lo + chunk] = torch.maximum(best[lo : lo + chunk], -sims.min(dim=1).values)
    return {
        "decoder_mean_max_cos": best.mean().item(),
        "decoder_mean_max_abs_cos": best_abs.mean().item(),
        "decoder_max_abs_cos": best_abs.max().item(),
    }


def kl_div_score(kl_sae: float, kl_zero: float) -> float:
    """SAEBench's kl_div_score, (kl_zero - kl_sae) / kl_zero: 1 when splicing the SAE in changes nothing, 0 when it
    is as bad as zeroing the activation (NaN when zeroing changes nothing either)."""
    return (kl_zero - kl_sae) / kl_zero if kl_zero else float("nan")


def core_metrics(
    sae: SAE, lm: LoadedModel, source: Iterable[Document], cfg: EvalConfig = EvalConfig()
) -> dict[str, float | int | str]:
    """SAEBench's core metrics of `sae` on `cfg.tokens` held-out tokens of `source` in one evaluation pass, keyed by
    their SAEBench names (SAEBENCH_CORE), plus saelab's SAELAB_EXTRAS; JSON-ready."""
    result = evaluate(sae, lm, source, cfg).to_dict()
    result["kl_div_score"] = kl_div_score(result["kl_sae"], result["kl_zero"])
    result.update(decoder_max_cosine(sae.W_dec))
    out: dict[str, float | int | str] = {entry.name: result[field] for field, entry in SAEBENCH_CORE.items()}
    out.update({field: result[field] for field in SAELAB_EXTRAS})
    return out
