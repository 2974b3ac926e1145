"""The dashboard's circuit links (analysis.dashboard_circuits): circuits.js entries, replaced by page, surviving a
rewritten dashboard, a damaged file replaced with a warning, and the links on the overview and feature pages in
headless Chromium.

The dashboard is real: feature statistics of a random TopK SAE on the tiny Llama over held-out text, written by
write_dashboard. The circuit graphs are hand-written in the shape `sae circuit` writes, with real circuit pages.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from activations.hookpoints import parse_hook, run_with_cache
from activations.sources import open_text_source
from analysis.circuit_page import write_circuit_page
from analysis.dashboard import write_dashboard
from analysis.dashboard_circuits import CIRCUITS_FILE, read_circuits, register_circuit
from analysis.feature_stats import FeatureStats, StatsConfig, feature_stats
from sae.config import SAEConfig
from sae.registry import make_sae

HOOK = "blocks.2.hook_resid_post"
OTHER = "blocks.1.hook_resid_post"
STATS = StatsConfig(tokens=512, top_k=3, left=3, right=2, intervals=2, per_interval=2, bins=8, context_size=32)
CHROMIUM_FLAGS = (  # as tests/test_dashboard.py: offline, no first-run work
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --virtual-time-budget=10000"
).split()


def _node(hook: str, position: int, feature: int, attribution: float, **extra) -> dict:
    """A graph node as `sae circuit` writes it (the fields the dashboard reads, plus `extra`)."""
    node = {"id": f"{hook}@{position}:{feature}", "hook": hook, "position": position, "token": "t", "feature": feature}
    return node | {"attribution": attribution} | extra


def _graph(prompt: str, target: str, faithfulness: float, nodes: list[dict], contrast: str | None = None) -> dict:
    """A circuit graph JSON of `nodes`, metric value 2.5."""
    return {
        "format": 1,
        "prompt": prompt,
        "metric": {"kind": "logit", "target": target, "contrast": contrast, "value": 2.5},
        "hooks": [OTHER, HOOK],
        "nodes": nodes,
        "edges": [],
        "faithfulness": {"faithfulness": faithfulness, "completeness": 0.25, "full": 2.5, "empty": 0.5},
    }


# Graph A uses features 3 (at two positions) and 7 of HOOK; its feature 5 is another hook's, its feature 9 node is no
# feature node. Graph B's only HOOK feature is 11, and its faithfulness is NaN (the metric did not move).
GRAPH_A = _graph(
    "To be or not",
    " to",
    0.875,
    [
        _node(HOOK, 2, 3, 0.5, kind="feature"),
        _node(HOOK, 4, 3, -0.25),
        _node(HOOK, 4, 7, 1.5),
        _node(OTHER, 2, 5, 0.75),
        _node(HOOK, 3, 9, 2.0, kind="error"),
    ],
)
GRAPH_B = _graph("Friends, Romans", ",", math.nan, [_node(HOOK, 1, 11, 0.125), _node(OTHER, 1, 3, 1.0)], " and")


class _Links(HTMLParser):
    """Every <a> of a page: its attributes and its text."""

    def __init__(self):
        super().__init__()
        self.links: list[dict] = []
        self.open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.open.append(dict(attrs) | {"text": ""})

    def handle_data(self, data):
        for link in self.open:
            link["text"] += data

    def handle_endtag(self, tag):
        if tag == "a" and self.open:
            self.links.append(self.open.pop())


@pytest.fixture(scope="module")
def stats(tiny_llama) -> FeatureStats:
    """Statistics of a random TopK SAE at HOOK, centred on the model's mean activation so its features fire."""
    lm = tiny_llama
    tokens = torch.tensor([lm.tokenizer("To be, or not to be, that is the question")["input_ids"]])
    x = run_with_cache(lm.model, tokens, [parse_hook(HOOK, lm.model)])[HOOK][0, 1:]
    scale = lm.d_model**0.5 / x.norm(dim=-1).mean().item()
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=32, k=4, hook_name=HOOK, model_name=lm.name, norm_scale=scale))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0) * scale)
    return feature_stats(sae, lm, open_text_source("tinyshakespeare", split="test"), STATS)


@pytest.fixture
def run(stats, tokenizer, tmp_path) -> Path:
    """A run folder with a fresh dashboard/ (chunks of 8 features) and two circuit pages under circuits/."""
    write_dashboard(tmp_path / "dashboard", stats, None, tokenizer, title="circuit links", chunk_size=8)
    (tmp_path / "circuits").mkdir()
    for name, graph in (("to-be", GRAPH_A), ("second try", GRAPH_B)):
        write_circuit_page(graph, tmp_path / "circuits" / f"{name}.html", {HOOK: "../dashboard/index.html"})
    return tmp_path


def _register_both(run: Path) -> Path:
    register_circuit(run / "dashboard", HOOK, GRAPH_A, run / "circuits" / "to-be.html")
    return register_circuit(run / "dashboard", HOOK, GRAPH_B, run / "circuits" / "second try.html")


