"""Where training metrics go: metrics.jsonl in the run folder, and wandb when asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
        """On resume, drop lines written after the checkpoint so the file has each step once."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

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
