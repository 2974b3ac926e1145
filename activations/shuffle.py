"""The shuffle buffer shared by every activation source (live model forward or on-disk cache).

A source yields unshuffled raw activation chunks `[n, n_hooks, d]`; `ShuffledActivations` mixes them
in a fixed-size buffer, estimates the normalisation scale from its first fill, and hands out scaled
batches. The buffer contents depend only on the order of rows, never on how they were chunked, so a
cache replayed in the order it was written gives exactly the batches the live stream would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed


def resume_generator(seed: int, skip_contexts: int) -> torch.Generator:
    """The shuffle RNG for a stream (re)started after `skip_contexts` contexts (0 for a fresh one)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + skip_contexts)


def estimate_scales(acts: torch.Tensor, hook_names: list[str], across_ranks: bool = False) -> dict[str, float]:
    """Per hook, the factor that makes the mean activation norm sqrt(d): `acts` is `[n, n_hooks, d]`.

    across_ranks: data-parallel ranks all-reduce their norm sums and counts, so all agree on one scale.
    """
    d = acts.shape[-1]
    if across_ranks:
        sums = torch.cat([acts.norm(dim=-1).double().sum(dim=0), acts.new_tensor([len(acts)], dtype=torch.float64)])
        torch.distributed.all_reduce(sums)
        mean_norm = sums[:-1] / sums[-1]
    else:
        # One hook at a time on a contiguous copy, so a hook's scale is bit-identical whichever other hooks
        # share the buffer (a reduction over a strided [n, H] view can sum in a different order).
        mean_norm = [acts[:, i].contiguous().norm(dim=-1).mean() for i in range(acts.shape[1])]
    return {name: math.sqrt(d) / max(float(n), 1e-12) for name, n in zip(hook_names, mean_norm)}


class ShuffledActivations:
    """Iterate to get shuffled, optionally normalised batches `[batch_size, n_hooks, d_in]`.

    Subclasses provide `raw_activations()`, `hook_names`, `d_in`, `cfg` (batch_size, buffer_tokens,
    normalise, device), `scales` (None until estimated) and `_generator`; this class owns the buffer.
    """

    cfg: object
    d_in: int
    scales: dict[str, float] | None
    tokens_emitted: int
    _generator: torch.Generator

    @property
    def hook_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        """Rows per batch handed out (cfg.batch_size), as training.data.ActivationBatches declares."""
        return self.cfg.batch_size

    def raw_activations(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[torch.Tensor]:
        cfg = self.cfg
        capacity = max(cfg.buffer_tokens, 2 * cfg.batch_size)
        buffer = torch.empty(capacity, len(self.hook_names), self.d_in, device=cfg.device)
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
                buffer[n : n + take] = pending[:take]
                n += take
                pending = pending[take:] if take < len(pending) else None
            if n == 0:
                return
            if cfg.normalise and self.scales is None:
                self.scales = estimate_scales(
                    buffer[:n], self.hook_names, across_ranks=getattr(cfg, "world_size", 1) > 1
                )
            perm = torch.randperm(n, generator=self._generator).to(cfg.device)
            buffer[:n] = buffer[perm]
            # Emit half the buffer, keep the rest to mix with the next fill (all of it at the end).
            emit = n if exhausted else n // 2
            emit -= emit % cfg.batch_size if not exhausted else 0
            scale = self._scale_tensor()
            for start in range(0, emit, cfg.batch_size):
                out = buffer[start : min(start + cfg.batch_size, emit)] * scale
                self.tokens_emitted += len(out)
                yield out
            if exhausted:
                return
            buffer[: n - emit] = buffer[emit:n].clone()
            n -= emit

    def _scale_tensor(self) -> torch.Tensor:
        if not self.cfg.normalise or self.scales is None:
            return torch.ones(len(self.hook_names), 1, device=self.cfg.device)
        return torch.tensor([[self.scales[h]] for h in self.hook_names], device=self.cfg.device)
