"""The README's circuit examples on a several-hook run: an induction prompt and two natural ones, each traced with
`sae circuit`, summarised as a markdown table (nodes, links, faithfulness, completeness, the attribution-ablation
correlation, seconds, the heads that carry most of it, the tagged features) for benchmarks/.

    python scripts/circuit_examples.py RUN [--ablation zero|mean] [--out benchmarks/circuit_examples.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import date
from importlib.metadata import version
from pathlib import Path

from analysis.commands.circuit import Config, run

WORDS = "apple river green seven castle money window purple doctor ocean basket".split()
EXAMPLES = [  # (name, prompt, target, contrast)
    ("induction", " ".join(WORDS + WORDS[:9]), " ocean", None),
    ("paris", "The capital of France is", " Paris", " London"),
    ("bracket", "She wrote the answer (in red ink", ")", ","),
]


def carriers(graph: dict, n: int = 4) -> str:
    """The heads carrying the most |link weight| across positions, with their catalogue types."""
    total: dict[str, float] = {}
    for link in graph["links"]:
        for h in link["heads"][:1]:
            key = h["head"] + (f" ({', '.join(h['types'])})" if h["types"] else "")
            total[key] = total.get(key, 0.0) + abs(link["weight"]) * h["share"]
    return ", ".join(k for k, _ in sorted(total.items(), key=lambda kv: -kv[1])[:n])


def tagged(graph: dict, n: int = 3) -> str:
    """The most attributed feature nodes that carry mechanism tags."""
    rows = [node for node in graph["nodes"] if node["kind"] == "feature" and node["tags"]]
    rows.sort(key=lambda node: -abs(node["attribution"]))
    return "; ".join(
        f"{node['node_id'].split('.hook')[0]}@{node['ctx_idx']}:{node['feature']} "
        f"{'/'.join(t['name'].split(' (')[0] for t in node['tags'][:2])}"
        for node in rows[:n]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--ablation", default="zero", choices=("zero", "mean"))
    parser.add_argument("--out", default="benchmarks/circuit_examples.md")
    args = parser.parse_args()
    lines = [
        f"# Circuit examples on {args.run} ({args.ablation}-ablation)",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"saelab {version('saelab')}, torch {version('torch')}, transformers {version('transformers')}.",
        "",
        "| prompt | metric | feature nodes | links | faithfulness | completeness | pearson (top 16) | seconds | "
        "heads carrying links | tagged nodes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, prompt, target, contrast in EXAMPLES:
        path = run(
            Config(
                run=args.run,
                prompt=prompt,
                target=target,
                contrast=contrast,
                ablation=args.ablation,
                name=f"{name}-{args.ablation}",
            )
        )
        g = json.loads(Path(path).read_text())
        f, v = g["faithfulness"], g["validation"]
        n = sum(1 for node in g["nodes"] if node["kind"] == "feature")
        metric = (
            f"{g['metric']['kind']} {target!r}"
            + (f" − {contrast!r}" if contrast else "")
            + f" = {g['metric']['value']:.2f}"
        )
        lines.append(
            f"| {prompt!r} | {metric} | {n} | {len(g['links'])} | {f['faithfulness']:.2f} | {f['completeness']:.2f} "
            f"| {v['pearson']:.3f} | {sum(g['seconds'].values()):.0f} | {carriers(g)} | {tagged(g)} |"
        )
        curve = ", ".join(f"{k}: {x:.2f}" for k, x in g["curve"])
        lines.append(f"| | faithfulness of the top n nodes: {curve} | | | | | | | | |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
