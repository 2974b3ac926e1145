"""Architecture name -> SAE class, and make_sae(cfg) to build one.

ARCHITECTURES is the one table of built-in architectures; each class names itself with its `architecture`
class attribute (the cfg.json "architecture" value). Add a new architecture by importing it here.
"""

from __future__ import annotations

import torch

from activations.errors import UserError
from sae.base import SAE
from sae.batchtopk import BatchTopKSAE
from sae.config import SAEConfig
from sae.gated import GatedSAE
from sae.jumprelu import JumpReLUSAE
from sae.matryoshka import MatryoshkaSAE
from sae.relu import ReLUSAE
from sae.topk import TopKSAE
from sae.transcoder import TranscoderSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    cls.architecture: cls
    for cls in (TopKSAE, ReLUSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE, MatryoshkaSAE, TranscoderSAE)
}

# The sparsity coefficient (an SAEConfig field) each penalty-trained architecture reads; the others are set by k.
COEFFICIENT_OF = {"relu": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}


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
