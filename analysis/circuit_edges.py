"""The edges of a prompt's circuit, on the linearised spliced model (attention patterns and norm scales frozen,
errors detached; Marks et al. 2024 attribution patching of edges), and the attention heads that carry them.

Stages run embeddings -> first spliced hook -> ... -> last spliced hook -> output. An edge u -> v between
consecutive stages weighs  delta_u * d f_v / d u * dm / d f_v : delta_u is a feature's activation minus its
baseline, a whole error term or a token's embedding (dotted with the gradient), and dm / d f_v the metric's
gradient at v (1 for the output), so a node's incoming edges split its attribution. Each backward pass seeds one
target per copy of the prompt, `chunk` copies at a time, so memory stays bounded.

With attention frozen, head h of layer l moves  pattern[h, j, i] * values[i, h] · d target / d z[j, h]  from
position i into a target at position j; summed over i that is the head's share of the target, and at the source's
position i it names the heads that carry a cross-position edge (heads between the two stages only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from activations.hookpoints import parse_hook
from activations.models import LoadedModel
from analysis.attribution import LINEARISED, Metric, NodeAttribution, embedding_leaf
from analysis.splice import Nodes, spliced
from sae.base import SAE

Node = tuple[str, int, int]  # (hook the dictionary writes | EMBED | OUTPUT, position, feature | ERROR)
EMBED, OUTPUT, ERROR = "embed", "output", -1
HEADS_KEPT = 3  # heads named per node and per cross-position edge
_KIND_ORDER = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")


@dataclass
class Edge:
    """u -> v with its weight; `heads` [(layer, head, contribution, share)] carry it when it crosses positions."""

    source: Node
    target: Node
    weight: float
    heads: list[tuple[int, int, float, float]] = field(default_factory=list)


@dataclass
class CircuitEdges:
    """Every edge into the targets (largest |weight| first) and, per target, the heads that write most of it."""

    edges: list[Edge]
    heads: dict[Node, list[tuple[int, int, float, float]]]


def depth(hook: str, lm: LoadedModel) -> tuple[float, int]:
    """Where a hook (or EMBED / OUTPUT) sits in the forward: (layer, its place within the block)."""
    if hook == EMBED:
        return -1.0, 0
    if hook == OUTPUT:
        return float("inf"), 0
    hp = parse_hook(hook, lm.model)
    return float(hp.layer), _KIND_ORDER.index(hp.kind)


def _between(layer: int, up: tuple[float, int], down: tuple[float, int]) -> bool:
    """Whether layer's attention runs after hook `up` and before hook `down` (it sits just past resid_pre)."""
    return up < (layer, 0.5) < down


