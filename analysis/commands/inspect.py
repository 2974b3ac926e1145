"""`sae inspect`: statistics, examples and logit effects of every feature, plots, and the static dashboard."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from activations.config import HeldOutText, SAEModelConfig
from activations.files import check_writable
from activations.options import option
from analysis.inspect import InspectConfig, inspect_run
from sae.runs import open_sae

HELP = "find what each feature does (writes RUN/features, RUN/plots and RUN/dashboard/index.html)"
DESCRIPTION = (
    "Read held-out text once (two passes) to get every feature's density, histogram, top and sampled "
    "examples; rank the tokens each feature promotes and suppresses; plot densities and training curves; "
    "write a static dashboard that opens offline by double-click."
)


@dataclass
class Config:
    """`sae inspect`: the run, the model, the held-out text and what to compute."""

    run: str = option(help="run folder (or SAE folder holding cfg.json and sae_weights.safetensors)", positional=True)
    model: SAEModelConfig = field(default_factory=SAEModelConfig, metadata=dict(help="model"))
    text: HeldOutText = field(default_factory=HeldOutText, metadata=dict(help="held-out text"))
    inspect: InspectConfig = field(default_factory=InspectConfig, metadata=dict(help="what to compute"))


def run(cfg: Config) -> Path:
    check_writable(cfg.inspect.out or cfg.run, "--out" if cfg.inspect.out else "RUN")
    _, lm = open_sae(cfg.run, model=cfg.model.model, device=cfg.model.device)
    return inspect_run(cfg.run, lm, cfg.text, cfg.inspect)
