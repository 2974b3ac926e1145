"""features/explanations.jsonl (analysis.explanations_store): appended line by line, a torn last line (a run killed
while writing) is cut off and redone, keys make a rerun skip what is done, the newest line of a feature wins."""

from __future__ import annotations

import json

import pytest

from analysis.explanations_store import FILE, append, done, latest, read_records


def _record(feature: int, text: str, explainer: str = "local:a") -> dict:
    return {
        "feature": feature,
        "explanation": text,
        "explainer": explainer,
        "scorer": "local:a",
        "prompt_version": 1,
        "scores": {"explanation": {"detection": {"auroc": float("nan")}}},
    }


def test_lines_append_resume_and_the_newest_wins(tmp_path):
    append(tmp_path, _record(3, "cats"))
    append(tmp_path, _record(5, "dogs"))
    append(tmp_path, _record(3, "felines", explainer="http:b"))
    assert done(tmp_path) == {(3, "local:a", "local:a", 1), (5, "local:a", "local:a", 1), (3, "http:b", "local:a", 1)}
    assert latest(tmp_path)[3]["explanation"] == "felines" and latest(tmp_path)[5]["explanation"] == "dogs"
    first = json.loads((tmp_path / FILE).read_text().splitlines()[0])
    assert first["scores"]["explanation"]["detection"]["auroc"] is None  # NaN is written as null: valid JSON


def test_a_torn_last_line_is_dropped_and_redone(tmp_path):
    append(tmp_path, _record(1, "one"))
    with open(tmp_path / FILE, "a") as f:
        f.write('{"feature": 2, "explanation": "tw')  # killed mid-write
    with pytest.warns(UserWarning, match="1 damaged line"):
        assert [r["feature"] for r in read_records(tmp_path)] == [1]
    append(tmp_path, _record(2, "two"))
    lines = (tmp_path / FILE).read_text().splitlines()
    assert [json.loads(line)["feature"] for line in lines] == [1, 2]
    assert read_records(tmp_path)[1]["explanation"] == "two"
