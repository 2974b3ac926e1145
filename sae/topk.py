"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), with the AuxK loss.

Each token keeps its k largest (ReLU'd) pre-activations; training decodes them sparsely and
AuxK makes dead latents predict the residual so they come back to life.
"""

from __future__ import annotations

import torch
from torch import Tensor

from activations.errors import UserError
from sae.base import SAE, Code, fvu
from sae.config import SAEConfig
from sae.kernels import sparse_decode
from sae.registry import register


@register("topk")
class TopKSAE(SAE):
    """SAE whose activation keeps the top-k ReLU'd pre-activations per token."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """Check k and aux_k against d_sae, then the shared tied init."""
        if not 1 <= cfg.k <= cfg.d_sae:
            raise UserError(f"TopK SAE needs 1 <= k <= d_sae ({cfg.d_sae}), got k={cfg.k}; set k in the config")
        if cfg.aux_k is not None and cfg.aux_k < 1:
            raise UserError(f"aux_k must be >= 1 (or null for d_in // 2), got {cfg.aux_k}")
        super().__init__(cfg, device=device)

    @property
    def aux_k(self) -> int:
        """How many dead latents AuxK uses per token (cfg.aux_k, default d_in // 2)."""
        return self.cfg.aux_k if self.cfg.aux_k is not None else max(self.cfg.d_in // 2, 1)

    def activation(self, pre: Tensor) -> Tensor:
        """Dense [..., d_sae]: the k largest pre-activations clamped at 0, zero elsewhere."""
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def train_code(self, pre: Tensor) -> Code:
        """Sparse code (top-k indices, ReLU'd values), decoded without a dense [B, d_sae] tensor."""
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return Code(acts=top.values.relu(), idx=top.indices)

    def aux_losses(
        self, x: Tensor, target: Tensor, x_hat: Tensor, pre: Tensor, code: Code, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        """{"auxk": aux_k_coef * scale * FVU of the residual predicted by the top dead latents}.

        scale = min(n_dead / aux_k, 1) as in sparsify; 0 when no latent is dead (or no mask).
        Costs one device sync (counting dead latents) so the common all-alive case does no work.
        """
        zero = pre.new_zeros((), dtype=torch.float32)
        if dead_mask is None:
            return {"auxk": zero}
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return {"auxk": zero}
        k_aux = min(self.aux_k, n_dead)
        dead_pre = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
        top = dead_pre.topk(k_aux, dim=-1, sorted=False)
        e = target - x_hat.detach()
        e_hat = sparse_decode(top.indices, top.values.relu(), self.W_dec)
        scale = min(n_dead / self.aux_k, 1.0)
        auxk = self.cfg.aux_k_coef * scale * fvu(e, e_hat)
        return {"auxk": torch.nan_to_num(auxk, nan=0.0, posinf=0.0, neginf=0.0)}
