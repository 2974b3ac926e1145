"""PNG plots for a run folder: the feature density histogram and the training curves (loss, L0, FVU).

matplotlib runs headless (Agg backend), so plots render on servers and in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def density_histogram(density: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 feature density (fraction of tokens each feature fires on); dead features counted apart."""
    plt = _pyplot()
    d = density.double()
    alive = d[d > 0]
    dead = int((d == 0).sum())
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if len(alive):
        ax.hist(alive.log10().numpy(), bins=60, color="#ea580c")
    ax.set_xlabel("log10 feature density (fraction of tokens it fires on)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}  ({len(d)} features, {dead} never fired)".strip())
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """The lines of a run's metrics.jsonl (skipping blank or broken ones)."""
    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def training_curves(metrics_jsonl: str | Path, path: str | Path, title: str = "") -> Path | None:
    """Loss, L0 and FVU against training tokens from metrics.jsonl; None when there is nothing to plot."""
    rows = [r for r in read_metrics(metrics_jsonl) if "tokens" in r] if Path(metrics_jsonl).is_file() else []
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=110)
    tokens = [r["tokens"] for r in rows]
    for ax, key in zip(axes, ("loss", "l0", "fvu")):
        points = [(t, r[key]) for t, r in zip(tokens, rows) if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), color="#ea580c")
        ax.set_title(key)
        ax.set_xlabel("tokens")
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
