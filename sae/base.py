"""The SAE base class: SAELens-named parameters, encode/decode, and the shared training plumbing.

An architecture is a small subclass: it defines `activation(pre)` and, optionally, a sparse
training code (`train_code`) and extra loss terms (`aux_losses`); everything else lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from activations.errors import UserError
from sae.config import SAEConfig
from sae.kernels import sparse_decode


@dataclass
class TrainOutput:
    """What one training step needs from the SAE.

    loss == sum(losses.values()) (before detaching); losses holds each weighted term, detached.
    fired is a BoolTensor [d_sae]: True for latents with a nonzero activation on some token in the
    batch (fixed size, so it can be OR-reduced across ranks; the trainer resets their dead counters).
    """

    x_hat: Tensor  # [B, d_in]
    loss: Tensor  # scalar, what the trainer backprops
    losses: dict[str, Tensor]  # named weighted parts: {"fvu": ..., "auxk": ...}, detached
    fired: Tensor  # BoolTensor [d_sae]
    l0: Tensor  # scalar: mean number of nonzero latents per token

    @classmethod
    def from_terms(cls, x_hat: Tensor, terms: dict[str, Tensor], fired: Tensor, l0: Tensor) -> TrainOutput:
        """The output of a step whose loss is the sum of the weighted `terms` (kept detached in `losses`)."""
        return cls(
            x_hat=x_hat,
            loss=sum(terms.values()),
            losses={name: value.detach() for name, value in terms.items()},
            fired=fired,
            l0=l0.detach(),
        )


# How to compute a loss denominator: x [B, d] -> sum of squared deviations of x from its mean. None means this
# batch's own (local_variance); data-parallel training passes the rank's share of the global batch's variance
# (training.distributed.global_variance_share) so the ranks' losses average to the one-process loss.
Variance = Callable[[Tensor], Tensor]


@dataclass
class Code:
    """A batch's latent activations: dense `acts` [B, d_sae] when `idx` is None, else sparse
    (`idx`, `acts`) [B, k] pairs. Sparse codes are decoded without materialising [B, d_sae]."""

    acts: Tensor
    idx: Tensor | None = None

    def fired(self, d_sae: int) -> Tensor:
        """BoolTensor [d_sae]: latents nonzero on at least one token."""
        if self.idx is None:
            return (self.acts != 0).any(dim=0)
        fired = torch.zeros(d_sae, dtype=torch.bool, device=self.acts.device)
        fired[self.idx[self.acts != 0]] = True
        return fired

    def l0(self) -> Tensor:
        """Mean number of nonzero latents per token."""
        return (self.acts != 0).sum(dim=-1).float().mean()


def local_variance(x: Tensor) -> Tensor:
    """sum((x - x.mean(0))^2) over this process's batch: the default denominator of fvu() and penalty()."""
    return (x - x.mean(dim=0)).pow(2).sum()


def denominator(x: Tensor, variance: Variance | None = None) -> Tensor:
    """The float32 loss denominator of x: variance(x), or this batch's own local_variance(x) when None."""
    x = x.float()
    return local_variance(x) if variance is None else variance(x)


@dataclass
class ForwardPass:
    """What the training forward computed, handed to an architecture's extra loss terms (SAE.aux_losses)."""

    x: Tensor  # [B, d_in] the input
    target: Tensor  # [B, d_out] what is reconstructed: x, or a transcoder's output hook
    x_hat: Tensor  # [B, d_out] the reconstruction
    pre: Tensor  # [B, d_sae] pre-activations
    code: Code  # the latent activations


@torch.no_grad()
def threshold_for_l0(pre: Tensor, l0: float) -> Tensor:
    """A threshold that about l0 pre-activations per token exceed: the median over tokens of each token's l0-th
    largest pre-activation (robust to the few tokens of huge norm, such as a first position, whose values would
    take every place of a batch-wide top-k). A scalar in pre's dtype."""
    k = max(1, min(pre.shape[-1], round(l0)))
    return pre.reshape(-1, pre.shape[-1]).float().topk(k, dim=-1).values[:, -1].median().to(pre.dtype)


