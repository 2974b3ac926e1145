"""Every architecture on its FVU-L0 frontier from one activation cache: train each setting at each token budget
with saelab's Trainer, score it on held-out activations, and write the tables to benchmarks/frontier.md.

The data pipeline is `sae train --activations CACHE`'s (CachedActivationSource, the same shuffle buffer and
normalisation); the held-out set is a second cache (e.g. `sae cache --split test --tokens 16384`), scored at the
SAE's own norm_scale: FVU = sum((x - x_hat)^2) / sum((x - mean x)^2) as analysis/evaluate.py, L0 = mean number of
positive latents per token, dead = the fraction of latents that never fire on the held-out tokens.

    sae cache --hooks blocks.15.hook_resid_pre --tokens 262144 --out CACHE
    sae cache --hooks blocks.15.hook_resid_pre --tokens 16384 --split test --out HELDOUT
    python scripts/bench_frontier.py --cache CACHE --heldout HELDOUT --results after.json
    python scripts/bench_frontier.py --cache CACHE --heldout HELDOUT --results after.json --before before.json

Results are appended to --results as each run finishes (a rerun skips the runs already there), so a sweep
can be stopped and continued; --before adds the table of an earlier results file (e.g. the code before a change).
The tables go between the report's bench_frontier markers, so the prose around them is kept.

    python scripts/bench_frontier.py ... --settings "relu;gated" --target-l0 32 --budgets 262144

searches the L1/L0 coefficient that gives held-out L0 32 at that budget (a few runs; see find_coefficient).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from activations.cache import CachedActivationSource, read_manifest  # noqa: E402
from activations.config import StoreConfig  # noqa: E402
from activations.errors import UserError  # noqa: E402
from sae.base import SAE  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.registry import make_sae  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import Trainer  # noqa: E402

EXPANSION = 8  # d_sae = 8 x d_model, the `sae train` default (4608 latents on SmolLM2-135M)


@dataclass
class Setting:
    """One point of the sweep: an architecture with SAEConfig and TrainConfig overrides (empty: the defaults)."""

    architecture: str
    sae: dict = field(default_factory=dict)  # SAEConfig fields, e.g. {"k": 16} or {"l1_coefficient": 2.0}
    train: dict = field(default_factory=dict)  # TrainConfig fields, e.g. {"b_dec_init": "mean"}

    @property
    def label(self) -> str:
        """A short unique name: the architecture and its overrides (`topk k=32`, `relu l1_coefficient=2`)."""
        items = [*self.sae.items(), *self.train.items()]
        parts = [f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in items]
        return " ".join([self.architecture, *parts]) if parts else f"{self.architecture} (defaults)"


def parse_setting(text: str) -> Setting:
    """`relu:l1_coefficient=2,sparsity_warmup_fraction=0.1` -> Setting (TrainConfig field names go to `train`)."""
    arch, _, rest = text.partition(":")
    sae, train = {}, {}
    train_fields = set(TrainConfig.__dataclass_fields__)
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        parsed: object = value
        for kind in (int, float):
            try:
                parsed = kind(value)
                break
            except ValueError:
                continue
        (train if key in train_fields else sae)[key] = parsed
    return Setting(arch, sae, train)


# The sweep: each architecture at its defaults, then at sparsities that span L0 ~ 16-100 (explicit values, so the
# before and after tables compare the same settings; the defaults rows show what a user gets without options).
SWEEP: list[str] = [
    "topk",
    "topk:k=16",
    "topk:k=64",
    "batchtopk",
    "batchtopk:k=16",
    "batchtopk:k=64",
    "matryoshka",
    "relu",
    "relu:l1_coefficient=1",
    "relu:l1_coefficient=2",
    "gated",
    "gated:l1_coefficient=1",
    "gated:l1_coefficient=2",
    "jumprelu",
    "jumprelu:l0_coefficient=0.3",
    "jumprelu:l0_coefficient=3",
]


def load_heldout(folder: str, hook: str) -> torch.Tensor:
    """Raw activations [n, d] of `hook` from a held-out cache, in file order."""
    cfg = StoreConfig(hooks=[hook], batch_size=4096, normalise=False, epochs=1)
    source = CachedActivationSource(folder, cfg)
    return torch.cat([chunk[:, 0] for chunk in source.raw_activations()])


@torch.no_grad()
def score(sae: SAE, raw: torch.Tensor, chunk: int = 4096) -> dict:
    """Held-out FVU, L0 and dead fraction of `sae` on raw activations [n, d] (read at the SAE's norm_scale)."""
    x = raw.double()
    variance = (x - x.mean(0)).pow(2).sum().item()
    sq_err, active = 0.0, 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, len(raw), chunk):
        part = raw[start : start + chunk] * sae.cfg.norm_scale
        feats = sae.encode(part)
        x_hat = sae.decode(feats) / sae.cfg.norm_scale
        sq_err += (raw[start : start + chunk] - x_hat).double().pow(2).sum().item()
        active += int((feats > 0).sum())
        fired |= (feats > 0).any(0)
    return {"fvu": sq_err / variance, "l0": active / len(raw), "dead": 1 - fired.float().mean().item()}


