"""A prompt's circuit over spliced dictionaries: the feature nodes kept by cumulative attribution, and how faithful
they are, measured by ablation on the real (not linearised) spliced model (Marks et al. 2024, section 3).

    faithfulness(C) = (m(C) - m(none)) / (m(all) - m(none))   every feature node outside C ablated
    completeness(C) = (m(all minus C) - m(none)) / (m(all) - m(none))   only C ablated (near 0: C is complete)
m(all) is the clean metric (splicing changes nothing), m(none) the metric with every feature node ablated; an
ablated node takes 0 (zero-ablation) or its mean over reference text (mean-ablation); error terms are kept unless
`ablate_errors`. Positions before `first` are no nodes (`sae circuit` passes 1: saelab's SAEs never train on a
context's first position, the attention sink, so its features there are left as they are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from activations.errors import UserError
from activations.hookpoints import parse_hook
from activations.models import LoadedModel
from analysis.attribution import LINEARISED, Metric, NodeAttribution
from analysis.splice import spliced
from sae.base import SAE

Node = tuple[str, int, int]  # (hook the dictionary writes, position, feature)
ABLATIONS = ("zero", "mean")


def ranked(attr: NodeAttribution, first: int = 0) -> list[tuple[Node, float]]:
    """Every feature node at positions >= first with a non-zero attribution, largest |attribution| first."""
    rows = []
    for hook, a in attr.features.items():
        flat = torch.cat([torch.zeros(first * a.shape[1]), a[first:].flatten()]) if first else a.flatten()
        nonzero = flat.nonzero().squeeze(1)
        order = nonzero[flat[nonzero].abs().argsort(descending=True)]
        width = a.shape[1]
        rows += [((hook, i // width, i % width), v) for i, v in zip(order.tolist(), flat[order].tolist())]
    return sorted(rows, key=lambda r: -abs(r[1]))


def prune(
    attr: NodeAttribution, node_fraction: float = 0.8, max_nodes: int | None = None, first: int = 0
) -> list[Node]:
    """The fewest top nodes (positions >= first) whose |attribution| sums to `node_fraction` of their total (at
    most `max_nodes`)."""
    if not 0 < node_fraction <= 1:
        raise UserError(f"node_fraction must lie in (0, 1], not {node_fraction}.")
    rows = ranked(attr, first)
    total = sum(abs(v) for _, v in rows)
    kept, running = [], 0.0
    for node, value in rows:
        if running >= node_fraction * total or (max_nodes is not None and len(kept) >= max_nodes):
            break
        kept.append(node)
        running += abs(value)
    return kept


@dataclass
class Faithfulness:
    """The metric with everything, nothing, only the circuit and all but the circuit (ablation as named)."""

    full: float
    empty: float
    circuit: float
    complement: float
    size: int
    ablation: str
    ablate_errors: bool

    @property
    def faithfulness(self) -> float:
        return (self.circuit - self.empty) / (self.full - self.empty) if self.full != self.empty else float("nan")

    @property
    def completeness(self) -> float:
        return (self.complement - self.empty) / (self.full - self.empty) if self.full != self.empty else float("nan")

    def to_dict(self) -> dict:
        return {
            "full": self.full,
            "empty": self.empty,
            "circuit": self.circuit,
            "complement": self.complement,
            "faithfulness": self.faithfulness,
            "completeness": self.completeness,
            "size": self.size,
            "ablation": self.ablation,
            "ablate_errors": self.ablate_errors,
        }


@torch.no_grad()
def mean_features(lm: LoadedModel, saes: list[SAE], reference: Tensor) -> dict[str, Tensor]:
    """[d_sae] per spliced hook: each feature's mean activation over reference tokens [B, T]."""
    with spliced(lm, saes) as nodes:
        lm.model(input_ids=reference.to(lm.device), use_cache=False)
        return {hook: f.float().mean((0, 1)) for hook, f in nodes.features.items()}


@torch.no_grad()
def metric_with(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    metric: Metric,
    kept: dict[str, Tensor],
    baseline: dict[str, Tensor] | None = None,
    ablate_errors: bool = False,
) -> float:
    """The metric when every feature node where kept[hook] [T, d_sae] is False takes its baseline (0 or mean)."""

    def edit(hook: str):
        def fn(f: Tensor) -> Tensor:
            base = torch.zeros_like(f) if baseline is None else baseline[hook].to(f.dtype).expand_as(f)
            return torch.where(kept[hook].to(f.device), f, base)

        return fn

    with spliced(lm, saes, edits={hook: edit(hook) for hook in kept}, ablate_errors=ablate_errors):
        return float(metric(lm.model(input_ids=tokens.to(lm.device), use_cache=False).logits)[0])


