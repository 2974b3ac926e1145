"""Small helpers the subcommands share: device choice, model dtype, and opening a trained SAE with its model."""

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


def open_sae(folder, lm=None, model: str | None = None, device: str = "auto"):
    """The SAE in `folder` and the model to run it with: `lm` when given (the SAE goes to its device), else
    `model`, else the model the SAE was trained on (the embedded default when cfg.json names none)."""
    from activations.models import load_model
    from sae.io import load_sae

    if lm is not None:
        return load_sae(folder, device=str(lm.device)), lm
    device = pick_device(device)
    sae = load_sae(folder, device=device)
    return sae, load_model(model or sae.cfg.model_name or "smollm2-135m", device=device)
