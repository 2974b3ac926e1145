"""Save and load an SAE folder: cfg.json + sae_weights.safetensors (SAELens-loadable).

Saving is atomic per file (temp file in the folder, then os.replace); loading checks everything
a user can get wrong and says what to do about it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from activations.errors import UserError
from sae.base import SAE
from sae.config import SAEConfig
from sae.folder import CFG_FILENAME, WEIGHTS_FILENAME, check_tensors, own_memory, write_sae_folder
from sae.registry import get_architecture
from sae.saelens import is_saelens_folder, load_saelens, read_scaling_factor

__all__ = ["CFG_FILENAME", "WEIGHTS_FILENAME", "load_sae", "read_cfg", "save_sae"]
_FIX = f"point to the folder holding {CFG_FILENAME} and {WEIGHTS_FILENAME}, or re-run training to produce it"


def save_sae(sae: SAE, folder: str | os.PathLike) -> Path:
    """Write cfg.json and sae_weights.safetensors (contiguous CPU tensors in cfg dtype) into folder."""
    return write_sae_folder(sae, folder, sae.cfg.to_saelens_dict())


def read_cfg(folder: str | os.PathLike) -> SAEConfig:
    """The SAEConfig stored in folder/cfg.json, with a UserError for a missing or broken file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"SAE folder {folder} does not exist; {_FIX}")
    path = folder / CFG_FILENAME
    if not path.is_file():
        raise UserError(f"{path} is missing; {_FIX}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore the file or re-save the SAE") from None
    if not isinstance(raw, dict):
        raise UserError(
            f"{path} must hold a JSON object, got {type(raw).__name__}; restore the file or re-save the SAE"
        )
    factor = read_scaling_factor(folder, raw)
    try:
        return SAEConfig.from_file_dict(raw, factor)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by save_sae, or one written by SAELens 6.x (sae.saelens), checked, onto device."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available; use device='cpu'")
    folder = Path(folder)
    if is_saelens_folder(folder):
        return load_saelens(folder, device)
    cfg = read_cfg(folder)
    try:
        cls = get_architecture(cfg.architecture)
    except UserError as err:
        raise UserError(f"{folder / CFG_FILENAME}: {err}") from None
    path = folder / WEIGHTS_FILENAME
    if not path.is_file():
        raise UserError(f"{path} is missing; {_FIX}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is corrupt or truncated ({err}); re-copy it or re-save the SAE") from None
    sae = cls(cfg, device="meta")  # shapes/dtypes only: no time spent on a random init
    check_tensors(path, tensors, sae.state_dict())
    sae.load_state_dict(own_memory(tensors), assign=True)
    return sae.to(device)
