"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), with the AuxK loss.

Each token keeps its k largest (ReLU'd) pre-activations; training decodes them sparsely and
AuxK makes dead latents predict the residual so they come back to life.

The encoder starts as the decoder's transpose scaled by ENCODER_INIT_SCALE: with unit-norm rows the kept
activations start about 2.4 times above where a 256-step run ends (the smallest kept one falls from 1.8 to 0.75
on the default hook), and Adam spends much of a short run shrinking them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from activations.errors import UserError
from sae.base import SAE, Code, ForwardPass, TrainOutput, Variance, denominator, fvu
from sae.config import SAEConfig
from sae.kernels import (
    encoder_backward_mode,
    encoder_values,
    fired_latents,
    sparse_decode,
    topk_select,
)

# W_enc = ENCODER_INIT_SCALE * W_dec^T at init (1/sqrt(3): the norm of nn.Linear's default rows, as in sparsify).
# Held-out FVU on the default hook at 65k tokens, k 32 (benchmarks/frontier.md): scale 1 0.318, 0.70 0.293,
# 0.58 0.289, 0.45 0.287, 0.3 0.290, 0.1 0.304; dead latents 0 %, 0.1 %, 0.3 %, 1.3 %, 4.4 %, 7.2 %. The
# optimum is flat from 0.45 to 0.58; the larger end keeps the fewest dead latents.
ENCODER_INIT_SCALE = 3**-0.5


class TopKSAE(SAE):
    """SAE whose activation keeps the top-k ReLU'd pre-activations per token."""

    architecture = "topk"

    # Train through the sparse fast path (see training_forward); False forces SAE.training_forward.
    fast_path: bool = True

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """Check k and aux_k against d_sae, then the shared tied init with the encoder scaled by ENCODER_INIT_SCALE."""
        if not 1 <= cfg.k <= cfg.d_sae:
            raise UserError(f"TopK SAE needs 1 <= k <= d_sae ({cfg.d_sae}), got k={cfg.k}; set k in the config")
        if cfg.aux_k is not None and cfg.aux_k < 1:
            raise UserError(f"aux_k must be >= 1 (or null for d_in // 2), got {cfg.aux_k}")
        super().__init__(cfg, device=device)
        with torch.no_grad():
            self.W_enc.mul_(ENCODER_INIT_SCALE)

    @property
    def aux_k(self) -> int:
        """How many dead latents AuxK uses per token (cfg.aux_k, default d_in // 2)."""
        return self.cfg.aux_k if self.cfg.aux_k is not None else max(self.cfg.d_in // 2, 1)

    def auxk(
        self,
        target: Tensor,
        x_hat: Tensor,
        dead_mask: Tensor | None,
        decode_top_dead: DecodeTopDead,
        variance: Variance | None = None,
    ) -> Tensor:
        """This SAE's AuxK term (auxk_loss with its aux_k and aux_k_coef); each training path picks the dead latents."""
        return auxk_loss(
            target, x_hat, dead_mask, decode_top_dead, aux_k=self.aux_k, coef=self.cfg.aux_k_coef, variance=variance
        )

    def activation(self, pre: Tensor) -> Tensor:
        """Dense [..., d_sae]: the k largest pre-activations clamped at 0, zero elsewhere."""
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def train_code(self, pre: Tensor) -> Code:
        """Sparse code (top-k indices, ReLU'd values), decoded without a dense [B, d_sae] tensor."""
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return Code(acts=top.values.relu(), idx=top.indices)

    def aux_losses(
        self, fp: ForwardPass, dead_mask: Tensor | None, variance: Variance | None = None
    ) -> dict[str, Tensor]:
        """{"auxk": auxk_loss(...)} with the top dead latents taken from the dense pre-activations."""

        def decode_top_dead(k_aux: int, n_dead: int) -> Tensor:
            """The top dead latents of the dense pre-activations, decoded sparsely."""
            dead_pre = fp.pre.masked_fill(~dead_mask.to(fp.pre.device), float("-inf"))
            top = dead_pre.topk(k_aux, dim=-1, sorted=False)
            return sparse_decode(top.indices, top.values.relu(), self.W_dec)

        return {"auxk": self.auxk(fp.target, fp.x_hat, dead_mask, decode_top_dead, variance)}

    # ---- the sparse training fast path ---------------------------------------------------------

    def uses_fast_path(self) -> bool:
        """True when training_forward takes the sparse path: fast_path is set and this class keeps
        TopK's encoder, code, decoder and loss terms (a subclass that changes any of them does not)."""
        cls = type(self)
        return (
            self.fast_path
            and cls.encode_pre is SAE.encode_pre
            and cls.train_code is TopKSAE.train_code
            and cls.decode_code is SAE.decode_code
            and cls.aux_losses is TopKSAE.aux_losses
        )

    def training_forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        target: Tensor | None = None,
        variance: Variance | None = None,
    ) -> TrainOutput:
        """SAE.training_forward's loss, gradients and outputs, computed sparsely when uses_fast_path():
        the encoder matmul runs without autograd, top-k picks latents (sae.kernels.topk_select), and
        only the chosen latents get gradient (sae.kernels.encoder_values), so no [B, d_sae] tensor is
        kept for the backward pass; AuxK works the same way on the dead latents."""
        if not self.uses_fast_path():
            return super().training_forward(x, dead_mask, target, variance)
        self.check_train_input(x)
        x = self._check_input(x)
        target = x if target is None else target.to(self.dtype)
        mode = encoder_backward_mode(x.device, self.cfg.d_sae, self.cfg.k)
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)  # bf16 under autocast
        _, idx = topk_select(pre, self.cfg.k)
        acts = encoder_values(pre, idx, x, self.W_enc, self.b_enc, self.b_dec, mode).relu()
        x_hat = sparse_decode(idx, acts, self.W_dec) + self.b_dec

        def decode_top_dead(k_aux: int, n_dead: int) -> Tensor:
            """The top dead latents of the gradient-free `pre`, chosen among the dead columns only (gathered
            when they are few), with gradient through encoder_values."""
            dead = dead_mask.to(pre.device)
            if 4 * n_dead <= self.cfg.d_sae:
                columns = dead.nonzero().squeeze(1)
                _, local = topk_select(pre.index_select(1, columns), k_aux)
                dead_idx = columns[local]
            else:
                _, dead_idx = topk_select(pre.masked_fill(~dead, float("-inf")), k_aux)
            dead_acts = encoder_values(pre, dead_idx, x, self.W_enc, self.b_enc, self.b_dec, mode).relu()
            return sparse_decode(dead_idx, dead_acts, self.W_dec)

        terms = {
            "fvu": fvu(target, x_hat, denominator(target, variance)),
            "auxk": self.auxk(target, x_hat, dead_mask, decode_top_dead, variance),
        }
        return TrainOutput.from_terms(
            x_hat, terms, fired_latents(idx, acts, self.cfg.d_sae), (acts != 0).sum(dim=-1).float().mean()
        )


