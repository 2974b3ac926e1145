"""`sae explain` end to end with the real embedded model as explainer and scorer, on a tiny inspected run: a run
killed mid-way loses no finished feature and repeats none when resumed, every line carries the explanation, its
scores and both baselines, and the rebuilt dashboard shows them (headless Chromium); bad feature specs are one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_dashboard import CHROMIUM_FLAGS, INSPECT, TRAIN, _one_line_error
from test_llm_backends import KEY_ENV, FakeOpenAI

from activations.models import load_model
from analysis.commands.explain import select_features, spread
from analysis.explain_examples import _quiet_stretch, add_negatives, feature_examples, token_decoder
from analysis.explanations_store import FILE
from analysis.feature_stats import FeatureStats
from analysis.llm_backends import LocalBackend
from analysis.splice import spliced
from sae.cli import main
from sae.runs import open_sae

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
    deadline = time.time() + 1200  # a loaded 2-core machine takes minutes for the first feature
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and path.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=60)
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
        scored = r["examples"]["scored"]
        assert len(scored) == detection["n"] and all(len(e["tokens"]) == len(e["acts"]) for e in scored)
        simulation = r["scores"]["explanation"]["simulation"]  # the local scorer reads per-token digit log-probs
        assert (
            simulation["n"] == sum(len(e["acts"]) for e in scored)
            and "simulation" in r["scores"]["gain"]["over_tokens"]
        )
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
    assert 'id="explanation"' in dom and dom.count("data-variant=") == 3 and dom.count('data-score="simulation"') == 3
    assert _escaped(records[0]["explanation"]) in dom
    overview = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert 'id="explanations"' in overview and "3 features" in overview


def _escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_quiet_stretch_by_hand():
    fires = torch.tensor([True, True, False, False, True, False, False, False, True])
    assert _quiet_stretch(fires, 3) == (5, 8)
    assert _quiet_stretch(fires, 4) is None
    assert _quiet_stretch(torch.tensor([True, False, False]), 2) == (1, 3)  # runs to the end; position 0 never counts
    assert _quiet_stretch(torch.tensor([False, True, True]), 1) is None


def test_negatives_are_quiet_when_rerun_and_dense_features_get_them(inspected):
    """Every negative, found again in its stored window and rerun alone through the spliced model (another code
    path), has the feature silent at each of its positions; the densest features still get negatives."""
    sae, lm = open_sae(inspected, device="cpu")
    stats = FeatureStats.load(inspected / "features")
    decode = token_decoder(lm)
    dense = select_features("top-density:4", stats, {})
    items = [feature_examples(stats, f, decode) for f in dense]
    add_negatives(lm, sae, stats, items, per_feature=6, seed=0)
    windows = stats.top_tokens.flatten(0, 1)
    windows = windows[(windows >= 0).all(-1)]
    texts = {tuple(decode(t) for t in w.tolist()): w for w in windows}
    hook = getattr(sae.cfg, "hook_name_out", "") or sae.cfg.hook_name
    for item in items:
        assert len(item.negatives) >= 3, f"feature {item.feature} got {len(item.negatives)} negatives"
        for example in item.negatives:
            found = [
                (w, i)
                for key, w in texts.items()
                for i in range(1, len(key) - len(example.tokens) + 1)
                if list(key[i : i + len(example.tokens)]) == example.tokens
            ]
            assert found, "a negative is not a stretch of a stored window"
            assert example.partial or len(example.tokens) == windows.shape[1] - 1
            w, i = found[0]
            with spliced(lm, [sae]) as nodes:
                lm.model(input_ids=w[None].long(), use_cache=False)
                acts = nodes.features[hook][0, :, item.feature]
            assert float(acts[i : i + len(example.tokens)].max()) <= 0


def test_explain_over_http_with_a_retry_then_a_wrong_key(inspected, capsys, monkeypatch):
    """`sae explain --api-base` end to end against a real OpenAI-compatible server on localhost answering with the
    embedded model: a dropped connection is retried, the plan names the tokens it will send, simulation is skipped
    (a chat server gives no log-probs of a reply it did not write), and a wrong key is one line that loses nothing."""
    srv = FakeOpenAI(LocalBackend.from_loaded(load_model("smollm2-135m", device="cpu")), key="right", faults=["drop"])
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        path = inspected / "features" / FILE
        before = path.read_text() if path.is_file() else ""
        monkeypatch.setenv(KEY_ENV, "right")
        argv = ["explain", str(inspected), "--features", "random:2", "--examples", "3", "--negatives", "3"]
        http = ["--api-base", srv.api_base, "--explainer", "smol", "--api-key-env", KEY_ENV, "--device", "cpu"]
        assert main([*argv, *http]) == 0
        out = capsys.readouterr().out
        assert "tokens over HTTP" in out and "simulation skipped" in out
        records = [json.loads(line) for line in path.read_text().splitlines()]
        ours = [r for r in records if r["explainer"] == f"http:smol@{srv.api_base}"]
        assert len(ours) == 2 and all(r["scores"]["explanation"]["simulation"] is None for r in ours)
        assert all(r["scores"]["explanation"]["detection"]["n"] >= 4 for r in ours)
        assert srv.requests > 2 * (1 + 3 * 2 * 3)  # the explanations, every question, and the dropped one
        kept = path.read_text()
        assert kept.startswith(before)
        monkeypatch.setenv(KEY_ENV, "wrong")
        code = main([*argv, "--features", "random:4", *http])
        _one_line_error(code, capsys.readouterr().err, "401")
        assert path.read_text() == kept  # nothing finished is lost, nothing half-done is written
    finally:
        srv.shutdown()
        srv.server_close()
