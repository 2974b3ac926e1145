"""The on-disk activation cache: run the model once, train from the shards many times.

A cache folder holds `manifest.json` and shards `shard-00000.safetensors`, ... Each shard is the
raw (unnormalised) activations of whole contexts in stream order, `activations [n, n_hooks, d]`,
with per-row provenance (`token_ids`, `doc_ids`, `positions` in the document, `context_ids`,
`context_positions`) and the full token ids of its contexts (`context_tokens [n_ctx, T]`).
Shards are written atomically and the manifest is rewritten after each one, so an interrupted
`sae cache` resumes where it stopped; `CachedActivationSource` replays the rows in the order they
were written through the same shuffle buffer as the live `ActivationStore`, so training from a
cache gives the same batches as streaming the same text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from activations.errors import UserError
from activations.files import atomic_write, atomic_write_json
from activations.models import LoadedModel
from activations.options import check_fields, option
from activations.shuffle import ShuffledActivations, resume_generator
from activations.sources import Document
from activations.store import ActivationStore, StoreConfig
from activations.tokens import model_wants_bos

MANIFEST = "manifest.json"
FORMAT = "saelab-activation-cache"
VERSION = 1
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _rebuild_hint(folder: Path, name: str) -> str:
    return f"delete {folder / name} and re-run `sae cache --out {folder}` to rebuild it"


# ---- the manifest ---------------------------------------------------------------------------


def read_manifest(folder: str | os.PathLike, repair: bool = False) -> dict:
    """The manifest of a cache folder, checked, or a UserError saying what is wrong and how to fix it.

    repair (`sae cache` resuming): drop the first broken shard entry and every later one, so that they are
    written again, instead of refusing.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} is not an activation cache ({MANIFEST} missing); "
            f"create one with `sae cache --out {folder}` or check the path."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(
            f"{path} is not valid JSON ({err}); delete the folder and re-run `sae cache --out {folder}`."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a saelab activation-cache manifest; point --activations at a folder written by `sae cache`."
        )
    if manifest.get("version") != VERSION:
        raise UserError(
            f"{path} has cache format version {manifest.get('version')}, this saelab reads version {VERSION}; "
            "rebuild the cache with this version of `sae cache`."
        )
    _check_fields(path, manifest)
    start = 0  # shards hold consecutive runs of contexts
    for index, entry in enumerate(manifest["shards"]):
        problem = _shard_entry_problem(entry, len(manifest["hooks"]))
        if not problem and entry["first_context"] != start:
            problem = f"({entry['file']}) starts at context {entry['first_context']}, the shards before end at {start}"
        if problem and repair:
            print(f"note: {path}: shard entry {index} {problem}; writing it and the shards after it again")
            del manifest["shards"][index:]
            break
        if problem:
            raise UserError(
                f"{path}: shard entry {index} {problem}; re-run `sae cache --out {folder}` to repair it "
                "(the shards from there on are written again)."
            )
        start += entry["contexts"]
    return manifest


# Top-level manifest fields and the types readers rely on (bool is not an int here).
_MANIFEST_FIELDS = {
    "model": str,
    "d_model": int,
    "hooks": list,
    "dtype": str,
    "context_size": int,
    "model_batch_size": int,
    "prepend_bos": bool,
    "skip_special": bool,
    "skip_first": bool,
    "shard_tokens": int,
    "tokens": int,
    "contexts": int,
    "scales": dict,
    "shards": list,
}
# What each shard entry holds: the file, where its contexts sit in the stream, its size and checksum.
_SHARD_FIELDS = {"file": str, "tokens": int, "contexts": int, "first_context": int, "bytes": int, "sha256": str}


