"""`sae heads`: every attention head of the model scored on the primer's head types, as tables and heat-maps
(or JSON), with an optional causal check (ablate the top heads of each type against random heads)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from activations.config import ModelConfig, model_dtype, pick_device
from activations.models import load_model, model_slug
from activations.options import check_fields, option
from analysis.head_ablation import ABLATION_MODES, AblationResult, ablation_check, ablation_table
from analysis.head_report import heatmaps, score_table
from analysis.heads import HeadCatalogue, ProbeSettings, classify_heads

HELP = "classify the model's attention heads (previous-token, induction, sink, successor, ...)"
DESCRIPTION = (
    "Score every attention head on the head types of Ferrando et al. 2024 (arXiv 2405.00208, section 5): "
    "previous-token, induction, duplicate-token, attention sink, copying, copy suppression and successor, each "
    "in [0, 1] with a documented threshold, from attention patterns on repeated random tokens and OV circuits "
    "read from the weights. Cached per model; --ablate checks the tagged heads causally against random heads "
    "of the same layers."
)


@dataclass
class Config:
    """`sae heads`: which model, what to print, and the ablation check."""

    as_json: bool = option(False, "print every head's scores (layer, head, one per type) as JSON", flag="--json")
    refresh: bool = option(False, "recompute the scores even when the cache holds them")
    ablate: bool = option(False, "also ablate each type's tagged heads against random heads of the same layers")
    out: str | None = option(None, "folder for the heat-maps (default heads/<model> in the current folder)")
    top: int = option(3, "heads ablated per type (its tagged heads, at most this many)", low=1)
    draws: int = option(10, "random head sets per type for the ablation baseline", low=1)
    ablation: str = option("mean", "what an ablated head outputs: its mean, or zero", choices=ABLATION_MODES)
    seed: int = option(0, "seed of the probes and of the random heads")
    model: ModelConfig = field(default_factory=ModelConfig, metadata=dict(help="model"))

    def __post_init__(self) -> None:
        check_fields(self)


def out_folder(cfg: Config, model_name: str) -> Path:
    """--out, or heads/<model> (the model's last path part, made file-name safe)."""
    if cfg.out:
        return Path(cfg.out)
    return Path("heads") / model_slug(model_name)


def as_json(cat: HeadCatalogue, ablation: dict[str, AblationResult] | None) -> str:
    """The --json document: every head's scores, the thresholds, the tagged heads (and the ablation check)."""
    data = {
        "model": cat.model,
        "thresholds": cat.thresholds,
        "heads": cat.rows(),
        "tagged": {k: [list(h) for h in cat.tagged(k)] for k in cat.scores},
    }
    if ablation is not None:
        data["ablation"] = {k: r.to_dict() for k, r in ablation.items()}
    return json.dumps(data, indent=1)


def run(cfg: Config) -> tuple[HeadCatalogue, dict[str, AblationResult] | None]:
    """Score (or read from the cache) every head; print JSON, or tables and heat-maps; optionally ablate."""
    device = pick_device(cfg.model.device)
    lm = load_model(cfg.model.model, device=device, dtype=model_dtype(cfg.model.model_dtype))
    cat = classify_heads(lm, ProbeSettings(seed=cfg.seed), refresh=cfg.refresh)
    ablation = (
        ablation_check(lm, cat, n=cfg.top, draws=cfg.draws, mode=cfg.ablation, seed=cfg.seed) if cfg.ablate else None
    )
    if cfg.as_json:
        print(as_json(cat, ablation))
        return cat, ablation
    for kind in cat.scores:
        print(score_table(cat, kind), end="\n\n")
    if ablation is not None:
        print(f"ablation check ({cfg.ablation}-ablation, {cfg.draws} random draws; damage = ablated − clean NLL):")
        print(ablation_table(ablation), end="\n\n")
    paths = heatmaps(cat, out_folder(cfg, lm.name))
    print(f"heat-maps: {paths[0].parent}/ ({', '.join(p.name for p in paths)})")
    return cat, ablation
