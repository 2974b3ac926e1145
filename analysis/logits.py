"""Logit attribution: what a feature's decoder direction does to the next-token logits on the direct path.

A feature adds `activation × W_dec[f] / norm_scale` to the residual stream. Its direct effect skips
the later blocks and goes through the final norm with the norm's scale frozen (the usual direct-logit
attribution linearisation: LayerNorm centres, then every norm multiplies by its gain — `1 + weight` for
Gemma's RMSNorm) and then the unembedding, whatever `lm_head` holds (tied to the input embedding or
not). Summed over every part of the final residual, these direct effects give the logits exactly.
Gemma 2's final logit soft-capping is not applied (it is monotone, so rankings are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from activations.errors import UserError
from activations.hookpoints import arch_table, hooks_installed, parse_hook
from activations.models import LoadedModel
from sae.base import SAE


@dataclass
class Unembed:
    """The final norm (frozen scale) and unembedding of a model, float32, as a linear map residual → logits."""

    W_U: Tensor  # [vocab, d]: lm_head.weight (the input embedding when tied)
    gain: Tensor  # [d]: what the norm multiplies by
    center: bool  # LayerNorm subtracts the mean first; RMSNorm does not
    eps: float
    bias: Tensor  # [vocab]: norm bias through W_U plus any lm_head bias (the same for every input)

    def logits(self, direction: Tensor) -> Tensor:
        """[..., vocab] logit change per unit of a residual direction [..., d], at norm scale 1."""
        d = direction.float()
        if self.center:
            d = d - d.mean(-1, keepdim=True)
        return (d * self.gain) @ self.W_U.T

    def scale(self, resid: Tensor) -> Tensor:
        """[...] the norm's divisor for actual final residuals [..., d] (what 'frozen' freezes)."""
        r = resid.float()
        if self.center:
            r = r - r.mean(-1, keepdim=True)
        return (r.pow(2).mean(-1) + self.eps).sqrt()


def unembedding(lm: LoadedModel) -> Unembed:
    """The final norm and unembedding of `lm` (any architecture in the hook table)."""
    table = arch_table(lm.model)
    norm = lm.model.get_submodule(table.final_norm)
    head = lm.model.get_submodule(table.unembed)
    W_U = head.weight.detach().float()
    name = type(norm).__name__
    weight = norm.weight.detach().float()
    gain = 1 + weight if name.startswith("Gemma") and "RMSNorm" in name else weight
    center = isinstance(norm, nn.LayerNorm) or ("LayerNorm" in name and "RMS" not in name)
    eps = next((float(getattr(norm, a)) for a in ("eps", "variance_epsilon") if hasattr(norm, a)), 1e-6)
    bias = torch.zeros(W_U.shape[0], device=W_U.device)
    if getattr(norm, "bias", None) is not None:
        bias = bias + W_U @ norm.bias.detach().float()
    if getattr(head, "bias", None) is not None:
        bias = bias + head.bias.detach().float()
    return Unembed(W_U=W_U, gain=gain, center=center, eps=eps, bias=bias)


def decoder_directions(sae: SAE, features: Tensor | list[int]) -> Tensor:
    """[n, d] raw-residual directions added per unit of activation of each feature."""
    idx = torch.as_tensor(features, dtype=torch.long, device=sae.device)
    _check_features(sae, idx)
    return sae.W_dec.detach()[idx].float() / sae.cfg.norm_scale


def feature_logit_weights(
    sae: SAE, lm: LoadedModel, features: Tensor | list[int], unembed: Unembed | None = None
) -> Tensor:
    """[n, vocab] direct logit change per unit activation of each feature, at final-norm scale 1."""
    unembed = unembed or unembedding(lm)
    return unembed.logits(decoder_directions(sae, features).to(unembed.W_U.device))


@dataclass
class TopLogits:
    """Each feature's most promoted and most suppressed tokens (ids and logit weights), [F, n]."""

    promoted_ids: Tensor
    promoted: Tensor
    suppressed_ids: Tensor
    suppressed: Tensor

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in vars(self).items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> TopLogits:
        if not Path(path).is_file():
            raise UserError(f"{path} is missing; run 'sae inspect RUN' to compute logit attributions.")
        return cls(**load_file(str(path)))


@torch.inference_mode()
def top_logits(sae: SAE, lm: LoadedModel, n: int = 10, chunk: int = 512) -> TopLogits:
    """Top-n promoted and suppressed tokens of every feature, `chunk` features at a time (bounded memory)."""
    unembed = unembedding(lm)
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, sae.cfg.d_sae, chunk):
        w = feature_logit_weights(sae, lm, list(range(start, min(start + chunk, sae.cfg.d_sae))), unembed)
        hi, lo = w.topk(n, dim=-1), w.topk(n, dim=-1, largest=False)
        parts.append((hi.indices, hi.values, lo.indices, lo.values))
    return TopLogits(*(torch.cat([p[i] for p in parts]).cpu() for i in range(4)))


# ---- one prompt ------------------------------------------------------------------------


def prompt_ids(lm: LoadedModel, prompt: str) -> Tensor:
    """[1, T] token ids of a prompt as the tokenizer makes them by default (with BOS where it adds one)."""
    if not prompt:
        raise UserError("the prompt is empty; give some text.")
    return torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)


