"""`sae inspect`: statistics, examples and logit effects of every feature, plots, and the static dashboard."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sae.commands.common import open_sae

HELP = "find what each feature does (writes RUN/features, RUN/plots and RUN/dashboard/index.html)"
DESCRIPTION = ("Read held-out text once (two passes) to get every feature's density, histogram, top and sampled "
               "examples; rank the tokens each feature promotes and suppresses; plot densities and training curves; "
               "write a static dashboard that opens offline by double-click.")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `sae inspect`."""
    p.add_argument("run", help="run folder (or SAE folder holding cfg.json and sae_weights.safetensors)")
    p.add_argument("--tokens", type=int, default=32768, help="held-out tokens to read (default 32768)")
    p.add_argument("--out", default=None, help="where features/, plots/ and dashboard/ go (default: the run folder)")
    p.add_argument("--model", default=None, help="model (default: the one the SAE was trained on)")
    p.add_argument("--dataset", default=None, help="held-out text (default: the training corpus)")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="test", help="split to read (default test)")
    p.add_argument("--text-field", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--top-k", type=int, default=16, help="max-activating examples per feature (default 16)")
    p.add_argument("--left", type=int, default=20, help="tokens shown before an example's token (default 20)")
    p.add_argument("--right", type=int, default=6, help="tokens shown after it (default 6)")
    p.add_argument("--intervals", type=int, default=5, help="activation intervals to sample examples from (default 5)")
    p.add_argument("--per-interval", type=int, default=3, help="examples sampled per interval (default 3)")
    p.add_argument("--bins", type=int, default=32, help="activation histogram bins (default 32)")
    p.add_argument("--logit-tokens", type=int, default=10, help="promoted/suppressed tokens listed per feature (default 10)")
    p.add_argument("--model-batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=64, help="features per lazily loaded dashboard file (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the interval samples (default 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-mechanisms", action="store_true", help="skip the mechanism detectors (see 'sae catalogue')")
    p.add_argument("--mechanism-tokens", type=int, default=4096,
                   help="held-out tokens the mechanism detectors read (default 4096)")
    p.add_argument("--dashboard-only", action="store_true",
                   help="rebuild plots and dashboard from existing features/ (e.g. after adding features/tags.json)")


def inspect_run(run: str | Path, out: str | Path | None = None, *, lm=None, model: str | None = None, dataset: str | None = None,
                dataset_config: str | None = None, split: str = "test", text_field: str | None = None,
                data_dir: str | None = None, tokens: int = 32768, top_k: int = 16, left: int = 20, right: int = 6,
                intervals: int = 5, per_interval: int = 3, bins: int = 32, logit_tokens: int = 10, model_batch_size: int = 8,
                chunk_size: int = 64, seed: int = 0, device: str = "auto", dashboard_only: bool = False,
                mechanisms: bool = True, mechanism_tokens: int = 4096) -> Path:
    """Compute (or reload) feature data for the SAE in `run`, write plots and dashboard under `out`; returns index.html."""
    from activations.errors import UserError
    from activations.sources import open_text_source
    from analysis.dashboard import load_tags, write_dashboard
    from analysis.feature_stats import FeatureStats, StatsConfig, feature_stats
    from analysis.logits import TopLogits, top_logits
    from analysis.plots import density_histogram, training_curves

    run = Path(run)
    out = Path(out) if out else run
    features_dir = out / "features"
    if chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {chunk_size}.")
    sae, lm = open_sae(run, lm=lm, model=model, device=device)
    device = str(lm.device)
    started = time.time()
    dataset = dataset or sae.cfg.dataset or "wikitext-2"
    if dashboard_only:
        stats = FeatureStats.load(features_dir)
        logits = TopLogits.load(features_dir / "logits.safetensors")
    else:
        source = open_text_source(dataset, split=split, config=dataset_config, text_field=text_field, data_dir=data_dir)
        cfg = StatsConfig(tokens=tokens, top_k=top_k, left=left, right=right, intervals=intervals, per_interval=per_interval,
                          bins=bins, model_batch_size=model_batch_size, seed=seed)
        stats = feature_stats(sae, lm, source, cfg, meta={"dataset": dataset, "split": split, "run": str(run)})
        stats.save(features_dir)
        logits = top_logits(sae, lm, n=logit_tokens)
        logits.save(features_dir / "logits.safetensors")
        if mechanisms:
            from sae.commands.catalogue import detect_run
            detect_run(run, lm=lm, dataset=dataset, split=split, data_dir=data_dir, tokens=mechanism_tokens, save_to=out)

    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    name = f"{sae.cfg.model_name} {sae.cfg.hook_name}"
    density_histogram(stats.density, plots_dir / "feature_density.png", name)
    plots = [("Feature density", "../plots/feature_density.png")]
    if training_curves(run / "metrics.jsonl", plots_dir / "training.png", name):
        plots.append(("Training (loss, L0, FVU)", "../plots/training.png"))

    dead = int((stats.count == 0).sum())
    summary = {"features": stats.d_sae, "tokens read": stats.tokens, "never fired": dead,
               "median density": float(stats.density.median()), "text": f"{stats.meta.get('dataset', dataset)} ({stats.meta.get('split', split)})"}
    eval_path = run / "eval.json"
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        summary.update({k: ev[k] for k in ("fvu", "l0", "ce_recovered") if k in ev})
    index = write_dashboard(out / "dashboard", stats, logits, lm.tokenizer, title=f"{sae.cfg.architecture} SAE · {name}",
                            subtitle=str(run.resolve()), summary=summary,
                            plots=plots,
                            tags=load_tags(features_dir, run / "features"), chunk_size=chunk_size,
                            catalogue=_catalogue_page(features_dir, run / "features"))
    print(f"inspected {stats.d_sae} features over {stats.tokens} held-out tokens in {time.time() - started:.0f} s "
          f"({dead} never fired); data in {features_dir}, plots in {plots_dir}")
    print(f"dashboard: {index.resolve().as_uri()}")
    return index


def _catalogue_page(*features_dirs: Path) -> list[dict]:
    """The dashboard's mechanisms page from the first mechanisms.json the detectors wrote (none: no page;
    a hand-written file holding only tags gives tags on the features but no page)."""
    from activations.errors import UserError
    from analysis.catalogue import TAGS_FILE, dashboard_catalogue, load_tags

    for folder in features_dirs:
        if (folder.parent / TAGS_FILE).is_file():
            try:
                return dashboard_catalogue(load_tags(folder.parent))
            except UserError:
                return []
    return []


def run(args: argparse.Namespace) -> Path:
    return inspect_run(args.run, args.out, model=args.model, dataset=args.dataset, dataset_config=args.dataset_config,
                       split=args.split, text_field=args.text_field, data_dir=args.data_dir, tokens=args.tokens,
                       top_k=args.top_k, left=args.left, right=args.right, intervals=args.intervals,
                       per_interval=args.per_interval, bins=args.bins, logit_tokens=args.logit_tokens,
                       model_batch_size=args.model_batch_size, chunk_size=args.chunk_size, seed=args.seed,
                       device=args.device, dashboard_only=args.dashboard_only, mechanisms=not args.no_mechanisms,
                       mechanism_tokens=args.mechanism_tokens)
