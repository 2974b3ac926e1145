"""Transcoder: a TopK dictionary that reads one hook point and reconstructs another (e.g. MLP in -> out).

f = TopK(x_in @ W_enc + b_enc), y_hat = f @ W_dec + b_dec with W_enc [d_in, d_sae], W_dec [d_sae, d_out],
b_dec [d_out]. The input is not centred by b_dec (it lives in the output space) and has no input bias of
its own, as in SAELens's transcoder. The trainer passes the output activations as training_forward's target.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from activations.errors import UserError
from sae.base import TrainOutput, Variance
from sae.config import SAEConfig
from sae.topk import TopKSAE


def _unit_rows(rows: int, cols: int, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
    """A random [rows, cols] matrix whose rows have unit norm."""
    w = torch.randn(rows, cols, device=device, dtype=torch.float32)
    return (w / w.norm(dim=1, keepdim=True)).to(dtype)


class TranscoderSAE(TopKSAE):
    """TopK transcoder from d_in to d_out = cfg.d_out (default d_in); AuxK as TopK, on the output."""

    architecture = "transcoder"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """Independent random init: unit-norm decoder rows in the output space, unit-norm encoder columns."""
        if cfg.d_out is not None and (isinstance(cfg.d_out, bool) or not isinstance(cfg.d_out, int) or cfg.d_out <= 0):
            raise UserError(f"transcoder d_out must be a positive integer (or null for d_in), got {cfg.d_out!r}")
        super().__init__(cfg, device=device)
        dtype = cfg.torch_dtype
        self.W_enc = nn.Parameter(_unit_rows(cfg.d_sae, cfg.d_in, device, dtype).T.contiguous())
        self.W_dec = nn.Parameter(_unit_rows(cfg.d_sae, self.d_out, device, dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, device=device, dtype=dtype))

    @property
    def d_out(self) -> int:
        """Width of the reconstructed (output) activations."""
        return self.cfg.d_out or self.cfg.d_in

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations x @ W_enc + b_enc (no b_dec centring: b_dec is in the output space)."""
        return self._check_input(x) @ self.W_enc + self.b_enc

    def reconstruct_raw(self, x_raw: Tensor) -> Tensor:
        """Predicted raw output activations for raw input activations (each side's own scale)."""
        return self.forward(x_raw * self.cfg.norm_scale) / self.cfg.norm_scale_out

    def training_forward(
        self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None, variance: Variance | None = None
    ) -> TrainOutput:
        """As SAE.training_forward, but target (the output activations [B, d_out]) is required."""
        if target is None or target.shape != (x.shape[0], self.d_out):
            got = "none" if target is None else f"shape {tuple(target.shape)}"
            raise UserError(
                f"a transcoder trains on (input, target) pairs: target must be [batch, d_out={self.d_out}] "
                f"activations at hook_name_out, got {got}; give the output hook (--hook-out) and matching d_out"
            )
        return super().training_forward(x, dead_mask, target, variance)
