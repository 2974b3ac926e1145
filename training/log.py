"""Where training metrics go: metrics.jsonl in the run folder, and wandb when asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path

from activations.files import atomic_write_text


class MetricsLog:
    """Appends one JSON object per logged step; mirrors to wandb (offline mode needs no network)."""

    def __init__(self, run_dir: Path, use_wandb: bool, project: str, config: dict, resume: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if use_wandb:
            import wandb

            self.wandb_run = wandb.init(
                project=project,
                dir=str(run_dir),
                config=config,
                name=Path(run_dir).name,
                mode=os.environ.get("WANDB_MODE", "online"),
                resume="allow" if resume else None,
            )

    def truncate_after(self, step: int) -> None:
        """On resume, keep each step up to the checkpoint's once and drop the rest: lines written after it, and a
        torn last line (a kill in the middle of a write). The file is replaced in one step."""
        if not self.path.is_file():
            return
        kept, seen = [], set()
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                logged = json.loads(line).get("step", 0)
            except (json.JSONDecodeError, AttributeError):
                continue  # torn or blank
            if logged <= step and logged not in seen:
                kept.append(line)
                seen.add(logged)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=metrics["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


class NoLog:
    """The log of a rank that does not write the run folder: every call does nothing."""

    def truncate_after(self, step: int) -> None: ...

    def log(self, metrics: dict) -> None: ...

    def close(self) -> None: ...
