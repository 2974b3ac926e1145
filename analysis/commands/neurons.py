"""`sae neurons`: every MLP neuron of the model scored on the primer's neuron types, as tables and per-layer plots
(or JSON). matplotlib runs headless (Agg backend), as in analysis/plots.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from activations.config import ModelConfig, model_dtype, pick_device
from activations.models import load_model, model_slug
from activations.options import check_fields, option
from analysis.neurons import PROBES, NeuronCatalogue, NeuronSettings, classify_neurons

HELP = "classify the model's MLP neurons (position, token-frequency, entropy, promoting, suppression)"
DESCRIPTION = (
    "Score every MLP neuron (an input coordinate of the MLP's output projection; gated MLPs included) on the "
    "neuron types of Ferrando et al. 2024 (arXiv 2405.00208, section 5.2): position (variance explained by "
    "position on random tokens and on text), token frequency (direct logit effect against log unigram "
    "frequency), entropy (output in the unembedding's near-null space with a large norm, plus a measured entropy "
    "change for the top ones), promoting and suppression (kurtosis and skew of the direct logit effect). Each "
    "score is in [0, 1] with a documented threshold; cached per model."
)


@dataclass
class Config:
    """`sae neurons`: which model and what to print."""

    as_json: bool = option(
        False, "print each type's tagged and top neurons (scores and evidence) as JSON", flag="--json"
    )
    every: bool = option(False, "with --json, also every neuron's scores (one row per layer and neuron)", flag="--all")
    refresh: bool = option(False, "recompute the scores even when the cache holds them")
    top: int = option(10, "neurons listed per type", low=1)
    out: str | None = option(None, "folder for the plots (default neurons/<model> in the current folder)")
    seed: int = option(0, "seed of the random-token probe")
    model: ModelConfig = field(default_factory=ModelConfig, metadata=dict(help="model"))

    def __post_init__(self) -> None:
        check_fields(self)


def out_folder(cfg: Config, model_name: str) -> Path:
    """--out, or neurons/<model> (the model's last path part, made file-name safe)."""
    if cfg.out:
        return Path(cfg.out)
    return Path("neurons") / model_slug(model_name)


def entry(cat: NeuronCatalogue, kind: str, layer: int, neuron: int, tokenizer=None) -> dict:
    """One neuron of one type: layer, neuron, score and its evidence (token ids decoded too, given a tokenizer)."""
    ev = cat.evidence_of(kind, layer, neuron)
    if tokenizer is not None and "tokens" in ev:
        ev["token_text"] = [tokenizer.decode([t]) for t in ev["tokens"]]
    return {"layer": layer, "neuron": neuron, "score": round(float(cat.scores[kind][layer, neuron]), 4), **ev}


def as_json(cat: NeuronCatalogue, top: int, every: bool = False, tokenizer=None) -> str:
    """The --json document: thresholds, per-layer counts, and per type every tagged neuron and the top ones."""
    data = {
        "model": cat.model,
        "layout": {"n_layers": cat.n_layers, "d_mlp": cat.d_mlp},
        "thresholds": cat.thresholds,
        "probes": {k: PROBES.get(k, "") for k in cat.scores},
        "settings": cat.settings,
        "counts": {k: cat.counts(k) for k in cat.scores},
        "tagged": {k: [entry(cat, k, a, b, tokenizer) for a, b in cat.tagged(k)] for k in cat.scores},
        "top": {k: [entry(cat, k, a, b, tokenizer) for a, b, _ in cat.top(k, top)] for k in cat.scores},
    }
    if every:
        data["neurons"] = cat.rows()
    return json.dumps(data, indent=1)


def _evidence_text(ev: dict) -> str:
    parts = []
    for name, value in ev.items():
        if name == "tokens":
            continue
        if isinstance(value, list):
            parts.append(f"{name} {' '.join(repr(v) for v in value)}")
        elif value is None:
            parts.append(f"{name} -")
        else:
            parts.append(f"{name} {value:.4g}")
    return ", ".join(parts)


def score_table(cat: NeuronCatalogue, kind: str, top: int, tokenizer=None) -> str:
    """One type as text: threshold and tagged count, tagged neurons per layer, then the top neurons."""
    counts = cat.counts(kind)
    width = max(3, len(str(max(counts))) + 1)
    lines = [
        f"{kind}: {PROBES.get(kind, '')}",
        f"  tagged when score >= {cat.thresholds[kind]:g}: {sum(counts)} of {cat.n_layers * cat.d_mlp} neurons",
        "  layer  " + "".join(f"{layer:>{width}}" for layer in range(cat.n_layers)),
        "  tagged " + "".join(f"{c:>{width}}" for c in counts),
        f"  {'rank':>4} {'layer':>5} {'neuron':>6} {'score':>6}  evidence",
    ]
    for rank, (layer, neuron, score) in enumerate(cat.top(kind, top), 1):
        ev = entry(cat, kind, layer, neuron, tokenizer)
        for key in ("layer", "neuron", "score"):
            ev.pop(key)
        mark = "*" if score >= cat.thresholds[kind] else " "
        lines.append(f"  {rank:>4} {layer:>5} {neuron:>6} {score:>6.3f}{mark} {_evidence_text(ev)}")
    return "\n".join(lines)


def layer_plots(cat: NeuronCatalogue, folder: str | Path) -> list[Path]:
    """Per type a PNG: every neuron's score by layer (tagged ones orange, the threshold dashed) over the tagged
    count per layer; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    layers = torch.arange(cat.n_layers).repeat_interleave(cat.d_mlp).float()
    x = layers + (torch.rand(len(layers), generator=gen) - 0.5) * 0.7
    paths = []
    for kind, score in cat.scores.items():
        flat, threshold = score.flatten(), cat.thresholds[kind]
        hit = flat >= threshold
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(2 + 0.3 * cat.n_layers, 5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
        top.scatter(x[~hit].numpy(), flat[~hit].numpy(), s=1, color="#64748b", alpha=0.35, linewidths=0)
        top.scatter(x[hit].numpy(), flat[hit].numpy(), s=6, color="#f97316", linewidths=0)
        top.axhline(threshold, color="#f97316", ls="--", lw=1)
        top.set_ylim(0, 1)
        top.set_ylabel("score")
        top.set_title(f"{cat.model}: {kind} neurons (tagged >= {threshold:g}: {int(hit.sum())})", fontsize=9)
        bottom.bar(range(cat.n_layers), cat.counts(kind), color="#f97316")
        bottom.set_xlabel("layer")
        bottom.set_ylabel("tagged")
        fig.tight_layout()
        paths.append(folder / f"{kind}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def run(cfg: Config) -> NeuronCatalogue:
    """Score (or read from the cache) every neuron; print JSON, or tables and plots."""
    device = pick_device(cfg.model.device)
    lm = load_model(cfg.model.model, device=device, dtype=model_dtype(cfg.model.model_dtype))
    cat = classify_neurons(lm, NeuronSettings(seed=cfg.seed), refresh=cfg.refresh)
    if cfg.as_json:
        print(as_json(cat, cfg.top, cfg.every, lm.tokenizer))
        return cat
    for kind in cat.scores:
        print(score_table(cat, kind, cfg.top, lm.tokenizer), end="\n\n")
    paths = layer_plots(cat, out_folder(cfg, lm.name))
    print(f"plots: {paths[0].parent}/ ({', '.join(p.name for p in paths)})")
    return cat