def fvu(x: Tensor, x_hat: Tensor, variance: Tensor | None = None) -> Tensor:
    """Fraction of variance unexplained: sum((x - x_hat)^2) / variance, in float32.

    variance: the denominator (see denominator()); None: this batch's own, sum((x - x.mean(0))^2).
    Scale-free (1.0 = predicting the batch mean), so loss coefficients transfer across models/layers.
    """
    x, x_hat = x.float(), x_hat.float()
    total = local_variance(x) if variance is None else variance
    return (x - x_hat).pow(2).sum() / total.clamp_min(torch.finfo(torch.float32).tiny)


def penalty(per_token: Tensor, target: Tensor, variance: Tensor | None = None) -> Tensor:
    """Mean of a per-token penalty [B] divided by FVU's denominator per token (`variance`, default the target's
    own, over len(target)), so coefficients keep their SAELens meaning: FVU + penalty = (MSE + coef * term) / var."""
    target = target.float()
    total = local_variance(target) if variance is None else variance
    return per_token.float().mean() / (total / len(target)).clamp_min(torch.finfo(torch.float32).tiny)


class SAE(nn.Module):
    """Sparse autoencoder x -> f = activation((x - b_dec) @ W_enc + b_enc) -> x_hat = f @ W_dec + b_dec.

    Parameters use SAELens names and shapes; subclasses set `activation` (and may refine training).
    """

    architecture: str = ""  # each architecture class names itself (the cfg.json "architecture" value)
    unit_norm_decoder: bool = True  # False: decoder norms are free (the sparsity penalty weights by them)
    progress: float = 1.0  # fraction of training done, from set_progress (1.0 outside training)

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """Tied init (Gao et al. 2024): unit-norm random decoder rows, W_enc = W_dec.T, zero biases.

        Seed with torch.manual_seed before constructing for reproducible weights.
        """
        super().__init__()
        self.cfg = cfg
        dtype = cfg.torch_dtype
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, device=device, dtype=torch.float32)
        W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(dtype)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
        self.W_dec = nn.Parameter(W_dec)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (inputs are cast to it)."""
        return self.W_dec.dtype

    # ---- inference -------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> Tensor:
        """Cast x to the SAE dtype after checking its last dim is d_in (a user-fixable mismatch)."""
        if x.shape[-1] != self.cfg.d_in:
            raise UserError(
                f"SAE input has last dimension {x.shape[-1]} but this SAE expects d_in={self.cfg.d_in}"
                f" (trained on {self.cfg.model_name or '?'} {self.cfg.hook_name or ''}); "
                "feed activations from the same model and hook the SAE was trained on"
            )
        return x.to(self.dtype)

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations [..., d_sae] = (x - b_dec) @ W_enc + b_enc."""
        return (self._check_input(x) - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """Dense feature activations from pre-activations; each architecture defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define activation(pre)")

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [..., d_sae] for inputs [..., d_in]."""
        return self.activation(self.encode_pre(x))

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction [..., d_in] = f @ W_dec + b_dec."""
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x (same leading dims)."""
        return self.decode(self.encode(x))

    def encode_raw(self, x_raw: Tensor) -> Tensor:
        """Feature activations for raw (unnormalised) model activations."""
        return self.encode(x_raw * self.cfg.norm_scale)

    def reconstruct_raw(self, x_raw: Tensor) -> Tensor:
        """Reconstruction of raw model activations, returned in the raw scale."""
        return self.forward(x_raw * self.cfg.norm_scale) / self.cfg.norm_scale

    # ---- training --------------------------------------------------------------------------

    def train_code(self, pre: Tensor) -> Code:
        """The training-time code for pre-activations; default dense. Sparse architectures override."""
        return Code(self.activation(pre))

    def decode_code(self, code: Code) -> Tensor:
        """Decode a Code: sparse codes go through sparse_decode (no [B, d_sae] tensor)."""
        if code.idx is None:
            return self.decode(code.acts)
        return sparse_decode(code.idx, code.acts, self.W_dec) + self.b_dec

    def calibrate_sparsity(self, x: Tensor, l0: float) -> None:
        """Set the biases or thresholds that decide which latents fire so that this batch x [B, d_in] has L0 about
        `l0` (called once, on the first batch, when a target L0 is given); nothing for k-sparse architectures."""

    def lr_scales(self) -> dict[str, float]:
        """Parameters whose learning rate is a multiple of the schedule's now, by name (the others get 1): the
        decoder's unit-norm rows turn slowly at the encoder's rate, so they start at decoder_lr_scale x and fall
        linearly to 1 x by the end of training (benchmarks/frontier.md: faster early, as steady late)."""
        return {"W_dec": 1 + (self.cfg.decoder_lr_scale - 1) * (1 - self.progress)}

    def optimizer_groups(self) -> list[dict]:
        """Adam's parameter groups: each parameter of lr_scales() alone, the rest together; "param_names" names a
        group's parameters, in order, so training.step.set_lr can apply the scales and a checkpoint be checked."""
        scaled = self.lr_scales()
        named = list(self.named_parameters())
        rest = [(name, param) for name, param in named if name not in scaled]
        groups = [{"params": [p for _, p in rest], "param_names": [n for n, _ in rest]}] if rest else []
        return groups + [{"params": [param], "param_names": [name]} for name, param in named if name in scaled]

    def set_progress(self, fraction: float) -> None:
        """Called by the trainer before each step with the fraction of training done, for schedules
        such as the sparsity coefficient warm-up (see warmed_up)."""
        self.progress = float(fraction)

    def resume_at(self, step: int) -> None:
        """Called by the trainer after it loads a checkpoint taken after `step` steps, for training state the weights
        do not hold (BatchTopK's count of threshold updates); nothing for most architectures."""

    def warmed_up(self, coefficient: float) -> float:
        """coefficient scaled linearly from 0 to 1 over the first cfg.sparsity_warmup_fraction of training."""
        warmup = self.cfg.sparsity_warmup_fraction
        return coefficient if warmup <= 0 else coefficient * min(1.0, self.progress / warmup)

    def l1_penalty(self, acts: Tensor, target: Tensor, variance: Variance | None = None) -> Tensor:
        """Warmed-up l1_coefficient * sum_i f_i ||W_dec_i|| (Anthropic, April 2024), as a term added to FVU."""
        weighted = (acts.float() * self.W_dec.float().norm(dim=1)).sum(dim=-1)
        return self.warmed_up(self.cfg.l1_coefficient) * penalty(weighted, target, denominator(target, variance))

    def aux_losses(
        self, fp: ForwardPass, dead_mask: Tensor | None, variance: Variance | None = None
    ) -> dict[str, Tensor]:
        """Architecture-specific loss terms, already weighted by their coefficients; default none.

        variance is training_forward's: pass denominator(..., variance) to every fvu() and penalty()."""
        return {}

    def check_train_input(self, x: Tensor) -> None:
        """Raise a UserError unless x is a [batch, d_in] tensor with batch >= 2 (FVU needs a batch mean)."""
        if x.ndim != 2 or x.shape[0] < 2:
            raise UserError(
                f"training_forward needs a [batch, d_in] tensor with batch >= 2, got shape {tuple(x.shape)}; "
                "flatten tokens into the batch dimension and use a larger batch size"
            )

    def training_forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        target: Tensor | None = None,
        variance: Variance | None = None,
    ) -> TrainOutput:
        """One training forward pass on x [B, d_in] (B >= 2); loss = FVU + architecture terms.

        dead_mask (BoolTensor [d_sae], optional) marks latents the trainer considers dead.
        target defaults to x (a transcoder passes a different target).
        variance computes every loss denominator (see Variance); None: this batch's own.
        """
        self.check_train_input(x)
        target = x if target is None else target.to(self.dtype)
        pre = self.encode_pre(x)
        code = self.train_code(pre)
        x_hat = self.decode_code(code)
        terms = {"fvu": fvu(target, x_hat, denominator(target, variance))}
        terms.update(self.aux_losses(ForwardPass(x, target, x_hat, pre, code), dead_mask, variance))
        return TrainOutput.from_terms(x_hat, terms, code.fired(self.cfg.d_sae), code.l0())

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder row to unit norm (call after each optimiser step); no-op when the
        architecture leaves decoder norms free (unit_norm_decoder = False)."""
        if not self.unit_norm_decoder:
            return
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min(torch.finfo(self.dtype).eps))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of W_dec.grad the part parallel to each decoder row (call before the optimiser
        step), so Adam moves rows along the unit sphere as in Gao et al. 2024 / sparsify; no-op when
        unit_norm_decoder is False."""
        grad = self.W_dec.grad
        if grad is None or not self.unit_norm_decoder:
            return
        rows = self.W_dec
        parallel = (grad * rows).sum(dim=1, keepdim=True) / rows.pow(2).sum(dim=1, keepdim=True).clamp_min(
            torch.finfo(self.dtype).eps
        )
        grad.sub_(parallel * rows)
