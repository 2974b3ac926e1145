"""Finding the SAEs of a run folder and opening one with the model it reads.

A run trained on one hook is itself an SAE folder (cfg.json + sae_weights.safetensors); a run trained
on several holds one SAE folder per hook (RUN/<hook>/). Every command that reads a run goes through
`sae_folders`, so an unfinished run or a wrong path gets the same clear message everywhere.
"""

from __future__ import annotations

from pathlib import Path

from activations.config import DEFAULT_MODEL, pick_device
from activations.errors import UserError
from activations.models import LoadedModel, load_model
from sae.base import SAE
from sae.io import load_sae

CHECKPOINT = "checkpoint"  # training.checkpoint writes RUN/checkpoint/ until the run finishes


def sae_folders(run: str | Path) -> dict[str, Path]:
    """The SAE folders of a run: {"": run} for one SAE, {hook: run/hook} for a several-hook run."""
    run = Path(run)
    if (run / "cfg.json").is_file():
        return {"": run}
    if not run.is_dir():
        raise UserError(f"{run} does not exist; give a run folder written by sae train (or an SAE folder).")
    found = {
        d.name: d for d in sorted(run.iterdir()) if d.is_dir() and d.name != CHECKPOINT and (d / "cfg.json").is_file()
    }
    if found:
        return found
    if (run / CHECKPOINT).is_dir() or any((d / CHECKPOINT).is_dir() for d in run.iterdir() if d.is_dir()):
        raise UserError(
            f"{run} holds no finished SAE (training stopped before the end); finish it with "
            f"`sae train --out {run} --resume`, or use its last checkpoint: {run}/{CHECKPOINT}"
        )
    raise UserError(f"{run} holds no SAE (no cfg.json); give a run folder written by sae train or an SAE folder.")


def open_sae(
    folder: str | Path, lm: LoadedModel | None = None, model: str | None = None, device: str = "auto"
) -> tuple[SAE, LoadedModel]:
    """The SAE in `folder` and the model to run it with: `lm` when given (the SAE goes to its device), else
    `model`, else the model the SAE was trained on (the embedded default when cfg.json names none)."""
    if lm is None:
        device = pick_device(device)
        sae = load_sae(folder, device=device)
        lm = load_model(model or sae.cfg.model_name or DEFAULT_MODEL, device=device)
    else:
        sae = load_sae(folder, device=str(lm.device))
    check_sae_fits(sae, lm)
    return sae, lm


def check_sae_fits(sae: SAE, lm: LoadedModel) -> None:
    """UserError unless the SAE reads vectors of the model's width (an SAE trained on another model)."""
    if sae.cfg.d_in != lm.d_model:
        raise UserError(
            f"the SAE expects d_in={sae.cfg.d_in} but {lm.name} has d_model={lm.d_model} "
            f"(last dimension {lm.d_model}); "
            f"use the model it was trained on ({sae.cfg.model_name or 'see cfg.json'}), e.g. via --model."
        )
