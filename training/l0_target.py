"""Steer a penalty SAE's sparsity coefficient (relu, gated: L1; jumprelu: L0) so its training L0 settles at a target.

The coefficient that gives an L0 depends on the budget (measured: ReLU's L1 5 gives L0 120 after 65k tokens and 36
after 262k), so no fixed default suits short and long runs. After the coefficient's warm-up, every step multiplies
it by (L0 / target)^gain, capped at a factor MAX_STEP either way: integral control in log space, whose fixed point
is batch L0 = target. The coefficient lives in sae.cfg, so checkpoints and the final cfg.json hold the value reached.
"""

from __future__ import annotations

import math

from activations.errors import UserError
from sae.base import SAE
from sae.config import SAEConfig
from sae.registry import COEFFICIENT_OF

GAIN = 0.05  # log-coefficient change per unit of log(L0 / target): an error of 2x moves the coefficient ~3.5 % a step
MAX_STEP = 0.1  # at most x e^0.1 (or / e^0.1) a step, so one odd batch cannot throw the coefficient far
# The coefficient stays within this factor of the architecture's default (SAEConfig): while the weights lag behind it
# (an L0 still falling at a penalty near 0, as a JumpReLU's on planted data) it would otherwise wind up by orders of
# magnitude and overshoot for as many steps after. Measured on real activations: 0.4-3.7 times the default suffice.
BOUND = 30.0


def coefficient_name(architecture: str) -> str:
    """The SAEConfig field the target steers, or UserError for architectures whose L0 is set by k."""
    if architecture not in COEFFICIENT_OF:
        raise UserError(
            f"--target-l0 steers the sparsity coefficient of {', '.join(COEFFICIENT_OF)}; {architecture} sets its "
            "L0 directly: use --k instead."
        )
    return COEFFICIENT_OF[architecture]


def steer(sae: SAE, l0: float, target: float) -> float:
    """Update sae.cfg's sparsity coefficient from this step's L0 (a no-op while the coefficient warms up; an L0 of
    0, which has no logarithm, lowers it by the largest step); returns the new coefficient."""
    name = coefficient_name(sae.cfg.architecture)
    coefficient = getattr(sae.cfg, name)
    if sae.progress < sae.cfg.sparsity_warmup_fraction:
        return coefficient
    change = max(-MAX_STEP, min(MAX_STEP, GAIN * math.log(max(l0, 1e-3) / target)))
    default = getattr(SAEConfig, name)
    coefficient = min(max(coefficient * math.exp(change), default / BOUND), default * BOUND)
    setattr(sae.cfg, name, coefficient)
    return coefficient
