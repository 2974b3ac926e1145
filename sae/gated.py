"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

A gate path decides which latents fire, a magnitude path how strongly; they share the encoder,
W_mag = W_enc * exp(r_mag):  f = 1[(x - b_dec) W_enc + b_gate > 0] * ReLU((x - b_dec) W_mag + b_mag).
The L1 penalty acts on ReLU(gate pre-activations) (weighted by decoder norms), and an auxiliary
reconstruction from those gate activations through a frozen decoder trains the gate path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae.base import SAE, ForwardPass, Variance, denominator, fvu, threshold_for_l0
from sae.config import SAEConfig


class GatedSAE(SAE):
    """Gated SAE with SAELens parameter names: W_enc, W_dec, b_gate, b_mag, r_mag, b_dec (no b_enc)."""

    architecture = "gated"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """The shared tied init; b_enc is replaced by the gate and magnitude biases, r_mag starts at 0."""
        super().__init__(cfg, device=device)
        del self.b_enc
        for name in ("b_gate", "b_mag", "r_mag"):
            setattr(self, name, nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=cfg.torch_dtype)))

    def encode_pre(self, x: Tensor) -> Tensor:
        """The projection both paths share, (x - b_dec) @ W_enc, [..., d_sae] (biases added per path)."""
        return (self._check_input(x) - self.b_dec) @ self.W_enc

    @torch.no_grad()
    def calibrate_sparsity(self, x: Tensor, l0: float) -> None:
        """b_gate = minus the threshold that opens l0 gates per token of x (the magnitude path is left as it is)."""
        self.b_gate.fill_(-threshold_for_l0(self.encode_pre(x), l0))

    def activation(self, pre: Tensor) -> Tensor:
        """Magnitude ReLU((x - b_dec) W_mag + b_mag) where the gate pre-activation is positive, else 0."""
        magnitude = (pre * self.r_mag.exp() + self.b_mag).relu()
        return magnitude * (pre + self.b_gate > 0).to(magnitude.dtype)

    def aux_losses(
        self, fp: ForwardPass, dead_mask: Tensor | None, variance: Variance | None = None
    ) -> dict[str, Tensor]:
        """{"l1": L1 of ReLU(gate pre-acts), "aux": FVU of their reconstruction with W_dec, b_dec frozen}."""
        gate = (fp.pre + self.b_gate).relu()
        x_hat_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        return {
            "l1": self.l1_penalty(gate, fp.target, variance),
            "aux": fvu(fp.target, x_hat_gate, denominator(fp.target, variance)),
        }
