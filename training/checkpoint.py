"""Atomic checkpoints in RUN/checkpoint/: the SAE folder plus the trainer's state (optimizer, step, data position).

A new checkpoint is written beside the old one and swapped in with renames, so a kill at any moment
leaves one complete checkpoint on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from activations.errors import UserError
from sae.base import SAE
from sae.io import load_sae, save_sae
from sae.sharded import load_sharded

STATE_FILE = "trainer_state.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's last complete checkpoint lives."""
    return Path(run_dir) / "checkpoint"


def save_checkpoint(run_dir: Path, sae: SAE, state: dict) -> Path:
    """Write SAE + trainer state to RUN/checkpoint atomically."""
    run_dir = Path(run_dir)
    final, tmp, old = checkpoint_dir(run_dir), run_dir / ".checkpoint-tmp", run_dir / ".checkpoint-old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_sae(sae, tmp)
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, device: str = "cpu", shard: bool = False) -> tuple[SAE, dict]:
    """The last complete checkpoint of a run, or a UserError saying why it cannot be resumed.

    shard: only this rank's slice of the latents (sae.sharded), the state memory-mapped on the CPU.
    """
    run_dir = Path(run_dir)
    path = checkpoint_dir(run_dir)
    if not path.exists() and (run_dir / ".checkpoint-old").exists():
        path = run_dir / ".checkpoint-old"  # killed during the swap: the previous one is complete
    if not (path / STATE_FILE).is_file():
        raise UserError(f"{run_dir} has no checkpoint to resume from; start it again without --resume.")
    sae = load_sharded(path, device=device) if shard else load_sae(path, device=device)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu" if shard else device, weights_only=False, mmap=shard)
    except Exception as e:
        raise UserError(
            f"checkpoint state {path / STATE_FILE} is corrupt ({type(e).__name__}); "
            "delete RUN/checkpoint and start the run again without --resume."
        ) from e
    return sae, state
