"""The shuffle buffer shared by every activation source (live model forward or on-disk cache).

A source yields unshuffled raw activation chunks `[n, n_hooks, d]`; `ShuffledActivations` mixes them
in a fixed-size buffer, estimates the normalisation scale from its first fill, and hands out scaled
batches. The buffer contents depend only on the order of rows, never on how they were chunked, so a
cache replayed in the order it was written gives exactly the batches the live stream would have.

Resuming is exact: a checkpoint holds the buffer's rows, the shuffle RNG and the stream position
(`state_dict`), so the resumed stream hands out the very batches the uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed

from activations.errors import UserError


def resume_generator(seed: int, skip_contexts: int) -> torch.Generator:
    """The shuffle RNG of a fresh stream (0), or of one restarted after `skip_contexts` contexts without a saved
    state (a checkpoint written before the buffer was saved: the rows it held are skipped)."""
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

    Subclasses provide `raw_activations()` (a stream that starts at `contexts_consumed`), `hook_names`, `d_in`,
    `cfg` (batch_size, buffer_tokens, normalise, device), `scales` (None until estimated) and `_generator`;
    this class owns the buffer. Between two batches `state_dict()` is everything the stream's future depends
    on (the buffer's rows, the chunk that did not fit, the shuffle RNG, the stream position), so an iteration
    started after `load_state_dict()` hands out exactly the batches this one would have (one iteration at a time).
    """

    cfg: object
    d_in: int
    scales: dict[str, float] | None
    contexts_consumed: int
    tokens_emitted: int
    _generator: torch.Generator
    # the iteration under way: rows [next, due) of the buffer are shuffled and handed out next, [due, held) are
    # kept to mix with the next fill; pending is the part of the last chunk that did not fit
    _buffer: torch.Tensor | None = None
    _held = _next = _due = 0
    _pending: torch.Tensor | None = None
    _exhausted = False
    _restored: dict | None = None  # load_state_dict's state, taken up by the next __iter__

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
        self._start(max(cfg.buffer_tokens, 2 * cfg.batch_size))
        buffer, stream = self._buffer, self.raw_activations()
        while True:
            scale = self._scale_tensor()
            while self._next < self._due:  # hand out this round's shuffled rows
                out = buffer[self._next : min(self._next + cfg.batch_size, self._due)] * scale
                self._next += len(out)
                self.tokens_emitted += len(out)
                yield out
            if self._exhausted:
                return
            kept = self._held - self._due  # the rest stays to mix with the next fill
            buffer[:kept] = buffer[self._due : self._held].clone()
            self._held, self._next, self._due = kept, 0, 0
            self._fill(stream)
            if self._held == 0:
                return
            if cfg.normalise and self.scales is None:
                self.scales = estimate_scales(
                    buffer[: self._held], self.hook_names, across_ranks=getattr(cfg, "world_size", 1) > 1
                )
            perm = torch.randperm(self._held, generator=self._generator).to(cfg.device)
            buffer[: self._held] = buffer[perm]
            # Emit half the buffer (whole batches), keep the rest to mix with the next fill (all of it at the end).
            half = self._held // 2
            self._due = self._held if self._exhausted else half - half % cfg.batch_size

    def _start(self, capacity: int) -> None:
        """An empty buffer of `capacity` rows, or the one load_state_dict restored."""
        state, self._restored = self._restored, None
        state = state or {"rows": torch.empty(0, len(self.hook_names), self.d_in), "due": 0, "pending": None}
        rows, pending = state["rows"], state["pending"]
        self._buffer = torch.empty(max(capacity, len(rows)), len(self.hook_names), self.d_in, device=self.cfg.device)
        self._buffer[: len(rows)] = rows.to(self.cfg.device)
        self._held, self._next, self._due = len(rows), 0, int(state["due"])
        self._pending = None if pending is None else pending.to(self.cfg.device)
        self._exhausted = bool(state.get("exhausted", False))

    def _fill(self, stream: Iterator[torch.Tensor]) -> None:
        """Top the buffer up from the stream (a chunk that does not fit waits in `_pending` for the next fill)."""
        capacity = len(self._buffer)
        while self._held < capacity and not self._exhausted:
            if self._pending is None:
                self._pending = next(stream, None)
                if self._pending is None:
                    self._exhausted = True
                    break
            take = min(capacity - self._held, len(self._pending))
            self._buffer[self._held : self._held + take] = self._pending[:take]
            self._held += take
            self._pending = self._pending[take:] if take < len(self._pending) else None

    def state_dict(self) -> dict:
        """Where the stream stands between two batches (CPU tensors and plain values: a checkpoint loads it with
        torch.load(weights_only=True)); it holds up to a buffer of raw rows, buffer_tokens × n_hooks × d × 4 bytes."""
        empty = torch.empty(0, len(self.hook_names), self.d_in)
        rows = empty if self._buffer is None else self._buffer[self._next : self._held].to("cpu", copy=True)
        return {
            "rows": rows,  # raw activations: the first `due` are shuffled and handed out next, the rest kept
            "due": self._due - self._next,
            "pending": None if self._pending is None else self._pending.to("cpu", copy=True),
            "exhausted": self._exhausted,
            "generator": self._generator.get_state(),
            "contexts_consumed": self.contexts_consumed,
            "tokens_emitted": self.tokens_emitted,
            "scales": dict(self.scales) if self.scales else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`: the next iteration starts with the batch after the saved one."""
        shape = tuple(state["rows"].shape[1:])
        if shape != (len(self.hook_names), self.d_in):
            raise UserError(
                f"the saved shuffle buffer holds rows of {shape} but this stream gives "
                f"{(len(self.hook_names), self.d_in)} (hooks, d_model); resume with the run's own hooks and data."
            )
        self._generator.set_state(state["generator"])
        self.contexts_consumed, self.tokens_emitted = int(state["contexts_consumed"]), int(state["tokens_emitted"])
        self.scales = dict(state["scales"]) if state["scales"] else self.scales
        self._restored = state

    def _scale_tensor(self) -> torch.Tensor:
        if not self.cfg.normalise or self.scales is None:
            return torch.ones(len(self.hook_names), 1, device=self.cfg.device)
        return torch.tensor([[self.scales[h]] for h in self.hook_names], device=self.cfg.device)
