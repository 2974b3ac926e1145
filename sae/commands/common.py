"""Small helpers the subcommands share: device choice and the held-out text source."""

from __future__ import annotations

import torch


def pick_device(name: str) -> str:
    """'auto' means CUDA when available, else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from activations.errors import UserError
        raise UserError(f"--device {name} asked for CUDA but no GPU is available; use --device cpu.")
    return name


def model_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)
