"""The rows of `sae compare`: one per SAE of each run (its config, and its metrics from bench.json where `sae bench`
has run, eval.json otherwise), grouped by hook, and each group's Pareto front of L0 against each metric.

A point is on the front when no other point of its hook has an L0 at most as large and a metric at least as good,
one of the two strictly: the SAEs worth choosing from at each sparsity. Points of different hooks are never compared
(their metrics are not on one scale). Reads JSON only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from activations.errors import UserError
from sae.io import read_cfg
from sae.registry import COEFFICIENT_OF
from sae.runs import CHECKPOINT, sae_folders

RUN_CONFIG = "run_config.json"  # written by `sae train` at the top of its run folder


@dataclass(frozen=True)
class Metric:
    """A metric plotted against L0: its row key, its title and which way is better."""

    key: str
    title: str
    lower_is_better: bool


# The metrics drawn against L0, each with its own Pareto front.
PARETO_METRICS = (
    Metric("fvu", "FVU (fraction of variance unexplained)", True),
    Metric("ce_loss_score", "CE loss score (fraction of the CE loss recovered)", False),
    Metric("absorption", "mean absorption fraction", True),
    Metric("probing_top1", "top-1 sparse probing accuracy", False),
)


def _alive(dead: float) -> float:
    """eval.json's dead fraction as SAEBench's frac_alive."""
    return 1.0 - dead


# Row field -> where it is read, the first found wins: (file, section or None for the top level, key, conversion).
SOURCES: dict[str, list[tuple[str, str | None, str, Callable[[float], float]]]] = {
    "l0": [("bench.json", "core", "l0", float), ("eval.json", None, "l0", float)],
    "fvu": [("bench.json", "core", "fvu", float), ("eval.json", None, "fvu", float)],
    "ce_loss_score": [("bench.json", "core", "ce_loss_score", float), ("eval.json", None, "ce_recovered", float)],
    "kl_div_score": [("bench.json", "core", "kl_div_score", float)],
    "explained_variance": [
        ("bench.json", "core", "explained_variance", float),
        ("eval.json", None, "explained_variance", float),
    ],
    "frac_alive": [("bench.json", "core", "frac_alive", float), ("eval.json", None, "dead_fraction", _alive)],
    "absorption": [("bench.json", "absorption", "mean_absorption_fraction_score", float)],
    "full_absorption": [("bench.json", "absorption", "mean_full_absorption_score", float)],
    "split_features": [("bench.json", "absorption", "mean_num_split_features", float)],
    "probing_top1": [("bench.json", "sparse_probing", "sae_top_1_test_accuracy", float)],
    "probing_top2": [("bench.json", "sparse_probing", "sae_top_2_test_accuracy", float)],
    "probing_llm": [("bench.json", "sparse_probing", "llm_test_accuracy", float)],
}
METRIC_FIELDS = tuple(SOURCES)


@dataclass
class Row:
    """One SAE of one run: what it is and how it scores (None where neither bench.json nor eval.json says)."""

    run: str  # the run's label on the page and the plots
    folder: str  # the SAE folder
    hook: str
    architecture: str
    k: int | None
    coefficient: float | None
    d_sae: int
    tokens: int | None  # training tokens (None: no run_config.json, e.g. an exported SAE folder)
    metrics: dict[str, float | None]
    sources: dict[str, str]  # metric -> the file it came from
    fronts: list[str] = field(default_factory=list)  # the PARETO_METRICS keys whose front this row is on

    def to_dict(self) -> dict:
        return asdict(self)


def is_run(folder: Path) -> bool:
    """Whether `folder` is a run or SAE folder (rather than a folder of runs, such as a sweep's)."""
    return (folder / RUN_CONFIG).is_file() or (folder / "cfg.json").is_file()


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders named by `paths`: each a run, or a folder of runs (a `sae sweep --out` folder) whose finished
    runs are taken in name order (unfinished ones are named and skipped)."""
    if not paths:
        raise UserError("no runs given; name run folders, e.g. sae compare runs/a,runs/b or a sweep folder.")
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path} does not exist; give run folders written by sae train (or a sweep folder).")
        if is_run(path):
            runs.append(path)
            continue
        inside = [d for d in sorted(path.iterdir()) if d.is_dir() and d.name != CHECKPOINT and is_run(d)]
        if not inside:
            raise UserError(
                f"{path} is neither a run folder nor a folder of runs (no cfg.json or {RUN_CONFIG} in it or its "
                "subfolders); give run folders written by sae train, or the --out folder of sae sweep."
            )
        for run in inside:
            if _finished(run):
                runs.append(run)
            else:
                print(f"skipping {run}: training has not finished (finish it with sae sweep or sae train --resume)")
    if len({run.resolve() for run in runs}) != len(runs):
        raise UserError("a run is named twice; give each run folder once.")
    return runs


def _finished(run: Path) -> bool:
    try:
        sae_folders(run)
    except UserError:
        return False
    return True


def read_json(path: Path) -> dict | None:
    """A metrics file's content, None when it does not exist; a broken one is a UserError naming the fix."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete it and run the command that writes it again.") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(data).__name__}; delete it and write it again.")
    return data


def _number(value: object) -> float | None:
    """A finite number, or None (missing, NaN, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def read_metrics(folder: Path) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every METRIC_FIELDS value of an SAE folder (None where no file has it) and the file each came from."""
    files = {name: read_json(folder / name) for name in ("bench.json", "eval.json")}
    metrics: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    for name, places in SOURCES.items():
        metrics[name] = None
        for file, section, key, transform in places:
            data = files[file]
            block = data if section is None or data is None else data.get(section)
            value = _number(block.get(key)) if isinstance(block, dict) else None
            if value is not None:
                metrics[name], sources[name] = transform(value), file
                break
    return metrics, sources


def _tokens(run: Path) -> int | None:
    """The training budget of a run, from its run_config.json (None when it has none or it is unreadable)."""
    try:
        saved = read_json(run / RUN_CONFIG)
    except UserError:
        return None
    tokens = ((saved or {}).get("config") or {}).get("training", {}).get("tokens")
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def run_labels(runs: Sequence[Path]) -> list[str]:
    """A short unique label per run: its folder name, with as many parent folders as it takes to tell it apart from
    every other run (labels of one depth differ, labels of different depths differ in their number of '/')."""
    parts = [r.resolve().parts for r in runs]

    def label(i: int) -> str:
        for depth in range(1, len(parts[i]) + 1):
            mine = parts[i][-depth:]
            if all(other[-depth:] != mine for j, other in enumerate(parts) if j != i):
                return "/".join(mine)
        return str(runs[i])

    return [label(i) for i in range(len(runs))]


def collect_rows(runs: Sequence[str | Path]) -> list[Row]:
    """One Row per SAE of each run (run, or folder of runs), in the order given; fronts are not yet marked."""
    folders = expand_runs(runs)
    rows = []
    for run, label in zip(folders, run_labels(folders)):
        tokens = _tokens(run)
        for folder in sae_folders(run).values():
            cfg = read_cfg(folder)
            metrics, sources = read_metrics(folder)
            coefficient = COEFFICIENT_OF.get(cfg.architecture)
            hook = cfg.hook_name + (f" -> {cfg.hook_name_out}" if cfg.hook_name_out else "")
            rows.append(
                Row(
                    run=label,
                    folder=str(folder),
                    hook=hook or "(hook not recorded)",
                    architecture=cfg.architecture,
                    k=None if coefficient else cfg.k,
                    coefficient=getattr(cfg, coefficient) if coefficient else None,
                    d_sae=cfg.d_sae,
                    tokens=tokens,
                    metrics=metrics,
                    sources=sources,
                )
            )
    return rows


def group_by_hook(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """The rows of each hook, hooks in the order they first appear."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.hook, []).append(row)
    return groups


def pareto_front(points: Sequence[tuple[float | None, float | None]], lower_is_better: bool) -> list[int]:
    """Indices of the points (L0, metric) no other point dominates, by increasing L0; points missing either value
    take no part. q dominates p when q's L0 <= p's and q's metric is as good, one of them strictly."""
    sign = 1.0 if lower_is_better else -1.0  # compare "cost" = sign * metric, lower is better
    known = [(i, x, sign * y) for i, (x, y) in enumerate(points) if x is not None and y is not None]

    def dominated(x: float, c: float) -> bool:
        return any(x2 <= x and c2 <= c and (x2 < x or c2 < c) for _, x2, c2 in known)

    front = [(x, c, i) for i, x, c in known if not dominated(x, c)]
    return [i for _, _, i in sorted(front)]


def mark_fronts(rows: Sequence[Row]) -> dict[str, dict[str, list[int]]]:
    """Set each row's `fronts`; returns {hook: {metric: indices into `rows` of its front, by increasing L0}}."""
    index = {id(row): i for i, row in enumerate(rows)}
    fronts: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        row.fronts = []
    for hook, group in group_by_hook(rows).items():
        fronts[hook] = {}
        for metric in PARETO_METRICS:
            points = [(r.metrics["l0"], r.metrics[metric.key]) for r in group]
            members = [group[i] for i in pareto_front(points, metric.lower_is_better)]
            for r in members:
                r.fronts.append(metric.key)
            fronts[hook][metric.key] = [index[id(r)] for r in members]
    return fronts


def format_value(value: float | int | None, digits: int = 4) -> str:
    """A table cell: n/a for a missing value, else a short number."""
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


# The columns of the text table (and the page): title, and how a row shows it.
COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("run", lambda r: r.run),
    ("hook", lambda r: r.hook),
    ("arch", lambda r: r.architecture),
    ("k/coef", lambda r: format_value(r.k if r.k is not None else r.coefficient)),
    ("d_sae", lambda r: str(r.d_sae)),
    ("tokens", lambda r: format_value(r.tokens)),
    ("L0", lambda r: format_value(r.metrics["l0"])),
    ("FVU", lambda r: format_value(r.metrics["fvu"])),
    ("CE score", lambda r: format_value(r.metrics["ce_loss_score"])),
    ("absorption", lambda r: format_value(r.metrics["absorption"])),
    ("top-1 probe", lambda r: format_value(r.metrics["probing_top1"])),
    ("front", lambda r: ",".join(r.fronts) or "-"),
]


def text_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table for the terminal, grouped by hook."""
    ordered = [r for group in group_by_hook(rows).values() for r in group]
    cells = [[title for title, _ in COLUMNS]] + [[show(r) for _, show in COLUMNS] for r in ordered]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)
