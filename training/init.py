"""Data-dependent initialisation of the decoder bias: the geometric median (or mean) of a batch."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    x = x.float()
    median = x.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            return new
        median = new
    return median


def initial_b_dec(x: torch.Tensor, method: str) -> torch.Tensor:
    """b_dec from a first batch of activations `[n, d_in]`."""
    if method == "geometric_median":
        return geometric_median(x)
    if method == "mean":
        return x.float().mean(dim=0)
    if method == "zeros":
        return torch.zeros(x.shape[-1])
    raise ValueError(f"unknown b_dec_init {method!r}; use geometric_median, mean or zeros")
