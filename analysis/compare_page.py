"""The output of `sae compare`: one Pareto plot per metric (PNG, a panel per hook, each SAE a labelled point, the
front a step line), the rows and fronts as compare.json, and an offline page (index.html) with the sortable table and
the plots. matplotlib runs headless (Agg), so the plots render on servers and in CI."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from activations.files import atomic_write_json, atomic_write_text
from analysis.compare import PARETO_METRICS, Metric, Row, group_by_hook

# The page's column title of each metric field (analysis.compare.SOURCES), in table order.
FIELD_TITLES = {
    "l0": "L0",
    "fvu": "FVU",
    "explained_variance": "explained var.",
    "ce_loss_score": "CE loss score",
    "kl_div_score": "KL score",
    "frac_alive": "alive",
    "absorption": "absorption",
    "full_absorption": "full absorption",
    "split_features": "split features",
    "probing_top1": "top-1 probe",
    "probing_top2": "top-2 probe",
    "probing_llm": "LLM probe",
}
COLOURS = ("#c2410c", "#1d4ed8", "#15803d", "#7e22ce", "#b45309", "#0e7490", "#be123c", "#4d7c0f")


def _pyplot():
    import matplotlib  # here, not at the top: `sae --help` imports every command module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_file(metric: Metric) -> str:
    """The PNG name of a metric's plot."""
    return f"pareto_{metric.key}.png"


def pareto_plot(rows: Sequence[Row], metric: Metric, path: str | Path) -> Path:
    """L0 against `metric`, one panel per hook: every SAE with both values a point labelled with its run, its
    hook's front a step line (the best value reachable at each L0); a panel with no values says so."""
    plt = _pyplot()
    groups = group_by_hook(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.6 * len(groups), 4.2), dpi=110, squeeze=False)
    for n, (ax, (hook, group)) in enumerate(zip(axes[0], groups.items())):
        colour = COLOURS[n % len(COLOURS)]
        points = [(r.metrics["l0"], r.metrics[metric.key], r) for r in group]
        points = [(x, y, r) for x, y, r in points if x is not None and y is not None]
        ax.set_title(hook, fontsize=10)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(metric.title + (" ↓" if metric.lower_is_better else " ↑"), fontsize=9)
        if not points:
            ax.text(0.5, 0.5, "n/a: no SAE of this hook has it", ha="center", va="center", transform=ax.transAxes)
            continue
        front = sorted((x, y) for x, y, r in points if metric.key in r.fronts)
        on = [metric.key in r.fronts for _, _, r in points]
        ax.scatter(
            [x for x, _, _ in points],
            [y for _, y, _ in points],
            c=[colour if f else "#ffffff" for f in on],
            edgecolors=colour,
            s=36,
            zorder=3,
        )
        if front:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color=colour, lw=1.4, zorder=2)
        for x, y, r in points:
            ax.annotate(r.run, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, color="#1d2125")
        xs = [x for x, _, _ in points]
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Pareto front (filled points, line): {metric.title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _json_safe(value):
    """Plain JSON for the page: NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_compare(rows: Sequence[Row], fronts: dict[str, dict[str, list[int]]], out: str | Path) -> Path:
    """Write the plots, compare.json and index.html into `out`; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for metric in PARETO_METRICS:
        pareto_plot(rows, metric, out / plot_file(metric))
        points = sum(r.metrics["l0"] is not None and r.metrics[metric.key] is not None for r in rows)
        plots.append(
            dict(
                key=metric.key,
                title=metric.title,
                lower_is_better=metric.lower_is_better,
                file=plot_file(metric),
                points=points,
            )
        )
    data = _json_safe(
        dict(
            rows=[r.to_dict() for r in rows],
            fronts=fronts,
            plots=plots,
            fields=[[key, title] for key, title in FIELD_TITLES.items()],
        )
    )
    atomic_write_json(out / "compare.json", data)
    embedded = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")  # no tag ends the script
    template = resources.files("analysis").joinpath("compare_template.html").read_text(encoding="utf-8")
    page = out / "index.html"
    atomic_write_text(page, template.replace("__DATA__", embedded))
    return page
