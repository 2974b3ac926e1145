"""Atomic checkpoints in RUN/checkpoint/: the SAE folder plus the trainer's state (optimizer, step, data position).

A new checkpoint is written beside the old one and swapped in with renames, so a kill at any moment
leaves one complete checkpoint on disk: RUN/checkpoint, or (killed between the two renames) RUN/.checkpoint-old.
The state is read with torch.load(weights_only=True): tensors and plain values only, so a crafted file cannot
run code.
"""

from __future__ import annotations

import pickle
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


def _complete(run_dir: Path) -> Path:
    """The folder holding the last complete checkpoint: RUN/checkpoint, or .checkpoint-old when a kill landed
    between the two renames of a swap (whenever RUN/checkpoint is missing, .checkpoint-old is whole)."""
    final = checkpoint_dir(run_dir)
    old = Path(run_dir) / ".checkpoint-old"
    return old if not final.exists() and old.exists() else final


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run folder holds a complete checkpoint to resume from."""
    return (_complete(Path(run_dir)) / STATE_FILE).is_file()


def save_checkpoint(run_dir: Path, sae: SAE, state: dict) -> Path:
    """Write SAE + trainer state to RUN/checkpoint atomically (write beside it, then two renames)."""
    run_dir = Path(run_dir)
    final, tmp, old = checkpoint_dir(run_dir), run_dir / ".checkpoint-tmp", run_dir / ".checkpoint-old"
    if _complete(run_dir) == old:
        old.rename(final)  # a swap was cut short: put the whole checkpoint back before .checkpoint-old is reused
    shutil.rmtree(tmp, ignore_errors=True)
    save_sae(sae, tmp)
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# What every trainer state holds (training.trainer.Trainer.state_dict); a state without one cannot resume.
REQUIRED_STATE = ("step", "tokens", "optimizer", "tokens_since_fired", "store_scales", "contexts_consumed", "torch_rng")


def load_checkpoint(run_dir: Path, device: str = "cpu", shard: bool = False) -> tuple[SAE, dict]:
    """The last complete checkpoint of a run, or a UserError saying why it cannot be resumed.

    shard: only this rank's slice of the latents (sae.sharded). The state is memory-mapped on the CPU (RNG states
    must be CPU tensors; a rank reads only its own shuffle buffer of the ranks' buffers the state holds).
    """
    run_dir = Path(run_dir)
    path = _complete(run_dir)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"{run_dir} has no checkpoint to resume from; start it again without --resume.")
    sae = load_sharded(path, device=device) if shard else load_sae(path, device=device)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global before running anything
        what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "an unsupported object")
        raise UserError(
            f"refusing to load {path / STATE_FILE}: it holds more than tensors and plain values ({what}), which "
            f"could run code; sae train never writes such a file: start the run again in a new --out (or delete "
            f"{run_dir} first)."
        ) from None
    except Exception as e:
        raise UserError(
            f"checkpoint state {path / STATE_FILE} is corrupt ({type(e).__name__}); start the run again in a new "
            f"--out (or delete {run_dir} first), without --resume."
        ) from e
    missing = [key for key in REQUIRED_STATE if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(
            f"checkpoint state {path / STATE_FILE} lacks {', '.join(missing)} (not written by this sae train); "
            f"start the run again in a new --out (or delete {run_dir} first), without --resume."
        )
    return sae, state