# (k_aux, n_dead) -> what the k_aux highest-activating dead latents decode to, [B, d_out] without b_dec
DecodeTopDead = Callable[[int, int], Tensor]


@torch.compiler.disable  # counts the dead latents on the host: runs eagerly inside a compiled step
def auxk_loss(
    target: Tensor,
    x_hat: Tensor,
    dead_mask: Tensor | None,
    decode_top_dead: DecodeTopDead,
    *,
    aux_k: int,
    coef: float,
    variance: Variance | None = None,
) -> Tensor:
    """AuxK (Gao et al. 2024): coef * scale * FVU of the residual target - x_hat predicted by the top
    k_aux = min(aux_k, n_dead) dead latents (decode_top_dead says how they are picked and decoded), with
    scale = min(n_dead / aux_k, 1) as in sparsify; 0 when no latent is dead (or no mask), NaN/Inf read as 0.
    One device sync (counting the dead latents), so the common all-alive case does no work."""
    zero = target.new_zeros((), dtype=torch.float32)
    if dead_mask is None:
        return zero
    n_dead = int(dead_mask.sum())  # the full [d_sae] mask: the same on every rank of a sharded SAE
    if n_dead == 0:
        return zero
    e_hat = decode_top_dead(min(aux_k, n_dead), n_dead)
    e = target - x_hat.detach()
    scale = min(n_dead / aux_k, 1.0)
    auxk = coef * scale * fvu(e, e_hat, denominator(e, variance))
    return torch.nan_to_num(auxk, nan=0.0, posinf=0.0, neginf=0.0)
