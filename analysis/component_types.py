"""A feature's sources named with the catalogue types of the heads and neurons they are, and summed per type.

A component name from analysis.components (`L3H1`, `L5.mlp`, `L5.mlp[j]`, `embed`, ...) is looked up in the
head catalogue (analysis.heads) and the neuron catalogue (analysis.neurons): a head or neuron has a type when
its score reaches the type's threshold. Types are written `head:induction`, `neuron:position`; the embeddings
are their own types, `embed` and `pos_embed`, and `effective_embed` is the token embedding together with block
0's MLP, which acts largely as an extended embedding (Gould et al. 2023, McDougall et al. 2023). A feature's
share of a type is the part of its positive direct input that comes from components of that type (neurons:
from the neurons recorded in its examples, a lower bound).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

_HEAD = re.compile(r"L(\d+)H(\d+)$")
_NEURON = re.compile(r"L(\d+)\.mlp\[(\d+)\]$")
EMBEDDINGS = ("embed", "pos_embed", "effective_embed")
_EFFECTIVE = ("embed", "L0.mlp")


class Scored(Protocol):
    """What a catalogue offers: per type a [layers, units] score and a threshold."""

    scores: dict[str, Tensor]
    thresholds: dict[str, float]


def neuron_name(mlp: str, neuron: int) -> str:
    """`L5.mlp` and 17 -> `L5.mlp[17]`."""
    return f"{mlp}[{neuron}]"


@dataclass
class ComponentTypes:
    """The head and neuron catalogues of one model (either may be missing: its components then have no type)."""

    heads: Scored | None = None
    neurons: Scored | None = None
    _seen: dict[str, list[tuple[str, float]]] = field(default_factory=dict, repr=False, compare=False)

    def of(self, name: str) -> list[tuple[str, float]]:
        """The types of component `name` as (type, score), highest score first; [] when it has none."""
        if name not in self._seen:
            self._seen[name] = self._lookup(name)
        return self._seen[name]

    def _lookup(self, name: str) -> list[tuple[str, float]]:
        if name in _EFFECTIVE:
            return [(name, 1.0), ("effective_embed", 1.0)] if name == "embed" else [("effective_embed", 1.0)]
        if name in EMBEDDINGS:
            return [(name, 1.0)]
        for pattern, catalogue, prefix in ((_HEAD, self.heads, "head"), (_NEURON, self.neurons, "neuron")):
            match = pattern.match(name)
            if match and catalogue is not None:
                layer, unit = int(match[1]), int(match[2])
                found = []
                for kind, score in catalogue.scores.items():
                    if layer < score.shape[0] and unit < score.shape[1]:
                        value = float(score[layer, unit])
                        if value >= catalogue.thresholds[kind]:
                            found.append((f"{prefix}:{kind}", round(value, 4)))
                return sorted(found, key=lambda t: -t[1])
        return []

    def available(self) -> set[str]:
        """Every type a component can have with these catalogues."""
        kinds = set(EMBEDDINGS)
        for catalogue, prefix in ((self.heads, "head"), (self.neurons, "neuron")):
            if catalogue is not None:
                kinds |= {f"{prefix}:{k}" for k in catalogue.scores}
        return kinds

    def members(self, kind: str) -> list[str]:
        """Names of the components of type `kind` (`head:induction` -> ['L18H6', ...]), highest score first."""
        prefix, _, sub = kind.partition(":")
        catalogue = {"head": self.heads, "neuron": self.neurons}.get(prefix)
        if kind in EMBEDDINGS:
            return list(_EFFECTIVE) if kind == "effective_embed" else [kind]
        if catalogue is None or sub not in catalogue.scores:
            return []
        score = catalogue.scores[sub]
        flat = score.flatten()
        order = flat.argsort(descending=True, stable=True)
        chosen = order[flat[order] >= catalogue.thresholds[sub]].tolist()
        width = score.shape[1]
        fmt = (lambda a, b: f"L{a}H{b}") if prefix == "head" else (lambda a, b: f"L{a}.mlp[{b}]")
        return [fmt(i // width, i % width) for i in chosen]


def label(name: str, types: list[tuple[str, float]]) -> str:
    """`L11H1 (previous_token head 0.85)`, or the bare name for an untyped component."""
    typed = [(k, s) for k, s in types if ":" in k]
    if not typed:
        return name
    kind, score = typed[0]
    prefix, _, sub = kind.partition(":")
    return f"{name} ({sub} {prefix} {score:.2f})"


def type_shares(
    parts: list[tuple[str, float]], neurons: list[tuple[str, float]], types: ComponentTypes
) -> dict[str, float]:
    """A feature's share of each type: the fractions of its components (and recorded neurons) of that type."""
    shares: dict[str, float] = {}
    for name, frac in [*parts, *neurons]:
        for kind, _ in types.of(name):
            shares[kind] = shares.get(kind, 0.0) + frac
    return {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}
