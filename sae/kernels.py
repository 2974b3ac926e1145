"""Decoding from sparse (index, value) codes without building the dense [B, d_sae] activations.

This is the CPU/eager reference implementation: GPU kernels (a later issue) must match it
numerically, forward and backward, and fall back to it where they cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode(top_idx: torch.Tensor, top_acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j top_acts[..., j] * W_dec[top_idx[..., j]]: [..., k] codes -> [..., d_in] (no b_dec).

    embedding_bag gathers only the k decoder rows each token uses; gradients flow to W_dec
    (dense grad, rows not used get zero) and to top_acts.
    """
    lead = top_idx.shape[:-1]
    k = top_idx.shape[-1]
    out = F.embedding_bag(
        top_idx.reshape(-1, k),
        W_dec,
        per_sample_weights=top_acts.reshape(-1, k).to(W_dec.dtype),
        mode="sum",
    )
    return out.reshape(*lead, W_dec.shape[-1])
