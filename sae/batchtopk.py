"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * B largest ReLU'd pre-activations over the whole batch (k per token on average,
more for hard tokens); a global threshold, a running average of the smallest kept activation,
replaces the batch dependence at inference: encode is then per token, f = ReLU(z) * 1[z > threshold].
The threshold is saved per latent as `threshold` [d_sae], so the file is a SAELens jumprelu SAE.

The smallest kept activation falls steadily while the SAE trains (1.82 to 1.20 over a 32-step run of the default
hook, 1.8 to 0.75 over 256 steps; benchmarks/frontier.md) and one batch pins it within ~1 %, so the average must
forget the untrained start: a plain EMA at rate 0.01 lagged ~100 steps behind, held-out L0 7 and 21 for k = 32.
Polynomial-decay averaging (rate (c + 1) / (n + c + 1) at batch n, Shamir & Zhang 2013) always weighs about
the last 1/(c + 1) of the batches seen, at every run length; topk_threshold_lr is its floor for long runs.

Selecting over the batch from the first step slows the dictionary's forming: on a planted dictionary (scripts/
bench_synthetic.py, 0.5M samples) BatchTopK found 181 of 512 true features where TopK found 469. Per-token TopK over
the first batch_topk_warmup_fraction of the steps, then the batch's selection, finds 416 (0.3) to 457 (0.5), but on
real activations it costs held-out FVU at equal L0 (0.195 -> 0.207 at 262k tokens, benchmarks/frontier.md), so it is
off by default. The threshold tracks the batch's value throughout, so inference is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from activations.errors import UserError
from sae.base import Code
from sae.config import SAEConfig
from sae.topk import TopKSAE

# c of the threshold's polynomial-decay average: it weighs about the last 1/(c + 1) of the batches seen so far.
# Measured on the default hook (k 32, batch 1024): c = 30 gives held-out L0 32.9 after 32 steps and 31.9 after 256,
# where c = 3 gives 29.0 and 28.4 (a batch's own value varies by only ~1 % late in a run, so a short window is safe).
THRESHOLD_AVERAGE_C = 30


class BatchTopKSAE(TopKSAE):
    """TopK over the batch while training, a learned global threshold at inference; AuxK as TopK."""

    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """TopK's checks and init, plus the `threshold` buffer (0 until the first training batch)."""
        if not 0 < cfg.topk_threshold_lr <= 1:
            raise UserError(f"topk_threshold_lr must be in (0, 1], got {cfg.topk_threshold_lr}; set it in the config")
        super().__init__(cfg, device=device)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, device=device, dtype=cfg.torch_dtype))
        # batches averaged into the threshold: one a training step, so a resumed run gets it back from the trainer
        self.threshold_batches = 0

    def activation(self, pre: Tensor) -> Tensor:
        """Inference, per token: ReLU(z) where z exceeds the learned threshold, else 0."""
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def train_code(self, pre: Tensor) -> Code:
        """Dense code keeping the k * B largest ReLU'd pre-activations of the batch (per token the k largest, as
        TopK, over the first batch_topk_warmup_fraction of training); updates the threshold from the batch's."""
        acts = pre.relu()
        flat = acts.flatten()
        top = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()), sorted=False)
        batch = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        self.update_threshold(batch)
        if self.progress < self.cfg.batch_topk_warmup_fraction:
            per_token = acts.topk(min(self.cfg.k, acts.shape[-1]), dim=-1, sorted=False)
            return Code(torch.zeros_like(acts).scatter(-1, per_token.indices, per_token.values))
        return Code(batch)

    def resume_at(self, step: int) -> None:
        """The threshold has averaged one batch per step so far; later batches keep their weights on resume."""
        self.threshold_batches = step

    def threshold_rate(self) -> float:
        """The weight of the next batch in the threshold: (c + 1) / (n + c + 1) after n batches (1 for the
        first), never below topk_threshold_lr."""
        c = THRESHOLD_AVERAGE_C
        return max(self.cfg.topk_threshold_lr, (c + 1) / (self.threshold_batches + c + 1))

    @torch.no_grad()
    def update_threshold(self, acts: Tensor) -> None:
        """threshold <- (1 - rate) * threshold + rate * (the batch's smallest positive kept activation), rate
        from threshold_rate(). Stays on the device (no sync); a batch with nothing positive leaves it as it is."""
        smallest = acts.detach().float().masked_fill(acts <= 0, float("inf")).amin()
        current = self.threshold.float()
        rate = self.threshold_rate()
        self.threshold_batches += 1
        updated = (1 - rate) * current + rate * smallest
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, current))
