"""`sae compare`: Pareto fronts of hand-made points, rows read from hand-made run folders (bench.json over eval.json,
n/a where neither has a metric), grouping by hook, and the page drawn in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import analysis.commands.compare as compare_command
from activations.errors import UserError
from analysis.compare import METRIC_FIELDS, collect_rows, group_by_hook, mark_fronts, pareto_front, run_labels
from analysis.compare_page import FIELD_TITLES
from sae.cli import make_config
from sae.config import SAEConfig
from sae.io import save_sae
from sae.registry import make_sae

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
CHROMIUM_FLAGS = "--headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking".split()


def test_pareto_front_of_hand_made_points():
    points = [(10, 0.5), (20, 0.3), (15, 0.6), (30, 0.3), (40, 0.1), (None, 0.05), (5, None), (20, 0.3)]
    # lower is better: (15, .6) is beaten by (10, .5), (30, .3) by (20, .3) at a lower L0; the two (20, .3) tie
    # (neither beats the other) and both stay; points missing a value take no part.
    assert pareto_front(points, lower_is_better=True) == [0, 1, 7, 4]
    # higher is better: (10, .5) beats every point at L0 >= 20; (15, .6) is the best of all above it.
    assert pareto_front(points, lower_is_better=False) == [0, 2]
    assert pareto_front([], True) == [] and pareto_front([(None, None)], True) == []
    assert pareto_front([(3, 1.0)], False) == [0]


def _sae_folder(folder: Path, hook: str, architecture: str = "topk", k: int = 8, **extra) -> None:
    cfg = SAEConfig(d_in=8, d_sae=32, architecture=architecture, k=k, hook_name=hook, **extra)
    save_sae(make_sae(cfg), folder)


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _eval(l0, fvu, ce) -> dict:
    return dict(l0=l0, fvu=fvu, ce_recovered=ce, explained_variance=1 - fvu, dead_fraction=0.25, kl_sae=0.1)


@pytest.fixture
def runs(tmp_path) -> Path:
    """A sweep-like folder of four finished runs and one unfinished, and a run trained on two hooks."""
    sweep = tmp_path / "sw"
    for name, arch, k in (("topk-k8", "topk", 8), ("topk-k16", "topk", 16), ("fresh", "topk", 4)):
        _sae_folder(sweep / name, H1, arch, k)
        _write(sweep / name / "run_config.json", {"config": {"training": {"tokens": 1000}}})
    _sae_folder(sweep / "relu-c5", H1, "relu", l1_coefficient=5.0)  # an SAE folder alone: no run_config.json
    _write(sweep / "topk-k8" / "eval.json", _eval(8, 0.30, 0.80))
    _write(sweep / "topk-k16" / "eval.json", _eval(16, 0.20, 0.70))
    bench = {
        "core": {"l0": 15.5, "fvu": 0.21, "ce_loss_score": 0.85, "kl_div_score": 0.9, "frac_alive": 0.5},
        "absorption": {"mean_absorption_fraction_score": 0.12, "mean_full_absorption_score": 0.05},
        "sparse_probing": {"llm_test_accuracy": 0.95, "sae_top_1_test_accuracy": 0.7},
    }
    _write(sweep / "topk-k16" / "bench.json", bench)
    _write(sweep / "relu-c5" / "eval.json", _eval(40, 0.25, float("nan")))  # NaN: eval's CE score undefined
    _write(sweep / "unfinished" / "run_config.json", {"config": {}})
    (sweep / "unfinished" / "checkpoint").mkdir()
    multi = tmp_path / "multi"
    _write(multi / "run_config.json", {"config": {"training": {"tokens": 2000}}})
    for hook, metrics in ((H0, _eval(20, 0.40, 0.60)), (H1, _eval(30, 0.10, 0.95))):
        _sae_folder(multi / hook, hook)
        _write(multi / hook / "eval.json", metrics)
    return tmp_path


def test_rows_read_bench_over_eval_and_show_missing_metrics_as_none(runs, capsys):
    rows = collect_rows([runs / "sw", runs / "multi"])
    assert "skipping" in capsys.readouterr().out  # the unfinished run is named and left out
    assert [(r.run, r.hook) for r in rows] == [
        ("fresh", H1),
        ("relu-c5", H1),
        ("topk-k16", H1),
        ("topk-k8", H1),
        ("multi", H0),
        ("multi", H1),
    ]
    fresh, relu, k16, k8, m0, m1 = rows
    assert all(v is None for v in fresh.metrics.values()) and fresh.sources == {}
    assert k16.metrics["l0"] == 15.5 and k16.metrics["fvu"] == 0.21 and k16.metrics["ce_loss_score"] == 0.85
    assert k16.metrics["absorption"] == 0.12 and k16.metrics["probing_top1"] == 0.7 and k16.metrics["frac_alive"] == 0.5
    assert k16.metrics["explained_variance"] == pytest.approx(0.8)  # not in bench.json: eval.json's
    assert k16.sources["l0"] == "bench.json" and k16.sources["explained_variance"] == "eval.json"
    assert k8.metrics["ce_loss_score"] == 0.80 and k8.metrics["frac_alive"] == 0.75 and k8.sources["fvu"] == "eval.json"
    assert k8.metrics["absorption"] is None and k8.metrics["kl_div_score"] is None
    assert relu.metrics["ce_loss_score"] is None and relu.metrics["fvu"] == 0.25  # NaN is n/a
    assert (relu.k, relu.coefficient, relu.tokens) == (None, 5.0, None)
    assert (k8.k, k8.coefficient, k8.d_sae, k8.tokens, m0.tokens) == (8, None, 32, 1000, 2000)


def test_fronts_are_per_hook(runs):
    rows = collect_rows([runs / "sw", runs / "multi"])
    groups = group_by_hook(rows)
    assert list(groups) == [H1, H0] and [r.run for r in groups[H0]] == ["multi"]
    fronts = mark_fronts(rows)
    names = {hook: {m: [rows[i].run for i in idx] for m, idx in f.items()} for hook, f in fronts.items()}
    # H1 FVU: (8, .30) (15.5, .21) (30, .10) form the front; relu (40, .25) is beaten by multi's (30, .10).
    assert names[H1] == {
        "fvu": ["topk-k8", "topk-k16", "multi"],
        "ce_loss_score": ["topk-k8", "topk-k16", "multi"],
        "absorption": ["topk-k16"],
        "probing_top1": ["topk-k16"],
    }
    # H0 holds one SAE: alone on its fronts, though H1's SAEs score better (different hooks are not compared)
    assert names[H0] == {"fvu": ["multi"], "ce_loss_score": ["multi"], "absorption": [], "probing_top1": []}
    assert rows[1].fronts == [] and rows[4].fronts == ["fvu", "ce_loss_score"]


def test_labels_and_bad_inputs(runs, tmp_path):
    assert run_labels([tmp_path / "a" / "topk", tmp_path / "b" / "topk", tmp_path / "c"]) == ["a/topk", "b/topk", "c"]
    with pytest.raises(UserError, match=r"nope does not exist; give run folders"):
        collect_rows([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is neither a run folder nor a folder of runs"):
        collect_rows([tmp_path / "empty"])
    with pytest.raises(UserError, match=r"a run is named twice"):
        collect_rows([runs / "multi", runs / "sw" / ".." / "multi"])
    with pytest.raises(UserError, match=r"holds no finished SAE"):  # named on its own, an unfinished run is an error
        collect_rows([runs / "sw" / "unfinished"])
    (runs / "sw" / "topk-k8" / "eval.json").write_text("{not json")
    with pytest.raises(UserError, match=r"topk-k8/eval.json is not valid JSON .*delete it and run the command"):
        collect_rows([runs / "sw"])


class _Cells(HTMLParser):
    """The text of each table cell by row (data-row) and column (data-column), rows in page order."""

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict[str, str]] = {}
        self.order: list[int] = []
        self.best: set[tuple[int, str]] = set()
        self._row = self._col = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-row" in a:
            self._row = int(a["data-row"])
            self.rows[self._row] = {}
            self.order.append(self._row)
        elif tag == "td" and self._row is not None and "data-column" in a:
            self._col = a["data-column"]
            self.rows[self._row][self._col] = ""
            if "best" in (a.get("class") or "").split():
                self.best.add((self._row, self._col))

    def handle_endtag(self, tag):
        if tag == "td":
            self._col = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._col is not None:
            self.rows[self._row][self._col] += data


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _render(browser: str, url: str, profile: Path) -> tuple[str, str]:
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    done = subprocess.run(
        [browser, *flags, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    return done.stdout, done.stderr


def test_the_command_writes_a_page_that_renders_in_chromium(runs, tmp_path, capsys):
    out = tmp_path / "page"
    assert make_config("compare", compare_command, [f"{runs / 'sw'},{runs / 'multi'}"]).runs == [
        str(runs / "sw"),
        str(runs / "multi"),
    ]  # comma-separated as well as one word each
    with pytest.raises(UserError, match=r"RUNS is required"):
        make_config("compare", compare_command, ["--out", str(out)])
    argv = [str(runs / "sw"), str(runs / "multi"), "--out", str(out)]
    page = compare_command.run(make_config("compare", compare_command, argv))
    printed = capsys.readouterr().out
    table = {line.split()[0]: line for line in printed.splitlines() if line.startswith(("fresh", "relu"))}
    assert table["fresh"].split()[-6:] == ["n/a"] * 5 + ["-"]  # L0, FVU, CE, absorption, probe; on no front
    assert table["relu-c5"].split()[3:6] == ["5", "32", "n/a"]  # its coefficient; no run_config.json: tokens n/a
    assert "no eval.json or bench.json for fresh" in printed
    assert set(FIELD_TITLES) == set(METRIC_FIELDS)
    data = json.loads((out / "compare.json").read_text())
    assert len(data["rows"]) == 6 and data["rows"][1]["metrics"]["ce_loss_score"] is None
    plots = [p["file"] for p in data["plots"]]
    assert len(plots) == 4
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    dom, log = _render(browser, page.resolve().as_uri(), tmp_path / "profile")
    assert "CONSOLE" not in log, log  # the page logs nothing: no script error, every plot loaded
    assert re.search(r'<body[^>]*data-ready="1"', dom) and "data-errors" not in dom
    cells = _Cells()
    cells.feed(dom)
    assert sorted(cells.rows) == list(range(6))
    assert cells.order == [0, 1, 2, 3, 5, 4]  # grouped by hook: H1's five, then H0's one
    for name in plots:
        assert re.search(rf'<img[^>]*src="{re.escape(name)}"[^>]*data-loaded="1"', dom), name
    assert all(cells.rows[0][key] == "n/a" for key in METRIC_FIELDS)  # "fresh": no metrics at all
    assert cells.rows[2]["absorption"] == "0.12" and cells.rows[3]["absorption"] == "n/a"
    assert cells.rows[1]["coefficient"] == "5" and cells.rows[1]["k"] == "n/a"
    assert {(2, "absorption"), (5, "fvu"), (3, "fvu"), (4, "fvu")} <= cells.best and (1, "fvu") not in cells.best
    assert dom.count('data-group="') == 2

    dom, log = _render(browser, page.resolve().as_uri() + "#sort=fvu", tmp_path / "profile")
    order = _Cells()
    order.feed(dom)
    assert order.order == [5, 2, 1, 3, 0, 4] and "CONSOLE" not in log  # by FVU within each hook, n/a last
    dom, _ = _render(browser, page.resolve().as_uri() + "#sort=-fvu", tmp_path / "profile")
    order = _Cells()
    order.feed(dom)
    assert order.order == [3, 1, 2, 5, 0, 4]
