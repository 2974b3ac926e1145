"""`sae train`: load the model and text, build the store and SAE, train, then evaluate on held-out text."""

from __future__ import annotations

import argparse
import contextlib
import gc
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
RESUME_OVERRIDES = ("lr", "tokens", "device", "wandb", "no_eval", "eval_tokens", "checkpoint_every", "log_every",
                    "compile")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `sae train` (a --config file may set any of them)."""
    g = p.add_argument_group("data and model")
    g.add_argument("--model", default="smollm2-135m",
                   help="HF hub id, local model folder, .gguf file, or 'smollm2-135m' (embedded default, offline)")
    g.add_argument("--hook", default=None, help=f"hook point, e.g. blocks.6.hook_resid_post (default {DEFAULT_HOOK}; "
                   "with --activations: every hook of the cache)")
    g.add_argument("--hooks", default=None, help="several hook points, comma-separated: one SAE each, all from the same "
                   "model forward (run folder: RUN/<hook>/ per hook)")
    g.add_argument("--hook-out", default=None, help="transcoder: the hook it reconstructs from --hook, "
                   "e.g. --hook blocks.3.hook_mlp_in --hook-out blocks.3.hook_mlp_out")
    g.add_argument("--activations", default=None, metavar="DIR",
                   help="train from an activation cache written by `sae cache` instead of running the model")
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
    from sae.registry import ARCHITECTURES
    g.add_argument("--architecture", default="topk", help=f"SAE architecture: {', '.join(sorted(ARCHITECTURES))} (default topk)")
    g.add_argument("--k", type=int, default=32,
                   help="active latents per token for topk, transcoder; per token on average for batchtopk, matryoshka (default 32)")
    g.add_argument("--l1-coefficient", type=float, default=None,
                   help="relu, gated: weight of the decoder-norm-weighted L1 penalty, SAELens units (default 5)")
    g.add_argument("--l0-coefficient", type=float, default=None, help="jumprelu: weight of the L0 penalty, SAELens units (default 1)")
    g.add_argument("--matryoshka-prefixes", default=None,
                   help="matryoshka: nested dictionary sizes, e.g. 256,1024,4096 (default d_sae/16,/8,/4,/2,d_sae)")
    g.add_argument("--expansion", type=int, default=8, help="d_sae = expansion × d_model (default 8)")
    g.add_argument("--d-sae", type=int, default=None, help="number of latents (overrides --expansion)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--tokens", type=int, default=250_000, help="training budget in tokens (default 250000)")
    g.add_argument("--batch-size", type=int, default=1024, help="tokens per training step (default 1024)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3/sqrt(d_sae/4096))")
    g.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps, at most a tenth of the run (default 50)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (faster on GPU once compiled; the first steps compile)")
    g.add_argument("--parallel", default="data", choices=["data", "latents", "layers"],
                   help="under torchrun, how the processes share the work: data (each its share of every batch, "
                        "DDP), latents (each a slice of every dictionary's latents, TopK only), layers (each the "
                        "SAEs of its own --hooks) (default data)")

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
    model = Path(opts["activations"]).name if opts.get("activations") else Path(opts["model"]).stem
    hooks = opts.get("hooks") or opts.get("hook") or (DEFAULT_HOOK if not opts.get("activations") else "cache")
    name = f"{model}-{hooks if isinstance(hooks, str) else ','.join(hooks)}-{opts['architecture']}"
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def dictionary_hooks(opts: dict, cached: list[str] | None = None) -> tuple[list[str], str | None]:
    """The hooks to train one SAE each on, and a transcoder's output hook (None for SAEs)."""
    hooks, hook_out = opts.get("hooks"), opts.get("hook_out")
    if hooks and opts.get("hook"):
        raise UserError("give either --hook (one SAE) or --hooks (one SAE per hook), not both.")
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    if not hooks:
        hooks = [opts["hook"]] if opts.get("hook") else [h for h in cached if h != hook_out] if cached else [DEFAULT_HOOK]
    if len(set(hooks)) != len(hooks):
        raise UserError(f"--hooks lists a hook twice ({','.join(hooks)}); give each hook once.")
    if (opts["architecture"] == "transcoder") != bool(hook_out):
        raise UserError("a transcoder needs --hook-out (the hook it reconstructs), e.g. --hook blocks.3.hook_mlp_in "
                        "--hook-out blocks.3.hook_mlp_out; --hook-out is for --architecture transcoder only.")
    if hook_out and len(hooks) != 1:
        raise UserError(f"a transcoder reads one hook (--hook) and reconstructs --hook-out; got {len(hooks)} input hooks. "
                        "Train one transcoder per run.")
    return hooks, hook_out


