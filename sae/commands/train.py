"""`sae train`: load the model and text, build the store and SAE, train, then evaluate on held-out text."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from activations.errors import UserError
from sae.commands.common import model_dtype, pick_device

HELP = "train a dictionary and write a run folder"
DESCRIPTION = ("Stream activations from a model over a text source and train an SAE on them. With no options: "
               "SmolLM2-135M, blocks.15.hook_resid_pre, wikitext-2, TopK k=32, 8x expansion, then evaluate.")
DEFAULT_HOOK = "blocks.15.hook_resid_pre"   # the residual stream half-way through SmolLM2-135M's 30 blocks
RUN_CONFIG = "run_config.json"
# Options a resumed run may change; everything else comes from the run's own run_config.json.
RESUME_OVERRIDES = ("lr", "tokens", "device", "wandb", "no_eval", "eval_tokens", "checkpoint_every", "log_every")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `sae train` (a --config file may set any of them)."""
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


def default_out(opts: dict) -> Path:
    name = f"{Path(opts['model']).stem}-{opts['hook']}-{opts['architecture']}"
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _options(args: argparse.Namespace, out: Path) -> dict:
    """The options of a fresh run, or of the run being resumed (with the allowed overrides)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "out")}
    if not args.resume:
        if (out / RUN_CONFIG).exists():
            raise UserError(f"{out} already holds a run; continue it with --resume, or choose another folder with --out.")
        return given
    path = out / RUN_CONFIG
    if not path.is_file():
        raise UserError(f"{out} holds no run to resume ({RUN_CONFIG} missing); check --out, or start without --resume.")
    opts = json.loads(path.read_text())["options"]
    parser = argparse.ArgumentParser()
    add_options(parser)
    defaults = vars(parser.parse_args([]))
    for key in RESUME_OVERRIDES:  # an option changed from its default on this command line wins
        if given.get(key) != defaults.get(key):
            opts[key] = given[key]
    return opts


def run(args: argparse.Namespace) -> Path:
    """Train (or resume) and, unless --no-eval, evaluate."""
    from activations.models import load_model
    from activations.sources import open_text_source
    from activations.store import ActivationStore, StoreConfig
    from sae.config import SAEConfig
    from sae.registry import make_sae
    from training.checkpoint import load_checkpoint
    from training.config import TrainConfig
    from training.trainer import Trainer

    out = Path(args.out) if args.out else default_out(vars(args))
    opts = _options(args, out)
    device = pick_device(opts["device"])
    lm = load_model(opts["model"], device=device, dtype=model_dtype(opts["model_dtype"]))
    source = open_text_source(opts["dataset"], split=opts["split"], config=opts["dataset_config"],
                              text_field=opts["text_field"], data_dir=opts["data_dir"])
    store_cfg = StoreConfig(
        hooks=[opts["hook"]], context_size=opts["context_size"], model_batch_size=opts["model_batch_size"],
        batch_size=opts["batch_size"], buffer_tokens=opts["buffer_tokens"], normalise=not opts["no_normalise"],
        seed=opts["seed"], device=device,
    )
    train_cfg = TrainConfig(
        tokens=opts["tokens"], lr=opts["lr"], warmup_steps=opts["warmup_steps"], log_every=opts["log_every"],
        checkpoint_every=opts["checkpoint_every"], wandb=opts["wandb"], wandb_project=opts["wandb_project"],
        device=device, seed=opts["seed"],
    )
    if args.resume:
        sae, state = load_checkpoint(out, device=device)
        store = ActivationStore(lm, source, store_cfg, scales=state["store_scales"], skip_contexts=state["contexts_consumed"])
        print(f"resuming {out} from step {state['step']} ({state['tokens']} tokens)")
    else:
        from activations.hookpoints import parse_hook
        from activations.tokens import model_wants_bos

        hp = parse_hook(opts["hook"], lm.model)
        store = ActivationStore(lm, source, store_cfg)
        d_sae = opts["d_sae"] or opts["expansion"] * lm.d_model
        sae_cfg = SAEConfig(
            d_in=lm.d_model, d_sae=d_sae, architecture=opts["architecture"], k=opts["k"],
            model_name=lm.name, hook_name=hp.name, hook_layer=hp.layer, context_size=opts["context_size"],
            prepend_bos=model_wants_bos(lm.tokenizer), dataset=opts["dataset"],
        )
        torch.manual_seed(opts["seed"])
        sae, state = make_sae(sae_cfg).to(device), None
        out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps({"options": opts, "saelab_version": _version()}, indent=2))

    print(f"training {sae.cfg.architecture} SAE ({sae.cfg.d_in}→{sae.cfg.d_sae}) on {lm.name} {opts['hook']} "
          f"over {getattr(source, 'describe', lambda: opts['dataset'])()} for {opts['tokens']} tokens on {device}; run folder {out}")
    started = time.time()
    trainer = Trainer(sae, store, train_cfg, out, run_config=opts)
    trainer.train(resume_state=state)
    elapsed = time.time() - started
    print(f"trained {trainer.tokens} tokens in {elapsed:.0f} s ({trainer.tokens / max(elapsed, 1e-9):.0f} tokens/s); SAE saved in {out}")
    if not opts["no_eval"]:
        from sae.commands.evaluate import evaluate_run
        evaluate_run(out, lm=lm, split="test", tokens=opts["eval_tokens"], model_batch_size=opts["model_batch_size"],
                     dataset=opts["dataset"], dataset_config=opts["dataset_config"], text_field=opts["text_field"],
                     data_dir=opts["data_dir"])
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("saelab")
    except PackageNotFoundError:
        return "unknown"
