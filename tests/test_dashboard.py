"""`sae inspect` end to end on a tiny trained run: data files, plots, dashboard records, and the page in headless
Chromium."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from analysis.dashboard import feature_record, read_feature_tags, write_dashboard
from analysis.feature_stats import FeatureStats
from analysis.logits import TopLogits
from sae.cli import main

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
TRAIN = (
    "--hook blocks.2.hook_resid_post --dataset tinyshakespeare --tokens 4096 --batch-size 512 "
    "--buffer-tokens 2048 --context-size 64 --d-sae 96 --k 8 --eval-tokens 256 --device cpu"
).split()
INSPECT = (
    "--tokens 1024 --top-k 6 --left 4 --right 2 --intervals 3 --per-interval 2 --chunk-size 16 --device cpu"
).split()
CHROMIUM_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync"
).split()


def _one_line_error(code, err, *phrases):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def _load_js(path: Path, call: str):
    """The JSON arguments of a SAELAB.<call>(...) data file."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"SAELAB.{call}(") and text.rstrip().endswith(");")
    body = text[len(f"SAELAB.{call}(") : text.rstrip().rindex(")")]
    return json.loads(f"[{body}]")


@pytest.fixture(scope="module")
def inspected(tiny_llama_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("inspect") / "run"
    assert main(["train", "--model", tiny_llama_dir, *TRAIN, "--out", str(run)]) == 0
    assert main(["inspect", str(run), *INSPECT]) == 0
    return run


def test_inspect_writes_data_plots_and_dashboard(inspected):
    run = inspected
    for name in (
        "features/stats.safetensors",
        "features/stats.json",
        "features/logits.safetensors",
        "plots/feature_density.png",
        "plots/training.png",
        "dashboard/index.html",
        "dashboard/data/index.js",
    ):
        assert (run / name).is_file(), name
    for png in ("feature_density.png", "training.png"):
        data = (run / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    stats = FeatureStats.load(run / "features")
    assert stats.d_sae == 96 and stats.tokens >= 1024 and stats.top_act.shape == (96, 6)
    chunks = sorted((run / "dashboard" / "data").glob("features_*.js"))
    assert len(chunks) == 6  # 96 features / 16 per chunk
    (meta,) = _load_js(run / "dashboard" / "data" / "index.js", "index")
    assert len(meta["features"]) == 96 and meta["chunk_size"] == 16
    assert [p["src"] for p in meta["plots"]] == ["../plots/feature_density.png", "../plots/training.png"]
    # the page is static: no network, no CDN; data comes from script files next to it
    html = (run / "dashboard" / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "fetch(" not in html
    assert "XMLHttpRequest" not in html
    assert "<link" not in html


def test_inspect_writes_each_features_sources(inspected):
    """features/components.json: every feature that fired has its top examples split into sources, rerun in their
    exact held-out contexts, and the parts add up to the example's pre-activation (the remainder is ~0)."""
    data = json.loads((inspected / "features" / "components.json").read_text())
    assert data["mode"].startswith("exact") and data["max_abs_remainder"] < 1e-3
    assert data["features"] and all(record["examples"] and record["summary"] for record in data["features"].values())
    names = {name for record in data["features"].values() for name, _ in record["fractions"]}
    assert names & {"embed"} and any(name.startswith("L0H") or name.startswith("L1H") for name in names)


def test_records_hold_the_statistics(inspected):
    run = inspected
    stats = FeatureStats.load(run / "features")
    logits = TopLogits.load(run / "features" / "logits.safetensors")
    f = int(stats.count.argmax())
    n, records = _load_js(run / "dashboard" / "data" / f"features_{f // 16:05d}.js", "chunk")
    assert n == f // 16
    r = records[f % 16]
    assert r["id"] == f and r["count"] == int(stats.count[f])
    assert r["tags"] == read_feature_tags(run / "features").get(f, [])  # the catalogue's tags, nothing else
    assert r["max"] == pytest.approx(float(stats.max[f]), rel=1e-3)
    assert sum(r["hist"]["counts"]) == r["count"]
    assert [ex["act"] for ex in r["top"]] == pytest.approx(stats.top_act[f].tolist(), rel=1e-3)
    for ex in r["top"]:
        assert ex["acts"][ex["center"]] == pytest.approx(ex["act"], rel=1e-2)
        assert len(ex["tokens"]) == len(ex["acts"]) <= 4 + 1 + 2
    assert sum(iv["count"] for iv in r["intervals"]) == r["count"]
    assert sum(len(iv["examples"]) for iv in r["intervals"]) == int((stats.sample_g[f] >= 0).sum())
    assert r["logits"]["promoted"][0][1] == pytest.approx(float(logits.promoted[f, 0]), rel=1e-3)


def test_tags_from_files_reach_the_records(inspected, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(inspected / "features", out / "features")
    (out / "features" / "tags.json").write_text(json.dumps({"3": ["hand-picked"]}))
    (out / "features" / "mechanisms.json").write_text(
        json.dumps({"format": 1, "tags": {"3": [{"mechanism": "induction", "name": "Induction", "score": 0.9}]}})
    )
    assert (
        main(
            ["inspect", str(inspected), "--out", str(out), "--dashboard-only", "--chunk-size", "16", "--device", "cpu"]
        )
        == 0
    )
    _, records = _load_js(out / "dashboard" / "data" / "features_00000.js", "chunk")
    assert records[3]["tags"] == ["hand-picked", {"mechanism": "induction", "name": "Induction", "score": 0.9}]
    assert records[4]["tags"] == []
    (meta,) = _load_js(out / "dashboard" / "data" / "index.js", "index")
    assert meta["features"][3][6] == ["hand-picked", "Induction"]
    assert not (out / "dashboard" / "data" / "features_00006.js").exists()


def test_annotators_add_fields_and_tags(inspected, tmp_path, tokenizer):

    stats = FeatureStats.load(inspected / "features")
    logits = TopLogits.load(inspected / "features" / "logits.safetensors")

    def annotate(record):
        record["parity"] = record["id"] % 2
        if record["count"] == int(stats.count.max()):
            record["tags"].append({"name": "busiest", "note": "fires most often"})

    write_dashboard(tmp_path, stats, logits, tokenizer, title="t", annotators=[annotate], chunk_size=50)
    _, records = _load_js(tmp_path / "data" / "features_00000.js", "chunk")
    assert [r["parity"] for r in records] == [i % 2 for i in range(50)]
    busiest = int(stats.count.argmax())
    (meta,) = _load_js(tmp_path / "data" / "index.js", "index")
    assert "busiest" in meta["features"][busiest][6]
    one = feature_record(stats, logits, 7, tokenizer)
    assert one == {k: v for k, v in records[7].items() if k != "parity"} | {"tags": []}


def test_inspect_user_errors(inspected, tmp_path, capsys):
    code = main(["inspect", str(tmp_path / "no-run"), "--device", "cpu"])
    _one_line_error(code, capsys.readouterr().err, "no-run", "does not exist")
    empty = tmp_path / "empty-out"
    code = main(["inspect", str(inspected), "--out", str(empty), "--dashboard-only", "--device", "cpu"])
    _one_line_error(code, capsys.readouterr().err, "no feature statistics", "sae inspect RUN")
    broken = tmp_path / "broken"
    shutil.copytree(inspected / "features", broken / "features")
    (broken / "features" / "tags.json").write_text("[1, 2]")
    code = main(["inspect", str(inspected), "--out", str(broken), "--dashboard-only", "--device", "cpu"])
    _one_line_error(code, capsys.readouterr().err, "tags.json", "fix or delete it")
    code = main(["inspect", str(inspected), "--out", str(tmp_path / "x"), "--top-k", "0", "--device", "cpu"])
    _one_line_error(code, capsys.readouterr().err, "--top-k 0", "at least 1")


class _TextUnder(HTMLParser):
    """Collects the text inside the elements with the given ids."""

    def __init__(self, ids):
        super().__init__()
        self.text = {i: "" for i in ids}
        self.stack = []

    def handle_starttag(self, tag, attrs):
        self.stack.append(dict(attrs).get("id"))

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        for i in self.text:
            if i in self.stack:
                self.text[i] += data


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_dashboard_renders_in_headless_chromium(inspected, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    run = inspected
    stats = FeatureStats.load(run / "features")
    f = int(stats.count.argmax())
    _, records = _load_js(run / "dashboard" / "data" / f"features_{f // 16:05d}.js", "chunk")
    r = records[f % 16]
    url = (run / "dashboard" / "index.html").resolve().as_uri() + f"#feature={f}"
    flags = [
        browser,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--window-size=1400,1000",
        "--hide-scrollbars",
    ]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    page = _TextUnder(["top-examples", "logit-table", "interval-examples", "tags"])
    page.feed(dom)
    assert f'data-feature="{f}"' in dom and f"Feature {f}" in dom
    shown = page.text["top-examples"]
    assert len(r["top"]) > 0
    for ex in r["top"]:
        window = "".join(t.replace("\n", "↵\n").replace("\t", "→") for t in ex["tokens"])
        assert window in shown
    for token, _ in r["logits"]["promoted"][:5] + r["logits"]["suppressed"][:5]:
        assert json.dumps(token) in page.text["logit-table"]
    assert page.text["interval-examples"].strip()
    # lazy loading: only the chunk holding this feature was loaded
    loaded = re.findall(r'src="data/(features_\d+\.js)"', dom)
    assert loaded == [f"features_{f // 16:05d}.js"]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard_feature.png"
    shot.unlink(missing_ok=True)
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    # a feature that does not exist says so
    dom = subprocess.run(
        [*flags, "--dump-dom", url.replace(f"feature={f}", "feature=4000")], capture_output=True, text=True, timeout=120
    ).stdout
    assert "There is no feature 4000" in dom


def _dom(browser: str, tmp_path: Path, url: str) -> str:
    flags = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


def test_sources_chart_and_heads_page_render_in_chromium(inspected, tmp_path):
    """A feature page draws a bar per source component; the heads & neurons page draws a layer x head grid per head
    type and, for a picked head, the features it feeds."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    run = inspected
    (meta,) = _load_js(run / "dashboard" / "data" / "index.js", "index")
    comps = meta["components"]
    kinds = comps["heads"]["scores"]
    n_layers, n_heads = len(next(iter(kinds.values()))), len(next(iter(kinds.values()))[0])
    f = int(FeatureStats.load(run / "features").count.argmax())
    _, records = _load_js(run / "dashboard" / "data" / f"features_{f // 16:05d}.js", "chunk")
    sources = records[f % 16]["sources"]
    assert sources["fractions"] and sources["max_abs_remainder"] < 1e-3

    index = (run / "dashboard" / "index.html").resolve().as_uri()
    dom = _dom(browser, tmp_path, f"{index}#feature={f}")
    assert 'id="sources"' in dom
    for name, _ in sources["fractions"]:
        assert f'data-component="{name}"' in dom

    dom = _dom(browser, tmp_path, f"{index}#components")
    assert 'id="components"' in dom
    for kind in kinds:
        assert f'data-kind="{kind}"' in dom
    assert dom.count('class="cell') == len(kinds) * n_layers * n_heads
    for kind in comps["neurons"]["tagged"]:
        assert f'data-neuron-type="{kind}"' in dom

    head, fed = max(
        ((h, v) for h, v in comps["feeds"].items() if re.fullmatch(r"L\d+H\d+", h)), key=lambda x: len(x[1])
    )
    dom = _dom(browser, tmp_path, f"{index}#head={head}")
    assert f"Head {head}" in dom
    for feature, _ in fed[:3]:
        assert f'href="#feature={feature}"' in dom
