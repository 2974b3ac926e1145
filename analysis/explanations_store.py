"""RUN/features/explanations.jsonl: one JSON line per explained feature, appended and flushed as each finishes, so a
killed `sae explain` loses nothing finished and a rerun skips what is done. A line is keyed by (feature, explainer,
scorer, prompt version): another explainer adds lines, the newest line of a feature is the one shown."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

FILE = "explanations.jsonl"


def key(record: dict) -> tuple:
    return (int(record["feature"]), record["explainer"], record["scorer"], int(record["prompt_version"]))


def read_records(features_dir: str | Path) -> list[dict]:
    """Every whole line of the file, in order ([] when there is none); a torn or damaged line (a run killed while
    writing it) is skipped with a warning and redone by the next run."""
    path = Path(features_dir) / FILE
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key(record)
            records.append(record)
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        warnings.warn(f"{path}: {bad} damaged line(s) skipped; those features are explained again.", stacklevel=2)
    return records


def done(features_dir: str | Path) -> set[tuple]:
    """The keys already in the file."""
    return {key(r) for r in read_records(features_dir)}


def append(features_dir: str | Path, record: dict) -> None:
    """Add one line and make it durable before returning (a torn last line of a killed run is dropped first)."""
    path = Path(features_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:  # a line without its newline is a torn write: cut it off
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = path.read_bytes()
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_finite(record), ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finite(value):
    """The record with every non-finite number (a NaN AUROC of a one-class set) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def latest(features_dir: str | Path) -> dict[int, dict]:
    """The newest record of each feature."""
    return {int(r["feature"]): r for r in read_records(features_dir)}
