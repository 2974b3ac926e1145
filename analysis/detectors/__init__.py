"""Mechanism detectors: each maps a `Subject` (features as a token -> activation function, plus
optional output weights) to a `DetectorResult` with a score in [0, 1] for every feature at once.

The catalogue (analysis/mechanisms.yaml) names a detector per mechanism and holds its threshold;
`detect` runs one (cached on the subject, since some detectors reuse others), `detect_all` all.
This package's __init__ is the one detector table: it imports the detector modules, which import only
`base`, `probes` and each other, never this table.
"""

from __future__ import annotations

from collections.abc import Callable

from analysis.detectors.base import DetectorResult, Subject, run_once
from analysis.detectors.ordinal import successor
from analysis.detectors.output import entropy, suppression, token_promoting
from analysis.detectors.position import attention_sink, positional
from analysis.detectors.repetition import duplicate_token, induction
from analysis.detectors.token import previous_token, token
from analysis.detectors.words import script, subword_merging

DETECTORS: dict[str, Callable[[Subject], DetectorResult]] = {
    "token_promoting": token_promoting,
    "suppression": suppression,
    "entropy": entropy,
    "token": token,
    "previous_token": previous_token,
    "positional": positional,
    "attention_sink": attention_sink,
    "subword_merging": subword_merging,
    "duplicate_token": duplicate_token,
    "induction": induction,
    "successor": successor,
    "script": script,
}


def detect(subject: Subject, name: str) -> DetectorResult:
    """Run detector `name` on `subject` once; later calls return the stored result."""
    return run_once(subject, name, DETECTORS[name])


def detect_all(subject: Subject, names: list[str] | None = None, progress: bool = False) -> dict[str, DetectorResult]:
    """Run several detectors (all by default) in registry order."""
    names = list(DETECTORS) if names is None else [n for n in DETECTORS if n in names]
    results = {}
    for name in names:
        results[name] = detect(subject, name)
        if progress:
            print(
                f"  {name:<16} {subject.cache[f'seconds:{name}']:6.1f} s  "
                f"max score {float(results[name].score.max()) if len(results[name].score) else 0:.2f}",
                flush=True,
            )
    return results


__all__ = ["DETECTORS", "DetectorResult", "Subject", "detect", "detect_all"]
