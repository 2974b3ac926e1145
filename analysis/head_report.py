"""The head catalogue for people: a text table per head type and a layer × head heat-map PNG per type.

matplotlib runs headless (Agg backend), as in analysis/plots.py.
"""

from __future__ import annotations

from pathlib import Path

from analysis.heads import PROBES, HeadCatalogue


def score_table(cat: HeadCatalogue, kind: str) -> str:
    """One type as text: threshold, tagged heads, then a layer × head grid (* marks a tagged head)."""
    tagged = set(cat.tagged(kind))
    listed = ", ".join(f"L{a}H{b} {float(cat.scores[kind][a, b]):.2f}" for a, b in cat.tagged(kind)[:12])
    lines = [
        f"{kind}: {PROBES.get(kind, '')}",
        f"  tagged when score >= {cat.thresholds[kind]:g}: {len(tagged)} heads" + (f" ({listed})" if listed else ""),
        "  layer " + "".join(f"{'h' + str(h):>7}" for h in range(cat.n_heads)),
    ]
    for layer in range(cat.n_layers):
        cells = "".join(
            f"{float(cat.scores[kind][layer, h]):>6.2f}{'*' if (layer, h) in tagged else ' '}"
            for h in range(cat.n_heads)
        )
        lines.append(f"  {layer:>5} {cells}")
    return "\n".join(lines)


def heatmaps(cat: HeadCatalogue, folder: str | Path) -> list[Path]:
    """A layer × head heat-map PNG per type in `folder` (tagged heads outlined); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, score in cat.scores.items():
        fig, ax = plt.subplots(figsize=(1.6 + 0.45 * cat.n_heads, 1.4 + 0.22 * cat.n_layers), dpi=110)
        im = ax.imshow(score.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
        for layer, head in cat.tagged(kind):
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#f97316", lw=1.5))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{cat.model}: {kind} (tagged >= {cat.thresholds[kind]:g})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.08)
        fig.tight_layout()
        paths.append(folder / f"{kind}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths
