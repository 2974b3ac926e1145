"""Save and load an SAE folder: cfg.json + sae_weights.safetensors (SAELens-loadable).

Saving is atomic per file (temp file in the folder, then os.replace); loading checks everything
a user can get wrong and says what to do about it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from activations.errors import UserError
from sae.base import SAE
from sae.config import SAEConfig
from sae.registry import get_architecture

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
_FIX = f"point to the folder holding {CFG_FILENAME} and {WEIGHTS_FILENAME}, or re-run training to produce it"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temp file next to `path`, then move it into place in one step."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sae(sae: SAE, folder: str | os.PathLike) -> Path:
    """Write cfg.json and sae_weights.safetensors (contiguous CPU tensors in cfg dtype) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = sae.cfg.torch_dtype
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in sae.state_dict().items()}
    cfg_text = json.dumps(sae.cfg.to_saelens_dict(), indent=2) + "\n"
    _atomic_write(folder / WEIGHTS_FILENAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / CFG_FILENAME, lambda tmp: Path(tmp).write_text(cfg_text))
    return folder


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
        raise UserError(f"{path} must hold a JSON object, got {type(raw).__name__}; restore the file or re-save the SAE")
    try:
        return SAEConfig.from_file_dict(raw)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """UserError naming the first tensor that is missing, unexpected, misshapen, wrongly typed or non-finite."""
    redo = "re-save the SAE or point to the matching cfg.json"
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise UserError(f"{path} is missing tensor(s) {', '.join(missing)}; {redo}")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise UserError(
            f"{path} has tensor(s) {', '.join(unexpected)} that this architecture does not use; "
            f"check \"architecture\" in cfg.json or {redo}"
        )
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise UserError(
                f"{path}: tensor {name} has shape {tuple(got.shape)} but cfg.json (d_in, d_sae) expects "
                f"{tuple(want.shape)}; fix d_in/d_sae in cfg.json or {redo}"
            )
        if not got.dtype.is_floating_point:
            raise UserError(f"{path}: tensor {name} has non-floating dtype {got.dtype}; {redo}")
        if got.dtype != want.dtype:
            raise UserError(
                f"{path}: tensor {name} has dtype {got.dtype} but cfg.json says dtype {want.dtype}; "
                f"set \"dtype\" in cfg.json to match the weights or {redo}"
            )
        if not torch.isfinite(got).all():
            raise UserError(f"{path}: tensor {name} contains NaN or Inf; the run diverged - load an earlier checkpoint or retrain")


def load_sae(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by save_sae, or one written by SAELens 6.x (sae.saelens), checked, onto device."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available; use device='cpu'")
    folder = Path(folder)
    from sae.saelens import is_saelens_folder, load_saelens  # lazy: sae.saelens uses this module

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
    _check_tensors(path, tensors, sae.state_dict())
    sae.load_state_dict(tensors, assign=True)
    return sae.to(device)
