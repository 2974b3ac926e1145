"""`sae explain` end to end with the real embedded model as explainer and scorer, on a tiny inspected run: a run
killed mid-way loses no finished feature and repeats none when resumed, every line carries the explanation, its
scores and both baselines, and the rebuilt dashboard shows them (headless Chromium); bad feature specs are one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from test_dashboard import CHROMIUM_FLAGS, INSPECT, TRAIN, _one_line_error

from analysis.commands.explain import select_features, spread
from analysis.explanations_store import FILE
from analysis.feature_stats import FeatureStats
from sae.cli import main

EXPLAIN = "--features random:3 --examples 4 --negatives 4 --batch-size 1 --device cpu".split()


@pytest.fixture(scope="module")
def inspected(tiny_llama_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("explain") / "run"
    assert main(["train", "--model", tiny_llama_dir, *TRAIN, "--out", str(run)]) == 0
    assert main(["inspect", str(run), *INSPECT]) == 0
    return run


def test_feature_specs(inspected, capsys):
    stats = FeatureStats.load(inspected / "features")
    alive = [i for i in range(stats.d_sae) if int(stats.count[i]) > 0]
    assert select_features("all", stats, {}) == alive
    dense = select_features("top-density:3", stats, {})
    assert (
        len(dense) == 3
        and min(float(stats.density[i]) for i in dense)
        >= sorted((float(stats.density[i]) for i in alive), reverse=True)[2]
    )
    assert select_features("random:4", stats, {}, seed=1) == select_features("random:4", stats, {}, seed=1)
    assert select_features(f"{alive[0]},{alive[1]}-{alive[1]}", stats, {}) == alive[:2]
    assert select_features("tag:induction", stats, {alive[2]: [{"name": "Induction / copying feature"}]}) == [alive[2]]
    assert spread(list(range(10)), 4) == [0, 3, 6, 9] and spread([1, 2], 4) == [1, 2]
    for spec, phrase in (("top-density:x", "not understood"), ("99999", "the SAE has"), ("tag:nothing", "no feature")):
        code = main(["explain", str(inspected), "--features", spec, "--device", "cpu"])
        _one_line_error(code, capsys.readouterr().err, phrase)


def test_explain_resumes_after_a_kill_and_shows_on_the_dashboard(inspected, tmp_path, capsys):
    path = inspected / "features" / FILE
    argv = [sys.executable, "-m", "sae", "explain", str(inspected), *EXPLAIN]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and path.read_text().count("\n") >= 1:
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait(timeout=30)
    first = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert 1 <= len(first) < 3, "the run should have been killed after its first feature"
    assert main(["explain", str(inspected), *EXPLAIN]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in path.read_text().splitlines()]
    features = [r["feature"] for r in records]
    assert len(features) == len(set(features)) == 3  # none lost, none repeated
    assert records[: len(first)] == first  # what was finished stays as it was
    for r in records:
        assert r["explanation"] and r["explainer"] == "local:smollm2-135m" and r["prompt_version"] >= 1
        assert set(r["scores"]) >= {"explanation", "shuffled", "tokens", "gain"}
        assert r["baselines"]["tokens"] and r["baselines"]["shuffled"] != r["explanation"]
        detection = r["scores"]["explanation"]["detection"]
        assert detection["n"] == r["examples"]["activating"] + r["examples"]["negatives"]
    assert "detection_auroc" in out and "gain over shuffled" in out and "explains weakly" in out
    assert main(["inspect", str(inspected), "--dashboard-only", "--device", "cpu"]) == 0
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium: the dashboard's explanation view is not checked")
    page = (inspected / "dashboard" / "index.html").resolve().as_uri()
    flags = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p'}", "--virtual-time-budget=8000"]
    feature = records[0]["feature"]
    dom = subprocess.run(
        [*flags, "--dump-dom", f"{page}#feature={feature}"], capture_output=True, text=True, timeout=120
    ).stdout
    assert 'id="explanation"' in dom and dom.count("data-variant=") == 3
    assert _escaped(records[0]["explanation"]) in dom
    overview = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert 'id="explanations"' in overview and "3 features" in overview


def _escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
