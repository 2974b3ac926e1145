"""ReLU SAE with the decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates - April 2024").

f = ReLU((x - b_dec) @ W_enc + b_enc); loss = FVU + l1_coefficient * sum_i f_i ||W_dec_i|| (warmed up).
The penalty already accounts for decoder norms, so rows are left free (not renormalised), as in
Anthropic's update and SAELens's "standard" SAE, which is what this architecture exports as.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import SAE, ForwardPass, Variance, threshold_for_l0
from sae.config import SAEConfig

# Unit decoder rows, as every other architecture. Anthropic's 0.1 suits their lr 5e-5: at saelab's ~2e-3 Adam moves
# an entry of a 0.1-norm row by half its size a step, undoing the sparsity calibration within two steps (measured at
# 65k tokens, target L0 32: held-out FVU 0.778 at L0 26 with 0.1, 0.414 at L0 33 with 1.0; benchmarks/frontier.md).
DECODER_INIT_NORM = 1.0


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

    @torch.no_grad()
    def calibrate_sparsity(self, x: Tensor, l0: float) -> None:
        """b_enc = minus the pre-activation threshold that leaves l0 latents per token of x positive (the tied init
        fires about half of them), so training starts at the target sparsity instead of descending to it."""
        self.b_enc.zero_()
        self.b_enc.fill_(-threshold_for_l0(self.encode_pre(x), l0))

    def activation(self, pre: Tensor) -> Tensor:
        """ReLU of the pre-activations."""
        return pre.relu()

    def aux_losses(
        self, fp: ForwardPass, dead_mask: Tensor | None, variance: Variance | None = None
    ) -> dict[str, Tensor]:
        """{"l1": warmed-up, decoder-norm-weighted L1 of the activations}."""
        return {"l1": self.l1_penalty(fp.code.acts, fp.target, variance)}
