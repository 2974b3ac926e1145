"""`sae eval`: evaluate a trained SAE (every SAE of a several-hook run, with one model load) on held-out
text and write RUN/eval.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from activations.config import HeldOutText, SAEModelConfig
from activations.files import check_writable
from activations.options import option
from analysis.evaluate import EvalConfig, evaluate_run
from sae.runs import open_sae, sae_folders

HELP = "evaluate a trained SAE on held-out text (writes RUN/eval.json)"
DESCRIPTION = "Reconstruction (FVU, L0, dead latents) and spliced-in next-token loss on held-out text."


@dataclass
class Config:
    """Which run to evaluate, with which model, on which held-out text, how much of it."""

    run: str = option(help="run folder (or SAE folder holding cfg.json and sae_weights.safetensors)", positional=True)
    model: SAEModelConfig = field(default_factory=SAEModelConfig, metadata=dict(help="model"))
    text: HeldOutText = field(default_factory=HeldOutText, metadata=dict(help="held-out text"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=dict(help="evaluation"))


def run(cfg: Config) -> dict:
    """Evaluate one SAE, or every SAE of a multi-hook run with one model load; returns {folder: result}
    for several, the result itself for one."""
    folders = list(sae_folders(cfg.run).values())
    for folder in folders:
        check_writable(folder, "RUN")  # eval.json goes next to each SAE
    lm = open_sae(folders[0], model=cfg.model.model, device=cfg.model.device)[1]
    results = {str(folder): evaluate_run(folder, lm, cfg.text, cfg.eval) for folder in folders}
    return next(iter(results.values())) if len(results) == 1 else results
