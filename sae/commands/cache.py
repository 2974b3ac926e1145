"""`sae cache`: run the model once over the text and write its activations to a cache folder.

`sae train --activations DIR` then trains from the folder as many times as wanted, with the same
batches a streamed run would see. Re-running `sae cache --out DIR` resumes or repairs a cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from activations.errors import UserError
from sae.commands.common import model_dtype, pick_device

HELP = "run the model once and write activations to disk (train from them with sae train --activations)"
DESCRIPTION = ("Write raw activations of one or more hooks to safetensors shards with a manifest (model, hooks, "
               "normalisation, token count, provenance). An interrupted run resumes when re-run with the same --out.")
DEFAULT_HOOK = "blocks.15.hook_resid_pre"
# Options that decide what the cache holds: a resumed cache keeps its own and refuses different ones.
FIXED = ("model", "hooks", "dataset", "dataset_config", "split", "text_field", "context_size", "model_batch_size",
         "dtype", "shard_tokens", "model_dtype")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `sae cache`."""
    p.add_argument("--out", required=True, help="cache folder (re-run with the same folder to resume or repair it)")
    p.add_argument("--model", default="smollm2-135m", help="HF hub id, local model folder, .gguf file, or 'smollm2-135m'")
    p.add_argument("--hooks", default=DEFAULT_HOOK,
                   help=f"comma-separated hook points, all from one forward (default {DEFAULT_HOOK})")
    p.add_argument("--dataset", default="wikitext-2", help="'wikitext-2', 'tinyshakespeare', local files, or an HF dataset id")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--text-field", default=None)
    p.add_argument("--data-dir", default=None, help="folder holding local copies of the named corpora")
    p.add_argument("--tokens", type=int, default=250_000, help="activation tokens to store (default 250000)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per packed context (default 128)")
    p.add_argument("--model-batch-size", type=int, default=8, help="contexts per model forward (default 8)")
    p.add_argument("--shard-tokens", type=int, default=32768, help="activation tokens per shard file (default 32768)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored dtype (default float32; bfloat16 halves the disk)")
    p.add_argument("--model-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model forward (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")


def _resolve_options(args: argparse.Namespace, out: Path) -> dict:
    """The options to cache with: the existing manifest's when resuming (a conflicting one is an error)."""
    from activations.cache import MANIFEST, read_manifest

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if not (out / MANIFEST).exists():
        return given
    stored = read_manifest(out).get("options", {})
    parser = argparse.ArgumentParser()
    add_options(parser)
    defaults = vars(parser.parse_args(["--out", str(out)]))
    for key in FIXED:
        if given.get(key) != defaults.get(key) and key in stored and given.get(key) != stored[key]:
            raise UserError(f"{out} already caches {key.replace('_', '-')}={stored[key]!r}, not {given[key]!r}; "
                            f"re-run without --{key.replace('_', '-')} to resume it, or choose another --out.")
    return {**given, **{k: stored[k] for k in FIXED if k in stored}}


def run(args: argparse.Namespace) -> dict:
    """Build (or resume) the cache and print where it is."""
    from activations.cache import CacheConfig, write_cache
    from activations.hookpoints import parse_hook
    from activations.models import load_model
    from activations.sources import open_text_source
    from activations.store import StoreConfig

    out = Path(args.out)
    opts = _resolve_options(args, out)
    given_hooks = opts["hooks"] if isinstance(opts["hooks"], list) else str(opts["hooks"]).split(",")  # a --config may give a list
    hooks = [h.strip() for h in given_hooks if h.strip()]
    if not hooks:
        raise UserError("--hooks is empty; give one or more hook points, e.g. --hooks blocks.6.hook_resid_post")
    device = pick_device(opts["device"])
    lm = load_model(opts["model"], device=device, dtype=model_dtype(opts["model_dtype"]))
    source = open_text_source(opts["dataset"], split=opts["split"], config=opts["dataset_config"],
                              text_field=opts["text_field"], data_dir=opts["data_dir"])
    store_cfg = StoreConfig(hooks=hooks, context_size=opts["context_size"], model_batch_size=opts["model_batch_size"],
                            device="cpu")
    for h in hooks:
        parse_hook(h, lm.model)  # a bad name fails before anything is written
    info = {"dataset": opts["dataset"], "dataset_config": opts["dataset_config"], "split": opts["split"],
            "text_field": opts["text_field"], "options": {k: opts[k] for k in FIXED}}
    print(f"caching {', '.join(hooks)} of {lm.name} over {getattr(source, 'describe', lambda: opts['dataset'])()} "
          f"({opts['tokens']} tokens) into {out}")
    manifest = write_cache(lm, source, store_cfg, out, CacheConfig(tokens=opts["tokens"], shard_tokens=opts["shard_tokens"],
                                                                    dtype=opts["dtype"]), info=info)
    size = sum(s["bytes"] for s in manifest["shards"])
    print(f"cached {manifest['tokens']} tokens × {len(manifest['hooks'])} hook(s) in {len(manifest['shards'])} shard(s), "
          f"{size / 2**20:.1f} MiB → {out} (train with: sae train --activations {out})")
    return manifest
