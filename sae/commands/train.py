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

RUN_CONFIG = "run_config.json"
# Options a resumed run may change; everything else comes from the run's own run_config.json.
RESUME_OVERRIDES = ("lr", "tokens", "device", "wandb", "no_eval", "eval_tokens", "checkpoint_every", "log_every")


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
    from sae.cli import build_parser
    defaults = vars(build_parser().parse_args(["train"]))
    for key in RESUME_OVERRIDES:  # an option changed from its default on this command line wins
        if given.get(key) != defaults.get(key):
            opts[key] = given[key]
    return opts


def run_train(args: argparse.Namespace) -> Path:
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
