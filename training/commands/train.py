"""`sae train`: open the data (the model over the text, or an activation cache), build one SAE per hook,
train them, and hand the run folder to `sae eval`.

The config tree is training.config.TrainRunConfig; --resume reloads it from RUN/run_config.json and
applies only the fields declared resume=True there.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import time
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from activations.cache import CachedActivationSource, read_manifest
from activations.config import model_dtype, pick_device
from activations.errors import UserError
from activations.files import atomic_write_json, check_writable
from activations.hookpoints import parse_hook
from activations.lock import run_lock
from activations.models import LoadedModel, load_model
from activations.options import build, flag_of, from_dict, leaf_fields, resumable_fields, to_dict
from activations.sources import open_text_source
from activations.store import ActivationStore
from activations.tokens import model_wants_bos
from sae.base import SAE
from sae.registry import make_sae
from training.checkpoint import has_checkpoint, load_checkpoint
from training.config import TrainRunConfig, from_legacy_options
from training.data import FinishableBatches
from training.distributed import (
    barrier,
    init_distributed,
    launch_rank,
    rank_batch_size,
    resume_position,
    split_work,
    teardown,
)
from training.multi import MultiTrainer, resume_point
from training.trainer import Trainer

HELP = "train a dictionary and write a run folder"
DESCRIPTION = (
    "Stream activations from a model over a text source and train an SAE on them. With no options: "
    "SmolLM2-135M, blocks.15.hook_resid_pre, wikitext-2, TopK k=32, 8x expansion, then evaluate."
)
RUN_CONFIG = "run_config.json"
Config = TrainRunConfig


def make_config(values: dict) -> TrainRunConfig:
    """A fresh run's config, or (--resume) the run's saved config with the fields a resumed run may change."""
    cfg = build(TrainRunConfig, values)
    if not cfg.run.resume:
        return cfg
    out = cfg.out_dir()
    saved = load_run_config(out)
    allowed = resumable_fields(TrainRunConfig)
    paths = {f.name: (path, flag_of(f)) for path, f, _ in leaf_fields(TrainRunConfig)}
    current = {name: _get(saved, path, name) for name, (path, _) in paths.items()}
    for name in values:
        given, flag = _get(cfg, paths[name][0], name), paths[name][1]  # as the config holds it (typed)
        if name not in allowed and name not in ("out", "resume") and given != current[name]:
            raise UserError(
                f"{flag} {given!r} differs from the run's {current[name]!r}: a resumed run keeps it. Drop {flag} "
                f"to resume, or start a new run with another --out. A resumed run may change "
                f"{', '.join(sorted(paths[n][1] for n in allowed))}."
            )
    merged = {**current, **{k: v for k, v in values.items() if k in allowed}, "out": str(out), "resume": True}
    return build(TrainRunConfig, merged)


def _get(cfg, path: str, name: str):
    for part in path.split(".") if path else []:
        cfg = getattr(cfg, part)
    return getattr(cfg, name)


def load_run_config(out: Path) -> TrainRunConfig:
    """The config a run in `out` was started with (today's run_config.json, or an older flat one)."""
    path = out / RUN_CONFIG
    if not path.is_file():
        raise UserError(f"{out} holds no run to resume ({RUN_CONFIG} missing); check --out, or start without --resume.")
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it, or start the run again in a new --out.") from e
    where = f"{path}"
    if "config" in saved:
        return from_dict(TrainRunConfig, saved["config"], where)
    if "options" in saved:  # written before the config tree: one flat mapping of the old option names
        known = {f.name for _, f, _ in leaf_fields(TrainRunConfig)}
        options = from_legacy_options(saved["options"])
        return build(TrainRunConfig, {k: v for k, v in options.items() if k in known and v is not None})
    raise UserError(f"{path} holds neither 'config' nor 'options'; it was not written by sae train.")


def reuse_unstarted_run(out: Path) -> None:
    """A fresh start in a folder that holds a run: refused when the run has finished work (a checkpoint or a
    saved SAE, in RUN or RUN/<hook>); a run stopped before its first checkpoint is started again in place."""
    folders = [out, *(d for d in out.iterdir() if d.is_dir())]
    work = [f / name for f in folders for name in ("checkpoint", ".checkpoint-old", "cfg.json") if (f / name).exists()]
    if work:
        raise UserError(
            f"{out} already holds a run ({work[0]} exists); continue it with --resume, "
            "or choose another folder with --out."
        )
    for folder in folders:
        (folder / "metrics.jsonl").unlink(missing_ok=True)  # the lines of the attempt that never checkpointed
    print(f"{out} holds a run that stopped before its first checkpoint; starting it again there")


def follow_up(cfg: TrainRunConfig, out: Path | None) -> list[list[str]]:
    """`sae eval` on the run just trained, unless --no-eval (and only on the process that wrote it)."""
    if not cfg.run.evaluate or out is None:
        return []
    argv = [
        "eval",
        str(out),
        "--tokens",
        str(cfg.run.eval_tokens),
        "--device",
        cfg.model.device,
        "--model-batch-size",
        str(cfg.store.model_batch_size),
    ]
    text = {"dataset_config": cfg.text.dataset_config, "text_field": cfg.text.text_field}
    if cfg.data.activations:  # the model and text the cache was made from
        manifest = read_manifest(cfg.data.activations)
        text = {key: manifest.get(key) for key in text}
    else:
        argv += ["--model", cfg.model.model] + (
            ["--model-dtype", cfg.model.model_dtype] if cfg.model.model_dtype else []
        )
    text["data_dir"] = cfg.text.data_dir
    for name, value in text.items():
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return [argv]


@dataclass
class DataInfo:
    """What the training data is: the model, its width, context size and BOS rule, the dataset, a description."""

    model_name: str
    d_model: int
    context_size: int
    prepend_bos: bool
    dataset: str
    describe: str


def run(cfg: TrainRunConfig) -> Path | None:
    """Train (or resume) one SAE per hook; returns the run folder (None on the ranks that do not write it).

    The process that writes the run folder holds its lock (activations.lock) from the first check to the end."""
    out = cfg.out_dir()
    check_writable(out)
    created = not out.exists()
    try:
        with run_lock(out) if launch_rank() == 0 else contextlib.nullcontext():
            if not cfg.run.resume and (out / RUN_CONFIG).exists():
                reuse_unstarted_run(out)
            return train(cfg, out)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # failed before writing anything (the model or the text could not be opened): leave no trace
        raise


def train(cfg: TrainRunConfig, out: Path) -> Path | None:
    """The training run itself, in the (locked) run folder `out`."""
    ranks, device = init_distributed(pick_device(cfg.model.device))  # under torchrun: one rank per process
    barrier()  # every rank has checked the run folder before rank 0 writes to it
    cached = read_manifest(cfg.data.activations)["hooks"] if cfg.data.activations else None
    hooks, hook_out = cfg.data.hook_list(cached), cfg.data.hook_out
    # One SAE: the run folder is its folder. Several: RUN/<hook>/ each, with run_config.json at the top.
    folders = {hooks[0]: out} if len(hooks) == 1 else {hook: out / hook for hook in hooks}
    store_cfg = replace(
        cfg.store,
        hooks=hooks + ([hook_out] if hook_out else []),
        seed=cfg.training.seed,
        batch_size=rank_batch_size(cfg.store.batch_size, ranks),
        device=device,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    train_cfg = replace(cfg.training, device=device)
    shard = ranks.world_size > 1 and cfg.training.parallel == "latents"  # each rank holds a slice of the latents
    ready = [has_checkpoint(folder) for folder in folders.values()]  # some, not all: killed in the first round
    if cfg.run.resume and (all(ready) or not any(ready)):  # none: load_checkpoint says to start without --resume
        loaded = {hook: load_checkpoint(folder, device=device, shard=shard) for hook, folder in folders.items()}
        saes, states = {h: sae for h, (sae, _) in loaded.items()}, {h: state for h, (_, state) in loaded.items()}
        # The store restarts where the hook furthest behind stopped; its trainer puts the shuffle buffer back.
        state = resume_point(list(states.values()))
        store, about = open_data(cfg, store_cfg, device, state["store_scales"], resume_position(state, ranks))
        if ranks.is_main:
            print(f"resuming {out} from step {state['step']} ({state['tokens']} tokens)")
    else:
        if cfg.run.resume and ranks.is_main:
            print(f"not every hook of {out} had checkpointed when it stopped; training them all again from step 0")
        store, about = open_data(cfg, store_cfg, device, None, 0)
        with torch.device("meta") if shard else contextlib.nullcontext():  # shards are initialised by split_work
            saes = {hook: new_sae(cfg, hook, hook_out, about) for hook in hooks}
        saes = {hook: sae if shard else sae.to(device) for hook, sae in saes.items()}
        states = {hook: None for hook in hooks}
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_CONFIG, {"config": to_dict(cfg), "saelab_version": _version()})
        sae = saes[hooks[0]]
        print(
            f"training {len(hooks)} × {sae.cfg.architecture} SAE ({sae.cfg.d_in}→{sae.cfg.d_sae}) on "
            f"{about.model_name} {', '.join(hooks)}{f' → {hook_out}' if hook_out else ''} over {about.describe} "
            f"for {cfg.training.tokens} tokens on {device}"
            f"{f' and {ranks.world_size - 1} more processes ({ranks.backend})' if ranks.world_size > 1 else ''}; "
            f"run folder {out}"
        )
    started = time.time()
    # under torchrun: which hooks this rank trains, on what data, with which collectives (--parallel)
    store, mine, parallel = split_work(
        cfg.training.parallel, ranks, store, saes, hooks, bool(hook_out), device=device, seed=cfg.training.seed
    )
    trainers = [
        Trainer(
            saes[hook],
            store,
            train_cfg,
            folders[hook],
            hook_index=i,
            run_config=to_dict(cfg),
            parallel=parallel(),
            target_index=len(hooks) if hook_out else None,
            compile=cfg.training.compile,
        )
        for hook, i in mine
    ]
    if len(trainers) == 1:
        trainers[0].train(resume_state=states[mine[0][0]])
    else:
        MultiTrainer(trainers, store).train(resume_states=[states[hook] for hook, _ in mine])
    if isinstance(store, FinishableBatches):
        store.finish()  # layer split: keep serving the ranks still training
    elapsed = time.time() - started
    tokens = trainers[0].tokens
    # DDP's reducer holds the process group: free it while every rank is still here (freed after the group is
    # gone, its gloo threads can wait forever for a peer that has exited).
    del trainers, parallel
    gc.collect()
    barrier()
    teardown()  # the evaluation that follows runs on rank 0 alone
    if not ranks.is_main:
        return None
    print(
        f"trained {tokens} tokens in {elapsed:.0f} s ({tokens / max(elapsed, 1e-9):.0f} tokens/s); "
        f"SAE{'s' if len(hooks) > 1 else ''} saved in {out}"
    )
    return out


def open_data(
    cfg: TrainRunConfig, store_cfg, device: str, scales: dict | None, skip_contexts: int
) -> tuple[object, DataInfo]:
    """The activation batches (the model over the text, or an activation cache) and what the data is."""
    if cfg.data.activations:
        store = CachedActivationSource(cfg.data.activations, store_cfg, scales=scales, skip_contexts=skip_contexts)
        m = store.manifest
        return store, DataInfo(
            m["model"],
            m["d_model"],
            m["context_size"],
            bool(m["prepend_bos"]),
            m.get("dataset") or "",
            store.describe(),
        )
    lm: LoadedModel = load_model(cfg.model.model, device=device, dtype=model_dtype(cfg.model.model_dtype))
    for hook in store_cfg.hooks:
        parse_hook(hook, lm.model)  # a bad layer or kind fails before any text is read
    lm.check_context_size(store_cfg.context_size)
    text = cfg.text
    source = open_text_source(
        text.dataset, split=text.split, config=text.dataset_config, text_field=text.text_field, data_dir=text.data_dir
    )
    store = ActivationStore(lm, source, store_cfg, scales=scales, skip_contexts=skip_contexts)
    return store, DataInfo(
        lm.name,
        lm.d_model,
        store_cfg.context_size,
        model_wants_bos(lm.tokenizer),
        text.dataset,
        getattr(source, "describe", lambda: text.dataset)(),
    )


def new_sae(cfg: TrainRunConfig, hook: str, hook_out: str | None, about: DataInfo) -> SAE:
    """A freshly initialised SAE for `hook` (seeded with --seed, so every hook starts alike)."""
    sae_cfg = cfg.dictionary.sae_config(
        about.d_model,
        model_name=about.model_name,
        hook_name=hook,
        hook_layer=hook_layer(hook),
        context_size=about.context_size,
        prepend_bos=about.prepend_bos,
        dataset=about.dataset,
        **(dict(hook_name_out=hook_out, hook_layer_out=hook_layer(hook_out)) if hook_out else {}),
    )
    torch.manual_seed(cfg.training.seed)
    return make_sae(sae_cfg)


def hook_layer(name: str) -> int:
    """The block index of a hook name (-1 if it names none)."""
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _version() -> str:
    try:
        return version("saelab")
    except PackageNotFoundError:
        return "unknown"
