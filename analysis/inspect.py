"""inspect_run: every feature's statistics, examples and logit effects, the mechanism tags, the plots and the
static dashboard of one SAE folder: what `sae inspect` does, callable from Python."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from activations.config import HeldOutText
from activations.errors import UserError
from activations.hookpoints import parse_hook
from activations.models import LoadedModel
from activations.options import check_fields, option
from activations.sources import open_text_source
from analysis.catalogue import TAGS_FILE, dashboard_catalogue, detect_run, load_tags
from analysis.component_capture import family, span_of
from analysis.component_evidence import add_component_evidence
from analysis.component_types import ComponentTypes
from analysis.components import features_sources_for_run
from analysis.dashboard import read_feature_tags, write_dashboard
from analysis.dashboard_explanations import explanations_annotator, explanations_overview
from analysis.dashboard_sources import components_page, read_sources, sources_annotator
from analysis.explanations_store import latest
from analysis.feature_stats import FeatureStats, StatsConfig, feature_stats
from analysis.heads import classify_heads
from analysis.logits import TopLogits, top_logits
from analysis.neurons import classify_neurons
from analysis.plots import density_histogram, training_curves
from sae.io import load_sae


@dataclass
class InspectConfig:
    """What `sae inspect` computes and writes besides the feature statistics (StatsConfig)."""

    out: str | None = option(None, "where features/, plots/ and dashboard/ go (default: the run folder)")
    stats: StatsConfig = field(default_factory=StatsConfig, metadata=dict(help="feature statistics"))
    logit_tokens: int = option(10, "promoted/suppressed tokens listed per feature", low=1)
    chunk_size: int = option(64, "features per lazily loaded dashboard file", low=1)
    mechanisms: bool = option(True, "skip the mechanism detectors (see 'sae catalogue')", flag="--no-mechanisms")
    mechanism_tokens: int = option(4096, "held-out tokens the mechanism detectors read", low=1)
    components: bool = option(
        True,
        "skip splitting each feature's top examples into the heads and MLPs that wrote them",
        flag="--no-components",
    )
    component_examples: int = option(4, "top examples per feature split into their sources", low=1)
    dashboard_only: bool = option(
        False, "rebuild plots and dashboard from existing features/ (e.g. after adding features/tags.json)"
    )

    def __post_init__(self) -> None:
        check_fields(self)


def inspect_run(
    run: str | Path, lm: LoadedModel, text: HeldOutText = HeldOutText(), cfg: InspectConfig = InspectConfig()
) -> Path:
    """Compute (or reload) feature data for the SAE in `run`, write plots and dashboard; returns index.html."""
    run = Path(run)
    out = Path(cfg.out) if cfg.out else run
    features_dir = out / "features"
    sae = load_sae(run, device=str(lm.device))
    started = time.time()
    dataset = text.dataset or sae.cfg.dataset or "wikitext-2"
    written = None
    if cfg.dashboard_only:
        stats = FeatureStats.load(features_dir)
        logits = TopLogits.load(features_dir / "logits.safetensors")
    else:
        source = open_text_source(
            dataset, split=text.split, config=text.dataset_config, text_field=text.text_field, data_dir=text.data_dir
        )
        stats = feature_stats(
            sae, lm, source, cfg.stats, meta={"dataset": dataset, "split": text.split, "run": str(run)}
        )
        stats.save(features_dir)
        logits = top_logits(sae, lm, n=cfg.logit_tokens)
        logits.save(features_dir / "logits.safetensors")
        if cfg.mechanisms:
            detect_run(run, lm, text, tokens=cfg.mechanism_tokens, save_to=out)
        if cfg.components and int((stats.count > 0).sum()):
            written = write_sources(sae, lm, stats, text, dataset, cfg, features_dir, out)

    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    name = f"{sae.cfg.model_name} {sae.cfg.hook_name}"
    density_histogram(stats.density, plots_dir / "feature_density.png", name)
    plots = [("Feature density", "../plots/feature_density.png")]
    if training_curves(run / "metrics.jsonl", plots_dir / "training.png", name):
        plots.append(("Training (loss, L0, FVU)", "../plots/training.png"))

    dead = int((stats.count == 0).sum())
    summary = {
        "features": stats.d_sae,
        "tokens read": stats.tokens,
        "never fired": dead,
        "median density": float(stats.density.median()),
        "text": f"{stats.meta.get('dataset', dataset)} ({stats.meta.get('split', text.split)})",
    }
    eval_path = run / "eval.json"
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        summary.update({k: ev[k] for k in ("fvu", "l0", "ce_recovered") if k in ev})
    if written is not None:
        types, sources = written
    else:
        sources = read_sources(features_dir, run / "features") if cfg.components else None
        types = component_types(lm) if sources is not None else ComponentTypes()
    explained = latest(features_dir)
    index = write_dashboard(
        out / "dashboard",
        stats,
        logits,
        lm.tokenizer,
        title=f"{sae.cfg.architecture} SAE · {name}",
        subtitle=str(run.resolve()),
        summary=summary,
        plots=plots,
        tags=read_feature_tags(features_dir, run / "features"),
        chunk_size=cfg.chunk_size,
        catalogue=catalogue_page(features_dir, run / "features"),
        annotators=([sources_annotator(sources)] if sources is not None else []) + [explanations_annotator(explained)],
        components=components_page(types, sources, lm.name),
        explanations=explanations_overview(explained),
    )
    print(
        f"inspected {stats.d_sae} features over {stats.tokens} held-out tokens in {time.time() - started:.0f} s "
        f"({dead} never fired); data in {features_dir}, plots in {plots_dir}"
    )
    print(f"dashboard: {index.resolve().as_uri()}")
    return index


def component_types(lm: LoadedModel) -> ComponentTypes:
    """The model's head and neuron catalogues (from the saelab cache, computed once per model), or none for a
    model whose heads and neurons saelab cannot read one by one."""
    try:
        family(lm.model)
        return ComponentTypes(heads=classify_heads(lm), neurons=classify_neurons(lm))
    except UserError as e:
        print(f"head and neuron catalogues skipped: {e}")
        return ComponentTypes()


def write_sources(
    sae,
    lm: LoadedModel,
    stats: FeatureStats,
    text: HeldOutText,
    dataset: str,
    cfg: InspectConfig,
    features_dir: Path,
    out: Path,
) -> tuple[ComponentTypes, dict] | None:
    """features/components.json: each feature's top examples rerun in their own held-out contexts and split into
    the embeddings, heads and MLPs that wrote them, named with their catalogue types; then the mechanism tags get
    their component evidence. Returns the catalogues and what it wrote, or None (saying so) for models the split
    does not support."""
    try:
        family(lm.model)
    except UserError as e:
        print(f"feature sources skipped: {e}")
        return None
    started = time.time()
    types = component_types(lm)
    catalogues = time.time() - started
    again = open_text_source(
        dataset, split=text.split, config=text.dataset_config, text_field=text.text_field, data_dir=text.data_dir
    )
    result = features_sources_for_run(
        sae, lm, stats, examples_per_feature=cfg.component_examples, source=again, out=features_dir, types=types
    )
    print(
        f"feature sources: {result['examples']} examples of {len(result['features'])} features split in "
        f"{result['seconds']:.0f} s (head and neuron catalogues {catalogues:.0f} s), max |remainder| "
        f"{result['max_abs_remainder']:.1e}"
    )
    if (out / TAGS_FILE).is_file():
        counts = add_component_evidence(out, result, types, span_of(parse_hook(sae.cfg.hook_name, lm.model)))
        for mechanism, by_status in counts.items():
            if by_status:
                print(f"  {mechanism:<16} " + ", ".join(f"{n} {status}" for status, n in by_status.items()))
    return types, result


def catalogue_page(*features_dirs: Path) -> list[dict]:
    """The dashboard's mechanisms page from the first mechanisms.json the detectors wrote (none: no page;
    a hand-written file holding only tags gives tags on the features but no page)."""
    for folder in features_dirs:
        if (folder.parent / TAGS_FILE).is_file():
            try:
                return dashboard_catalogue(load_tags(folder.parent))
            except UserError:
                return []
    return []
