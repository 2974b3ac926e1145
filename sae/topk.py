"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), with the AuxK loss.

Each token keeps its k largest (ReLU'd) pre-activations; training decodes them sparsely and
AuxK makes dead latents predict the residual so they come back to life.
"""

from __future__ import annotations

import torch
from torch import Tensor

from activations.errors import UserError
from sae.base import SAE, Code, TrainOutput, fvu
from sae.config import SAEConfig
from sae.kernels import encoder_backward_mode, encoder_values, fired_latents, sparse_decode, topk_select
from sae.registry import register


@register("topk")
class TopKSAE(SAE):
    """SAE whose activation keeps the top-k ReLU'd pre-activations per token."""

    # Train through the sparse fast path (see training_forward); False forces SAE.training_forward.
    fast_path: bool = True

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

    # ---- the sparse training fast path ---------------------------------------------------------

    def uses_fast_path(self) -> bool:
        """True when training_forward takes the sparse path: fast_path is set and this class keeps
        TopK's encoder, code, decoder and loss terms (a subclass that changes any of them does not)."""
        cls = type(self)
        return (self.fast_path and cls.encode_pre is SAE.encode_pre and cls.train_code is TopKSAE.train_code
                and cls.decode_code is SAE.decode_code and cls.aux_losses is TopKSAE.aux_losses)

    def training_forward(
        self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None
    ) -> TrainOutput:
        """SAE.training_forward's loss, gradients and outputs, computed sparsely when uses_fast_path():
        the encoder matmul runs without autograd, top-k picks latents (sae.kernels.topk_select), and
        only the chosen latents get gradient (sae.kernels.encoder_values), so no [B, d_sae] tensor is
        kept for the backward pass; AuxK works the same way on the dead latents."""
        if not self.uses_fast_path():
            return super().training_forward(x, dead_mask, target)
        if x.ndim != 2 or x.shape[0] < 2:
            raise UserError(
                f"training_forward needs a [batch, d_in] tensor with batch >= 2, got shape {tuple(x.shape)}; "
                "flatten tokens into the batch dimension and use a larger batch size"
            )
        x = self._check_input(x)
        target = x if target is None else target.to(self.dtype)
        mode = encoder_backward_mode(x.device, self.cfg.d_sae, self.cfg.k)
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)  # bf16 under autocast
        _, idx = topk_select(pre, self.cfg.k)
        acts = encoder_values(pre, idx, x, self.W_enc, self.b_enc, self.b_dec, mode).relu()
        x_hat = sparse_decode(idx, acts, self.W_dec) + self.b_dec
        terms = {"fvu": fvu(target, x_hat), "auxk": self._sparse_auxk(x, target, x_hat, pre, dead_mask, mode)}
        return TrainOutput(
            x_hat=x_hat,
            loss=sum(terms.values()),
            losses={name: value.detach() for name, value in terms.items()},
            fired=fired_latents(idx, acts, self.cfg.d_sae),
            l0=(acts != 0).sum(dim=-1).float().mean().detach(),
        )

    @torch.compiler.disable  # counts the dead latents on the host: runs eagerly inside a compiled step
    def _sparse_auxk(self, x: Tensor, target: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None,
                     mode: str) -> Tensor:
        """aux_losses' AuxK term from the gradient-free `pre`: the top dead latents are chosen among the
        dead columns only (gathered when they are few), and get gradient through encoder_values."""
        zero = pre.new_zeros((), dtype=torch.float32)
        if dead_mask is None:
            return zero
        dead_mask = dead_mask.to(pre.device)
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return zero
        k_aux = min(self.aux_k, n_dead)
        if 4 * n_dead <= self.cfg.d_sae:
            dead = dead_mask.nonzero().squeeze(1)
            _, local = topk_select(pre.index_select(1, dead), k_aux)
            idx = dead[local]
        else:
            _, idx = topk_select(pre.masked_fill(~dead_mask, float("-inf")), k_aux)
        acts = encoder_values(pre, idx, x, self.W_enc, self.b_enc, self.b_dec, mode).relu()
        e_hat = sparse_decode(idx, acts, self.W_dec)
        scale = min(n_dead / self.aux_k, 1.0)
        auxk = self.cfg.aux_k_coef * scale * fvu(target - x_hat.detach(), e_hat)
        return torch.nan_to_num(auxk, nan=0.0, posinf=0.0, neginf=0.0)
