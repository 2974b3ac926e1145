"""SAEConfig: the shape, architecture and provenance of one SAE, and its cfg.json form.

cfg.json is written SAELens-loadable (top-level SAELens keys + `metadata`) with a `saelab`
section holding our full config, which is the source of truth when we read it back.
"""

from __future__ import annotations

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
    sparsity_warmup_fraction: float = 0.05  # l1/l0 coefficient warms up linearly over this fraction of training
    jumprelu_bandwidth: float = 0.05  # STE rectangle-kernel width, in (normalised) activation units
    jumprelu_init_threshold: float = 0.5  # SAELens uses 0.01; thresholds move ~lr per step, so 0.5 suits short runs
    pre_act_loss_coefficient: float = 0.0  # jumprelu: Anthropic's pre-activation loss on dead latents (0 = off)
    topk_threshold_lr: float = 0.01  # batchtopk, matryoshka: EMA rate of the inference threshold
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
        known = {key: value for key, value in d.items() if key in names and key != "extra"}
        extra = dict(d.get("extra") or {})
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
    def from_file_dict(cls, d: dict) -> SAEConfig:
        """Read a cfg.json dict: our `saelab` section if present, else the fields a plain SAELens cfg has."""
        if isinstance(d.get("saelab"), dict):
            return cls.from_dict(d["saelab"])
        meta = d.get("metadata") or d.get("meta") or {}

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
            "architecture": FROM_SAELENS.get(d.get("architecture", "standard"), d.get("architecture", "standard")),
            "dtype": str(d.get("dtype", "float32")),
            "model_name": pick("model_name", ""),
            "hook_name": pick("hook_name", ""),
            "hook_layer": pick("hook_layer", -1),
            "context_size": pick("context_size", 0),
            "prepend_bos": pick("prepend_bos", False),
            "dataset": pick("dataset_path", ""),
            "extra": {key: value for key, value in d.items() if key not in used},
        }
        plain["extra"]["saelens_architecture"] = d.get("architecture", "standard")
        if "k" in d:  # BatchTopK's k is a float in SAELens
            plain["k"] = int(d["k"]) if float(d["k"]).is_integer() else d["k"]
        return cls.from_dict({key: value for key, value in plain.items() if value is not None})
