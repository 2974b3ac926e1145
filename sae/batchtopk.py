"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * B largest ReLU'd pre-activations over the whole batch (k per token on average,
more for hard tokens); a global threshold, the running mean (EMA) of the smallest kept activation,
replaces the batch dependence at inference: encode is then per token, f = ReLU(z) * 1[z > threshold].
The threshold is saved per latent as `threshold` [d_sae], so the file is a SAELens jumprelu SAE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from activations.errors import UserError
from sae.base import Code
from sae.config import SAEConfig
from sae.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """TopK over the batch while training, a learned global threshold at inference; AuxK as TopK."""

    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """TopK's checks and init, plus the `threshold` buffer (0 until the first training batch)."""
        if not 0 < cfg.topk_threshold_lr <= 1:
            raise UserError(f"topk_threshold_lr must be in (0, 1], got {cfg.topk_threshold_lr}; set it in the config")
        super().__init__(cfg, device=device)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, device=device, dtype=cfg.torch_dtype))

    def activation(self, pre: Tensor) -> Tensor:
        """Inference, per token: ReLU(z) where z exceeds the learned threshold, else 0."""
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def train_code(self, pre: Tensor) -> Code:
        """Dense code keeping the k * B largest ReLU'd pre-activations of the batch; updates the threshold."""
        acts = pre.relu()
        flat = acts.flatten()
        top = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()), sorted=False)
        acts = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        self.update_threshold(acts)
        return Code(acts)

    @torch.no_grad()
    def update_threshold(self, acts: Tensor) -> None:
        """threshold <- EMA (rate topk_threshold_lr) of the smallest positive kept activation; the first
        batch sets it directly. Stays on the device (no sync); a batch with nothing positive is skipped."""
        smallest = acts.detach().float().masked_fill(acts <= 0, float("inf")).amin()
        current = self.threshold.float()
        lr = self.cfg.topk_threshold_lr
        updated = torch.where(current == 0, smallest, (1 - lr) * current + lr * smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, current))