def _is(value: object, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _check_fields(path: Path, manifest: dict) -> None:
    """UserError for a manifest field that is missing or of the wrong type (only a rebuild can fix those)."""
    fix = f"delete {path.parent} and re-run `sae cache --out {path.parent}` to rebuild the cache."
    for key, kind in _MANIFEST_FIELDS.items():
        if key not in manifest:
            raise UserError(f"{path} has no {key!r}; {fix}")
        if not _is(manifest[key], kind):
            raise UserError(f"{path}: {key!r} is {manifest[key]!r}, not of type {kind.__name__}; {fix}")
    if manifest["dtype"] not in CACHE_DTYPES or not all(isinstance(h, str) for h in manifest["hooks"]):
        raise UserError(f"{path}: dtype {manifest['dtype']!r} or hooks {manifest['hooks']!r} are not valid; {fix}")


def _shard_entry_problem(entry: object, n_hooks: int) -> str | None:
    """What is wrong with one shard entry of the manifest, in words, or None."""
    if not isinstance(entry, dict):
        return f"is {entry!r}, not an object"
    for key, kind in _SHARD_FIELDS.items():
        if key not in entry:
            return f"({entry.get('file', 'no file name')}) has no {key!r}"
        if not _is(entry[key], kind) or kind is int and entry[key] < 0:
            wanted = "a non-negative integer" if kind is int else "a string"
            return f"({entry.get('file')}) has {key} {entry[key]!r}, not {wanted}"
    if entry["file"] != Path(entry["file"]).name or not entry["file"].endswith(".safetensors"):
        return f"names the file {entry['file']!r}, not a shard file in the cache folder"
    if len(entry["sha256"]) != 64:
        return f"({entry['file']}) has sha256 {entry['sha256']!r}, not a 64-digit hex digest"
    sums = entry.get("norm_sums")
    if not isinstance(sums, list) or len(sums) != n_hooks or not all(_is(v, float) or _is(v, int) for v in sums):
        return f"({entry['file']}) has norm_sums {sums!r}, not one number per hook"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shard(folder: Path, entry: dict, full: bool = False) -> None:
    """UserError naming the shard if it is missing, truncated or (with `full`) fails its sha256."""
    path = folder / entry["file"]
    if not path.is_file():
        raise UserError(f"cache shard {path} is missing; re-run `sae cache --out {folder}` to rebuild it.")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise UserError(
            f"cache shard {path} is truncated or corrupt ({size} bytes, the manifest says {entry['bytes']}); "
            f"{_rebuild_hint(folder, entry['file'])}."
        )
    if full and _sha256(path) != entry["sha256"]:
        raise UserError(
            f"cache shard {path} is corrupt (its sha256 does not match the manifest); "
            f"{_rebuild_hint(folder, entry['file'])}."
        )


# ---- writing --------------------------------------------------------------------------------


@dataclass
class CacheConfig:
    """What `write_cache` stores: how many tokens, in shards of how many, in which dtype."""

    tokens: int = option(250_000, "activation tokens to store", low=1)
    shard_tokens: int = option(32768, "activation tokens per shard file", low=1)
    dtype: str = option(
        "float32", "stored dtype (bfloat16 halves the disk, ~3 significant digits)", choices=tuple(CACHE_DTYPES)
    )

    def __post_init__(self) -> None:
        check_fields(self)


class _Accumulator:
    """Rows of consecutive model batches, until they make a shard."""

    def __init__(self) -> None:
        self.acts, self.tokens, self.doc_ids, self.positions = [], [], [], []
        self.context_ids, self.context_positions, self.context_tokens = [], [], []
        self.n_rows = self.n_contexts = 0

    def add(self, acts: torch.Tensor, batch, keep: torch.Tensor, first_context: int) -> None:
        B, T = batch.tokens.shape
        ctx = torch.arange(first_context, first_context + B)[:, None].expand(B, T)
        pos = torch.arange(T)[None, :].expand(B, T)
        self.acts.append(acts.cpu())
        self.tokens.append(batch.tokens[keep])
        self.doc_ids.append(batch.doc_ids[keep])
        self.positions.append(batch.positions[keep])
        self.context_ids.append(ctx[keep])
        self.context_positions.append(pos[keep])
        self.context_tokens.append(batch.tokens)
        self.n_rows += len(acts)
        self.n_contexts += B

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {
            "activations": torch.cat(self.acts).to(dtype).contiguous(),
            "token_ids": torch.cat(self.tokens).long(),
            "doc_ids": torch.cat(self.doc_ids).long(),
            "positions": torch.cat(self.positions).long(),
            "context_ids": torch.cat(self.context_ids).long(),
            "context_positions": torch.cat(self.context_positions).int(),
            "context_tokens": torch.cat(self.context_tokens).long(),
        }


def _save_shard(folder: Path, index: int, acc: _Accumulator, first_context: int, dtype: torch.dtype) -> dict:
    """Write one shard atomically (temp file, then rename); returns its manifest entry."""
    name = shard_name(index)

    def write(tmp: Path) -> dict:
        save_file(acc.tensors(dtype), tmp, metadata={"format": "pt"})  # one key: a deterministic header
        return {
            "file": name,
            "tokens": acc.n_rows,
            "contexts": acc.n_contexts,
            "first_context": first_context,
            "bytes": tmp.stat().st_size,
            "sha256": _sha256(tmp),
        }

    return atomic_write(folder / name, write)


def _norm_sums(acts: torch.Tensor) -> list[float]:
    return acts.double().norm(dim=-1).sum(dim=0).tolist()  # per hook, summed over rows


def _update_totals(manifest: dict) -> None:
    """Token/context totals and the whole-cache normalisation scales, from the shard entries."""
    shards = manifest["shards"]
    manifest["tokens"] = sum(s["tokens"] for s in shards)
    manifest["contexts"] = sum(s["contexts"] for s in shards)
    n = max(manifest["tokens"], 1)
    manifest["scales"] = {
        hook: math.sqrt(manifest["d_model"]) / max(sum(s["norm_sums"][i] for s in shards) / n, 1e-12)
        for i, hook in enumerate(manifest["hooks"])
    }


def write_cache(
    lm: LoadedModel,
    source: Iterable[Document],
    store_cfg: StoreConfig,
    folder: str | os.PathLike,
    cfg: CacheConfig,
    info: dict | None = None,
) -> dict:
    """Run the model over `source` and write (or finish) the cache in `folder`; returns the manifest.

    An existing manifest is resumed: shards it lists that are missing or the wrong size are
    rebuilt from their contexts, then new shards are appended until `cfg.tokens` are stored (or the
    text runs out). `info` (dataset, options, ...) is recorded in the manifest as provenance.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.dtype not in CACHE_DTYPES:
        raise UserError(f"unknown cache dtype {cfg.dtype!r}; use one of {', '.join(CACHE_DTYPES)}.")
    if cfg.shard_tokens < 1 or cfg.tokens < 1:
        raise UserError(f"--tokens and --shard-tokens must be positive, got {cfg.tokens} and {cfg.shard_tokens}.")
    for leftover in folder.glob(".shard-*.tmp"):  # a shard being written when the last run was killed
        leftover.unlink()
    store_cfg = StoreConfig(**{**store_cfg.__dict__, "normalise": False, "epochs": 1})
    if (folder / MANIFEST).exists():
        manifest = read_manifest(folder, repair=True)
        if manifest["hooks"] != list(store_cfg.hooks) or manifest["d_model"] != lm.d_model:
            raise UserError(
                f"{folder} caches {', '.join(manifest['hooks'])} of a d_model={manifest['d_model']} model; "
                "resume it with the same model and hooks, or choose another folder."
            )
        manifest["tokens_target"] = cfg.tokens
    else:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model": lm.name,
            "d_model": lm.d_model,
            "hooks": list(store_cfg.hooks),
            "dtype": cfg.dtype,
            "context_size": store_cfg.context_size,
            "model_batch_size": store_cfg.model_batch_size,
            "prepend_bos": model_wants_bos(lm.tokenizer) if store_cfg.prepend_bos is None else store_cfg.prepend_bos,
            "skip_special": store_cfg.skip_special,
            "skip_first": store_cfg.skip_first,
            "tokens_target": cfg.tokens,
            "shard_tokens": cfg.shard_tokens,
            **(info or {}),
            "shards": [],
            "complete": False,
        }
    dtype = CACHE_DTYPES[manifest["dtype"]]
    # A resumed cache cuts and keeps tokens exactly as it did (shards end on the same batch boundaries).
    for key in ("model_batch_size", "context_size", "prepend_bos", "skip_special", "skip_first"):
        setattr(store_cfg, key, manifest[key])

    def save(index: int, acc: _Accumulator, first_context: int, norm_sums: list[float]) -> None:
        entry = _save_shard(folder, index, acc, first_context, dtype)
        entry["norm_sums"] = norm_sums
        shards = manifest["shards"]
        shards[index : index + 1] = [entry]
        _update_totals(manifest)
        atomic_write_json(folder / MANIFEST, manifest)

    # 1. Rebuild any listed shard that is missing or has the wrong size (deleted by the user after a failed check).
    for index, entry in enumerate(list(manifest["shards"])):
        path = folder / entry["file"]
        if path.is_file() and path.stat().st_size == entry["bytes"]:
            continue
        print(
            f"rebuilding {path} (contexts {entry['first_context']}..{entry['first_context'] + entry['contexts'] - 1})"
        )
        store = ActivationStore(lm, source, store_cfg, skip_contexts=entry["first_context"])
        acc, sums = _Accumulator(), [0.0] * len(manifest["hooks"])
        for acts, batch, keep in store.raw_batches():
            acc.add(acts, batch, keep, entry["first_context"] + acc.n_contexts)
            sums = [a + b for a, b in zip(sums, _norm_sums(acts))]
            if acc.n_contexts >= entry["contexts"]:
                break
        if acc.n_contexts != entry["contexts"]:
            raise UserError(
                f"could not rebuild {path}: the text gave {acc.n_contexts} contexts where the shard had "
                f"{entry['contexts']}; re-run with the same --dataset and options, or delete {folder} and start again."
            )
        save(index, acc, entry["first_context"], sums)

    # 2. Append shards until the token target is reached or the text runs out.
    _update_totals(manifest)
    if manifest["tokens"] < cfg.tokens:
        manifest["complete"] = False
        first = manifest["contexts"]
        store = ActivationStore(lm, source, store_cfg, skip_contexts=first)
        acc, sums = _Accumulator(), [0.0] * len(manifest["hooks"])
        bar = tqdm(total=cfg.tokens, initial=manifest["tokens"], desc="cache", unit="tok", dynamic_ncols=True)
        try:
            for acts, batch, keep in store.raw_batches():
                acc.add(acts, batch, keep, first + acc.n_contexts)
                sums = [a + b for a, b in zip(sums, _norm_sums(acts))]
                bar.update(len(acts))
                done = manifest["tokens"] + acc.n_rows >= cfg.tokens
                if acc.n_rows >= manifest["shard_tokens"] or done:
                    save(len(manifest["shards"]), acc, first, sums)
                    first += acc.n_contexts
                    acc, sums = _Accumulator(), [0.0] * len(manifest["hooks"])
                if done:
                    break
            if acc.n_contexts:
                save(len(manifest["shards"]), acc, first, sums)
        finally:
            bar.close()
        if manifest["tokens"] < cfg.tokens:
            print(
                f"the text ran out after {manifest['tokens']} tokens (asked for {cfg.tokens}); the cache holds them all"
            )
    if manifest["tokens"] == 0:
        raise UserError("the text source gave no activations to cache; give a larger --dataset/--split.")
    manifest["complete"] = True
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


# ---- reading --------------------------------------------------------------------------------


class CachedActivationSource(ShuffledActivations):
    """Shuffled batches `[batch_size, n_hooks, d]` from a cache folder, like `ActivationStore` from a model.

    Rows are replayed in the order they were written, one model batch of contexts at a time, through
    the same shuffle buffer, so the batches equal the live store's for the same seed and text. Shards
    are read one slice at a time (never the whole cache); each is checked against the manifest's size
    up front and its sha256 when first opened. `cfg.hooks` picks hooks of the cache (all if empty);
    its model-side fields are ignored (the manifest fixes them).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        cfg: StoreConfig,
        scales: dict[str, float] | None = None,
        skip_contexts: int = 0,
        verify: bool = True,
    ):
        self.folder, self.cfg = Path(folder), cfg
        self.manifest = read_manifest(self.folder)
        if not self.manifest.get("complete"):
            raise UserError(
                f"activation cache {self.folder} is incomplete ({self.manifest.get('tokens', 0)} of "
                f"{self.manifest.get('tokens_target')} tokens); finish it with `sae cache --out {self.folder}`."
            )
        cached = self.manifest["hooks"]
        hooks = list(cfg.hooks) or list(cached)
        missing = [h for h in hooks if h not in cached]
        if missing:
            raise UserError(
                f"activation cache {self.folder} has no hook {', '.join(missing)}; it holds {', '.join(cached)}. "
                "Train on one of those, or build a cache with that hook (sae cache --hooks ...)."
            )
        self._hooks = hooks
        self._hook_index = [cached.index(h) for h in hooks]
        for entry in self.manifest["shards"]:
            check_shard(self.folder, entry)
        self.verify, self._verified = verify, set()
        self.d_in = int(self.manifest["d_model"])
        self.scales = dict(scales) if scales else None
        self.contexts_consumed = skip_contexts
        self.tokens_emitted = 0
        self.epoch = 0
        self._generator = resume_generator(cfg.seed, skip_contexts)

    @property
    def hook_names(self) -> list[str]:
        return list(self._hooks)

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    def describe(self) -> str:
        return f"the activation cache {self.folder} ({self.manifest['tokens']} tokens)"

    def _open(self, entry: dict):
        """A safetensors handle on one shard (memory-mapped reads), checked on first use."""
        path = self.folder / entry["file"]
        if self.verify and entry["file"] not in self._verified:
            check_shard(self.folder, entry, full=True)
            self._verified.add(entry["file"])
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise UserError(
                f"cache shard {path} cannot be read ({err}); {_rebuild_hint(self.folder, entry['file'])}."
            ) from None

    def raw_activations(self) -> Iterator[torch.Tensor]:
        """Unshuffled raw activations `[n, n_hooks, d]` float32, one model batch of contexts per chunk."""
        group = max(int(self.manifest["model_batch_size"]), 1)
        total = max(int(self.manifest["contexts"]), 1)
        skip = self.contexts_consumed % total if self.cfg.epochs is None else self.contexts_consumed
        while self.cfg.epochs is None or self.epoch < self.cfg.epochs:
            for entry in self.manifest["shards"]:
                if skip >= entry["contexts"]:
                    skip -= entry["contexts"]
                    continue
                yield from self._shard_chunks(entry, skip, group)
                skip = 0
            self.epoch += 1
            if self.cfg.epochs is None or self.epoch < self.cfg.epochs:
                tqdm.write(
                    f"activation cache used up after {self.manifest['contexts']} contexts; "
                    f"starting pass {self.epoch + 1} over it"
                )

    def _shard_chunks(self, entry: dict, skip: int, group: int) -> Iterator[torch.Tensor]:
        """The rows of one shard from context `first_context + skip` on, one model batch at a time.

        Model batches are the ones the cache was written in (shards start on their boundaries); with
        world_size > 1 this rank takes batches rank, rank + world_size, ... as the live store does.
        """
        rank, world = getattr(self.cfg, "rank", 0), getattr(self.cfg, "world_size", 1)
        try:
            with self._open(entry) as f:
                context_ids = f.get_tensor("context_ids")
                acts = f.get_slice("activations")
                first, end = entry["first_context"] + skip, entry["first_context"] + entry["contexts"]
                for batch_start in range(first - first % group, end, group):
                    start, stop = max(batch_start, first), min(batch_start + group, end)
                    self.contexts_consumed += stop - start
                    if (batch_start // group) % world != rank:  # another rank's batch
                        continue
                    lo, hi = torch.searchsorted(context_ids, torch.tensor([start, stop])).tolist()
                    if hi > lo:
                        yield acts[lo:hi][:, self._hook_index].to(self.cfg.device, torch.float32)
        except SafetensorError as err:
            raise UserError(
                f"cache shard {self.folder / entry['file']} cannot be read ({err}); "
                f"{_rebuild_hint(self.folder, entry['file'])}."
            ) from None