def token_id(lm: LoadedModel, token: str | int) -> int:
    """The id of a single token given as text (e.g. ' Paris') or as an id."""
    if isinstance(token, int):
        tid = int(token)
        if not 0 <= tid < len(lm.tokenizer):
            raise UserError(
                f"token id {tid} is outside the vocabulary (0..{len(lm.tokenizer) - 1}); "
                "give a valid id or the token's text."
            )
        return tid
    ids = lm.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise UserError(
            f"target {token!r} is {len(ids)} tokens {pieces}, not one; give a single token "
            "(mind the leading space, e.g. ' Paris') or its id."
        )
    return ids[0]


@torch.inference_mode()
def run_prompt(sae: SAE, lm: LoadedModel, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward: (feature acts [T, F] (0 at position 0), SAE-hook activation [T, d], final residual [T, d],
    logits [T, vocab])."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    captured: dict[str, Tensor] = {}

    def at_hook(act: Tensor):
        captured["x"] = act.detach()

    norm = lm.model.get_submodule(arch_table(lm.model).final_norm)
    handle = norm.register_forward_pre_hook(lambda mod, args: captured.__setitem__("final", args[0].detach()))
    try:
        with hooks_installed(lm.model, {hp: at_hook}):
            logits = lm.model(input_ids=ids, use_cache=False).logits[0].float()
    finally:
        handle.remove()
    x = captured["x"][0].float().to(sae.device)
    acts = sae.encode_raw(x).float()
    acts[0] = 0  # the SAE never saw a context's first position
    return acts, x, captured["final"][0].float(), logits


@torch.inference_mode()
def direct_effect(sae: SAE, lm: LoadedModel, prompt: str, feature: int) -> Tensor:
    """[T, vocab] direct effect of `feature` on the logits at each position of `prompt`
    (activation × weights / norm scale)."""
    unembed = unembedding(lm)
    acts, _, final, _ = run_prompt(sae, lm, prompt_ids(lm, prompt))
    weights = feature_logit_weights(sae, lm, [feature], unembed)[0]
    return acts[:, feature, None].to(weights.device) * weights / unembed.scale(final)[:, None]


@dataclass
class Contribution:
    feature: int
    activation: float
    effect: float  # direct effect on the target logit per unit activation, at this position's norm scale
    contribution: float  # activation × effect


@dataclass
class PromptAttribution:
    """Which features push the target logit at one position: logit = features + other + constant, exactly."""

    tokens: list[str]
    position: int
    target: int
    target_token: str
    logit: float  # the model's own target logit
    features: float  # summed contribution of every feature
    other: float  # direct effect of the rest of the final residual: SAE error, b_dec, position 0 and later blocks
    constant: float  # norm bias and lm_head bias
    top: list[Contribution]  # largest contributions, descending
    bottom: list[Contribution]  # most negative, ascending


@torch.inference_mode()
def attribute(
    sae: SAE, lm: LoadedModel, prompt: str, target: str | int, position: int = -1, n: int = 10
) -> PromptAttribution:
    """Features ranked by activation × direct effect on the `target` logit predicted at `position` of `prompt`."""
    ids = prompt_ids(lm, prompt)
    T = ids.shape[1]
    pos = position + T if position < 0 else position
    if not 1 <= pos < T:
        raise UserError(
            f"position {position} is not one the SAE reads in this {T}-token prompt (the first token is "
            "never encoded); give a longer prompt or a position from 1 to T-1."
        )
    tid = token_id(lm, target)
    unembed = unembedding(lm)
    acts, x, final, logits = run_prompt(sae, lm, ids)
    scale = unembed.scale(final[pos])
    W_dec = sae.W_dec.detach().float() / sae.cfg.norm_scale
    effect = _target_effect(unembed, W_dec, tid) / scale
    contrib = acts[pos].to(effect.device) * effect
    features_total = float(contrib.sum())
    feature_part = acts[pos].to(W_dec.device) @ W_dec
    other = float(unembed.logits(final[pos].to(W_dec.device) - feature_part)[..., tid] / scale)

    def row(f: int) -> Contribution:
        return Contribution(int(f), float(acts[pos, f]), float(effect[f]), float(contrib[f]))

    order = contrib.argsort(descending=True)
    top = [row(f) for f in order[:n] if contrib[f] > 0]
    bottom = [row(f) for f in order.flip(0)[:n] if contrib[f] < 0]
    return PromptAttribution(
        tokens=[lm.tokenizer.decode([i]) for i in ids[0].tolist()],
        position=pos,
        target=tid,
        target_token=lm.tokenizer.decode([tid]),
        logit=float(logits[pos, tid]),
        features=features_total,
        other=other,
        constant=float(unembed.bias[tid]),
        top=top,
        bottom=bottom,
    )


def _target_effect(unembed: Unembed, W_dec: Tensor, tid: int) -> Tensor:
    """[F] direct effect of each decoder row on one logit at norm scale 1 (no [F, vocab] matrix)."""
    d = W_dec.to(unembed.W_U.device)
    if unembed.center:
        d = d - d.mean(-1, keepdim=True)
    return (d * unembed.gain) @ unembed.W_U[tid]


def _check_features(sae: SAE, idx: Tensor) -> None:
    if idx.numel() and (idx.min() < 0 or idx.max() >= sae.cfg.d_sae):
        bad = idx[(idx < 0) | (idx >= sae.cfg.d_sae)][0].item()
        raise UserError(f"feature {bad} does not exist: this SAE has features 0..{sae.cfg.d_sae - 1}.")
