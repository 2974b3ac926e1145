"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

f_i = z_i * 1[z_i > theta_i] with a learned per-latent threshold theta, trained with an L0 penalty.
The step function has no useful gradient, so theta gets the paper's pseudo-derivatives (straight-
through estimators with a rectangle kernel of width jumprelu_bandwidth) from both the reconstruction
and the L0 term. theta is a plain parameter (saved as `threshold`, the SAELens name), not log(theta):
under Adam a log parameter moves theta by only ~theta * lr per step (SAELens issue #494).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from activations.errors import UserError
from sae.base import SAE, Code, ForwardPass, Variance, denominator, penalty, threshold_for_l0
from sae.config import SAEConfig


def _window(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((z - theta) / eps) / eps: 1/eps where |z - theta| < eps/2, else 0."""
    return ((z - threshold).abs() < bandwidth / 2).to(z.dtype) / bandwidth


def _save(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Save what the straight-through backward needs; returns relu(theta) in z's dtype (forward only)."""
    ctx.theta_dtype = threshold.dtype
    threshold = threshold.relu().to(z.dtype)
    ctx.save_for_backward(z, threshold)
    ctx.bandwidth = bandwidth
    return threshold


class JumpReLU(torch.autograd.Function):
    """z * 1[z > relu(theta)]; dz = 1[z > theta], dtheta = -(theta / eps) K((z - theta) / eps).

    theta is clamped at 0 in the forward pass only (straight through), so a threshold pushed below 0
    still gets the L0 gradient that pulls it back.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        threshold = _save(ctx, z, threshold, bandwidth)
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        dz = grad * (z > threshold).to(grad.dtype)
        dtheta = -(threshold * _window(z, threshold, ctx.bandwidth) * grad).reshape(-1, z.shape[-1]).sum(0)
        return dz, dtheta.to(ctx.theta_dtype), None


class Step(torch.autograd.Function):
    """1[z > relu(theta)] (counts active latents); dtheta = -(1 / eps) K((z - theta) / eps), no gradient to z."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        threshold = _save(ctx, z, threshold, bandwidth)
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        z, threshold = ctx.saved_tensors
        dtheta = -(_window(z, threshold, ctx.bandwidth) * grad).reshape(-1, z.shape[-1]).sum(0)
        return None, dtheta.to(ctx.theta_dtype), None


class JumpReLUSAE(SAE):
    """JumpReLU SAE with per-latent `threshold` [d_sae], L0 penalty and optional pre-activation loss."""

    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """The shared tied init plus every threshold at jumprelu_init_threshold."""
        if not cfg.jumprelu_bandwidth > 0:
            raise UserError(f"jumprelu_bandwidth must be > 0, got {cfg.jumprelu_bandwidth}; set it in the config")
        super().__init__(cfg, device=device)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold), device=device, dtype=cfg.torch_dtype)
        )

    @torch.no_grad()
    def calibrate_sparsity(self, x: Tensor, l0: float) -> None:
        """Every threshold at the pre-activation value that l0 latents per token of x exceed."""
        self.threshold.fill_(threshold_for_l0(self.encode_pre(x), l0).clamp_min(0))

    def lr_scales(self) -> dict[str, float]:
        """The decoder's, and jumprelu_threshold_lr_scale for the thresholds all along: under Adam a parameter moves by
        about lr a step, and a threshold must travel a distance on the scale of the pre-activations."""
        return {**super().lr_scales(), "threshold": self.cfg.jumprelu_threshold_lr_scale}

    def activation(self, pre: Tensor) -> Tensor:
        """Inference: ReLU(z) where z exceeds the (non-negative) threshold, else 0 (as SAELens's jumprelu)."""
        return pre.relu() * (pre > self.threshold.relu()).to(pre.dtype)

    def train_code(self, pre: Tensor) -> Code:
        """Same values as activation, with the straight-through gradient to the threshold."""
        return Code(JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth))

    def aux_losses(
        self, fp: ForwardPass, dead_mask: Tensor | None, variance: Variance | None = None
    ) -> dict[str, Tensor]:
        """{"l0_penalty": warmed-up l0_coefficient * L0 (STE); not "l0", the logged L0 itself} plus, when
        pre_act_loss_coefficient > 0,
        {"pre_act": Anthropic's sum over dead latents of ReLU(theta - z) * ||W_dec_i||}."""
        l0 = Step.apply(fp.pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(dim=-1)
        terms = {
            "l0_penalty": self.warmed_up(self.cfg.l0_coefficient)
            * penalty(l0, fp.target, denominator(fp.target, variance))
        }
        if self.cfg.pre_act_loss_coefficient > 0:
            dead = fp.pre.new_zeros(self.cfg.d_sae) if dead_mask is None else dead_mask.to(fp.pre.device, fp.pre.dtype)
            below = (self.threshold.relu() - fp.pre).relu() * dead * self.W_dec.norm(dim=1)
            pre_act = penalty(below.sum(dim=-1), fp.target, denominator(fp.target, variance))
            terms["pre_act"] = self.cfg.pre_act_loss_coefficient * pre_act
        return terms
