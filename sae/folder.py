"""The SAE folder format shared by sae.io and sae.saelens: file names, writing the two files, checking tensors.

Kept apart so that sae.io (which dispatches SAELens folders to sae.saelens) and sae.saelens (which writes
and checks folders the same way) both import it, and neither imports the other back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from activations.errors import UserError
from activations.files import atomic_write, atomic_write_text
from sae.base import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
# No SAE tensor comes near this, normalised or with the scale folded in (decoder rows are unit norm, or 1 / scale);
# a larger value, or decoder row norm, means a corrupted or mis-scaled file rather than a model to run.
MAX_ABS = 1e6


def write_sae_folder(sae: SAE, folder: str | os.PathLike, cfg: dict) -> Path:
    """Write `cfg` as cfg.json and sae's weights (contiguous CPU tensors in cfg dtype), each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = sae.cfg.torch_dtype
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in sae.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILENAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(folder / CFG_FILENAME, json.dumps(cfg, indent=2) + "\n")
    return folder


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """UserError naming the first tensor that is missing, unexpected, misshapen, wrongly typed, non-finite or absurdly
    large (a value or a decoder row norm above MAX_ABS)."""
    redo = "re-save the SAE or point to the matching cfg.json"
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise UserError(f"{path} is missing tensor(s) {', '.join(missing)}; {redo}")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise UserError(
            f"{path} has tensor(s) {', '.join(unexpected)} that this architecture does not use; "
            f'check "architecture" in cfg.json or {redo}'
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
                f'set "dtype" in cfg.json to match the weights or {redo}'
            )
        if not torch.isfinite(got).all():
            raise UserError(
                f"{path}: tensor {name} contains NaN or Inf; the run diverged - load an earlier checkpoint or retrain"
            )
        largest = got.abs().amax().item() if got.numel() else 0.0
        if largest > MAX_ABS:
            raise UserError(
                f"{path}: tensor {name} holds values up to {largest:.3g}, absurd for an SAE (limit {MAX_ABS:.0e}); "
                f"the file is corrupt or was rescaled by mistake - {redo}"
            )
    rows = torch.linalg.vector_norm(tensors["W_dec"], dim=-1, dtype=torch.float32) if "W_dec" in expected else None
    if rows is not None and rows.numel() and rows.amax().item() > MAX_ABS:  # safe: every value is <= MAX_ABS
        raise UserError(
            f"{path}: tensor W_dec has decoder rows of norm up to {rows.amax().item():.3g} (limit {MAX_ABS:.0e}); "
            f"the file is corrupt or was rescaled by mistake - {redo}"
        )


def own_memory(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh copies in torch's own (64-byte aligned) memory of tensors read from a safetensors file.

    The file's tensors sit at its header's offsets (8-byte aligned), and the CPU kernels round some sums
    differently on such memory: a resumed run would drift by an ulp from the run that was never stopped.
    """
    return {name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in tensors.items()}
