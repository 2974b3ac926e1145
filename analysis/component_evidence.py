"""Mechanism tags checked against what computes the feature: do its sources include the components the
catalogue says compute such a feature (analysis/mechanisms.yaml `components`)?

For a tag of mechanism m on feature f, with T the component types m lists, restricted to those with at least
one catalogued component upstream of the SAE's hook:
    share    = the part of f's positive direct input coming from components of types T (its type shares)
    baseline = the mean of that share over every feature of the run with sources
    supported  when share >= SUPPORT_SHARE and share >= ENRICHMENT * baseline;
    disagrees  otherwise (the tag is kept, and flagged: its components do not compute it);
    untestable when no component of a type in T sits upstream of the hook (e.g. induction heads only in later
               layers), untested when m lists no component type, no_sources when f has no decomposed examples.
"""

from __future__ import annotations

import re
from pathlib import Path

from activations.files import atomic_write_json
from analysis.catalogue import TAGS_FILE, Catalogue, CatalogueResult, load_catalogue, load_tags
from analysis.component_capture import Span
from analysis.component_types import ComponentTypes

SUPPORT_SHARE = 0.1
ENRICHMENT = 1.5
_LAYER = re.compile(r"L(\d+)")


def upstream(kind: str, types: ComponentTypes, span: Span, names: set[str]) -> list[str]:
    """The components of type `kind` that write into the hook (their layer is in its span)."""
    members = types.members(kind)
    if ":" not in kind:  # the embeddings, and block 0's MLP for the effective embedding
        return [m for m in members if (m == "L0.mlp" and 0 in span.mlp_layers) or (span.embed and m in names)]
    layers = span.attn_layers if kind.startswith("head:") else span.mlp_layers
    return [m for m in members if int(_LAYER.match(m)[1]) in layers]


def baselines(features: dict[str, dict]) -> dict[str, float]:
    """Each type's mean share over every feature with sources (a feature lacking the type counts 0)."""
    sums: dict[str, float] = {}
    for entry in features.values():
        for kind, share in entry.get("type_shares", {}).items():
            sums[kind] = sums.get(kind, 0.0) + share
    return {k: v / max(len(features), 1) for k, v in sums.items()}


def tag_evidence(kinds: tuple[str, ...], entry: dict | None, base: dict[str, float], present: dict) -> dict:
    """The component evidence of one tag: status, share, baseline, the types checked and the top components."""
    if not kinds:
        return {"status": "untested", "reason": "the catalogue names no component type for this mechanism"}
    testable = [k for k in kinds if present[k]]
    if not testable:
        return {
            "status": "untestable",
            "reason": f"no {' / '.join(kinds)} component upstream of the hook",
            "types": list(kinds),
        }
    if entry is None:
        return {"status": "no_sources", "reason": "the feature has no decomposed examples", "types": testable}
    share = sum(entry.get("type_shares", {}).get(k, 0.0) for k in testable)
    baseline = sum(base.get(k, 0.0) for k in testable)
    ok = share >= SUPPORT_SHARE and share >= ENRICHMENT * baseline
    typed = entry.get("types", {})
    listed = [*entry.get("fractions", []), *entry.get("neurons", [])]
    components = [
        [name, round(frac, 4), kind, score]
        for name, frac in listed
        for kind, score in typed.get(name, [])
        if kind in testable
    ]
    return {
        "status": "supported" if ok else "disagrees",
        "share": round(share, 4),
        "baseline": round(baseline, 4),
        "types": testable,
        "components": components[:5],
    }


def add_component_evidence(
    folder: str | Path,
    sources: dict,
    types: ComponentTypes,
    span: Span,
    catalogue: Catalogue | None = None,
) -> dict[str, dict[str, int]]:
    """Add `components` evidence (and a `flag` where they disagree) to every tag in FOLDER/features/mechanisms.json,
    rewrite it, and return per mechanism the count of each status."""
    catalogue = catalogue or load_catalogue()
    result: CatalogueResult = load_tags(folder)
    features = sources.get("features", {})
    names = set(sources.get("components") or ["embed"])
    base = baselines(features)
    counts: dict[str, dict[str, int]] = {}
    for mechanism in result.detectors:
        m = catalogue[mechanism]
        present = {k: upstream(k, types, span, names) for k in m.components}
        counts[mechanism] = {}
        for feature in result.features_with(mechanism):
            tag = next(t for t in result.tags[feature] if t["mechanism"] == mechanism)
            evidence = tag_evidence(m.components, features.get(str(feature)), base, present)
            tag["components"] = evidence
            tag.pop("flag", None)
            if evidence["status"] == "disagrees":
                tag["flag"] = (
                    f"components disagree: {100 * evidence['share']:.0f} % of its input from "
                    f"{' / '.join(evidence['types'])} (run mean {100 * evidence['baseline']:.0f} %)"
                )
            counts[mechanism][evidence["status"]] = counts[mechanism].get(evidence["status"], 0) + 1
        result.detectors[mechanism]["component_evidence"] = counts[mechanism]
        result.detectors[mechanism]["components_upstream"] = {k: v[:10] for k, v in present.items()}
    path = Path(folder) / TAGS_FILE
    atomic_write_json(path, result.to_json(), indent=None, ensure_ascii=False)
    return counts
