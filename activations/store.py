"""The streaming ActivationStore: text → packed contexts → model forward (hooks) → shuffled batches.

Activations from many contexts are mixed in a fixed-size shuffle buffer (memory stays bounded by
the buffer, however large the dataset), optionally normalised to mean norm sqrt(d_model), and handed
out as `[batch, n_hooks, d_model]` tensors. The model runs only up to the deepest hooked layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from activations.config import StoreConfig
from activations.errors import UserError
from activations.hookpoints import HookPoint, parse_hook, run_with_cache
from activations.models import LoadedModel
from activations.shuffle import ShuffledActivations, resume_generator
from activations.sources import Document
from activations.tokens import ContextBatch, batch_contexts, pack_contexts, special_token_mask


class ActivationStore(ShuffledActivations):
    """Iterate to get shuffled, normalised activation batches `[batch_size, n_hooks, d_model]`."""

    def __init__(
        self,
        lm: LoadedModel,
        source: Iterable[Document],
        cfg: StoreConfig,
        scales: dict[str, float] | None = None,
        skip_contexts: int = 0,
    ):
        self.lm, self.source, self.cfg = lm, source, cfg
        self.hook_points: list[HookPoint] = [parse_hook(h, lm.model) for h in cfg.hooks]
        self.d_in = lm.d_model
        self.scales: dict[str, float] | None = dict(scales) if scales else None
        self.contexts_consumed = skip_contexts  # contexts already run through the model (resume point)
        self.tokens_emitted = 0
        self.epoch = 0
        self._generator = resume_generator(cfg.seed, skip_contexts)

    @property
    def hook_names(self) -> list[str]:
        return [hp.name for hp in self.hook_points]

    # ---- text → contexts -------------------------------------------------------------
    def context_batches(self) -> Iterator[ContextBatch]:
        """Model-sized batches of packed contexts, looping over the source epoch after epoch.

        With world_size > 1 this rank takes batches rank, rank + world_size, ... of the shared stream, and
        contexts_consumed is its position in that stream (the other ranks' batches it passed included).
        """
        skip = self.contexts_consumed
        while self.cfg.epochs is None or self.epoch < self.cfg.epochs:
            contexts = pack_contexts(self.source, self.lm.tokenizer, self.cfg.context_size, self.cfg.prepend_bos)
            n_in_epoch = 0
            for i, batch in enumerate(batch_contexts(contexts, self.cfg.model_batch_size)):
                n_in_epoch += len(batch.tokens)
                if skip >= len(batch.tokens):
                    skip -= len(batch.tokens)
                    continue
                if skip:
                    batch = ContextBatch(batch.tokens[skip:], batch.doc_ids[skip:], batch.positions[skip:])
                    skip = 0
                if i % self.cfg.world_size != self.cfg.rank:  # another rank's batch
                    self.contexts_consumed += len(batch.tokens)
                    continue
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

    # ---- contexts → activations (ShuffledActivations.__iter__ shuffles them) ----------------
    @torch.inference_mode()
    def raw_batches(self) -> Iterator[tuple[torch.Tensor, ContextBatch, torch.Tensor]]:
        """Per model batch: (activations of kept positions `[n, n_hooks, d_model]` float32, the
        contexts, their keep mask `[B, T]`), unshuffled and unnormalised, in stream order."""
        device = self.lm.device
        for batch in self.context_batches():
            tokens = batch.tokens.to(device)
            cache = run_with_cache(self.lm.model, tokens, self.hook_points)
            acts = torch.stack([cache[hp.name] for hp in self.hook_points], dim=2)  # [B, T, H, d]
            keep = self.keep_mask(tokens)
            acts = acts[keep].to(self.cfg.device, torch.float32)
            self.contexts_consumed += len(batch.tokens)
            if not torch.isfinite(acts).all():
                raise UserError(
                    f"the model produced NaN/Inf activations at {', '.join(self.hook_names)}; "
                    "run the model in float32 (--model-dtype float32) or check the model weights."
                )
            yield acts, batch, keep.cpu()

    def raw_activations(self) -> Iterator[torch.Tensor]:
        """Unshuffled, unnormalised activations of kept positions, `[n, n_hooks, d_model]`, float32."""
        for acts, _, _ in self.raw_batches():
            if len(acts):
                yield acts
