"""The `sae` command line: parses options and dispatches to the command modules.

Every mistake a user can make ends as one line on stderr naming the problem and the fix, with a
non-zero exit code; finished work (checkpoints, run folders) is never deleted on the way out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from activations.errors import UserError

DEFAULT_HOOK = "blocks.15.hook_resid_pre"   # the residual stream half-way through SmolLM2-135M's 30 blocks


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--model", default="smollm2-135m",
                   help="HF hub id, local model folder, .gguf file, or 'smollm2-135m' (embedded default, offline)")
    g.add_argument("--hook", default=DEFAULT_HOOK, help=f"hook point, e.g. blocks.6.hook_resid_post (default {DEFAULT_HOOK})")
    g.add_argument("--dataset", default="wikitext-2",
                   help="'wikitext-2', 'tinyshakespeare', a local .txt/.jsonl/.parquet file or folder, or an HF dataset id")
    g.add_argument("--dataset-config", default=None, help="HF dataset config name (e.g. wikitext-2-raw-v1)")
    g.add_argument("--split", default="train", help="dataset split to train on (default train)")
    g.add_argument("--text-field", default=None, help="text column/field of jsonl, parquet or HF datasets (default 'text')")
    g.add_argument("--data-dir", default=None, help="folder holding local copies of the named corpora")
    g.add_argument("--context-size", type=int, default=128, help="tokens per packed context (default 128)")
    g.add_argument("--model-batch-size", type=int, default=8, help="contexts per model forward (default 8)")
    g.add_argument("--buffer-tokens", type=int, default=65536, help="shuffle buffer size in tokens (default 65536)")
    g.add_argument("--no-normalise", action="store_true", help="train on raw activations (no mean-norm scaling)")
    g.add_argument("--model-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model forward (default: float32 on CPU, bfloat16 on CUDA)")

    g = p.add_argument_group("dictionary")
    g.add_argument("--architecture", default="topk", help="SAE architecture (default topk)")
    g.add_argument("--k", type=int, default=32, help="active latents per token for TopK (default 32)")
    g.add_argument("--expansion", type=int, default=8, help="d_sae = expansion × d_model (default 8)")
    g.add_argument("--d-sae", type=int, default=None, help="number of latents (overrides --expansion)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--tokens", type=int, default=250_000, help="training budget in tokens (default 250000)")
    g.add_argument("--batch-size", type=int, default=4096, help="tokens per training step (default 4096)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4/sqrt(d_sae/16384))")
    g.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (default 50)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=None, help="run folder (default runs/<model>-<hook>-<architecture>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (default 20)")
    g.add_argument("--log-every", type=int, default=5, help="steps between metrics.jsonl lines (default 5)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works without network)")
    g.add_argument("--wandb-project", default="saelab")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation that follows training")
    g.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for the final evaluation (default 16384)")
    p.add_argument("--config", default=None, help="YAML or JSON file whose keys set any of these options (the command line wins)")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae",
        description="saelab: train sparse autoencoders on language-model activations and find out what their features do.",
        epilog="Start with 'sae train' (embedded SmolLM2-135M on wikitext-2, offline, a few minutes on CPU).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a dictionary and write a run folder",
                           description="Stream activations from a model over a text source and train an SAE on them. "
                                       "With no options: SmolLM2-135M, blocks.15.hook_resid_pre, wikitext-2, TopK k=32, 8× expansion.")
    _add_train_options(train)
    ev = sub.add_parser("eval", help="evaluate a trained SAE on held-out text (writes RUN/eval.json)",
                        description="Reconstruction (FVU, L0, dead latents) and spliced-in next-token loss on held-out text.")
    _add_eval_options(ev)
    return parser


def _apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Options from --config become defaults, so anything given on the command line still wins."""
    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; check the path given to --config.")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(path.read_text()) or {}
        else:
            values = json.loads(path.read_text())
    except Exception as e:
        raise UserError(f"config file {path} could not be parsed ({type(e).__name__}: {e}); fix its syntax.") from e
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value.")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(vars(args)) - {"config"})
    if unknown:
        raise UserError(f"config file {path} has unknown options {unknown}; see 'sae {args.command} --help' for valid ones.")
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's own parser
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if getattr(args, "config", None):
            args = _apply_config_file(parser, args, argv)
        if args.command == "train":
            from sae.commands.train import run_train
            run_train(args)
        elif args.command == "eval":
            from sae.commands.evaluate import run_eval
            run_eval(args)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; finished checkpoints are kept (continue a training run with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
