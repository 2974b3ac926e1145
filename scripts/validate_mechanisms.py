"""Precision and recall of every mechanism detector on planted ground truth.

Builds the planted feature banks of analysis/detectors/planted.py (standard, and `hard`: noisier
positives and more negatives) over the real SmolLM2-135M tokenizer and unembedding and real held-out
text, runs every detector, and prints and writes a table to benchmarks/mechanisms_validation.md.
With --run RUN it also records the per-mechanism counts stored for a trained run.

    python scripts/validate_mechanisms.py [--run runs/...] [--out benchmarks/mechanisms_validation.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from activations.models import load_model
from activations.sources import open_text_source
from analysis.catalogue import held_out_text, load_catalogue, load_tags, summary_table, tag_features
from analysis.detectors.planted import planted_bank, planted_subject, precision_recall
from analysis.logits import unembedding
from sae.runs import sae_folders


def bank_table(name: str, bank, result, catalogue) -> tuple[list[str], dict]:

    passed = {m.id: torch.tensor(result.scores[m.id]) >= m.threshold for m in catalogue.mechanisms}
    pr = precision_recall(bank, passed)
    lines = [
        f"### {name} bank: {len(bank)} planted features",
        "",
        "| detector | threshold | positives | negatives | TP | FP | FN | precision | recall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in catalogue.mechanisms:
        r = pr[m.id]
        fmt = lambda x: "n/a" if x != x else f"{x:.2f}"
        lines.append(
            f"| {m.id} | {m.threshold:g} | {r['positives']} | {r['negatives']} | {r['tp']} | {r['fp']} | "
            f"{r['fn']} | {fmt(r['precision'])} | {fmt(r['recall'])} |"
        )
    errors = [(m, r) for m, r in pr.items() if r["false_positives"] or r["missed"]]
    if errors:
        lines += ["", "Errors:", ""]
        for m, r in errors:
            if r["false_positives"]:
                lines.append(f"- {m} false positives: " + "; ".join(r["false_positives"]))
            if r["missed"]:
                missed = [
                    f"{n} (score {result.scores[m][i]:.2f})"
                    for i, n in ((j, b.name) for j, b in enumerate(bank))
                    if n in r["missed"]
                ]
                lines.append(f"- {m} missed: " + "; ".join(missed))
    return lines, pr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/mechanisms_validation.md")
    parser.add_argument("--text-tokens", type=int, default=4096)
    parser.add_argument("--run", default=None, help="also record the tag counts stored for this run")
    args = parser.parse_args()

    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    un = unembedding(lm)
    W = un.W_U * un.gain
    text = held_out_text(open_text_source("wikitext-2", split="test"), lm.tokenizer, args.text_tokens, 128, False)
    catalogue = load_catalogue()
    out = [
        "# Mechanism detectors on planted ground truth",
        "",
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads · "
        f"torch {torch.__version__} · catalogue v{catalogue.version}",
        "",
        "Planted features (analysis/detectors/planted.py) are rules from tokens to activations with a decoder "
        "direction, so each one's mechanisms are known by construction; tokenizer, unembedding and final norm "
        f"are SmolLM2-135M's, the held-out text {text.numel()} tokens of WikiText-2 test. "
        "Produced by `python scripts/validate_mechanisms.py`.",
        "",
    ]
    for name, hard in (("standard", False), ("hard", True)):
        bank = planted_bank(lm.tokenizer, W, un.center, hard=hard)
        subject = planted_subject(bank, lm.tokenizer, W, text, un.center)
        started = time.perf_counter()
        result = tag_features(subject, catalogue)
        lines, _ = bank_table(name, bank, result, catalogue)
        lines.insert(1, f"\n({time.perf_counter() - started:.0f} s for all detectors)")
        out += lines + [""]
        print("\n".join(lines), "\n", flush=True)
    if args.run:
        results = {hook: load_tags(folder) for hook, folder in sae_folders(Path(args.run)).items()}
        table = summary_table(results, catalogue)
        out += [f"## Tagged features of {args.run}", "", "```", table, "```", ""]
        print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