def train_setting(
    setting: Setting,
    cache: str,
    hook: str,
    tokens: int,
    seed: int,
    batch_size: int = 1024,
    prepare: Callable[[SAE], None] | None = None,
) -> SAE:
    """Train one setting on `tokens` tokens of the cache, as `sae train --activations` would (one process, CPU).

    prepare: called with the fresh SAE before training (experiments that change an initialisation)."""
    manifest = read_manifest(cache)
    d_in = int(manifest["d_model"])
    sae_fields = {"d_in": d_in, "d_sae": EXPANSION * d_in, "architecture": setting.architecture, **setting.sae}
    coefficient = COEFFICIENTS.get(setting.architecture)
    if coefficient and coefficient not in setting.sae and "target_l0" not in setting.sae:  # as sae train's default
        sae_fields["target_l0"] = float(sae_fields.get("k", SAEConfig.k))  # (sae.dictionary.DictionaryConfig)
    sae_cfg = SAEConfig(**sae_fields, model_name=manifest["model"], hook_name=hook)
    torch.manual_seed(seed)
    sae = make_sae(sae_cfg)
    if prepare is not None:
        prepare(sae)
    store = CachedActivationSource(cache, StoreConfig(hooks=[hook], batch_size=batch_size, seed=seed))
    train_cfg = TrainConfig(
        **{"tokens": tokens, "seed": seed, "log_every": 10**6, "checkpoint_every": 10**6, **setting.train}
    )
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(sae, store, train_cfg, run_dir).train()
    return sae.eval()


def run_sweep(args: argparse.Namespace, settings: list[Setting]) -> list[dict]:
    """Train and score every (setting, budget, seed) not yet in args.results (with args.target_l0: search each
    penalty setting's coefficient for that L0 instead, see find_coefficient); returns all the results."""
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["label"], r["tokens"], r["seed"]): r for r in results}
    hook = args.hook or read_manifest(args.cache)["hooks"][0]
    heldout = load_heldout(args.heldout, hook)

    def train_and_score(setting: Setting, tokens: int, seed: int) -> dict:
        """One run's scores, from the results file when it already holds them."""
        if (setting.label, tokens, seed) in done:
            return done[(setting.label, tokens, seed)]
        started = time.time()
        sae = train_setting(setting, args.cache, hook, tokens, seed)
        row = {"label": setting.label, "architecture": setting.architecture, "tokens": tokens, "seed": seed}
        row.update(score(sae, heldout), seconds=round(time.time() - started, 1))
        if setting.architecture in COEFFICIENTS:  # the coefficient trained with (where --target-l0 steered it)
            row["final_coefficient"] = getattr(sae.cfg, COEFFICIENTS[setting.architecture])
        results.append(row)
        done[(setting.label, tokens, seed)] = row
        path.write_text(json.dumps(results, indent=1))
        print(
            f"{tokens:>8} seed {seed} {setting.label:<45} FVU {row['fvu']:.3f}  L0 {row['l0']:6.1f}  "
            f"dead {row['dead']:.3f}  {row['seconds']:.0f} s",
            flush=True,
        )
        return row

    for tokens in args.budgets:
        for seed in args.seeds:
            for setting in settings:
                if args.target_l0:
                    find_coefficient(setting, args.target_l0, lambda s: train_and_score(s, tokens, seed))
                else:
                    train_and_score(setting, tokens, seed)
    return results


# The coefficient that sets each penalty architecture's sparsity (what --l1-coefficient / --l0-coefficient set).
COEFFICIENTS = {"relu": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}


def next_coefficient(trials: list[tuple[float, float]], target_l0: float) -> float:
    """The next coefficient to try for `target_l0`, from (coefficient, L0) trials so far: a secant step in
    log-log space (L0 falls about as a power of the coefficient), doubling or halving after a single trial."""
    if len(trials) == 1:
        coef, l0 = trials[0]
        return coef * (2.0 if l0 > target_l0 else 0.5)
    (c1, l1), (c2, l2) = sorted(trials, key=lambda t: abs(math.log(t[1] / target_l0)))[:2]
    if c1 == c2 or l1 == l2:
        return c1 * (2.0 if l1 > target_l0 else 0.5)
    slope = (math.log(l2) - math.log(l1)) / (math.log(c2) - math.log(c1))
    if slope >= 0:  # not monotone in these two trials: step away from the nearer one
        return c1 * (2.0 if l1 > target_l0 else 0.5)
    step = (math.log(target_l0) - math.log(l1)) / slope
    return c1 * math.exp(max(-2.0, min(2.0, step)))  # at most a factor e^2 per step