def _hook_layer(name: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


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
    """Train (or resume) one SAE per hook and, unless --no-eval, evaluate each."""
    from activations.store import StoreConfig
    from training.checkpoint import load_checkpoint
    from training.config import TrainConfig
    from training.distributed import barrier, init_distributed, rank_batch_size, resume_position, split_work, teardown
    from training.multi import MultiTrainer, resume_point
    from training.trainer import Trainer

    out = Path(args.out) if args.out else default_out(vars(args))
    opts = _options(args, out)
    ranks, device = init_distributed(pick_device(opts["device"]))  # under torchrun: one rank per process
    barrier()  # every rank has checked the run folder before rank 0 writes to it
    cached = None
    if opts.get("activations"):
        from activations.cache import read_manifest
        cached = read_manifest(opts["activations"])["hooks"]
    hooks, hook_out = dictionary_hooks(opts, cached)
    # One SAE: the run folder is its folder. Several: RUN/<hook>/ each, with run_config.json at the top.
    folders = {hooks[0]: out} if len(hooks) == 1 else {hook: out / hook for hook in hooks}
    store_cfg = StoreConfig(
        hooks=hooks + ([hook_out] if hook_out else []), context_size=opts["context_size"], model_batch_size=opts["model_batch_size"],
        batch_size=rank_batch_size(opts["batch_size"], ranks), buffer_tokens=opts["buffer_tokens"],
        normalise=not opts["no_normalise"], seed=opts["seed"], device=device, rank=ranks.rank, world_size=ranks.world_size,
    )
    train_cfg = TrainConfig(
        tokens=opts["tokens"], lr=opts["lr"], warmup_steps=opts["warmup_steps"], log_every=opts["log_every"],
        checkpoint_every=opts["checkpoint_every"], wandb=opts["wandb"], wandb_project=opts["wandb_project"],
        device=device, seed=opts["seed"],
    )
    shard = ranks.world_size > 1 and opts.get("parallel") == "latents"  # each rank holds a slice of the latents
    if args.resume:
        loaded = {hook: load_checkpoint(folder, device=device, shard=shard) for hook, folder in folders.items()}
        saes, states = {h: sae for h, (sae, _) in loaded.items()}, {h: state for h, (_, state) in loaded.items()}
        state = resume_point(list(states.values()))   # the store restarts where the hook furthest behind stopped
        store, lm, about = _open_data(opts, store_cfg, device, state["store_scales"], resume_position(state, ranks))
        if ranks.is_main:
            print(f"resuming {out} from step {state['step']} ({state['tokens']} tokens)")
    else:
        store, lm, about = _open_data(opts, store_cfg, device, None, 0)
        with torch.device("meta") if shard else contextlib.nullcontext():  # shards are initialised by split_work
            saes = {hook: _new_sae(opts, hook, hook_out, about) for hook in hooks}
        saes = {hook: sae if shard else sae.to(device) for hook, sae in saes.items()}
        states = {hook: None for hook in hooks}
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG).write_text(json.dumps({"options": opts, "saelab_version": _version()}, indent=2))
        sae = saes[hooks[0]]
        print(f"training {len(hooks)} × {sae.cfg.architecture} SAE ({sae.cfg.d_in}→{sae.cfg.d_sae}) on {about['model_name']} "
              f"{', '.join(hooks)}{f' → {hook_out}' if hook_out else ''} over {about['describe']} for {opts['tokens']} tokens "
              f"on {device}{f' and {ranks.world_size - 1} more processes ({ranks.backend})' if ranks.world_size > 1 else ''}; "
              f"run folder {out}")
    started = time.time()
    # under torchrun: which hooks this rank trains, on what data, with which collectives (--parallel)
    store, mine, parallel = split_work(opts.get("parallel") or "data", ranks, store, saes, hooks, bool(hook_out),
                                       device=device, seed=opts["seed"])
    trainers = [Trainer(saes[hook], store, train_cfg, folders[hook], hook_index=i, run_config=opts,
                        parallel=parallel(), target_index=len(hooks) if hook_out else None,
                        compile=opts.get("compile", False))
                for hook, i in mine]
    if len(trainers) == 1:
        trainers[0].train(resume_state=states[mine[0][0]])
    else:
        MultiTrainer(trainers, store).train(resume_states=[states[hook] for hook, _ in mine])
    if hasattr(store, "finish"):
        store.finish()  # layer split: keep serving the ranks still training
    elapsed = time.time() - started
    tokens = trainers[0].tokens
    # DDP's reducer holds the process group: free it while every rank is still here (freed after the group is
    # gone, its gloo threads can wait forever for a peer that has exited).
    del trainers, parallel
    gc.collect()
    barrier()
    teardown()  # the evaluation below runs on rank 0 alone
    if not ranks.is_main:
        return out
    print(f"trained {tokens} tokens in {elapsed:.0f} s ({tokens / max(elapsed, 1e-9):.0f} tokens/s); "
          f"SAE{'s' if len(hooks) > 1 else ''} saved in {out}")
    if not opts["no_eval"]:
        from sae.commands.evaluate import evaluate_run
        for folder in folders.values():
            evaluate_run(folder, lm=lm, model=about["model_name"] if lm is None else None, device=device, split="test",
                         tokens=opts["eval_tokens"], model_batch_size=opts["model_batch_size"], dataset=about["dataset"],
                         dataset_config=about["dataset_config"], text_field=about["text_field"], data_dir=opts["data_dir"])
    return out