def top_heads(contrib: Tensor, layers: list[int]) -> list[tuple[int, int, float, float]]:
    """The HEADS_KEPT largest |contributions| [L', H] as (layer, head, contribution, share of the total |.|)."""
    flat = contrib.flatten()
    total = float(flat.abs().sum())
    if not total:
        return []
    width = contrib.shape[1]
    order = flat.abs().topk(min(HEADS_KEPT, flat.numel())).indices.tolist()
    return [(layers[i // width], i % width, float(flat[i]), abs(float(flat[i])) / total) for i in order]


def _flows(nodes: Nodes, grads: list[Tensor | None], layers: list[int], k: int, j: int) -> Tensor:
    """[L', H, T]: what each head of `layers` moves from each position into copy k's target at position j."""
    rows = []
    for layer, g in zip(layers, grads):
        flow = nodes.heads[layer]
        if g is None:
            rows.append(torch.zeros(flow.pattern.shape[1], flow.pattern.shape[-1]))
            continue
        vg = torch.einsum("thd,hd->ht", flow.values[k].float(), g[k, j].float())
        rows.append(flow.pattern[k, :, j, :].float() * vg)
    return torch.stack(rows)


def edges(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    attr: NodeAttribution,
    nodes: list[Node],
    metric: Metric | None = None,
    chunk: int = 16,
    skip: tuple[int, ...] = (),
) -> CircuitEdges:
    """The edges into every kept feature node (and, given the metric, into the output) from the kept feature
    nodes, the error terms (positions not in skip) and the token embeddings of the stage before, with their heads."""
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    T = tokens.shape[1]
    hooks = sorted(attr.features, key=lambda h: depth(h, lm))
    stages = [(EMBED, hooks[0]), *zip(hooks, hooks[1:])] + ([(hooks[-1], OUTPUT)] if metric is not None else [])
    kept = set(nodes)
    baseline = getattr(attr, "baseline", None) or {}
    found: list[Edge] = []
    heads: dict[Node, list[tuple[int, int, float, float]]] = {}
    for up, down in stages:
        if down == OUTPUT:
            targets: list[Node] = [(OUTPUT, metric.position % T, ERROR)]
        else:
            targets = [n for n in nodes if n[0] == down]
        for start in range(0, len(targets), chunk):
            part = targets[start : start + chunk]
            found += _stage(lm, saes, tokens, attr, up, down, part, kept, baseline, metric, skip, heads)
    found.sort(key=lambda e: -abs(e.weight))
    return CircuitEdges(found, heads)


def _stage(lm, saes, tokens, attr, up, down, part, kept, baseline, metric, skip, heads) -> list[Edge]:
    """The edges into one chunk of targets of the stage up -> down, from one batched backward pass."""
    with embedding_leaf(lm) as seen, spliced(lm, saes, LINEARISED) as sn:
        logits = lm.model(input_ids=tokens.repeat(len(part), 1).to(lm.device), use_cache=False).logits
        if down == OUTPUT:
            seed = metric(logits).sum()
        else:
            f = sn.features[down]
            seed = sum(f[k, t, j] for k, (_, t, j) in enumerate(part))
        sources = [seen["embed"]] if up == EMBED else [sn.features[up], sn.errors[up]]
        layers = [layer for layer in sorted(sn.heads) if _between(layer, depth(up, lm), depth(down, lm))]
        grads = torch.autograd.grad(seed, sources + [sn.heads[layer].z for layer in layers], allow_unused=True)
    source_grads, head_grads = grads[: len(sources)], list(grads[len(sources) :])
    out: list[Edge] = []
    for k, target in enumerate(part):
        _, j, feature = target
        scale = 1.0 if down == OUTPUT else _metric_gradient(attr, baseline, target)
        if not scale:
            continue
        flows = _flows(sn, head_grads, layers, k, j) * scale if layers else None
        if flows is not None:
            heads[target] = top_heads(flows.sum(-1), layers)
        contributions = _contributions(attr, baseline, up, sources, source_grads, k, kept, skip)
        for source, value in contributions:
            weight = value * scale
            if not weight:
                continue
            carried = top_heads(flows[:, :, source[1]], layers) if flows is not None and source[1] < j else []
            out.append(Edge(source, target, weight, carried))
    return out


def _metric_gradient(attr: NodeAttribution, baseline: dict[str, Tensor], node: Node) -> float:
    """dm / d f_v: a kept node's attribution over its activation's distance from the baseline."""
    hook, t, f = node
    base = float(baseline[hook][f]) if hook in baseline else 0.0
    delta = float(attr.activations[hook][t, f]) - base
    return float(attr.features[hook][t, f]) / delta if delta else 0.0


def _contributions(attr, baseline, up, sources, grads, k, kept, skip) -> list[tuple[Node, float]]:
    """(source node, delta_u * d target / d u) for copy k: kept features, errors (positions not in skip), tokens."""
    if up == EMBED:
        g = grads[0]
        if g is None:
            return []
        values = (sources[0][k].detach().float() * g[k].float()).sum(-1)
        return [((EMBED, i, ERROR), float(v)) for i, v in enumerate(values.tolist())]
    rows = []
    g_features, g_errors = grads
    if g_features is not None:
        base = baseline.get(up)
        for hook, i, f in kept:
            if hook == up:
                delta = float(attr.activations[up][i, f]) - (float(base[f]) if base is not None else 0.0)
                rows.append(((up, i, f), delta * float(g_features[k, i, f])))
    if g_errors is not None:
        values = (sources[1][k].detach().float() * g_errors[k].float()).sum(-1)
        rows += [((up, i, ERROR), float(v)) for i, v in enumerate(values.tolist()) if i not in skip]
    return rows


def prune_edges(found: list[Edge], fraction: float = 0.98) -> list[Edge]:
    """The fewest largest edges whose |weight| sums to `fraction` of all of them (circuit-tracer's edge rule)."""
    total = sum(abs(e.weight) for e in found)
    kept, running = [], 0.0
    for e in sorted(found, key=lambda e: -abs(e.weight)):
        if running >= fraction * total:
            break
        kept.append(e)
        running += abs(e.weight)
    return kept