def find_coefficient(
    setting: Setting,
    target_l0: float,
    train_and_score: Callable[[Setting], dict],
    tolerance: float = 0.1,
    max_trials: int = 6,
) -> list[dict]:
    """Train `setting` with its sparsity coefficient adjusted until held-out L0 is within `tolerance` of
    `target_l0` (at most max_trials runs at the budget the runs use: the coefficient-to-L0 map depends on the
    budget); returns every trial's scores, the last one the closest. train_and_score(setting) -> score() dict."""
    name = COEFFICIENTS.get(setting.architecture)
    if name is None:
        raise UserError(f"--target-l0 is for {', '.join(COEFFICIENTS)}; {setting.architecture} sets its L0 with --k")
    coef = float(setting.sae.get(name, getattr(SAEConfig, name)))
    trials: list[dict] = []
    for _ in range(max_trials):
        trial = Setting(setting.architecture, {**setting.sae, name: coef}, dict(setting.train))
        row = {"label": trial.label, "coefficient": coef, **train_and_score(trial)}
        trials.append(row)
        print(f"{trial.label:<45} L0 {row['l0']:6.1f}  FVU {row['fvu']:.3f}", flush=True)
        if abs(row["l0"] - target_l0) <= tolerance * target_l0 or row["l0"] <= 0:
            break
        coef = next_coefficient([(t["coefficient"], max(t["l0"], 1e-3)) for t in trials], target_l0)
    return sorted(trials, key=lambda t: abs(t["l0"] - target_l0), reverse=True)


def table(results: list[dict]) -> str:
    """Markdown: one row per setting and budget (mean over seeds; the spread when there are several)."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for row in results:
        groups.setdefault((row["tokens"], row["label"]), []).append(row)
    lines = [
        "| tokens | setting | seeds | L0 | FVU | dead | wall (s) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (tokens, label), rows in sorted(groups.items(), key=lambda item: (item[0][0], item[1][0]["architecture"])):
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("l0", "fvu", "dead", "seconds")}
        spread = f" ± {(max(r['fvu'] for r in rows) - min(r['fvu'] for r in rows)) / 2:.3f}" if len(rows) > 1 else ""
        lines.append(
            f"| {tokens} | {label} | {len(rows)} | {mean['l0']:.1f} | {mean['fvu']:.3f}{spread} | "
            f"{mean['dead']:.3f} | {mean['seconds']:.0f} |"
        )
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    """Device, date, versions, data and the command that made the tables."""
    manifest, held = read_manifest(args.cache), read_manifest(args.heldout)
    return (
        f"{date.today().isoformat()} · {platform.machine()} CPU, {torch.get_num_threads()} thread(s) per run · "
        f"torch {torch.__version__} · Python {platform.python_version()} · {manifest['model']} "
        f"{', '.join(manifest['hooks'])}\n\n"
        f"Training cache: {manifest['tokens']} tokens ({manifest.get('dataset', '?')}, split "
        f"{manifest.get('split', 'train')}); held-out: {held['tokens']} tokens ({held.get('dataset', '?')}, split "
        f"{held.get('split', '?')}). d_sae {EXPANSION} x d_model, batch 1024, every other option at its default "
        f"unless the setting names it.\n\n`python scripts/bench_frontier.py {' '.join(sys.argv[1:])}`\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the sweep, print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="training activation cache (sae cache)")
    parser.add_argument("--heldout", required=True, help="held-out activation cache (sae cache --split test)")
    parser.add_argument("--hook", help="hook of the caches (default: the training cache's first)")
    parser.add_argument("--budgets", default="65536,262144", help="comma-separated token budgets")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument(
        "--settings", help="settings separated by ';', each ARCH[:field=value,...] (default: the built-in SWEEP)"
    )
    parser.add_argument(
        "--target-l0", type=float, help="relu, gated, jumprelu: search each setting's coefficient for this L0"
    )
    parser.add_argument("--results", required=True, help="JSON file the results are appended to")
    parser.add_argument("--before", help="an earlier results file, shown as the 'before' table")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "frontier.md"), help="report to write")
    parser.add_argument("--no-report", action="store_true", help="only run the sweep")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tabulate --results as it is")
    args = parser.parse_args(argv)
    args.budgets = [int(v) for v in args.budgets.split(",")]
    args.seeds = [int(v) for v in args.seeds.split(",")]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    specs = args.settings.split(";") if args.settings else SWEEP
    try:
        settings = [parse_setting(spec) for spec in specs]
        results = json.loads(Path(args.results).read_text()) if args.report_only else run_sweep(args, settings)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    tables = [header(args), "### After\n", table(results)]
    if args.before:
        tables += ["\n### Before\n", table(json.loads(Path(args.before).read_text()))]
    section = "\n".join(tables)
    print(section)
    if not args.no_report:
        write_report(Path(args.out), section)


TABLES_START, TABLES_END = "<!-- bench_frontier tables -->", "<!-- /bench_frontier tables -->"


def write_report(path: Path, section: str) -> None:
    """Put the tables between the markers of an existing report (the prose around them stays), or write a new one."""
    block = f"{TABLES_START}\n{section}\n{TABLES_END}"
    text = path.read_text() if path.is_file() else ""
    if TABLES_START in text and TABLES_END in text:
        before, rest = text.split(TABLES_START, 1)
        text = before + block + rest.split(TABLES_END, 1)[1]
    else:
        text = f"# FVU-L0 frontier of every architecture\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
