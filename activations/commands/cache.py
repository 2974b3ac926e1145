"""`sae cache`: run the model once over the text and write its activations to a cache folder.

`sae train --activations DIR` then trains from the folder as many times as wanted, with the same
batches a streamed run would see. Re-running `sae cache --out DIR` resumes or repairs a cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from activations.cache import MANIFEST, CacheConfig, read_manifest, write_cache
from activations.config import (
    DEFAULT_HOOK,
    ModelConfig,
    StoreConfig,
    TextConfig,
    check_hook_name,
    model_dtype,
    pick_device,
)
from activations.errors import UserError
from activations.files import check_writable
from activations.hookpoints import parse_hook
from activations.lock import run_lock
from activations.models import load_model
from activations.options import build, flag_of, leaf_fields, option, to_dict
from activations.sources import open_text_source

HELP = "run the model once and write activations to disk (train from them with sae train --activations)"
DESCRIPTION = (
    "Write raw activations of one or more hooks to safetensors shards with a manifest (model, hooks, "
    "normalisation, token count, provenance). An interrupted run resumes when re-run with the same --out."
)
# Options that decide what the cache holds: a resumed cache keeps its own and refuses different ones.
FIXED = (
    "model",
    "hooks",
    "dataset",
    "dataset_config",
    "split",
    "text_field",
    "context_size",
    "model_batch_size",
    "dtype",
    "shard_tokens",
    "model_dtype",
)


@dataclass
class CacheCommandConfig:
    """Where to write, which hooks of which model over which text, and how the shards are stored."""

    out: str = option(None, "cache folder (re-run with the same folder to resume or repair it)")
    hooks: list[str] = option(
        default_factory=lambda: [DEFAULT_HOOK],
        help=f"comma-separated hook points, all from one forward (default {DEFAULT_HOOK})",
    )
    context_size: int = option(StoreConfig.context_size, "tokens per packed context", low=2)
    model_batch_size: int = option(StoreConfig.model_batch_size, "contexts per model forward", low=1)
    model: ModelConfig = field(default_factory=ModelConfig, metadata=dict(help="model"))
    text: TextConfig = field(default_factory=TextConfig, metadata=dict(help="text"))
    cache: CacheConfig = field(default_factory=CacheConfig, metadata=dict(help="shards"))

    def __post_init__(self) -> None:
        if not self.out:
            raise UserError("--out is required: the cache folder to write (or to resume).")
        if not self.hooks:
            raise UserError("--hooks is empty; give one or more hook points, e.g. --hooks blocks.6.hook_resid_post")
        for hook in self.hooks:
            check_hook_name(hook, "--hooks")


Config = CacheCommandConfig


def make_config(values: dict) -> CacheCommandConfig:
    """The options to cache with: an existing cache's own for what it holds (a conflicting one is an error)."""
    cfg = build(CacheCommandConfig, values)
    out = Path(cfg.out)
    if not (out / MANIFEST).exists():
        return cfg
    stored = read_manifest(out).get("options", {})
    flags = {f.name: flag_of(f) for _, f, _ in leaf_fields(CacheCommandConfig)}
    for key in FIXED:
        if key in values and key in stored and values[key] != stored[key]:
            raise UserError(
                f"{out} already caches {flags[key].lstrip('-')}={stored[key]!r}, not {values[key]!r}; "
                f"re-run without {flags[key]} to resume it, or choose another --out."
            )
    return build(CacheCommandConfig, {**values, **{k: stored[k] for k in FIXED if k in stored}})


def fixed_options(cfg: CacheCommandConfig) -> dict:
    """The options that decide what the cache holds, by name, for its manifest."""
    flat = {}
    for section in to_dict(cfg).values():
        if isinstance(section, dict):
            flat.update(section)
    flat.update(hooks=cfg.hooks, context_size=cfg.context_size, model_batch_size=cfg.model_batch_size)
    return {key: flat[key] for key in FIXED}


def run(cfg: CacheCommandConfig) -> dict:
    """Build (or resume) the cache and print where it is."""
    out = Path(cfg.out)
    check_writable(out)
    device = pick_device(cfg.model.device)
    lm = load_model(cfg.model.model, device=device, dtype=model_dtype(cfg.model.model_dtype))
    for hook in cfg.hooks:
        parse_hook(hook, lm.model)  # a bad layer or kind fails before any text is read
    lm.check_context_size(cfg.context_size)
    text = cfg.text
    source = open_text_source(
        text.dataset, split=text.split, config=text.dataset_config, text_field=text.text_field, data_dir=text.data_dir
    )
    store_cfg = StoreConfig(
        hooks=cfg.hooks, context_size=cfg.context_size, model_batch_size=cfg.model_batch_size, device="cpu"
    )
    info = {
        "dataset": text.dataset,
        "dataset_config": text.dataset_config,
        "split": text.split,
        "text_field": text.text_field,
        "options": fixed_options(cfg),
    }
    print(
        f"caching {', '.join(cfg.hooks)} of {lm.name} over {getattr(source, 'describe', lambda: text.dataset)()} "
        f"({cfg.cache.tokens} tokens) into {out}"
    )
    with run_lock(out):  # one writer per cache folder
        manifest = write_cache(lm, source, store_cfg, out, cfg.cache, info=info)
    size = sum(s["bytes"] for s in manifest["shards"])
    print(
        f"cached {manifest['tokens']} tokens × {len(manifest['hooks'])} hook(s) in {len(manifest['shards'])} "
        f"shard(s), {size / 2**20:.1f} MiB → {out} (train with: sae train --activations {out})"
    )
    return manifest
