"""Architecture name -> SAE class, and make_sae(cfg) to build one.

Each architecture module registers itself with @register("name"); the imports at the bottom of
this file load the built-in ones, so importing sae.registry is enough to see them all.
"""

from __future__ import annotations

from typing import Callable

import torch

from activations.errors import UserError
from sae.base import SAE
from sae.config import SAEConfig

ARCHITECTURES: dict[str, type[SAE]] = {}


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make `name` (the cfg.json "architecture" value) build this SAE class."""

    def add(cls: type[SAE]) -> type[SAE]:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
            raise ValueError(f"architecture {name!r} is registered twice ({ARCHITECTURES[name]} and {cls})")
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return add


def get_architecture(name: str) -> type[SAE]:
    """The SAE class for an architecture name, or a UserError listing the known names."""
    if name not in ARCHITECTURES:
        raise UserError(
            f"unknown SAE architecture {name!r}; known architectures: {', '.join(sorted(ARCHITECTURES))}. "
            "Set architecture in the config / cfg.json to one of them"
        )
    return ARCHITECTURES[name]


def make_sae(cfg: SAEConfig, device: torch.device | str | None = None) -> SAE:
    """A freshly initialised SAE of cfg.architecture (seed with torch.manual_seed first)."""
    return get_architecture(cfg.architecture)(cfg, device=device)


# Built-in architectures: each import registers one. Add new architecture modules here.
import sae.topk  # noqa: E402,F401
import sae.relu  # noqa: E402,F401
import sae.batchtopk  # noqa: E402,F401
import sae.jumprelu  # noqa: E402,F401
import sae.gated  # noqa: E402,F401
import sae.matryoshka  # noqa: E402,F401
import sae.transcoder  # noqa: E402,F401
