"""A prompt's circuit over spliced dictionaries: the feature nodes kept by cumulative attribution, and how faithful
they are, measured by ablation on the real (not linearised) spliced model (Marks et al. 2024, section 3).

    faithfulness(C) = (m(C) - m(none)) / (m(all) - m(none))   every feature node outside C ablated
    completeness(C) = (m(all minus C) - m(none)) / (m(all) - m(none))   only C ablated (near 0: C is complete)
m(all) is the clean metric (splicing changes nothing), m(none) the metric with every feature node ablated; an
ablated node takes 0 (zero-ablation) or its mean over reference text (mean-ablation); error terms are kept unless
`ablate_errors`. Positions in `skip` are no nodes: their features are never ablated (`sae circuit` skips the first
position, on which saelab's SAEs never train, and every attention-sink position, see `sink_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from activations.errors import UserError
from activations.models import LoadedModel
from analysis.attribution import Metric, NodeAttribution
from analysis.splice import spliced
from sae.base import SAE

Node = tuple[str, int, int]  # (hook the dictionary writes, position, feature)
ABLATIONS = ("zero", "mean")


SINK_FACTOR = 10.0  # a position whose activation norm exceeds this many times the prompt's median is a sink


@torch.no_grad()
def sink_positions(lm: LoadedModel, saes: list[SAE], tokens: Tensor, factor: float = SINK_FACTOR) -> tuple[int, ...]:
    """Positions where the activation any dictionary reads has over `factor` x the median norm of the prompt's:
    attention sinks (massive activations, Sun et al. 2024). Dictionaries reconstruct them poorly and their features
    swamp a graph with large attributions that cancel, so they are no nodes."""
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    with spliced(lm, saes) as nodes:
        lm.model(input_ids=tokens.to(lm.device), use_cache=False)
    sinks: set[int] = set()
    for x in nodes.inputs.values():
        norms = x[0].float().norm(dim=-1)
        sinks |= set((norms > factor * norms.median()).nonzero().flatten().tolist())
    return tuple(sorted(sinks))


def ranked(attr: NodeAttribution, skip: tuple[int, ...] = ()) -> list[tuple[Node, float]]:
    """Every feature node at positions not in skip with a non-zero attribution, largest |attribution| first."""
    rows = []
    for hook, a in attr.features.items():
        a = a.clone()
        a[list(skip)] = 0
        flat = a.flatten()
        nonzero = flat.nonzero().squeeze(1)
        order = nonzero[flat[nonzero].abs().argsort(descending=True)]
        width = a.shape[1]
        rows += [((hook, i // width, i % width), v) for i, v in zip(order.tolist(), flat[order].tolist())]
    return sorted(rows, key=lambda r: -abs(r[1]))


def prune(
    attr: NodeAttribution, node_fraction: float = 0.8, max_nodes: int | None = None, skip: tuple[int, ...] = ()
) -> list[Node]:
    """The fewest top nodes (positions not in skip) whose |attribution| sums to `node_fraction` of their total (at
    most `max_nodes`)."""
    if not 0 < node_fraction <= 1:
        raise UserError(f"node_fraction must lie in (0, 1], not {node_fraction}.")
    rows = ranked(attr, skip)
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


def ablation_baseline(
    lm: LoadedModel, saes: list[SAE], ablation: str, reference: Tensor | None
) -> dict[str, Tensor] | None:
    """What an ablated node takes: None for zero-ablation, the feature means over `reference` for mean-ablation."""
    if ablation not in ABLATIONS:
        raise UserError(f"ablation '{ablation}' is unknown; use one of {', '.join(ABLATIONS)}.")
    if ablation == "zero":
        return None
    if reference is None:
        raise UserError("mean-ablation needs reference tokens to take the feature means over.")
    return mean_features(lm, saes, reference)


@torch.no_grad()
def metrics_with(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    metric: Metric,
    masks: list[dict[str, Tensor]],
    baseline: dict[str, Tensor] | None = None,
    ablate_errors: bool = False,
    chunk: int = 8,
) -> list[float]:
    """The metric for each mask set: every feature node where mask[hook] [T, d_sae] is False takes its baseline
    (0 or mean); `chunk` mask sets run as one batch."""
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    out: list[float] = []
    for start in range(0, len(masks), chunk):
        part = masks[start : start + chunk]
        kept = {hook: torch.stack([m[hook] for m in part]) for hook in part[0]}

        def edit(hook: str):
            def fn(f: Tensor) -> Tensor:
                base = torch.zeros_like(f) if baseline is None else baseline[hook].to(f.dtype).expand_as(f)
                return torch.where(kept[hook].to(f.device), f, base)

            return fn

        with spliced(lm, saes, edits={hook: edit(hook) for hook in kept}, ablate_errors=ablate_errors):
            logits = lm.model(input_ids=tokens.repeat(len(part), 1).to(lm.device), use_cache=False).logits
            out += metric(logits).tolist()
    return out


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
    return metrics_with(lm, saes, tokens, metric, [kept], baseline, ablate_errors)[0]


def _masks(attr: NodeAttribution, nodes: list[Node], value: bool, skip: tuple[int, ...]) -> dict[str, Tensor]:
    """[T, d_sae] per hook: True where a feature keeps its value (positions in skip always do)."""
    masks = {hook: torch.full(a.shape, not value, dtype=torch.bool) for hook, a in attr.features.items()}
    for hook, t, f in nodes:
        masks[hook][t, f] = value
    for m in masks.values():
        m[list(skip)] = True
    return masks


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
    skip: tuple[int, ...] = (),
    baseline: dict[str, Tensor] | None = None,
) -> Faithfulness:
    """How much of the metric the circuit recovers with everything else ablated, and how much is left without it
    (positions in skip are never ablated: they are no nodes). A given `baseline` saves computing the means."""
    base = baseline if baseline is not None else ablation_baseline(lm, saes, ablation, reference)
    sets = [
        _masks(attr, [], False, skip),  # everything
        _masks(attr, [], True, skip),  # nothing but the skipped positions
        _masks(attr, circuit, True, skip),
        _masks(attr, circuit, False, skip),
    ]
    full, empty, kept, left = metrics_with(lm, saes, tokens, metric, sets, base, ablate_errors)
    return Faithfulness(full, empty, kept, left, len(circuit), ablation, ablate_errors)


def faithfulness_curve(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    metric: Metric,
    attr: NodeAttribution,
    sizes: list[int],
    ablation: str = "zero",
    reference: Tensor | None = None,
    ablate_errors: bool = False,
    skip: tuple[int, ...] = (),
    baseline: dict[str, Tensor] | None = None,
) -> list[tuple[int, float]]:
    """(n, faithfulness of the top-n nodes by |attribution|) for each n in sizes, batched."""
    base = baseline if baseline is not None else ablation_baseline(lm, saes, ablation, reference)
    rows = [node for node, _ in ranked(attr, skip)]
    sets = [_masks(attr, [], False, skip), _masks(attr, [], True, skip)]
    sets += [_masks(attr, rows[:n], True, skip) for n in sizes]
    full, empty, *values = metrics_with(lm, saes, tokens, metric, sets, base, ablate_errors)
    span = full - empty
    return [(n, (v - empty) / span if span else float("nan")) for n, v in zip(sizes, values)]


def ablation_effects(
    lm: LoadedModel,
    saes: list[SAE],
    tokens: Tensor,
    metric: Metric,
    attr: NodeAttribution,
    nodes: list[Node],
    baseline: dict[str, Tensor] | None = None,
    ablate_errors: bool = False,
    skip: tuple[int, ...] = (),
) -> list[float]:
    """m(clean) - m(node ablated) for each node alone, on the real spliced model: what its attribution estimates."""
    sets = [_masks(attr, [], False, skip)] + [_masks(attr, [node], False, skip) for node in nodes]
    full, *values = metrics_with(lm, saes, tokens, metric, sets, baseline, ablate_errors)
    return [full - v for v in values]


def correlation(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Pearson's and Spearman's correlation of two equally long lists (nan when either is constant or short)."""
    if len(xs) < 3:
        return {"pearson": float("nan"), "spearman": float("nan")}
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)

    def pearson(a: Tensor, b: Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        denominator = float(a.norm() * b.norm())
        return float(a @ b) / denominator if denominator else float("nan")

    def ranks(a: Tensor) -> Tensor:  # ties share their mean rank
        r = a.argsort().argsort().double()
        for value in a.unique():
            r[a == value] = r[a == value].mean()
        return r

    return {"pearson": pearson(x, y), "spearman": pearson(ranks(x), ranks(y))}
