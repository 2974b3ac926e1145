"""The streaming ActivationStore: text → packed contexts → model forward (hooks) → shuffled batches.

Activations from many contexts are mixed in a fixed-size shuffle buffer (memory stays bounded by
the buffer, however large the dataset), optionally normalised to mean norm sqrt(d_model), and handed
out as `[batch, n_hooks, d_model]` tensors. The model runs only up to the deepest hooked layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from activations.errors import UserError
from activations.hookpoints import HookPoint, parse_hook, run_with_cache
from activations.models import LoadedModel
from activations.sources import Document
from activations.tokens import ContextBatch, batch_contexts, pack_contexts, special_token_mask


@dataclass
class StoreConfig:
    """How activations are produced, mixed and scaled."""

    hooks: list[str]
    context_size: int = 128
    model_batch_size: int = 8          # contexts per model forward
    batch_size: int = 4096             # tokens per batch handed to the trainer
    buffer_tokens: int = 65536         # shuffle buffer; memory = buffer × hooks × d_model × 4 bytes
    normalise: bool = True             # scale so the mean activation norm is sqrt(d_model)
    skip_special: bool = True          # drop BOS/EOS/pad positions
    skip_first: bool = True            # drop each context's first position (an attention sink, norm ~100× the rest)
    prepend_bos: bool | None = None    # None: as the tokenizer expects
    seed: int = 0
    device: str = "cpu"                # where batches are delivered (and the buffer lives)
    epochs: int | None = None          # passes over the text; None loops until the consumer stops
    extra: dict = field(default_factory=dict)


class ActivationStore:
    """Iterate to get shuffled, normalised activation batches `[batch_size, n_hooks, d_model]`."""

    def __init__(self, lm: LoadedModel, source: Iterable[Document], cfg: StoreConfig,
                 scales: dict[str, float] | None = None, skip_contexts: int = 0):
        self.lm, self.source, self.cfg = lm, source, cfg
        self.hook_points: list[HookPoint] = [parse_hook(h, lm.model) for h in cfg.hooks]
        self.d_in = lm.d_model
        self.scales: dict[str, float] | None = dict(scales) if scales else None
        self.contexts_consumed = skip_contexts   # contexts already run through the model (resume point)
        self.tokens_emitted = 0
        self.epoch = 0
        self._generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + skip_contexts)

    @property
    def hook_names(self) -> list[str]:
        return [hp.name for hp in self.hook_points]

    # ---- text → contexts -------------------------------------------------------------
    def context_batches(self) -> Iterator[ContextBatch]:
        """Model-sized batches of packed contexts, looping over the source epoch after epoch."""
        skip = self.contexts_consumed
        while self.cfg.epochs is None or self.epoch < self.cfg.epochs:
            contexts = pack_contexts(self.source, self.lm.tokenizer, self.cfg.context_size, self.cfg.prepend_bos)
            n_in_epoch = 0
            for batch in batch_contexts(contexts, self.cfg.model_batch_size):
                n_in_epoch += len(batch.tokens)
                if skip >= len(batch.tokens):
                    skip -= len(batch.tokens)
                    continue
                if skip:
                    batch = ContextBatch(batch.tokens[skip:], batch.doc_ids[skip:], batch.positions[skip:])
                    skip = 0
                yield batch
            self.epoch += 1
            if self.cfg.epochs is None or self.epoch < self.cfg.epochs:
                tqdm.write(f"text source used up after {n_in_epoch} contexts; starting pass {self.epoch + 1} over it")
                skip = skip % max(n_in_epoch, 1)

    def keep_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Positions whose activations are used: not special tokens, not the first of a context."""
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if self.cfg.skip_special:
            keep &= ~special_token_mask(tokens, self.lm.tokenizer)
        if self.cfg.skip_first:
            keep[:, 0] = False
        return keep

    # ---- contexts → activations -------------------------------------------------------
    @torch.inference_mode()
    def raw_activations(self) -> Iterator[torch.Tensor]:
        """Unshuffled, unnormalised activations of kept positions, `[n, n_hooks, d_model]`, float32."""
        device = self.lm.device
        for batch in self.context_batches():
            tokens = batch.tokens.to(device)
            cache = run_with_cache(self.lm.model, tokens, self.hook_points)
            acts = torch.stack([cache[hp.name] for hp in self.hook_points], dim=2)  # [B, T, H, d]
            acts = acts[self.keep_mask(tokens)].to(self.cfg.device, torch.float32)
            self.contexts_consumed += len(batch.tokens)
            if not torch.isfinite(acts).all():
                raise UserError(
                    f"the model produced NaN/Inf activations at {', '.join(self.hook_names)}; "
                    "run the model in float32 (--model-dtype float32) or check the model weights."
                )
            if len(acts):
                yield acts

    def _estimate_scales(self, acts: torch.Tensor) -> dict[str, float]:
        mean_norm = acts.norm(dim=-1).mean(dim=0)  # [H]
        return {name: math.sqrt(self.d_in) / max(float(n), 1e-12) for name, n in zip(self.hook_names, mean_norm)}

    # ---- activations → shuffled batches -----------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        cfg = self.cfg
        capacity = max(cfg.buffer_tokens, 2 * cfg.batch_size)
        buffer = torch.empty(capacity, len(self.hook_points), self.d_in, device=cfg.device)
        n, pending = 0, None
        stream = self.raw_activations()
        exhausted = False
        while True:
            # Fill the buffer to capacity (a chunk that does not fit waits for the next fill).
            while n < capacity and not exhausted:
                if pending is None:
                    pending = next(stream, None)
                    if pending is None:
                        exhausted = True
                        break
                take = min(capacity - n, len(pending))
                buffer[n:n + take] = pending[:take]
                n += take
                pending = pending[take:] if take < len(pending) else None
            if n == 0:
                return
            if cfg.normalise and self.scales is None:
                self.scales = self._estimate_scales(buffer[:n])
            perm = torch.randperm(n, generator=self._generator).to(cfg.device)
            buffer[:n] = buffer[perm]
            # Emit half the buffer, keep the rest to mix with the next fill (all of it at the end).
            emit = n if exhausted else n // 2
            emit -= emit % cfg.batch_size if not exhausted else 0
            scale = self._scale_tensor()
            for start in range(0, emit, cfg.batch_size):
                out = buffer[start:min(start + cfg.batch_size, emit)] * scale
                self.tokens_emitted += len(out)
                yield out
            if exhausted:
                return
            buffer[:n - emit] = buffer[emit:n].clone()
            n -= emit

    def _scale_tensor(self) -> torch.Tensor:
        if not self.cfg.normalise or self.scales is None:
            return torch.ones(len(self.hook_points), 1, device=self.cfg.device)
        return torch.tensor([[self.scales[h]] for h in self.hook_names], device=self.cfg.device)
