"""Several dictionaries from one activation stream: one Trainer per hook, stepped on the same batches.

The store yields `[batch, n_hooks, d]` from a single model forward, so every hook's SAE trains for the
price of one pass over the model. Each trainer keeps its own SAE, optimiser, run folder, metrics and
checkpoints. The store's state (shuffle buffer, RNG, position) is saved once per checkpoint step, by the
last trainer: trainers checkpoint in order, so after a kill between two hooks' checkpoints the last one's
is the furthest behind. The store restarts exactly there and trainers that are ahead sit out the batches
they have already trained on, which come again bit for bit, so every hook ends as an uninterrupted run's.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from sae.base import SAE
from training.data import ActivationBatches
from training.trainer import Trainer


def resume_point(states: list[dict]) -> dict:
    """The checkpoint state the shared store restarts from: the one with the fewest steps (among those, one that
    holds the store's state; when none does, as in older checkpoints, the store restarts by position)."""
    return min(states, key=lambda state: (state["step"], "data_states" not in state))


class MultiTrainer:
    """Steps `trainers` (each bound to a different hook index of `store`) on every batch of `store`."""

    def __init__(self, trainers: list[Trainer], store: ActivationBatches):
        """trainers: one per hook, each built on this same store (their hook_index picks the hook)."""
        self.trainers, self.store = trainers, store

    def train(self, resume_states: list[dict | None] | None = None, stop_after_steps: int | None = None) -> list[SAE]:
        """Run every trainer to its token budget (or `stop_after_steps` more batches); returns the SAEs."""
        states = resume_states or [None] * len(self.trainers)
        start = resume_point(states) if all(states) else None
        for trainer, state in zip(self.trainers, states):
            trainer.show_progress = False
            trainer.saves_data = trainer is self.trainers[-1]  # once per step, in the checkpoint written last
            trainer.begin(state, restore_data=state is start)
        step = min(t.step for t in self.trainers)
        total = max(t.total_steps for t in self.trainers)
        writes = all(t.parallel.writes for t in self.trainers)
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"train {len(self.trainers)} SAEs",
            unit="step",
            dynamic_ncols=True,
            disable=not writes,
        )
        batches, steps_run = iter(self.store), 0
        try:
            while not all(t.done for t in self.trainers):
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    break
                batch = next(batches, None)
                behind = [t for t in self.trainers if t.step == step and not t.done]
                if not all([t.train_step(batch) for t in behind]):
                    break  # out of data
                step += 1
                steps_run += 1
                bar.update(1)
                if any(t.last_metrics.get("step") == step for t in self.trainers):
                    bar.set_postfix_str(
                        "  ".join(
                            f"{self.store.hook_names[t.hook_index]} fvu {t.last_metrics['fvu']:.3f} "
                            f"l0 {t.last_metrics['l0']:.1f}"
                            for t in self.trainers
                            if t.last_metrics
                        )
                    )
        finally:
            bar.close()
            for trainer in self.trainers:
                trainer.end()
        return [t.sae for t in self.trainers]
