"""What the trainers read from an activation store, declared once.

ActivationStore and CachedActivationSource (through activations.shuffle.ShuffledActivations) and the
layer split's LayerSplit (training.distributed) satisfy it; so can any small in-memory stand-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ActivationBatches(Protocol):
    """Batches `[batch_size, n_hooks, d]` of (normalised) activations, and where the stream stands.

    batch_size: rows per batch this process receives. scales: per-hook normalisation factors (None or {} when
    not normalised), saved with the SAE. contexts_consumed: the stream's position, for resuming. hook_names:
    the hooks in the order of a batch's second dimension.
    """

    batch_size: int
    scales: dict[str, float] | None
    contexts_consumed: int
    hook_names: list[str]

    def __iter__(self) -> Iterator[Tensor]:
        """The batches, `[batch_size, n_hooks, d]` each (the last may be smaller), until the data runs out."""
        ...


@runtime_checkable
class FinishableBatches(ActivationBatches, Protocol):
    """A store whose ranks must keep exchanging activations after their own training ends (LayerSplit)."""

    def finish(self) -> None:
        """Keep serving the other ranks until all of them are done (call when this rank's training ends)."""
        ...
