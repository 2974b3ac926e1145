"""L2 logistic regression by full-batch L-BFGS in float64, batched over outputs: the one fitter behind the letter,
k-sparse and task probes (analysis/absorption.py, analysis/sparse_probing.py), deterministic for the same data."""

from __future__ import annotations

import torch
from torch import Tensor

LBFGS_STEPS = 200


def example_weights(y: Tensor, balanced: bool = True) -> Tensor:
    """Per-example loss weights [n, C] for labels y [n, C], summing to 1 in each column: balanced (each class of
    each column sums to 1/2, as sklearn's class_weight="balanced" up to one factor) or uniform (1/n: the mean)."""
    y = y.double()
    n = len(y)
    if not balanced:
        return torch.full_like(y, 1 / n)
    n_pos = y.sum(0)
    if bool(((n_pos == 0) | (n_pos == n)).any()):
        raise ValueError("every column of y needs positive and negative examples")
    return torch.where(y > 0, 0.5 / n_pos, 0.5 / (n - n_pos))


def fit_logistic(
    x: Tensor, y: Tensor, l2: float, balanced: bool = True, max_iter: int = LBFGS_STEPS
) -> tuple[Tensor, Tensor]:
    """C L2-regularised logistic regressions, one per column of y, fitted together from zero.

    x: [n, d] shared by the C outputs, or [C, n, d] one input per output; y: boolean (or 0/1) [n, C].
    Inputs are centred and divided by one scalar per output, the root mean variance of its columns: z has unit
    mean variance per coordinate (mean squared norm d), whatever the activations' overall scale, and the columns
    keep their relative sizes. Output c minimises sum_i weight_ic * BCE(z_ic . w_c + b_c, y_ic) + l2 / 2 * |w_c|^2
    (the bias unpenalised; weights from `example_weights`). Returns weight [C, d] and bias [C] in the original
    input space: logit = x @ weight[c] + bias[c].
    """
    x = x.double().clone()  # a copy: `x` may be an inference tensor, which autograd cannot save
    shared = x.ndim == 2
    xs = x.unsqueeze(0) if shared else x  # [1 or C, n, d]
    mean = xs.mean(1, keepdim=True)  # [1 or C, 1, d]
    scale = (xs - mean).pow(2).mean((1, 2)).sqrt()[:, None, None]  # [1 or C, 1, 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # every column constant: z = 0, nothing to learn
    z = (xs - mean) / scale
    target, weights = y.double(), example_weights(y, balanced)
    n_out, d = y.shape[1], x.shape[-1]
    weight = torch.zeros(n_out, d, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_out, dtype=torch.float64, requires_grad=True)

    def logits() -> Tensor:
        return (z[0] @ weight.T if shared else torch.einsum("cnd,cd->nc", z, weight)) + bias  # [n, C]

    def closure() -> Tensor:
        opt.zero_grad()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits(), target, reduction="none")
        loss = (weights * bce).sum() + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt = torch.optim.LBFGS(
        [weight, bias],
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    with torch.enable_grad():
        opt.step(closure)
    w = weight.detach() / scale[:, 0]  # [C, d]
    b = bias.detach() - (w * mean[:, 0]).sum(-1)
    return w, b
