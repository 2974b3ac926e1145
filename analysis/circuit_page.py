"""The offline page of a circuit graph (`sae circuit`): embeddings, spliced layers and the output x positions, a
circle per kept feature node (area by |attribution|, orange promotes the metric, blue works against it), error and
token nodes, link widths by |weight|, a node's tags, sources, examples and heads on hover, the heads carrying links
across positions, a click through to the feature's dashboard page, the faithfulness panel and curve, and the
attribution-against-ablation check."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from activations.files import atomic_write_text


def write_circuit_page(graph: dict, path: str | Path, dashboards: dict[str, str]) -> Path:
    """Write the page of `graph` (the circuit JSON) to `path`; `dashboards` maps a hook to the relative URL of its
    SAE's dashboard index.html (nodes of hooks without one are not links)."""

    def embed(value) -> str:  # JSON inside <script>: no closing tag can end it early
        return json.dumps(value, ensure_ascii=False).replace("</", "<\\/")

    template = resources.files("analysis").joinpath("circuit_template.html").read_text(encoding="utf-8")
    html = template.replace("__GRAPH__", embed(graph)).replace("__LINKS__", embed(dashboards))
    path = Path(path)
    atomic_write_text(path, html)
    return path
