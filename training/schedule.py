"""Learning-rate schedule: linear warm-up, constant, linear decay to zero at the end."""

from __future__ import annotations


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Multiplier on the base learning rate at `step` (0-based); warm-up is capped at a tenth of the run."""
    warmup_steps = min(warmup_steps, total_steps // 10)
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(total_steps * decay_fraction)
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0
