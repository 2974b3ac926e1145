"""ReLU SAE with the decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates - April 2024").

f = ReLU((x - b_dec) @ W_enc + b_enc); loss = FVU + l1_coefficient * sum_i f_i ||W_dec_i|| (warmed up).
The penalty already accounts for decoder norms, so rows are left free (not renormalised), as in
Anthropic's update and SAELens's "standard" SAE, which is what this architecture exports as.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import SAE, ForwardPass, Variance
from sae.config import SAEConfig

DECODER_INIT_NORM = 0.1  # Anthropic: random decoder directions of a small fixed norm, W_enc = W_dec^T


class ReLUSAE(SAE):
    """Dense ReLU activations; sparsity comes only from the L1 penalty."""

    architecture = "relu"

    unit_norm_decoder = False

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """The shared tied init with decoder rows (and so encoder columns) scaled to DECODER_INIT_NORM."""
        super().__init__(cfg, device=device)
        with torch.no_grad():
            self.W_dec.mul_(DECODER_INIT_NORM)
            self.W_enc.mul_(DECODER_INIT_NORM)

    def activation(self, pre: Tensor) -> Tensor:
        """ReLU of the pre-activations."""
        return pre.relu()

    def aux_losses(
        self, fp: ForwardPass, dead_mask: Tensor | None, variance: Variance | None = None
    ) -> dict[str, Tensor]:
        """{"l1": warmed-up, decoder-norm-weighted L1 of the activations}."""
        return {"l1": self.l1_penalty(fp.code.acts, fp.target, variance)}
