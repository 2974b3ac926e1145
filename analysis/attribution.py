"""Node attribution on the spliced model: how much each feature, error term and token embedding of one prompt
contributes to a metric of the next-token prediction (attribution patching: activation × gradient, Syed et al.
2023, as in Marks et al. 2024).

The metric is the target token's logit (or log-probability) at a position, or its difference to a contrast token.
With attention patterns and norm scales frozen and errors detached (the defaults here), the model from the last
spliced hook to the logits is linear, so there activation × gradient splits the logit exactly.

Baselines: a feature's attribution is (a - b) × gradient, the linear estimate of the metric's change when that node
is set to its baseline b (hook -> [d_sae]; zero by default, e.g. the feature's mean over reference text, which is
what mean-ablation measures). Inactive features then count too, by -b × gradient. Errors and embeddings stay
activation × gradient.

Integrated gradients (Sundararajan et al. 2017; per layer, as in Marks et al. 2024): for each spliced hook on its
own, its features run from the baseline to their clean values, f_a = b + a (f - b), and the attribution is (f - b)
× the gradient averaged over a at `steps` midpoints, on the full (not linearised) model. It is complete: one hook's
feature attributions add up to metric(clean) - metric(that hook's features at baseline, the others free), up to the
midpoint rule's error, O(1 / steps^2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from activations.errors import UserError
from activations.hookpoints import hooks_installed, parse_hook
from activations.models import LoadedModel, eager_attention
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
    embeddings' attributions [T]; the metric of the clean prompt; how the features' attributions were taken
    ("gradient": activation × gradient, "integrated_gradients") and against which baseline (hook -> [d_sae], None:
    zero)."""

    metric: float
    activations: dict[str, Tensor]
    features: dict[str, Tensor]
    errors: dict[str, Tensor]
    embeddings: Tensor
    method: str = "gradient"
    baseline: dict[str, Tensor] | None = None

    def top(self, n: int = 10) -> list[tuple[str, int, int, float]]:
        """The n feature nodes of largest |attribution| as (hook, position, feature, attribution)."""
        rows = [
            (hook, int(i) // a.shape[1], int(i) % a.shape[1], float(a.flatten()[i]))
            for hook, a in self.features.items()
            for i in a.flatten().abs().topk(min(n, a.numel())).indices
        ]
        return sorted(rows, key=lambda r: -abs(r[3]))[:n]


@contextmanager
def embedding_leaf(lm: LoadedModel) -> Iterator[dict[str, Tensor]]:
    """Inside the block each forward's token embeddings are a leaf whose gradient is kept, as seen["embed"]."""
    seen: dict[str, Tensor] = {}

    def leaf(mod, args, out):
        seen["embed"] = out.detach().requires_grad_(True)
        return seen["embed"]

    handle = lm.model.get_input_embeddings().register_forward_hook(leaf)
    try:
        yield seen
    finally:
        handle.remove()


def _check(lm: LoadedModel, tokens: Tensor, metric: Metric) -> Tensor:
    """The prompt as [1, T] on the model's device; a batch, an empty prompt or a token outside the vocabulary is
    a user error."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.dim() != 2 or len(tokens) != 1 or tokens.shape[1] == 0:
        raise UserError(f"give one prompt: tokens of shape [T] or [1, T], not {tuple(tokens.shape)}.")
    vocab = lm.model.config.vocab_size
    for name, token in (("target", metric.target), ("contrast", metric.contrast)):
        if token is not None and not 0 <= token < vocab:
            raise UserError(f"the {name} token id {token} lies outside the vocabulary (0..{vocab - 1}).")
    return tokens.to(lm.device)


def _written(sae: SAE, lm: LoadedModel) -> str:
    """The hook a dictionary writes (its output hook for a transcoder), the key of its nodes."""
    return parse_hook(getattr(sae.cfg, "hook_name_out", "") or sae.cfg.hook_name, lm.model).name


def _baselines(lm: LoadedModel, saes: list[SAE], baseline: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Each spliced hook's baseline [d_sae] (zero for hooks it does not name); a hook no dictionary writes or a
    wrong shape is a user error."""
    writes = {_written(sae, lm): sae for sae in saes}
    given = baseline or {}
    unknown = sorted(set(given) - set(writes))
    if unknown:
        raise UserError(
            f"the baseline names hooks no dictionary writes ({', '.join(unknown)}); spliced: {', '.join(writes)}."
        )
    out = {}
    for hook, sae in writes.items():
        b = torch.as_tensor(given[hook]) if hook in given else torch.zeros(sae.cfg.d_sae)
        if b.shape != (sae.cfg.d_sae,):
            shape, want = tuple(b.shape), sae.cfg.d_sae
            raise UserError(f"the baseline for {hook} has shape {shape}; give one value per feature, shape ({want},).")
        out[hook] = b.detach().to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    return out


def attribute_nodes(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    metric: Metric,
    options: SpliceOptions = LINEARISED,
    *,
    baseline: dict[str, Tensor] | None = None,
) -> NodeAttribution:
    """Every node's attribution to the metric on one prompt from one forward and one backward pass of the spliced
    model: (activation - baseline) × gradient for features, activation × gradient for errors and embeddings."""
    tokens = _check(lm, tokens, metric)
    base = _baselines(lm, saes, baseline)
    with embedding_leaf(lm) as seen, spliced(lm, saes, options) as nodes:
        value = metric(lm.model(input_ids=tokens, use_cache=False).logits)[0]
        value.backward()

    def times_grad(t: Tensor, b: Tensor | float = 0.0) -> Tensor:
        return (t.detach()[0] - b) * (t.grad[0] if t.grad is not None else 0)

    return NodeAttribution(
        metric=float(value.detach()),
        activations={hook: f.detach()[0] for hook, f in nodes.features.items()},
        features={hook: times_grad(f, base[hook]) for hook, f in nodes.features.items()},
        errors={hook: times_grad(e).sum(-1) for hook, e in nodes.errors.items()},
        embeddings=times_grad(seen["embed"]).sum(-1),
        baseline=None if baseline is None else base,
    )


def _plain_gradients(
    lm: LoadedModel, saes: list[SAE], tokens: Tensor, metric: Metric
) -> tuple[dict[str, Tensor], Tensor]:
    """d metric / d activation [T, d] at every hook a dictionary writes, and the embeddings' activation × gradient
    [T], from one forward and backward pass of the model itself (nothing spliced, so no gradient counts twice)."""
    model, kept = lm.model, {}

    def keep(hook: str):
        def fn(act: Tensor) -> None:
            act.retain_grad()
            kept[hook] = act

        return fn

    writes = {_written(sae, lm) for sae in saes}
    hooks = {parse_hook(h, model): keep(h) for h in writes}
    with embedding_leaf(lm) as seen, eager_attention(model), hooks_installed(model, hooks):
        metric(model(input_ids=tokens, use_cache=False).logits)[0].backward()
    grads = {h: torch.zeros_like(kept[h][0]) if kept[h].grad is None else kept[h].grad[0] for h in writes}
    embed = seen["embed"]
    return grads, (embed.detach()[0] * embed.grad[0]).sum(-1)


def integrated_gradients(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    metric: Metric,
    steps: int = 16,
    baseline: dict[str, Tensor] | None = None,
    *,
    chunk: int = 8,
) -> NodeAttribution:
    """Feature attributions by integrated gradients on the full model, per hook: (f - b) × the mean gradient at
    f_a = b + a (f - b), a = (k + 0.5) / steps, the steps run as batches of at most `chunk` copies of the prompt.

    Complete per hook: its features' attributions add up to metric(clean) - metric(its features at the baseline).
    Errors and embeddings are activation × gradient from one pass of the model itself (the error's gradient is the
    activation's at its hook). Each hook's passes splice only its own dictionary: the others leave the forward
    unchanged, but their attached errors would count the gradient through them twice (reconstruction and error).
    """
    if steps < 1:
        raise UserError(f"integrated gradients needs steps >= 1, not {steps}; 16 to 32 is usually enough.")
    if chunk < 1:
        raise UserError(f"chunk is how many copies of the prompt run at once; it must be >= 1, not {chunk}.")
    tokens = _check(lm, tokens, metric)
    base = _baselines(lm, saes, baseline)
    with torch.no_grad(), spliced(lm, saes, SpliceOptions()) as nodes:
        value = float(metric(lm.model(input_ids=tokens, use_cache=False).logits)[0])
    clean = {hook: f[0].detach() for hook, f in nodes.features.items()}
    grads, embeddings = _plain_gradients(lm, saes, tokens, metric)
    features = {}
    for sae in saes:
        hook = _written(sae, lm)
        f, b = clean[hook], base[hook]
        total = torch.zeros_like(f)
        alphas = (torch.arange(steps, device=f.device, dtype=f.dtype) + 0.5) / steps
        for part in alphas.split(chunk):
            points: list[Tensor] = []

            def interpolate(_: Tensor, part: Tensor = part, points: list[Tensor] = points) -> Tensor:
                points.append((b + part[:, None, None] * (f - b)).requires_grad_(True))
                return points[-1]

            with spliced(lm, [sae], SpliceOptions(), edits={hook: interpolate}):
                logits = lm.model(input_ids=tokens.repeat(len(part), 1), use_cache=False).logits
                metric(logits).sum().backward()
            if points[0].grad is not None:
                total += points[0].grad.sum(0)
        features[hook] = (f - b) * total / steps
    return NodeAttribution(
        metric=value,
        activations=clean,
        features=features,
        errors={hook: (e[0] * grads[hook].to(e.dtype)).sum(-1) for hook, e in nodes.errors.items()},
        embeddings=embeddings,
        method="integrated_gradients",
        baseline=None if baseline is None else base,
    )