def test_register_records_each_circuit_once(run):
    """Two circuits make two entries with this hook's feature attributions only; registering a page again replaces
    its entry in place; the file is the SAELAB.circuits([...]) script the page loads."""
    path = _register_both(run)
    assert path == run / "dashboard" / CIRCUITS_FILE
    text = path.read_text(encoding="utf-8")
    assert text.startswith("SAELAB.circuits([") and text.endswith("]);\n")
    a, b = read_circuits(run / "dashboard")
    assert a == {
        "name": "to-be",
        "href": "../circuits/to-be.html",
        "prompt": "To be or not",
        "target": " to",
        "contrast": None,
        "metric": 2.5,
        "faithfulness": 0.875,
        "completeness": 0.25,
        "features": {"3": [0.5, -0.25], "7": [1.5]},
    }
    assert b["name"] == "second try" and b["href"] == "../circuits/second%20try.html"  # a usable URL
    assert (run / "dashboard" / "../circuits/second try.html").is_file()
    assert b["contrast"] == " and" and b["faithfulness"] is None and b["features"] == {"11": [0.125]}

    changed = GRAPH_A | {"faithfulness": {"faithfulness": 0.5, "completeness": 0.125}, "nodes": GRAPH_A["nodes"][2:3]}
    register_circuit(run / "dashboard", HOOK, changed, run / "circuits" / "to-be.html")
    again = read_circuits(run / "dashboard")
    assert [e["name"] for e in again] == ["to-be", "second try"]
    assert again[0]["faithfulness"] == 0.5 and again[0]["features"] == {"7": [1.5]} and again[1] == b
    # the other hook's dashboard gets its own features of the same graph
    register_circuit(run / "other", OTHER, GRAPH_A, run / "circuits" / "to-be.html")
    (other,) = read_circuits(run / "other")
    assert other["features"] == {"5": [0.75]} and other["href"] == "../circuits/to-be.html"


@pytest.mark.parametrize(
    "damage",
    ["alert('not data');\n", 'SAELAB.circuits([{"href": ', 'SAELAB.circuits({"href": "x"});\n', "\xff\xfe"],
    ids=["script", "truncated", "not-a-list", "not-utf8"],
)
def test_a_damaged_file_is_replaced_with_a_warning(run, damage):
    """A circuits.js that is not a list of entries is never run or kept: reading it warns and gives no circuits, and
    the next registration rewrites it with only the new entry."""
    path = run / "dashboard" / CIRCUITS_FILE
    path.write_bytes(damage.encode("latin-1"))
    with pytest.warns(UserWarning, match="circuits.js is damaged"):
        assert read_circuits(run / "dashboard") == []
    with pytest.warns(UserWarning, match="circuits.js is damaged"):
        register_circuit(run / "dashboard", HOOK, GRAPH_A, run / "circuits" / "to-be.html")
    assert [e["name"] for e in read_circuits(run / "dashboard")] == ["to-be"]
    assert "alert" not in path.read_text(encoding="utf-8")


def test_rewriting_the_dashboard_keeps_the_circuits(run, stats, tokenizer):
    """write_dashboard (every `sae inspect`) replaces data/ but leaves circuits.js as it was."""
    before = _register_both(run).read_bytes()
    old_chunk = run / "dashboard" / "data" / "features_00003.js"
    assert old_chunk.is_file()
    write_dashboard(run / "dashboard", stats, None, tokenizer, title="circuit links", chunk_size=16)
    assert not old_chunk.exists()  # data/ was rewritten (16 features per chunk now)
    assert (run / "dashboard" / CIRCUITS_FILE).read_bytes() == before
    assert len(read_circuits(run / "dashboard")) == 2


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _dom(browser: str, tmp_path: Path, url: str) -> str:
    flags = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


def _links(dom: str) -> list[dict]:
    parser = _Links()
    parser.feed(dom)
    return parser.links


def test_circuit_links_render_in_chromium(run, tmp_path):
    """The overview lists each circuit (prompt → target, faithfulness) linking to its page; a feature page shows
    "In circuits:" with its attribution there; without circuits.js the dashboard works as before."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    index = (run / "dashboard" / "index.html").resolve().as_uri()
    dom = _dom(browser, tmp_path, index)
    assert 'id="overview"' in dom and 'id="circuits"' not in dom  # no circuits.js: no section, the page works

    _register_both(run)
    dom = _dom(browser, tmp_path, index)
    circuits = {a["data-circuit"]: a for a in _links(dom) if "data-circuit" in a}
    assert set(circuits) == {"to-be", "second try"}
    assert circuits["to-be"]["href"] == "../circuits/to-be.html"
    assert circuits["to-be"]["text"] == 'To be or not → " to", faithfulness 0.875'
    assert circuits["second try"]["href"] == "../circuits/second%20try.html"
    assert circuits["second try"]["text"] == 'Friends, Romans → "," vs " and", faithfulness n/a'
    for a in circuits.values():  # each link opens an existing page
        assert (run / "dashboard" / a["href"].replace("%20", " ")).is_file()

    dom = _dom(browser, tmp_path, f"{index}#feature=3")
    assert 'data-feature="3"' in dom and 'id="feature-circuits"' in dom
    (link,) = [a for a in _links(dom) if "data-feature-circuit" in a]
    assert link["data-feature-circuit"] == "to-be" and link["href"] == "../circuits/to-be.html"
    assert link["text"] == "to-be +0.5, -0.25"
    dom = _dom(browser, tmp_path, f"{index}#feature=11")
    (link,) = [a for a in _links(dom) if "data-feature-circuit" in a]
    assert link["data-feature-circuit"] == "second try" and link["text"] == "second try +0.125"
    dom = _dom(browser, tmp_path, f"{index}#feature=5")  # feature 5 is only in another hook's nodes
    assert 'data-feature="5"' in dom and 'id="feature-circuits"' not in dom
