"""Every architecture on one synthetic stream with planted ground truth: how many true features each recovers.

The same SyntheticConfig stream (activations.synthetic: superposition, Zipf-like firing, correlated groups,
parent/child hierarchies) trains each architecture with saelab's Trainer at its defaults (learning rate, warm-up,
decay, clipping, b_dec init, AuxK, penalty coefficients) for one token budget; analysis.recovery then scores it
on held-out samples. Prints a table and writes it with the device, date and versions to benchmarks/synthetic.md.
The transcoder is left out: it maps one hook to another, and a synthetic stream has only one.

    python scripts/bench_synthetic.py                        # 6 architectures, 1M samples: a few minutes on CPU
    python scripts/bench_synthetic.py --tokens 2e6 --archs topk,jumprelu --n-parents 32 --correlation 0.8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from activations.options import add_options, build, leaf_fields  # noqa: E402
from activations.synthetic import SYNTHETIC_HOOK, SyntheticBatches, SyntheticConfig, SyntheticFeatures  # noqa: E402
from analysis.recovery import recovery  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.registry import make_sae  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import Trainer, default_lr  # noqa: E402

ARCHS = ("topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated")  # all but the transcoder
K_ARCHS = ("topk", "batchtopk", "matryoshka")  # those whose sparsity is k


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, SyntheticConfig]:
    """The benchmark's own options, and the SyntheticConfig built from its options (all of them flags here)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=lambda s: int(float(s)), default=1_000_000, help="training samples each")
    parser.add_argument("--d-sae", type=int, default=1024, help="latents per SAE")
    parser.add_argument("--k", type=int, default=None, help="k of topk/batchtopk/matryoshka (default mean active)")
    parser.add_argument("--batch-size", type=int, default=1024, help="samples per step (the store's default)")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    parser.add_argument("--eval-samples", type=int, default=16384, help="held-out samples for the scores")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "synthetic.md"), help="the report file")
    add_options(parser.add_argument_group("synthetic data"), SyntheticConfig)
    args = parser.parse_args(argv)
    names = {f.name for _, f, _ in leaf_fields(SyntheticConfig)}
    cfg = build(SyntheticConfig, {k: v for k, v in vars(args).items() if k in names})
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(args.archs) - set(ARCHS))
    if unknown:
        parser.error(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    if args.k is None:
        args.k = max(1, round(cfg.mean_active))
    return args, cfg


def train_one(arch: str, truth: SyntheticFeatures, args: argparse.Namespace) -> dict:
    """Train one architecture on the synthetic stream at the Trainer's defaults; its recovery scores and time."""
    torch.manual_seed(0)
    target = None if arch in K_ARCHS else float(args.k)  # penalty architectures steer to k, as `sae train` does
    sae = make_sae(
        SAEConfig(
            d_in=truth.cfg.d_model,
            d_sae=args.d_sae,
            architecture=arch,
            k=args.k,
            target_l0=target,
            hook_name=SYNTHETIC_HOOK,
        )
    )
    store = SyntheticBatches(truth, args.batch_size)
    cfg = TrainConfig(tokens=args.tokens, checkpoint_every=10**9, log_every=50)  # one checkpoint, at the end
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(sae, store, cfg, run_dir)
        trainer.show_progress = False
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        dead = trainer.last_metrics.get("dead_fraction")
    scores = recovery(sae, truth, n_samples=args.eval_samples)
    return dict(architecture=arch, seconds=seconds, dead_fraction=dead, **scores)


def fmt(value: float | None, spec: str = ".3f") -> str:
    """A number for the table, or a dash."""
    return "—" if value is None else format(value, spec)


def package_version(name: str) -> str:
    """An installed package's version, or 'not installed'."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """The checkout's commit (short), or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def report(args: argparse.Namespace, cfg: SyntheticConfig, truth: SyntheticFeatures, rows: list[dict]) -> str:
    """The markdown report: how it was run, the truth's shape, the table and how to read it."""
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads)"
    lines = [
        "# Recovering a planted dictionary: every architecture on one synthetic stream",
        "",
        f"- date: {date.today().isoformat()}; device: {device}; commit {git_commit()}",
        f"- versions: torch {torch.__version__}, saelab {package_version('saelab')}, "
        f"python {platform.python_version()}",
        f"- command: `python scripts/bench_synthetic.py {' '.join(sys.argv[1:])}`",
        f"- training: saelab's Trainer at its defaults, {args.tokens:,} samples, batch {args.batch_size}, "
        f"d_sae {args.d_sae}, lr {default_lr(args.d_sae):.3g}; k {args.k} for {', '.join(K_ARCHS)} (the data's "
        "mean active count); relu/gated/jumprelu steered to L0 = k (`--target-l0`, `sae train`'s default)",
        f"- truth: {cfg.n_features} features in {cfg.d_model} dimensions, {cfg.n_parents} parents × "
        f"{cfg.n_children} exclusive children, {cfg.n_groups} correlated groups of {cfg.group_size}; "
        f"firing probabilities {float(truth.probabilities.min()):.4f} to {float(truth.probabilities.max()):.3f}",
        f"- scores on {args.eval_samples} held-out samples (analysis/recovery.py); the transcoder is left out "
        "(it needs an output hook, and a synthetic stream has only one)",
        f"- load average when done: {', '.join(f'{v:.1f}' for v in os.getloadavg())} ({os.cpu_count()} cores)",
        "",
        "```json",
        json.dumps(asdict(cfg)),
        "```",
        "",
        "| architecture | L0 | FVU | recovered (cos ≥ 0.9) | mean max cos | absorption | parent recall | "
        "child leaning | dead | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['architecture']} | {r['l0']:.1f} | {r['fvu']:.3f} | {r['n_recovered']}/{r['n_features']} "
            f"({r['fraction_recovered']:.0%}) | {r['mean_max_cos']:.3f} | {fmt(r['absorption'])} | "
            f"{fmt(r['parent_recall'])} | {fmt(r['child_leaning'])} | {fmt(r['dead_fraction'], '.2f')} | "
            f"{r['seconds']:.0f} |"
        )
    true_l0 = rows[0]["true_l0"] if rows else float("nan")
    lines += [
        "",
        f"True L0 of the held-out samples: {true_l0:.2f}. Columns: *recovered*, true features whose closest "
        "decoder row has cosine ≥ 0.9; *absorption*, over samples where a child fires, the fraction where the "
        "parent's latent is silent while the child's fires (mean over parents); *parent recall*, how often the "
        "parent's latent fires when the parent fires alone; *child leaning*, how much closer the child latents' "
        "decoders are to the parent direction than the true child directions are; *dead*, the trainer's dead "
        "fraction at the end.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table and write the report."""
    args, cfg = parse_args(argv)
    torch.set_num_threads(args.threads)
    truth = SyntheticFeatures(cfg)
    rows = []
    for arch in args.archs:
        row = train_one(arch, truth, args)
        print(
            f"{arch:>10}: L0 {row['l0']:.1f}  FVU {row['fvu']:.3f}  recovered {row['n_recovered']}/{row['n_features']}"
            f"  mean max cos {row['mean_max_cos']:.3f}  absorption {fmt(row['absorption'])}  {row['seconds']:.0f}s",
            flush=True,
        )
        rows.append(row)
    text = report(args, cfg, truth, rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