def _masks(attr: NodeAttribution, nodes: list[Node], value: bool, first: int) -> dict[str, Tensor]:
    """[1, T, d_sae] per hook: True where a feature keeps its value (positions < first always do)."""
    masks = {hook: torch.full(a.shape, not value, dtype=torch.bool) for hook, a in attr.features.items()}
    for hook, t, f in nodes:
        masks[hook][t, f] = value
    for m in masks.values():
        m[:first] = True
    return {hook: m[None] for hook, m in masks.items()}


def faithfulness(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    metric: Metric,
    attr: NodeAttribution,
    circuit: list[Node],
    ablation: str = "zero",
    reference: Tensor | None = None,
    ablate_errors: bool = False,
    first: int = 0,
) -> Faithfulness:
    """How much of the metric the circuit recovers with everything else ablated, and how much is left without it
    (positions < first are never ablated: they are no nodes)."""
    if ablation not in ABLATIONS:
        raise UserError(f"ablation '{ablation}' is unknown; use one of {', '.join(ABLATIONS)}.")
    if ablation == "mean" and reference is None:
        raise UserError("mean-ablation needs reference tokens to take the feature means over.")
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    base = mean_features(lm, saes, reference) if ablation == "mean" else None
    everything = _masks(attr, [], False, first)  # all True
    nothing = _masks(attr, [], True, first)  # only positions < first

    def run(kept: dict[str, Tensor]) -> float:
        return metric_with(lm, saes, tokens, metric, kept, base, ablate_errors)

    return Faithfulness(
        full=run(everything),
        empty=run(nothing),
        circuit=run(_masks(attr, circuit, True, first)),
        complement=run(_masks(attr, circuit, False, first)),
        size=len(circuit),
        ablation=ablation,
        ablate_errors=ablate_errors,
    )


def faithfulness_curve(
    lm: LoadedModel, saes: list[SAE], tokens: Tensor, metric: Metric, attr: NodeAttribution, sizes: list[int], **kw
) -> list[tuple[int, float]]:
    """(n, faithfulness of the top-n nodes by |attribution|) for each n in sizes."""
    rows = [node for node, _ in ranked(attr, kw.get("first", 0))]
    return [(n, faithfulness(lm, saes, tokens, metric, attr, rows[:n], **kw).faithfulness) for n in sizes]


def edges(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    attr: NodeAttribution,
    nodes: list[Node],
    options=None,
    chunk: int = 16,
) -> list[tuple[Node, Node, float]]:
    """Edges between kept nodes of consecutive spliced layers, u -> v, weight a_u * d f_v / d f_u * (dm / d f_v)
    on the linearised model (Marks et al. 2024, attribution patching of edges). Each backward pass seeds one
    downstream node per copy of the prompt, `chunk` copies at a time, so memory stays bounded."""
    options = options or LINEARISED
    hooks = sorted(attr.features, key=lambda h: depth(h, lm))
    kept = set(nodes)
    out: list[tuple[Node, Node, float]] = []
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    for up, down in zip(hooks, hooks[1:]):
        targets = [n for n in nodes if n[0] == down]
        sources = [n for n in nodes if n[0] == up]
        if not targets or not sources:
            continue
        for start in range(0, len(targets), chunk):
            part = targets[start : start + chunk]
            with spliced(lm, saes, options) as spliced_nodes:
                lm.model(input_ids=tokens.repeat(len(part), 1).to(lm.device), use_cache=False)
                f = spliced_nodes.features[down]
                seed = sum(f[k, t, j] for k, (_, t, j) in enumerate(part))
                grads = torch.autograd.grad(seed, spliced_nodes.features[up], allow_unused=True)[0]
            if grads is None:
                continue
            for k, (_, t, j) in enumerate(part):
                act_v = float(attr.activations[down][t, j])
                scale = float(attr.features[down][t, j]) / act_v if act_v else 0.0  # dm / d f_v
                for u in sources:
                    weight = float(attr.activations[up][u[1], u[2]] * grads[k, u[1], u[2]]) * scale
                    if weight and u in kept:
                        out.append((u, (down, t, j), weight))
    return sorted(out, key=lambda e: -abs(e[2]))


_KIND_ORDER = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")


def depth(hook: str, lm: LoadedModel) -> tuple[int, int]:
    """Where a hook sits in the forward: (layer, its place within the block)."""
    hp = parse_hook(hook, lm.model)
    return hp.layer, _KIND_ORDER.index(hp.kind)
