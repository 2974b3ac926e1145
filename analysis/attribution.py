"""Node attribution on the spliced model: how much each feature, error term and token embedding of one prompt
contributes to a metric of the next-token prediction (attribution patching: activation × gradient, Syed et al.
2023, as in Marks et al. 2024).

The metric is the target token's logit (or log-probability) at a position, or its difference to a contrast token.
With attention patterns and norm scales frozen and errors detached (the defaults here), the model from the last
spliced hook to the logits is linear, so there activation × gradient splits the logit exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from activations.errors import UserError
from activations.models import LoadedModel
from analysis.splice import SpliceOptions, spliced
from sae.base import SAE

METRIC_KINDS = ("logit", "logprob")
LINEARISED = SpliceOptions(freeze_attention=True, freeze_norms=True, detach_errors=True)


@dataclass(frozen=True)
class Metric:
    """What the prediction at `position` is scored by: the target's logit or log-prob, minus the contrast's."""

    target: int
    contrast: int | None = None
    kind: str = "logit"
    position: int = -1

    def __post_init__(self) -> None:
        if self.kind not in METRIC_KINDS:
            raise UserError(f"metric kind '{self.kind}' is unknown; use one of {', '.join(METRIC_KINDS)}.")

    def __call__(self, logits: Tensor) -> Tensor:
        """[B] the metric of logits [B, T, vocab]."""
        row = logits[:, self.position].float()
        if self.kind == "logprob":
            row = row.log_softmax(-1)
        value = row[:, self.target]
        return value if self.contrast is None else value - row[:, self.contrast]


@dataclass
class NodeAttribution:
    """Per spliced hook: feature activations and attributions [T, d_sae], error attributions [T]; the token
    embeddings' attributions [T]; and the metric of the clean prompt."""

    metric: float
    activations: dict[str, Tensor]
    features: dict[str, Tensor]
    errors: dict[str, Tensor]
    embeddings: Tensor

    def top(self, n: int = 10) -> list[tuple[str, int, int, float]]:
        """The n feature nodes of largest |attribution| as (hook, position, feature, attribution)."""
        rows = [
            (hook, int(i) // a.shape[1], int(i) % a.shape[1], float(a.flatten()[i]))
            for hook, a in self.features.items()
            for i in a.flatten().abs().topk(min(n, a.numel())).indices
        ]
        return sorted(rows, key=lambda r: -abs(r[3]))[:n]


def _check(lm: LoadedModel, tokens: Tensor, metric: Metric) -> Tensor:
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.dim() != 2 or len(tokens) != 1 or tokens.shape[1] == 0:
        raise UserError(f"give one prompt: tokens of shape [T] or [1, T], not {tuple(tokens.shape)}.")
    vocab = lm.model.config.vocab_size
    for name, token in (("target", metric.target), ("contrast", metric.contrast)):
        if token is not None and not 0 <= token < vocab:
            raise UserError(f"the {name} token id {token} lies outside the vocabulary (0..{vocab - 1}).")
    return tokens.to(lm.device)


def attribute_nodes(
    lm: LoadedModel, saes: list[SAE], tokens: Tensor, metric: Metric, options: SpliceOptions = LINEARISED
) -> NodeAttribution:
    """Every node's attribution to the metric on one prompt, activation × gradient, from one forward and one
    backward pass of the spliced model."""
    tokens = _check(lm, tokens, metric)
    seen: dict[str, Tensor] = {}

    def leaf(mod, args, out):
        seen["embed"] = out.detach().requires_grad_(True)
        return seen["embed"]

    handle = lm.model.get_input_embeddings().register_forward_hook(leaf)
    try:
        with spliced(lm, saes, options) as nodes:
            value = metric(lm.model(input_ids=tokens, use_cache=False).logits)[0]
            value.backward()
    finally:
        handle.remove()

    def times_grad(t: Tensor) -> Tensor:
        return t.detach()[0] * (t.grad[0] if t.grad is not None else 0)

    return NodeAttribution(
        metric=float(value.detach()),
        activations={hook: f.detach()[0] for hook, f in nodes.features.items()},
        features={hook: times_grad(f) for hook, f in nodes.features.items()},
        errors={hook: times_grad(e).sum(-1) for hook, e in nodes.errors.items()},
        embeddings=times_grad(seen["embed"]).sum(-1),
    )
