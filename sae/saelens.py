"""SAELens interoperability: load SAE folders written by sae-lens 6.x, and export folders it loads.

Import converts SAELens conventions into ours without changing what the SAE computes: an encoder
that does not subtract b_dec (`apply_b_dec_to_input: false`) gets b_dec @ W_enc added to its biases,
TopK's `rescale_acts_by_decoder_norm` is folded into the weights, and BatchTopK/Matryoshka training
checkpoints (a scalar `topk_threshold`) become the per-latent-threshold SAEs SAELens infers with.
Export folds the normalisation scale in, so the SAELens SAE reads raw model activations.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from activations.errors import UserError
from sae.base import SAE
from sae.config import FROM_SAELENS, SAELENS_SCALED_NORM, SAEConfig
from sae.fold import fold_norm_scale
from sae.folder import CFG_FILENAME, WEIGHTS_FILENAME, check_tensors, own_memory, write_sae_folder
from sae.registry import make_sae

# The tensors SAELens's inference class of each architecture loads (strictly).
SAELENS_TENSORS = {
    "standard": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
    "gated": ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"),
}
# SAELens' training checkpoints keep the activation scaling factor here (normalize_activations
# "expected_average_only_in"); the inference SAE it saves at the end has the factor folded in ("none").
ACTIVATION_SCALER_FILENAME = "activation_scaler.json"


def is_saelens_folder(folder: str | os.PathLike) -> bool:
    """True when folder/cfg.json is a plain SAELens config (a JSON object without our "saelab" section)."""
    try:
        raw = json.loads((Path(folder) / CFG_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "saelab" not in raw


# ---- import ---------------------------------------------------------------------------------


def _fail(folder: Path, problem: str) -> UserError:
    return UserError(f"{folder / CFG_FILENAME}: {problem}")


def load_saelens(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load a SAELens 6.x SAE folder (standard, topk, jumprelu, gated; batchtopk and matryoshka_batchtopk
    training checkpoints) as the saelab SAE that encodes and decodes identically."""
    folder = Path(folder)
    raw = json.loads((folder / CFG_FILENAME).read_text())
    arch = raw.get("architecture", "standard")
    if not isinstance(arch, str) or arch not in FROM_SAELENS:
        raise _fail(
            folder,
            f"SAELens architecture {arch!r} has no saelab equivalent; saelab reads "
            f"{', '.join(FROM_SAELENS)}. Convert it with SAELens to one of those, or train it with saelab.",
        )
    try:
        cfg = SAEConfig.from_file_dict(raw, read_scaling_factor(folder, raw))
    except UserError as err:
        raise _fail(folder, str(err)) from None
    path = folder / WEIGHTS_FILENAME
    if not path.is_file():
        raise UserError(
            f"{path} is missing; point to the SAELens folder holding {CFG_FILENAME} and {WEIGHTS_FILENAME}."
        )
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is corrupt or truncated ({err}); re-copy it from its source.") from None

    tensors = _to_saelab_tensors(folder, arch, raw, tensors)
    sae = make_sae(cfg, device="meta")
    check_tensors(path, tensors, sae.state_dict())
    sae.load_state_dict(own_memory(tensors), assign=True)
    return sae.to(device)


def read_scaling_factor(folder: Path, raw: dict) -> float | None:
    """The activation scaling factor a SAELens training checkpoint stores beside its cfg.json `raw`, if it
    needs one (normalize_activations "expected_average_only_in") and has one."""
    path = Path(folder) / ACTIVATION_SCALER_FILENAME
    if "saelab" in raw or raw.get("normalize_activations") != SAELENS_SCALED_NORM or not path.is_file():
        return None
    try:
        factor = json.loads(path.read_text()).get("scaling_factor")
    except (ValueError, AttributeError):
        factor = "unreadable"
    if factor is None:  # SAELens writes null when it did not normalise
        return None
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor < math.inf:
        raise UserError(
            f'{path} must hold {{"scaling_factor": a positive number}}, got {factor!r}; re-copy it from the '
            "SAELens checkpoint"
        )
    return float(factor)


def _to_saelab_tensors(folder: Path, arch: str, raw: dict, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite SAELens tensors so our encode (x - b_dec) @ W_enc + bias gives the same pre-activations."""
    t = dict(t)
    missing = [name for name in ("W_enc", "W_dec", "b_dec") if name not in t]
    if missing:
        raise UserError(
            f"{folder / WEIGHTS_FILENAME} is missing tensor(s) {', '.join(missing)}; "
            're-copy it or check "architecture" in cfg.json.'
        )
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        if "topk_threshold" not in t:
            raise UserError(
                f"{folder / WEIGHTS_FILENAME} has no topk_threshold for its {arch} cfg.json; re-save it "
                "with SAELens (save_inference_model) or check the architecture."
            )
        threshold = t.pop("topk_threshold")
        t["threshold"] = torch.full_like(t["b_enc"], float(threshold))
    if raw.get("rescale_acts_by_decoder_norm") and arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        # SAELens computes pre * ||W_dec_i|| and decodes with W_dec_i / ||W_dec_i||: fold the norms in.
        norms = t["W_dec"].norm(dim=-1).clamp_min(1e-8)
        t["W_enc"] = t["W_enc"] * norms
        t["b_enc"] = t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / norms[:, None]
    if raw.get("apply_b_dec_to_input", True) is False:
        shift = t["b_dec"] @ t["W_enc"]  # SAELens: x @ W_enc + b; ours subtracts b_dec first
        if arch == "gated":
            t["b_gate"] = t["b_gate"] + shift
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
        else:
            t["b_enc"] = t["b_enc"] + shift
    return {name: value.contiguous() for name, value in t.items()}


# ---- export ---------------------------------------------------------------------------------


def export_saelens(sae: SAE, out: str | os.PathLike) -> Path:
    """Write `sae` as a SAELens 6.x folder with the normalisation scale folded in (it reads raw activations).

    cfg.json keeps our full config under "saelab" (SAELens ignores it), so saelab reloads the exact class.
    """
    if sae.cfg.architecture == "transcoder":
        raise UserError(
            "SAELens has no TopK transcoder (its transcoders are ReLU), so this SAE cannot be exported "
            "in SAELens format; use the run folder itself with saelab."
        )
    folded = fold_norm_scale(sae)
    target = folded.cfg.to_saelens_dict()["architecture"]
    if target not in SAELENS_TENSORS:
        raise UserError(
            f"architecture {sae.cfg.architecture!r} has no SAELens equivalent; "
            f"SAELens export covers {', '.join(sorted(SAELENS_TENSORS))}."
        )
    names = set(folded.state_dict())
    if names != set(SAELENS_TENSORS[target]):
        raise UserError(
            f"a {sae.cfg.architecture} SAE holds tensors {sorted(names)}, not the {sorted(SAELENS_TENSORS[target])} "
            f"SAELens's {target} loads; it cannot be exported in SAELens format."
        )
    cfg = folded.cfg.to_saelens_dict()
    cfg["normalize_activations"] = "none"
    cfg["apply_b_dec_to_input"] = True
    if target == "topk":
        cfg["rescale_acts_by_decoder_norm"] = False
    return write_sae_folder(folded, out, cfg)
