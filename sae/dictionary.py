"""DictionaryConfig: the dictionary a user asks for (architecture, width, sparsity), the `sae train` section
that becomes an SAEConfig once the model's width is known.

Defaults come from SAEConfig, so each is declared once; combinations that cannot work (k above the
width, an option of another architecture) are refused here, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from activations.errors import UserError
from activations.options import check_fields, option
from sae.config import SAEConfig
from sae.registry import ARCHITECTURES, COEFFICIENT_OF

_ONLY_FOR = {  # option -> the architectures that read it
    "l1_coefficient": ("relu", "gated"),
    "l0_coefficient": ("jumprelu",),
    "matryoshka_prefixes": ("matryoshka",),
    "target_l0": ("relu", "gated", "jumprelu"),
}


@dataclass
class DictionaryConfig:
    """Which SAE to train: its architecture, number of latents and sparsity."""

    architecture: str = option(SAEConfig.architecture, "SAE architecture", choices=tuple(sorted(ARCHITECTURES)))
    k: int = option(
        SAEConfig.k,
        "active latents per token for topk, transcoder; per token on average for batchtopk, matryoshka; relu, "
        "gated, jumprelu: the L0 their coefficient is steered to when none is given (see --target-l0)",
        low=1,
    )
    expansion: int = option(8, "d_sae = expansion × d_model", low=1)
    d_sae: int | None = option(None, "number of latents (overrides --expansion)", low=1)
    l1_coefficient: float | None = option(
        None,
        "relu, gated: weight of the decoder-norm-weighted L1 penalty, "
        f"SAELens units (default {SAEConfig.l1_coefficient:g})",
        low=0,
    )
    l0_coefficient: float | None = option(
        None, f"jumprelu: weight of the L0 penalty, SAELens units (default {SAEConfig.l0_coefficient:g})", low=0
    )
    target_l0: float | None = option(
        None,
        "relu, gated, jumprelu: steer the sparsity coefficient during training so L0 settles at this value, "
        "starting from the coefficient given or its default (default --k, unless a coefficient is given: then it is "
        "fixed)",
        above=0,
    )
    matryoshka_prefixes: list[int] | None = option(
        None, "matryoshka: nested dictionary sizes, e.g. 256,1024,4096 (default d_sae/16,/8,/4,/2,d_sae)"
    )
    decoder_lr_scale: float = option(
        SAEConfig.decoder_lr_scale,
        "the decoder's learning rate as a multiple of --lr at the start, falling linearly to 1 x by the end (its "
        "unit-norm rows turn slowly at the encoder's rate)",
        above=0,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.d_sae is not None and self.k > self.d_sae:
            raise UserError(
                f"--k {self.k} is larger than --d-sae {self.d_sae}; a token cannot use more latents than "
                f"the dictionary has: lower --k or raise --d-sae."
            )
        for name, archs in _ONLY_FOR.items():
            if getattr(self, name) is not None and self.architecture not in archs:
                flag = "--" + name.replace("_", "-")
                raise UserError(
                    f"{flag} is for --architecture {' or '.join(archs)}, not {self.architecture}; "
                    f"drop {flag} or change the architecture."
                )

    def width(self, d_in: int) -> int:
        """The number of latents for inputs of width d_in."""
        d_sae = self.d_sae or self.expansion * d_in
        if self.k > d_sae:
            raise UserError(
                f"--k {self.k} is larger than the dictionary ({d_sae} latents = --expansion "
                f"{self.expansion} × d_model {d_in}); lower --k or raise --expansion."
            )
        return d_sae

    def sae_config(self, d_in: int, **provenance) -> SAEConfig:
        """The full SAEConfig for inputs of width d_in; provenance: model_name, hook_name, ... (SAEConfig fields)."""
        chosen = {name: getattr(self, name) for name in _ONLY_FOR if getattr(self, name) is not None}
        coefficient = COEFFICIENT_OF.get(self.architecture)
        if coefficient and coefficient not in chosen and "target_l0" not in chosen:
            chosen["target_l0"] = float(self.k)  # no fixed coefficient suits every budget; aim at TopK's sparsity
        return SAEConfig(
            d_in=d_in,
            d_sae=self.width(d_in),
            architecture=self.architecture,
            k=self.k,
            decoder_lr_scale=self.decoder_lr_scale,
            **chosen,
            **provenance,
        )
