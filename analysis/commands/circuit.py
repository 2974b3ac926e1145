"""`sae circuit RUN --prompt TEXT --target TOKEN`: which features of the run's dictionaries make the model predict
TOKEN after TEXT, through which edges and heads, and how faithful that circuit is: RUN/circuits/<name>.json + .html.

The JSON (format 2; close to circuit-tracer's / Neuronpedia's graph JSON, which has metadata, nodes with node_id,
feature_type, layer, ctx_idx, activation, and links with source, target, weight):
- metadata {slug, prompt, prompt_tokens, scan (the model), node_threshold, edge_threshold, schema};
- prompt, tokens, metric {kind, target, contrast, value, position}, hooks, method (gradient | ig), steps, skipped
  (positions that are no nodes: the first, and attention sinks);
- nodes: [{node_id, kind (feature | error | embedding | output), feature_type (circuit-tracer's name for the kind),
  hook, layer, ctx_idx, token, feature, activation, baseline, attribution, tags [{name, evidence, flag}], sources,
  examples [{act, tokens, acts, center}], explanation, heads [{head, types, contribution, share}]}], where feature
  nodes are the pruned ones and error / embedding nodes those with a kept link;
- links: [{source, target, weight, heads}] (heads: for links across positions, the heads that move the source's
  position into the target's, named with their catalogue types);
- embeddings [per position attribution], errors {hook: [per position attribution]};
- faithfulness {full, empty, circuit, complement, faithfulness, completeness, size, ablation, ablate_errors},
  curve [[n, faithfulness of the top n]], validation {nodes, pearson, spearman, pairs [[attribution, effect]]}
  (each of the top nodes ablated alone on the real spliced model), seconds (per stage), settings, versions.
It differs from circuit-tracer's in naming features by hook, its weights being attribution (activation minus
baseline, times gradient) rather than normalised influence, and in carrying faithfulness and the heads.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from activations.config import HeldOutText, SAEModelConfig
from activations.errors import UserError
from activations.files import atomic_write_json, check_writable
from activations.hookpoints import parse_hook
from activations.options import check_fields, option
from activations.sources import open_text_source
from analysis.attribution import METRIC_KINDS, Metric, attribute_nodes, integrated_gradients
from analysis.catalogue import held_out_text
from analysis.circuit import (
    ABLATIONS,
    ablation_baseline,
    ablation_effects,
    correlation,
    faithfulness,
    faithfulness_curve,
    prune,
    ranked,
    sink_positions,
)
from analysis.circuit_edges import EMBED, ERROR, OUTPUT, depth, edges, prune_edges
from analysis.circuit_nodes import load_notes
from analysis.circuit_page import write_circuit_page
from analysis.component_types import ComponentTypes
from analysis.dashboard_circuits import register_circuit
from analysis.heads import classify_heads
from analysis.splice import SpliceOptions
from sae.io import load_sae
from sae.runs import open_sae, sae_folders

FIRST = 1  # the first position is no node: saelab's SAEs never train on it; nor is any sink (sink_positions)
# Nodes are scored with the model's own gradient (nothing frozen, errors live): that is what predicts single-node
# ablations (tests/test_circuit.py; the linearised gradient does markedly worse). Edges use the linearised model.
NODE_GRADIENT = SpliceOptions()
METHODS = ("gradient", "ig")
HELP = "trace which features make the model predict a token after a prompt (nodes, edges, heads, faithfulness)"
DESCRIPTION = (
    "Splice every SAE of RUN (and --also runs) into the model, score each feature node of the prompt on the "
    "target's logit (activation minus baseline, times gradient, or integrated gradients), keep the nodes carrying "
    "--node-fraction of the attribution, add the edges from the token embeddings through the spliced layers to the "
    "output with the heads that carry them, and measure the circuit's faithfulness by ablating everything else. "
    "Writes RUN/circuits/<name>.json and its page <name>.html, linked from the dashboards."
)


@dataclass
class Config:
    """`sae circuit`: the dictionaries, the prompt and target, attribution, pruning and the faithfulness check."""

    run: str = option(help="run folder: one SAE, or a several-hook run (all its SAEs are spliced)", positional=True)
    prompt: str = option(help="the prompt text", required=True)
    target: str = option(help="the predicted token, as text (it must be one token, e.g. ' Paris')", required=True)
    contrast: str | None = option(None, "score the logit difference target - contrast (one token)")
    metric: str = option("logit", "what is scored: the target's logit or its log-probability", choices=METRIC_KINDS)
    also: list[str] = option(help="more run folders whose SAEs are spliced too (comma-separated)", default_factory=list)
    method: str = option(
        "gradient", "node attribution: activation x gradient, or integrated gradients (ig)", choices=METHODS
    )
    steps: int = option(16, "integrated-gradient steps per spliced layer (--method ig)", low=1)
    node_fraction: float = option(0.8, "keep the top nodes carrying this share of |attribution|", above=0, high=1)
    max_nodes: int = option(64, "at most this many feature nodes", low=1)
    edge_fraction: float = option(0.98, "keep the top edges carrying this share of |weight|", above=0, high=1)
    ablation: str = option(
        "zero", "what an ablated node takes: zero, or its mean over held-out text (--text)", choices=ABLATIONS
    )
    ablate_errors: bool = option(False, "also ablate the error terms in the faithfulness check")
    check_nodes: int = option(16, "top nodes each ablated alone to check their attribution against", low=0)
    name: str | None = option(None, "file name under RUN/circuits/ (default: from the prompt)")
    reference_tokens: int = option(2048, "held-out tokens the feature means of --ablation mean are taken over", low=1)
    model: SAEModelConfig = field(default_factory=SAEModelConfig, metadata=dict(help="model"))
    text: HeldOutText = field(default_factory=HeldOutText, metadata=dict(help="held-out text for mean-ablation"))

    def __post_init__(self) -> None:
        check_fields(self)


def one_token(tokenizer, text: str, what: str) -> int:
    """The id of `text` as one token, or a UserError showing how it splits."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise UserError(f"--{what} {text!r} is {len(ids)} tokens {pieces}; give one token (mind a leading space).")
    return ids[0]


