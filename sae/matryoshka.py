"""Matryoshka SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs";
Nabeshima 2025) on BatchTopK.

The first m latents of the dictionary must reconstruct the input on their own, for every m in a list
of nested prefix sizes: loss = sum over prefixes of the FVU of b_dec + sum_{i<m} f_i W_dec_i, with f the
BatchTopK code of the whole dictionary (Bussmann's formulation). Early latents learn general
features, later ones refine them, which counters feature absorption. Inference is BatchTopK's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from activations.errors import UserError
from sae.base import ForwardPass, Variance, denominator, fvu
from sae.batchtopk import BatchTopKSAE
from sae.config import SAEConfig


def default_prefixes(d_sae: int) -> list[int]:
    """d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae (without repeats, at least 1)."""
    return sorted({max(1, d_sae >> shift) for shift in range(5)})


def parse_prefixes(value: str | list | None) -> list[int] | None:
    """Prefix sizes from '256,1024,4096' (command line) or a list (config file); None stays None."""
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(part) for part in str(value).replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(
            f"--matryoshka-prefixes must be comma-separated integers such as 256,1024,4096, got {value!r}"
        ) from None


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK SAE whose nested prefixes (self.prefixes, ending at d_sae) each reconstruct the input."""

    architecture = "matryoshka"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        """Check the prefix sizes (strictly increasing, within 1..d_sae; d_sae is appended if missing)."""
        prefixes = list(cfg.matryoshka_prefixes or default_prefixes(cfg.d_sae))
        in_range = all(type(m) is int and 1 <= m <= cfg.d_sae for m in prefixes)
        if not in_range or any(a >= b for a, b in zip(prefixes, prefixes[1:])):
            example = ",".join(map(str, default_prefixes(cfg.d_sae)))
            raise UserError(
                f"matryoshka_prefixes must be strictly increasing integers between 1 and d_sae={cfg.d_sae}, "
                f"got {cfg.matryoshka_prefixes}; e.g. --matryoshka-prefixes {example}"
            )
        super().__init__(cfg, device=device)
        self.prefixes = prefixes if prefixes[-1] == cfg.d_sae else prefixes + [cfg.d_sae]

    def aux_losses(
        self, fp: ForwardPass, dead_mask: Tensor | None, variance: Variance | None = None
    ) -> dict[str, Tensor]:
        """AuxK plus {"fvu_<m>": FVU of the first m latents' reconstruction} for each prefix m < d_sae
        (the full dictionary's FVU is the base "fvu" term)."""
        terms = super().aux_losses(fp, dead_mask, variance)
        partial, start = self.b_dec, 0
        for end in self.prefixes[:-1]:
            partial = partial + fp.code.acts[:, start:end] @ self.W_dec[start:end]
            terms[f"fvu_{end}"] = fvu(fp.target, partial, denominator(fp.target, variance))
            start = end
        return terms
