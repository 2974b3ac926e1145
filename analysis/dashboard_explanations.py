"""Explanations on the dashboard (`sae explain`, features/explanations.jsonl): each feature record gets its newest
explanation with its detection, fuzzing and simulation scores next to both baselines, and the overview the
distributions."""

from __future__ import annotations

from analysis.dashboard import Annotator

VARIANTS = ("explanation", "shuffled", "tokens")  # the explanation, another feature's, the top-tokens one


def _scores(scores: dict) -> dict:
    """{variant: {"detection": auroc, "fuzzing": auroc, "simulation": pearson}} of one record's scores (AUROC needs
    no threshold, so it stays meaningful for a judge whose P(Yes) never crosses one half)."""
    out = {}
    for variant in VARIANTS:
        s = scores.get(variant) or {}
        out[variant] = {
            "detection": (s.get("detection") or {}).get("auroc"),
            "fuzzing": (s.get("fuzzing") or {}).get("auroc"),
            "simulation": (s.get("simulation") or {}).get("pearson"),
        }
    return out


def explanations_annotator(records: dict[int, dict]) -> Annotator:
    """Adds `explanation` {text, explainer, scorer, scores, baselines} to each explained feature's record."""

    def annotate(record: dict) -> None:
        r = records.get(int(record["id"]))
        if r is None:
            return
        record["explanation"] = {
            "text": r["explanation"],
            "explainer": r["explainer"],
            "scorer": r["scorer"],
            "scores": _scores(r.get("scores") or {}),
            "baselines": r.get("baselines", {}),
        }

    return annotate


def explanations_overview(records: dict[int, dict]) -> dict | None:
    """Per variant and score, the sorted per-feature values (the overview draws them as distributions)."""
    if not records:
        return None
    out: dict[str, dict[str, list[float]]] = {v: {"detection": [], "fuzzing": [], "simulation": []} for v in VARIANTS}
    for r in records.values():
        for variant, s in _scores(r.get("scores") or {}).items():
            for name, value in s.items():
                if isinstance(value, int | float):
                    out[variant][name].append(round(float(value), 4))
    for per in out.values():
        for values in per.values():
            values.sort()
    explainers = sorted({r["explainer"] for r in records.values()})
    return {"features": len(records), "explainers": explainers, "scores": out}