def _open_data(opts: dict, store_cfg, device: str, scales: dict | None, skip_contexts: int):
    """The activation batches (the model over the text, or an activation cache), the model (None for a
    cache), and what the data is: model name, d_model, context size, BOS rule, dataset, a description."""
    if opts.get("activations"):
        from activations.cache import CachedActivationSource

        store = CachedActivationSource(opts["activations"], store_cfg, scales=scales, skip_contexts=skip_contexts)
        m = store.manifest
        return store, None, dict(model_name=m["model"], d_model=m["d_model"], context_size=m["context_size"],
                                 prepend_bos=bool(m["prepend_bos"]), dataset=m.get("dataset") or "",
                                 dataset_config=m.get("dataset_config"), text_field=m.get("text_field"),
                                 describe=store.describe())
    from activations.hookpoints import parse_hook
    from activations.models import load_model
    from activations.sources import open_text_source
    from activations.store import ActivationStore
    from activations.tokens import model_wants_bos

    lm = load_model(opts["model"], device=device, dtype=model_dtype(opts["model_dtype"]))
    for hook in store_cfg.hooks:
        parse_hook(hook, lm.model)  # a bad name fails before anything is written
    source = open_text_source(opts["dataset"], split=opts["split"], config=opts["dataset_config"],
                              text_field=opts["text_field"], data_dir=opts["data_dir"])
    store = ActivationStore(lm, source, store_cfg, scales=scales, skip_contexts=skip_contexts)
    return store, lm, dict(model_name=lm.name, d_model=lm.d_model, context_size=opts["context_size"],
                           prepend_bos=model_wants_bos(lm.tokenizer), dataset=opts["dataset"],
                           dataset_config=opts["dataset_config"], text_field=opts["text_field"],
                           describe=getattr(source, "describe", lambda: opts["dataset"])())


def _new_sae(opts: dict, hook: str, hook_out: str | None, about: dict):
    """A freshly initialised SAE for `hook` (seeded with --seed, so every hook starts alike)."""
    from sae.config import SAEConfig
    from sae.matryoshka import parse_prefixes
    from sae.registry import make_sae

    d_sae = opts["d_sae"] or opts["expansion"] * about["d_model"]
    sae_cfg = SAEConfig(
        d_in=about["d_model"], d_sae=d_sae, architecture=opts["architecture"], k=opts["k"],
        model_name=about["model_name"], hook_name=hook, hook_layer=_hook_layer(hook), context_size=about["context_size"],
        prepend_bos=about["prepend_bos"], dataset=about["dataset"],
        matryoshka_prefixes=parse_prefixes(opts.get("matryoshka_prefixes")),
        **{key: opts[key] for key in ("l1_coefficient", "l0_coefficient") if opts.get(key) is not None},
        **(dict(hook_name_out=hook_out, hook_layer_out=_hook_layer(hook_out)) if hook_out else {}),
    )
    torch.manual_seed(opts["seed"])
    return make_sae(sae_cfg)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("saelab")
    except PackageNotFoundError:
        return "unknown"
