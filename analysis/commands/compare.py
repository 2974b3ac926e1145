"""`sae compare`: one table of several runs (their SAEs grouped by hook), Pareto plots of L0 against FVU, CE loss
score, absorption and top-1 probing, and an offline page holding both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from activations.files import check_writable
from activations.options import option
from analysis.compare import collect_rows, mark_fronts, text_table
from analysis.compare_page import write_compare

HELP = "compare runs: a table and Pareto plots of L0 against FVU, CE score, absorption, probing"
DESCRIPTION = (
    "Reads each run's bench.json (from sae bench) or else eval.json (from sae eval), prints one table (n/a where "
    "neither has a metric) and writes Pareto plots (PNG) and an offline page to --out. A run trained on several "
    "hooks adds one row per hook; rows and fronts are grouped by hook. RUNS: run folders, or the --out folder of "
    "sae sweep (its finished runs)."
)


@dataclass
class Config:
    """Which runs to compare and where the page goes."""

    runs: list[str] = option(help="run folders (or a folder of runs, e.g. the --out of sae sweep)", positional=True)
    out: str = option("compare", "folder for index.html, compare.json and the Pareto plots")


def run(cfg: Config) -> Path:
    """Collect the rows, mark each hook's fronts, print the table and write the page; returns the page's path."""
    rows = collect_rows(cfg.runs)
    check_writable(cfg.out)
    fronts = mark_fronts(rows)
    print(text_table(rows))
    missing = sorted({r.run for r in rows if r.metrics["l0"] is None})
    if missing:
        print(f"no eval.json or bench.json for {', '.join(missing)}: run sae eval (or sae bench) on them")
    page = write_compare(rows, fronts, cfg.out)
    print(f"page: {page}  (plots and compare.json beside it)")
    return page
