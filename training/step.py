"""One SAE optimiser step, the same for the Trainer, the tests and the benchmarks.

In order: the training forward (sae.training_forward, or a wrapper of it such as DDP's), the caller's
loss check, zero_grad, backward, removal of the decoder-gradient component parallel to each row,
gradient clipping, the learning rate, the optimiser step, and decoder renormalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sae.base import SAE, TrainOutput, Variance


class Forward(Protocol):
    """A training forward with SAE.training_forward's signature (the SAE's own, or DDP around it)."""

    def __call__(
        self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None, variance: Variance | None = None
    ) -> TrainOutput:
        """One training forward pass (see SAE.training_forward)."""
        ...


ClipGrad = Callable[[SAE, float], Tensor | None]  # (sae, max_norm) -> the gradient norm before clipping


@dataclass
class StepResult:
    """What one step did: the forward's output, its (detached) loss, the gradient norm and the learning rate."""

    out: TrainOutput
    loss: Tensor  # scalar, detached: this process's loss (data parallel: its share of the global loss)
    grad_norm: Tensor | None  # before clipping; None when grad_clip is 0 (no clipping, no norm computed)
    lr: float | None  # the learning rate set for this step; None when the optimiser's was left alone


def clip_grad_norm(sae: SAE, max_norm: float) -> Tensor:
    """Clip the SAE's gradients to total norm max_norm (one process holds the whole dictionary)."""
    return torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, scales: dict[str, float] | None = None) -> None:
    """Set every parameter group's learning rate: the schedule's, times the scale `scales` (SAE.lr_scales())
    gives a group of one named parameter (1 for the others)."""
    scales = scales or {}
    for group in optimizer.param_groups:
        names = group.get("param_names") or ()
        group["lr"] = lr * (scales.get(names[0], 1.0) if len(names) == 1 else 1.0)


def train_step(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    target: Tensor | None = None,
    dead_mask: Tensor | None = None,
    lr: float | None = None,
    grad_clip: float = 0.0,
    variance: Variance | None = None,
    forward: Forward | None = None,
    clip: ClipGrad = clip_grad_norm,
    autocast: AbstractContextManager | None = None,
    check_loss: Callable[[Tensor], None] | None = None,
) -> StepResult:
    """One optimiser step of `sae` on x [B, d_in] (target [B, d_out] for a transcoder); returns what it did.

    dead_mask: latents AuxK treats as dead. lr: set before the optimiser step (None: keep the optimiser's).
    grad_clip: max gradient norm, 0 for none. variance: the loss denominator (sae.base.Variance; None: the
    batch's own). forward: what runs the training forward (default sae.training_forward; data parallel passes
    DDP's). clip: how to clip (a latent-sharded SAE clips by its whole dictionary's norm). autocast: the context
    the forward runs in (e.g. bf16 on CUDA). check_loss: called with the detached loss before any gradient is
    touched, so it can raise (the trainer stops on a non-finite loss) and leave the weights as they were.
    """
    with autocast or nullcontext():
        out = (forward or sae.training_forward)(x, dead_mask=dead_mask, target=target, variance=variance)
    loss = out.loss.detach()
    if check_loss is not None:
        check_loss(loss)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.remove_parallel_grad()
    grad_norm = clip(sae, grad_clip) if grad_clip else None
    if lr is not None:
        set_lr(optimizer, lr, sae.lr_scales())
    optimizer.step()
    sae.normalise_decoder()
    return StepResult(out=out, loss=loss, grad_norm=grad_norm, lr=lr)
