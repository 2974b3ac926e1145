"""SAEConfig: the shape, architecture and provenance of one SAE, and its cfg.json form.

cfg.json is written SAELens-loadable (top-level SAELens keys + `metadata`) with a `saelab`
section holding our full config, which is the source of truth when we read it back.

The normalisation scale is never guessed (an SAE read at the wrong scale reports nonsense, not an error):
a `saelab` section must hold `norm_scale`; a plain SAELens cfg.json is read by SAELens' rule, where
`normalize_activations: "none"` means the scale is folded in (1.0) and `"expected_average_only_in"` (a training
checkpoint) needs the scaling factor SAELens stores beside it in activation_scaler.json.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields

import torch

from activations.errors import UserError

# dtype names accepted in cfg.json ("float32" and SAELens' older "torch.float32" spelling).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# saelab architecture -> the SAELens 6 architecture that encodes identically from the same tensors
# (batchtopk-style SAEs infer with a per-latent threshold, which SAELens calls jumprelu).
SAELENS_ARCHITECTURES = {"relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
# A plain SAELens cfg.json's architecture -> the saelab one that encodes identically (sae.saelens converts
# the tensors; batchtopk/matryoshka_batchtopk are SAELens training checkpoints, inferred with a threshold).
FROM_SAELENS = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
}

# SAELens' normalize_activations values whose scale is input-independent, so it can live in norm_scale.
SAELENS_SCALED_NORM = "expected_average_only_in"

# SAELens >= 6 treats a cfg.json without a version as pre-6.0 and drops its `metadata`; we write
# the format of 6.0 so SAELens reads our metadata as written.
SAELENS_FORMAT_VERSION = "6.0.0"


def torch_dtype(name: str) -> torch.dtype:
    """Map a cfg dtype name ("float32", "torch.bfloat16", ...) to a torch dtype, or UserError."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"unknown SAE dtype {name!r}; use one of {', '.join(DTYPES)} in the config / cfg.json")
    return DTYPES[key]


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE (shape, architecture) and to know what it was trained on."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32  # TopK: active latents per token
    aux_k: int | None = None  # AuxK: dead latents used for the aux loss (None -> d_in // 2)
    aux_k_coef: float = 1 / 32
    # sparsity penalties, in SAELens units (added to FVU as SAELens adds them to the summed MSE, see sae.base.penalty)
    l1_coefficient: float = 5.0  # relu, gated: L1 of f_i * ||W_dec_i|| (Anthropic April 2024 update)
    l0_coefficient: float = 1.0  # jumprelu: L0 through the straight-through estimator
    target_l0: float | None = None  # relu, gated, jumprelu: training steers the coefficient to this L0 (l0_target)
    sparsity_warmup_fraction: float = 0.05  # l1/l0 coefficient warms up linearly over this fraction of training
    jumprelu_bandwidth: float = 0.05  # STE rectangle-kernel width, in (normalised) activation units
    jumprelu_init_threshold: float = 0.5  # SAELens uses 0.01; thresholds move ~lr per step, so 0.5 suits short runs
    jumprelu_threshold_lr_scale: float = 10.0  # thresholds' lr = this x the schedule's (benchmarks/frontier.md)
    decoder_lr_scale: float = 3.0  # W_dec's lr: this x the schedule's at the start, falling to 1 x (frontier.md)
    pre_act_loss_coefficient: float = 0.3  # jumprelu: Anthropic's pre-activation loss on dead latents (0 = off)
    topk_threshold_lr: float = 0.01  # batchtopk, matryoshka: EMA rate of the inference threshold
    batch_topk_warmup_fraction: float = 0.0  # batchtopk, matryoshka: per-token TopK over this first fraction of steps
    matryoshka_prefixes: list[int] | None = None  # nested dictionary sizes (None: d_sae/16, /8, /4, /2, d_sae)
    # transcoder: reads hook_name (d_in), reconstructs hook_name_out (d_out)
    d_out: int | None = None  # None: d_in
    hook_name_out: str = ""
    hook_layer_out: int = -1
    norm_scale_out: float = 1.0  # transcoder target = raw output activation * norm_scale_out
    dtype: str = "float32"
    # provenance, written to cfg.json so users can come back later
    model_name: str = ""
    hook_name: str = ""
    hook_layer: int = -1
    context_size: int = 0
    prepend_bos: bool = False
    dataset: str = ""
    norm_scale: float = 1.0  # SAE input = raw activation * norm_scale (1.0: not normalised)
    extra: dict = field(default_factory=dict)  # architecture-specific or unknown keys, kept round trip

    def __post_init__(self) -> None:
        """Reject impossible shapes early, with the field to fix."""
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"SAE config {name} must be a positive integer, got {value!r}")
        if not self.norm_scale > 0:
            raise UserError(f"SAE config norm_scale must be > 0, got {self.norm_scale!r}")
        for name in ("l1_coefficient", "l0_coefficient", "pre_act_loss_coefficient", "sparsity_warmup_fraction"):
            if not getattr(self, name) >= 0:
                raise UserError(f"SAE config {name} must be >= 0, got {getattr(self, name)!r}; set it in the config")
        for name in ("decoder_lr_scale", "jumprelu_threshold_lr_scale"):
            if not getattr(self, name) > 0:
                raise UserError(f"SAE config {name} must be > 0, got {getattr(self, name)!r}; set it in the config")
        if not 0 <= self.batch_topk_warmup_fraction <= 1:
            raise UserError(
                f"SAE config batch_topk_warmup_fraction must be in [0, 1], got {self.batch_topk_warmup_fraction!r}; "
                "set it in the config"
            )
        if self.target_l0 is not None and not self.target_l0 > 0:
            raise UserError(f"SAE config target_l0 must be > 0 (or null), got {self.target_l0!r}; set it in the config")
        torch_dtype(self.dtype)  # validates the name

    @property
    def torch_dtype(self) -> torch.dtype:
        """The parameter dtype as a torch dtype."""
        return torch_dtype(self.dtype)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (extra included as a nested dict)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        """Inverse of to_dict; keys that are not fields are kept in `extra` rather than dropped."""
        for name in ("d_in", "d_sae"):
            if name not in d:
                raise UserError(
                    f"SAE config has no {name!r}; give both d_in and d_sae "
                    "(or re-save the SAE with saelab so cfg.json is complete)"
                )
        names = {f.name for f in fields(cls)}
        known = {key: _checked(key, value) for key, value in d.items() if key in names and key != "extra"}
        extra = dict(_checked("extra", {} if d.get("extra") is None else d["extra"]))
        extra.update({key: value for key, value in d.items() if key not in names})
        return cls(**known, extra=extra)

    def to_saelens_dict(self) -> dict:
        """The cfg.json content: SAELens 6.x top-level keys + metadata, and our full config under "saelab"."""
        out = {
            "architecture": SAELENS_ARCHITECTURES.get(self.architecture, self.architecture),
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": self.architecture != "transcoder",
            "normalize_activations": "none" if self.norm_scale == 1.0 else "expected_average_only_in",
            "metadata": {
                "model_name": self.model_name,
                "hook_name": self.hook_name,
                "hook_layer": self.hook_layer,
                "context_size": self.context_size,
                "prepend_bos": self.prepend_bos,
                "dataset_path": self.dataset,
                "hook_head_index": None,
                "sae_lens_version": SAELENS_FORMAT_VERSION,
                "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            },
        }
        if self.architecture == "topk":
            out["k"] = self.k
        if self.architecture == "transcoder":
            out.update(
                d_out=self.d_out or self.d_in, hook_name_out=self.hook_name_out, hook_layer_out=self.hook_layer_out
            )
        out["saelab"] = self.to_dict()
        return out

    @classmethod
    def from_file_dict(cls, d: dict, scaling_factor: float | None = None) -> SAEConfig:
        """Read a cfg.json dict: our `saelab` section if present, else the fields a plain SAELens cfg has.

        scaling_factor: what SAELens stored beside a plain cfg.json (activation_scaler.json), if anything.
        """
        if "saelab" in d:
            section = d["saelab"]
            if not isinstance(section, dict):
                raise UserError(
                    f'the "saelab" section must be a JSON object, got {type(section).__name__}; '
                    "restore cfg.json or re-save the SAE"
                )
            if "norm_scale" not in section:
                raise UserError(
                    'the "saelab" section has no norm_scale, so the scale the SAE reads its input at is unknown; '
                    're-save the SAE from its run, or add "norm_scale" (1.0 if it was trained unnormalised)'
                )
            return cls.from_dict(section)
        meta = d.get("metadata") or d.get("meta") or {}
        if not isinstance(meta, dict):
            raise UserError(f'"metadata" must be a JSON object, got {type(meta).__name__}; restore cfg.json')
        arch = d.get("architecture", "standard")
        if not isinstance(arch, str):
            raise UserError(f'"architecture" must be a string, got {arch!r}; restore cfg.json')

        def pick(key: str, default):
            """A provenance value from metadata (SAELens 6) or the top level (SAELens < 6)."""
            value = meta.get(key, d.get(key))
            return default if value is None else value

        used = {
            "architecture",
            "d_in",
            "d_sae",
            "dtype",
            "k",
            "metadata",
            "meta",
            "model_name",
            "hook_name",
            "hook_layer",
            "context_size",
            "prepend_bos",
            "dataset_path",
        }
        plain = {
            "d_in": d.get("d_in"),
            "d_sae": d.get("d_sae"),
            "architecture": FROM_SAELENS.get(arch, arch),
            "dtype": str(d.get("dtype", "float32")),
            "model_name": pick("model_name", ""),
            "hook_name": pick("hook_name", ""),
            "hook_layer": pick("hook_layer", -1),
            "context_size": pick("context_size", 0),
            "prepend_bos": pick("prepend_bos", False),
            "dataset": pick("dataset_path", ""),
            "extra": {key: value for key, value in d.items() if key not in used},
        }
        plain["extra"]["saelens_architecture"] = arch
        plain["norm_scale"] = saelens_norm_scale(d, scaling_factor)
        k = d.get("k")
        if isinstance(k, float) and k.is_integer():  # BatchTopK's k is a float in SAELens
            plain["k"] = int(k)
        elif isinstance(k, float):  # a fractional BatchTopK k: provenance only (it infers with a threshold)
            plain["extra"]["saelens_k"] = k
        elif k is not None:
            plain["k"] = k
        return cls.from_dict({key: value for key, value in plain.items() if value is not None})


def saelens_norm_scale(d: dict, scaling_factor: float | None) -> float:
    """The norm_scale of a plain SAELens cfg.json, by SAELens' own rule, or UserError when it cannot be known."""
    norm = d.get("normalize_activations", "none")
    if norm in ("none", None):  # SAELens folds the scale into the weights of every SAE it saves for inference
        return 1.0
    if norm != SAELENS_SCALED_NORM:
        raise UserError(
            f"normalize_activations {norm!r} rescales every token inside SAELens, which saelab "
            "SAEs do not do; fold it into the weights in SAELens first, or use an SAE saved with 'none'."
        )
    if scaling_factor is None:
        raise UserError(
            f"normalize_activations is {SAELENS_SCALED_NORM!r} but no scaling factor is stored with it, so the "
            'scale its input needs is unknown; a saelab run: restore its "saelab" section or export it with '
            "`sae export RUN --format saelens` (folds the scale in); a SAELens checkpoint: keep its "
            "activation_scaler.json beside cfg.json"
        )
    return scaling_factor


def _checked(name: str, value: object) -> object:
    """`value` if it has the type field `name` is declared with (an int is a float too), else UserError."""
    want = _field_types()[name]
    allowed = typing.get_args(want) if isinstance(want, types.UnionType) else (want,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                break
            return float(value)
        if kind == list[int] and isinstance(value, list) and all(_is_int(v) for v in value):
            return value
        if kind is int and _is_int(value) or kind in (str, bool, dict) and isinstance(value, kind):
            return value
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", dict: "an object"}
    names |= {type(None): "null", list[int]: "a list of integers"}
    expected = " or ".join(names[kind] for kind in allowed)
    raise UserError(
        f"SAE config field {name!r} must be {expected}, got {value!r} ({type(value).__name__}); "
        "fix it in cfg.json or re-save the SAE"
    )


@functools.cache
def _field_types() -> dict[str, object]:
    return typing.get_type_hints(SAEConfig)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
