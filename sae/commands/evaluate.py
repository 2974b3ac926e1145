"""`sae eval`: load a trained SAE and its model, evaluate on held-out text, write RUN/eval.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sae.commands.common import open_sae

HELP = "evaluate a trained SAE on held-out text (writes RUN/eval.json)"
DESCRIPTION = "Reconstruction (FVU, L0, dead latents) and spliced-in next-token loss on held-out text."


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `sae eval`."""
    p.add_argument("run", help="run folder (or SAE folder holding cfg.json and sae_weights.safetensors)")
    p.add_argument("--model", default=None, help="model to evaluate with (default: the one the SAE was trained on)")
    p.add_argument("--dataset", default=None, help="held-out text (default: the training corpus's test split)")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="test", help="held-out split (default test)")
    p.add_argument("--text-field", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate on (default 16384)")
    p.add_argument("--model-batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")


def evaluate_run(run: str | Path, *, lm=None, model: str | None = None, dataset: str | None = None,
                 dataset_config: str | None = None, split: str = "test", text_field: str | None = None,
                 data_dir: str | None = None, tokens: int = 16384, model_batch_size: int = 8, device: str = "auto") -> dict:
    """Evaluate the SAE in `run`; prints a summary and writes eval.json next to it."""
    from activations.sources import open_text_source
    from analysis.evaluate import EvalConfig, evaluate

    run = Path(run)
    sae, lm = open_sae(run, lm=lm, model=model, device=device)
    dataset = dataset or sae.cfg.dataset or "wikitext-2"
    source = open_text_source(dataset, split=split, config=dataset_config, text_field=text_field, data_dir=data_dir)
    result = evaluate(sae, lm, source, EvalConfig(tokens=tokens, model_batch_size=model_batch_size)).to_dict()
    result.update(dataset=dataset, split=split, model=lm.name)
    (run / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"eval on {result['tokens']} held-out tokens ({dataset}, {split}): FVU {result['fvu']:.3f}  L0 {result['l0']:.1f}  "
          f"dead {result['dead_fraction']:.3f}  CE clean {result['ce_loss_clean']:.3f} / SAE {result['ce_loss_sae']:.3f} / "
          f"zero {result['ce_loss_zero']:.3f}  ce_recovered {result['ce_recovered']:.3f}  KL {result['kl_sae']:.3f}  → {run / 'eval.json'}")
    return result


def sae_folders(run: str | Path) -> list[Path]:
    """The SAE folders in `run`: itself, or (a multi-hook run) each subfolder holding a cfg.json."""
    run = Path(run)
    if (run / "cfg.json").is_file() or not run.is_dir():
        return [run]
    return sorted(p for p in run.iterdir() if (p / "cfg.json").is_file()) or [run]  # none: load_sae names the problem


def run(args: argparse.Namespace) -> dict:
    """Evaluate one SAE, or every SAE of a multi-hook run with one model load; returns {folder: result}
    for several, the result itself for one."""
    folders = sae_folders(args.run)
    lm = open_sae(folders[0], model=args.model, device=args.device)[1] if len(folders) > 1 else None
    results = {str(f): evaluate_run(f, lm=lm, model=args.model, dataset=args.dataset, dataset_config=args.dataset_config,
                                    split=args.split, text_field=args.text_field, data_dir=args.data_dir,
                                    tokens=args.tokens, model_batch_size=args.model_batch_size, device=args.device)
               for f in folders}
    return next(iter(results.values())) if len(results) == 1 else results