def reference_text(cfg: Config, sae, lm) -> torch.Tensor:
    """[B, T] held-out contexts (the SAE's corpus's test split by default) for the feature means."""
    t = cfg.text
    source = open_text_source(
        t.dataset or sae.cfg.dataset or "wikitext-2",
        split=t.split,
        config=t.dataset_config,
        text_field=t.text_field,
        data_dir=t.data_dir,
    )
    return held_out_text(source, lm.tokenizer, cfg.reference_tokens, sae.cfg.context_size or 128, sae.cfg.prepend_bos)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "circuit"


class Clock:
    """Seconds per stage of the command, for the JSON and the cost figures in the README."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 2)
        self.last = now


def head_types(lm) -> ComponentTypes:
    """The model's head catalogue (cached after the first `sae heads` / `sae inspect`), or none if it cannot be
    read head by head."""
    try:
        return ComponentTypes(heads=classify_heads(lm))
    except UserError as e:
        print(f"head catalogue skipped: {e}")
        return ComponentTypes()


def _heads(rows, types: ComponentTypes) -> list[dict]:
    """(layer, head, contribution, share) rows as JSON entries named with their catalogue types."""
    out = []
    for layer, head, value, share in rows:
        name = f"L{layer}H{head}"
        kinds = [k.partition(":")[2] for k, _ in types.of(name) if k.startswith("head:")]
        out.append({"head": name, "types": kinds, "contribution": value, "share": round(share, 4)})
    return out


def node_id(node) -> str:
    """feature "hook@position:feature", error "hook@position:error", token "embed@position", "output"."""
    hook, t, f = node
    if hook == OUTPUT:
        return OUTPUT
    if hook == EMBED:
        return f"{EMBED}@{t}"
    return f"{hook}@{t}:{'error' if f == ERROR else f}"


def run(cfg: Config) -> Path:
    folders = {**sae_folders(cfg.run)}
    for extra in cfg.also:
        folders.update({f"{extra}:{hook}": path for hook, path in sae_folders(extra).items()})
    out = Path(cfg.run) / "circuits"
    check_writable(Path(cfg.run), "RUN")
    clock = Clock()
    leading, lm = open_sae(next(iter(folders.values())), model=cfg.model.model, device=cfg.model.device)
    saes = [leading] + [load_sae(path, device=str(lm.device)) for path in list(folders.values())[1:]]
    target = one_token(lm.tokenizer, cfg.target, "target")
    contrast = one_token(lm.tokenizer, cfg.contrast, "contrast") if cfg.contrast is not None else None
    tokens = torch.tensor([lm.tokenizer(cfg.prompt)["input_ids"]])
    if tokens.shape[1] <= FIRST:
        raise UserError(f"the prompt {cfg.prompt!r} is {tokens.shape[1]} token(s); give --prompt at least two.")
    metric = Metric(target=target, contrast=contrast, kind=cfg.metric)
    reference = reference_text(cfg, leading, lm) if cfg.ablation == "mean" else None
    baseline = ablation_baseline(lm, saes, cfg.ablation, reference)
    clock("load")
    if cfg.method == "ig":
        attr = integrated_gradients(lm, saes, tokens, metric, steps=cfg.steps, baseline=baseline)
    else:
        attr = attribute_nodes(lm, saes, tokens, metric, NODE_GRADIENT, baseline=baseline)
    skip = tuple(sorted({*range(FIRST), *sink_positions(lm, saes, tokens)}))
    kept = prune(attr, cfg.node_fraction, cfg.max_nodes, skip=skip)
    clock("attribution")
    found = edges(lm, saes, tokens, attr, kept, metric, skip=skip)
    links = prune_edges(found.edges, cfg.edge_fraction)
    clock("edges")
    ablated = dict(baseline=baseline, ablate_errors=cfg.ablate_errors, skip=skip)
    faith = faithfulness(lm, saes, tokens, metric, attr, kept, cfg.ablation, **ablated)
    total = len(ranked(attr, skip))
    sizes = sorted({min(2**i, total) for i in range(total.bit_length() + 1)} - {0})
    curve = faithfulness_curve(lm, saes, tokens, metric, attr, sizes, cfg.ablation, **ablated)
    checked = kept[: cfg.check_nodes]
    effects = ablation_effects(lm, saes, tokens, metric, attr, checked, **ablated)
    estimates = [float(attr.features[h][t, f]) for h, t, f in checked]
    validation = {"nodes": len(checked), **correlation(estimates, effects), "pairs": list(zip(estimates, effects))}
    clock("faithfulness")
    text = [lm.tokenizer.decode([t]) for t in tokens[0].tolist()]
    folder_of = {_writes(sae): path for sae, path in zip(saes, folders.values())}
    notes = {hook: load_notes(path, lm.tokenizer) for hook, path in folder_of.items()}
    types = head_types(lm)
    clock("catalogue")
    kinds = {
        hook: "transcoder feature" if _writes(sae) != sae.cfg.hook_name else "sae feature"
        for sae in saes
        for hook in [_writes(sae)]
    }
    T = tokens.shape[1]

    def layer_of(hook: str) -> int:
        return (
            -1
            if hook == EMBED
            else lm.model.config.num_hidden_layers
            if hook == OUTPUT
            else parse_hook(hook, lm.model).layer
        )

    def entry(node) -> dict:
        hook, t, f = node
        base = {"node_id": node_id(node), "hook": hook, "layer": layer_of(hook), "ctx_idx": t, "token": text[t]}
        heads = _heads(found.heads.get(node, []), types)
        if hook == OUTPUT:
            return {
                **base,
                "kind": "output",
                "feature_type": "logit",
                "attribution": attr.metric,
                "heads": heads,
                "token": cfg.target,
            }
        if hook == EMBED:
            return {**base, "kind": "embedding", "feature_type": "embedding", "attribution": float(attr.embeddings[t])}
        if f == ERROR:
            return {
                **base,
                "kind": "error",
                "feature_type": "reconstruction error",
                "attribution": float(attr.errors[hook][t]),
            }
        return {
            **base,
            "kind": "feature",
            "feature_type": kinds[hook],
            "feature": f,
            "activation": float(attr.activations[hook][t, f]),
            "baseline": float(baseline[hook][f]) if baseline is not None else 0.0,
            "attribution": float(attr.features[hook][t, f]),
            "heads": heads,
            **notes[hook].of(f),
        }

    others = {n for e in links for n in (e.source, e.target) if n[0] in (EMBED, OUTPUT) or n[2] == ERROR}
    order = sorted(others, key=lambda n: (layer_of(n[0]), n[0] != EMBED, n[1]))
    name = cfg.name or _slug(cfg.prompt + " " + cfg.target)
    data = {
        "format": 2,
        "metadata": {
            "slug": name,
            "prompt": cfg.prompt,
            "prompt_tokens": text,
            "scan": lm.name,
            "node_threshold": cfg.node_fraction,
            "edge_threshold": cfg.edge_fraction,
            "schema": "saelab circuit graph, format 2 (analysis/commands/circuit.py)",
        },
        "prompt": cfg.prompt,
        "tokens": text,
        "metric": {
            "kind": cfg.metric,
            "target": cfg.target,
            "contrast": cfg.contrast,
            "value": attr.metric,
            "position": metric.position % T,
        },
        "hooks": sorted(attr.features, key=lambda h: depth(h, lm)),
        "method": cfg.method,
        "skipped": list(skip),
        "steps": cfg.steps if cfg.method == "ig" else None,
        "nodes": [entry(n) for n in kept] + [entry(n) for n in order],
        "links": [
            {
                "source": node_id(e.source),
                "target": node_id(e.target),
                "weight": e.weight,
                "heads": _heads(e.heads, types),
            }
            for e in links
        ],
        "embeddings": attr.embeddings.tolist(),
        "errors": {hook: e.tolist() for hook, e in attr.errors.items()},
        "faithfulness": faith.to_dict(),
        "curve": curve,
        "validation": validation,
        "seconds": clock.seconds,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "model"},
        "versions": {p: version(p) for p in ("saelab", "torch", "transformers")},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    atomic_write_json(path, data, indent=1)
    dashboards = {
        hook: folder / "dashboard"
        for hook, folder in folder_of.items()
        if (folder / "dashboard" / "index.html").is_file()
    }
    page = write_circuit_page(
        data,
        path.with_suffix(".html"),
        {hook: os.path.relpath(d / "index.html", out) for hook, d in dashboards.items()},
    )
    for hook, dashboard in dashboards.items():
        register_circuit(dashboard, hook, data, page)
    clock("write")
    _report(cfg, attr, kept, total, links, faith, validation, data)
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in clock.seconds.items()))
    print(f"graph: {path}\npage: {page.resolve().as_uri()}")
    return path


def _report(cfg, attr, kept, total, links, faith, validation, data) -> None:
    """The command's summary: the metric, what was kept, faithfulness, the check, the top nodes and heads."""
    print(
        f"{cfg.metric} of {cfg.target!r}"
        + (f" - {cfg.contrast!r}" if cfg.contrast else "")
        + f" after {cfg.prompt!r}: {attr.metric:.3f}; {len(kept)} of {total} feature nodes kept, {len(links)} links "
        f"({cfg.method}); faithfulness {faith.faithfulness:.3f}, completeness {faith.completeness:.3f} "
        f"({cfg.ablation}-ablation); attribution vs single-node ablation over the top {validation['nodes']}: "
        f"pearson {validation['pearson']:.3f}, spearman {validation['spearman']:.3f}"
    )
    for node in [n for n in data["nodes"] if n["kind"] == "feature"][:10]:
        tags = [t["name"] + (f" ({t['evidence']})" if t["evidence"] else "") for t in node["tags"]]
        tag = f"  [{', '.join(tags)}]" if tags else ""
        print(f"  {node['node_id']:<40} {node['token']!r:<12} attribution {node['attribution']:+.3f}{tag}")
    carriers: dict[str, float] = {}
    for link in data["links"]:
        for h in link["heads"][:1]:
            key = h["head"] + (f" ({', '.join(h['types'])})" if h["types"] else "")
            carriers[key] = carriers.get(key, 0.0) + abs(link["weight"]) * h["share"]
    if carriers:
        top = sorted(carriers.items(), key=lambda kv: -kv[1])[:5]
        print("  heads carrying links across positions: " + ", ".join(f"{k} {v:.3f}" for k, v in top))


def _writes(sae) -> str:
    return getattr(sae.cfg, "hook_name_out", "") or sae.cfg.hook_name
