"""What the dashboard shows of feature sources: a `sources` field per feature record (from features/components.json)
and the components page (the head catalogue as heat-maps, tagged neurons, and each component's top features)."""

from __future__ import annotations

import json
from pathlib import Path

from activations.errors import UserError
from analysis.component_types import ComponentTypes, Scored
from analysis.dashboard import Annotator
from analysis.heads import PROBES

COMPONENTS_FILE = "components.json"
TOP_FEATURES = 20  # features listed per head or neuron
TOP_NEURONS = 24  # neurons listed per neuron type


def read_sources(*features_dirs: str | Path) -> dict | None:
    """The first features/components.json found, or None; a damaged file is a UserError naming the fix."""
    for folder in features_dirs:
        path = Path(folder) / COMPONENTS_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                data["features"]  # noqa: B018  the one key every reader needs
                return data
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); run 'sae inspect' again.") from None
    return None


def sources_annotator(sources: dict) -> Annotator:
    """Adds `sources` (summary, fractions, neurons, types, type shares, the largest remainder) to each record."""
    features = sources["features"]

    def annotate(record: dict) -> None:
        entry = features.get(str(record["id"]))
        if entry is None:
            return
        record["sources"] = {
            "summary": entry.get("summary", ""),
            "fractions": entry.get("fractions", []),
            "neurons": entry.get("neurons", []),
            "types": entry.get("types", {}),
            "type_shares": entry.get("type_shares", {}),
            "examples": len(entry.get("examples", [])),
            "max_abs_remainder": max((abs(e.get("remainder", 0.0)) for e in entry.get("examples", [])), default=0.0),
        }

    return annotate


def top_features(sources: dict, n: int = TOP_FEATURES) -> dict[str, list[list]]:
    """Per component (head, MLP, neuron, embedding), the features it feeds most: [[feature, share], ...]."""
    by: dict[str, list[tuple[float, int]]] = {}
    for feature, entry in sources["features"].items():
        for name, share in [*entry.get("fractions", []), *entry.get("neurons", [])]:
            by.setdefault(name, []).append((share, int(feature)))
    return {name: [[f, round(s, 4)] for s, f in sorted(pairs, reverse=True)[:n]] for name, pairs in by.items()}


def _grid(catalogue: Scored) -> dict:
    return {
        "scores": {k: [[round(float(x), 3) for x in row] for row in v.tolist()] for k, v in catalogue.scores.items()},
        "thresholds": dict(catalogue.thresholds),
    }


def components_page(types: ComponentTypes, sources: dict | None, model: str = "") -> dict | None:
    """The dashboard's components page: head scores per type (layer x head), the tagged neurons per type, and
    each component's top features; None when there is no catalogue."""
    if types.heads is None and types.neurons is None:
        return None
    feeds = top_features(sources) if sources else {}
    page: dict = {"model": model, "hook": (sources or {}).get("hook", ""), "feeds": feeds}
    if types.heads is not None:
        page["heads"] = _grid(types.heads)
        page["head_probes"] = {k: PROBES.get(k, "") for k in types.heads.scores}
    if types.neurons is not None:
        neurons = {}
        for kind in types.neurons.scores:
            members = types.members(f"neuron:{kind}")
            neurons[kind] = [[name, dict(types.of(name)).get(f"neuron:{kind}", 0.0)] for name in members[:TOP_NEURONS]]
        page["neurons"] = {
            "tagged": neurons,
            "counts": {k: len(types.members(f"neuron:{k}")) for k in types.neurons.scores},
            "thresholds": dict(types.neurons.thresholds),
        }
    return page
