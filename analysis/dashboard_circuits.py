"""The dashboard's links to circuit pages (`sae circuit`): `<dashboard>/circuits.js`, one entry per circuit page.

The file is a script, `SAELAB.circuits([entry, ...]);`, because a page opened from disk cannot fetch. It sits next to
index.html, outside data/ (which every `sae inspect` rewrites), so links survive re-inspection. An entry: {"name"
(the page's stem), "href" (the page relative to the dashboard folder, URL-quoted), "prompt", "target", "contrast",
"metric" (its value), "faithfulness", "completeness", "features": {feature id: [attribution of each node of this
dashboard's hook with that feature]}}; non-finite numbers are null. Depends on activations.files only.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from urllib.parse import quote

from activations.files import atomic_write_text

CIRCUITS_FILE = "circuits.js"
PREFIX, SUFFIX = "SAELAB.circuits(", ");"


def _finite(x) -> float | None:
    """x as a float, or None when it is missing or not finite (NaN faithfulness of a zero-effect metric)."""
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def circuit_entry(dashboard: Path, hook: str, graph: dict, page: Path) -> dict:
    """The dashboard entry of `graph` (a circuit JSON) whose page is `page`; only feature nodes of `hook` count."""
    metric, faith = graph.get("metric") or {}, graph.get("faithfulness") or {}
    features: dict[str, list[float | None]] = {}
    for node in graph.get("nodes", []):
        if node.get("hook") == hook and node.get("kind", "feature") == "feature":
            features.setdefault(str(int(node["feature"])), []).append(_finite(node.get("attribution")))
    return {
        "name": Path(page).stem,
        "href": quote(Path(os.path.relpath(page, dashboard)).as_posix()),
        "prompt": graph.get("prompt", ""),
        "target": metric.get("target"),
        "contrast": metric.get("contrast"),
        "metric": _finite(metric.get("value")),
        "faithfulness": _finite(faith.get("faithfulness")),
        "completeness": _finite(faith.get("completeness")),
        "features": features,
    }


def read_circuits(dashboard: Path) -> list[dict]:
    """The entries of `<dashboard>/circuits.js` ([] when there is none). The file is parsed as JSON, never run; a
    damaged one is ignored with a warning (the next register_circuit replaces it)."""
    path = Path(dashboard) / CIRCUITS_FILE
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8").strip()
        if not (text.startswith(PREFIX) and text.endswith(SUFFIX)):
            raise ValueError(f"it is not of the form {PREFIX}[...]{SUFFIX}")
        entries = json.loads(text[len(PREFIX) : -len(SUFFIX)])
        entry = lambda e: isinstance(e, dict) and isinstance(e.get("href"), str)
        if not isinstance(entries, list) or not all(map(entry, entries)):
            raise ValueError("it does not hold a list of circuit entries")
    except (ValueError, UnicodeDecodeError) as e:
        warnings.warn(f"{path} is damaged ({e}); its circuit links are ignored and it will be rewritten.", stacklevel=2)
        return []
    return entries


def register_circuit(dashboard: Path, hook: str, graph: dict, page: Path) -> Path:
    """Record the circuit `graph` (page `page`) in `<dashboard>/circuits.js`, replacing the entry of the same page;
    returns the file's path. Only the nodes of `hook`, the dashboard's SAE, are listed under its features."""
    dashboard = Path(dashboard)
    entry = circuit_entry(dashboard, hook, graph, page)
    entries = read_circuits(dashboard)
    at = next((i for i, e in enumerate(entries) if e["href"] == entry["href"]), None)
    if at is None:
        entries.append(entry)
    else:
        entries[at] = entry
    dashboard.mkdir(parents=True, exist_ok=True)
    path = dashboard / CIRCUITS_FILE
    body = json.dumps(entries, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    atomic_write_text(path, f"{PREFIX}{body}{SUFFIX}\n")
    return path
