"""Steering: push a model along SAE features while it runs, and measure what that does to its predictions.

Two interventions at the SAE's hook, active for every forward inside a `with steering(...)` block
(so `model.generate` works as is):
- add: activation += strength × W_dec[f] / norm_scale — strength is in units of the feature's own activation;
- clamp: encode → set the feature to `strength` → decode, keeping the SAE's error term. Decoding is linear,
  so this is exactly activation + (strength − f(activation)) × W_dec[f] / norm_scale, which is what runs.
The first position of a multi-token forward (the attention sink, which the SAE was never trained on)
is left alone; single-token forwards (generation with a KV cache) are all steered.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from activations.errors import UserError
from activations.hookpoints import parse_hook, patched
from activations.models import LoadedModel
from analysis.logits import decoder_directions, feature_logit_weights, prompt_ids
from sae.base import SAE
from sae.runs import check_sae_fits


def _strengths(features: Sequence[int], strength: float | Sequence[float]) -> list[float]:
    if isinstance(strength, (int, float)):
        return [float(strength)] * len(features)
    if len(strength) != len(features):
        raise UserError(
            f"got {len(strength)} strengths for {len(features)} features; give one strength, or one per feature."
        )
    return [float(s) for s in strength]


def _check(sae: SAE, lm: LoadedModel, features: Sequence[int]) -> None:
    if not features:
        raise UserError("no feature to steer with; give at least one feature index.")
    check_sae_fits(sae, lm)


def steer_fn(sae: SAE, features: Sequence[int], strength: float | Sequence[float], clamp: bool = False):
    """The hook function `act [B, T, d] -> steered act` that `steering` installs."""
    values = torch.tensor(_strengths(features, strength), device=sae.device)
    dirs = decoder_directions(sae, list(features))  # [n, d] raw space per unit activation
    idx = torch.tensor(list(features), device=sae.device)
    added = values @ dirs  # [d]

    def fn(act: Tensor) -> Tensor:
        if clamp:
            with torch.no_grad():
                now = sae.encode_raw(act.to(sae.device, torch.float32))[..., idx].float()  # [B, T, n]
            delta = (values - now) @ dirs
        else:
            delta = added.expand_as(act)
        if act.shape[1] > 1:
            delta = delta.clone()
            delta[:, 0] = 0
        return act + delta.to(act.device, act.dtype)

    return fn


@contextmanager
def steering(
    lm: LoadedModel, sae: SAE, features: Sequence[int], strength: float | Sequence[float], clamp: bool = False
) -> Iterator[None]:
    """Add `strength × direction` of each feature (or clamp each to `strength`) at the SAE's hook inside the block."""
    _check(sae, lm, features)
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    with patched(lm.model, hp, steer_fn(sae, features, strength, clamp)):
        yield


@torch.inference_mode()
def generate(lm: LoadedModel, prompt: str, max_new_tokens: int = 40, temperature: float = 0.8, seed: int = 0) -> str:
    """The model's continuation of `prompt` (sampled with `seed`, or greedy at temperature 0)."""
    if max_new_tokens < 1:
        raise UserError(f"max new tokens must be at least 1, got {max_new_tokens}.")
    ids = prompt_ids(lm, prompt)
    torch.manual_seed(seed)
    sample = temperature > 0
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id,
    )
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@dataclass
class SteeringEffect:
    """How steering moved the log-probabilities of the features' promoted (and suppressed) tokens."""

    promoted: list[str]  # the tokens measured: top promoted by the steering's direct logit weights
    suppressed: list[str]  # and the most suppressed
    logprob_clean: float  # mean log-prob of the promoted tokens, over every steered position of every prompt
    logprob_steered: float
    delta: float  # logprob_steered - logprob_clean
    delta_suppressed: float  # the same for the suppressed tokens
    delta_per_token: list[float]  # per promoted token
    positions: int  # prediction positions averaged over


@torch.inference_mode()
def measure_effect(
    lm: LoadedModel,
    sae: SAE,
    features: Sequence[int],
    strength: float | Sequence[float],
    prompts: Sequence[str],
    n_tokens: int = 10,
    clamp: bool = False,
) -> SteeringEffect:
    """Mean change in log-prob of the steering's top promoted tokens over `prompts` (next-token predictions
    at every steered position). Tokens are ranked by Σ strength × the features' direct logit weights."""
    _check(sae, lm, features)
    if not prompts:
        raise UserError("no prompts to measure the steering effect on; give at least one.")
    values = _strengths(features, strength)
    weights = torch.tensor(values, device=sae.device) @ feature_logit_weights(sae, lm, list(features)).to(sae.device)
    up = weights.topk(n_tokens).indices.to(lm.device)
    down = weights.topk(n_tokens, largest=False).indices.to(lm.device)
    sums = torch.zeros(4, n_tokens, dtype=torch.float64)
    n = 0
    for prompt in prompts:
        ids = prompt_ids(lm, prompt)
        if ids.shape[1] < 2:
            continue
        clean = F.log_softmax(lm.model(input_ids=ids, use_cache=False).logits[0, 1:].float(), -1)
        with steering(lm, sae, features, values, clamp):
            steered = F.log_softmax(lm.model(input_ids=ids, use_cache=False).logits[0, 1:].float(), -1)
        for i, (lp, toks) in enumerate(((clean, up), (steered, up), (clean, down), (steered, down))):
            sums[i] += lp[:, toks].sum(0).double().cpu()
        n += len(clean)
    if n == 0:
        raise UserError("every prompt is a single token; the first token is never steered, so give longer prompts.")
    mean = sums / n
    decode = lambda ids: [lm.tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
    return SteeringEffect(
        promoted=decode(up),
        suppressed=decode(down),
        logprob_clean=float(mean[0].mean()),
        logprob_steered=float(mean[1].mean()),
        delta=float((mean[1] - mean[0]).mean()),
        delta_suppressed=float((mean[3] - mean[2]).mean()),
        delta_per_token=(mean[1] - mean[0]).tolist(),
        positions=n,
    )
