"""`sae circuit RUN --prompt TEXT --target TOKEN`: which features of the run's dictionaries make the model predict
TOKEN after TEXT, their edges, and how faithful that circuit is; written to RUN/circuits/<name>.json.

The JSON (format 1): prompt, tokens, metric {kind, target, contrast, value}, hooks, nodes [{id "hook@position:
feature", hook, layer, position, token, feature, activation, attribution, tags, sources}], embeddings [per
position attribution], errors {hook: [per position attribution]}, edges [{source, target, weight}], faithfulness
{full, empty, circuit, complement, faithfulness, completeness, size, ablation, ablate_errors}, curve [[n,
faithfulness of the top n]], settings, versions. Close to circuit-tracer's graph JSON in spirit (nodes with
activation and influence, weighted edges); it differs in naming SAE features by hook and carrying faithfulness.
"""

from __future__ import annotations

import os
import re
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
from analysis.attribution import METRIC_KINDS, Metric, attribute_nodes
from analysis.catalogue import held_out_text
from analysis.circuit import ABLATIONS, edges, faithfulness, faithfulness_curve, prune, ranked
from analysis.circuit_page import write_circuit_page
from analysis.dashboard import read_feature_tags
from analysis.dashboard_sources import read_sources
from sae.io import load_sae
from sae.runs import open_sae, sae_folders

FIRST = 1  # the first position is no node: saelab's SAEs never train on it (the attention sink)
HELP = "trace which features make the model predict a token after a prompt (nodes, edges, faithfulness)"
DESCRIPTION = (
    "Splice every SAE of RUN (and --also runs) into the model, score each feature node of the prompt by activation "
    "x gradient on the target's logit (attention, norms and errors linearised), keep the nodes carrying "
    "--node-fraction of the attribution, add the edges between kept nodes of consecutive layers, and measure the "
    "circuit's faithfulness by ablating everything else. Writes RUN/circuits/<name>.json and its page <name>.html."
)


@dataclass
class Config:
    """`sae circuit`: the dictionaries, the prompt and target, pruning and the faithfulness check."""

    run: str = option(help="run folder: one SAE, or a several-hook run (all its SAEs are spliced)", positional=True)
    prompt: str = option(help="the prompt text", required=True)
    target: str = option(help="the predicted token, as text (it must be one token, e.g. ' Paris')", required=True)
    contrast: str | None = option(None, "score the logit difference target - contrast (one token)")
    metric: str = option("logit", "what is scored: the target's logit or its log-probability", choices=METRIC_KINDS)
    also: list[str] = option(help="more run folders whose SAEs are spliced too (comma-separated)", default_factory=list)
    node_fraction: float = option(0.8, "keep the top nodes carrying this share of |attribution|", above=0, high=1)
    max_nodes: int = option(64, "at most this many feature nodes", low=1)
    ablation: str = option(
        "zero", "what an ablated node takes: zero, or its mean over held-out text (--text)", choices=ABLATIONS
    )
    ablate_errors: bool = option(False, "also ablate the error terms in the faithfulness check")
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


def run(cfg: Config) -> Path:
    folders = {**sae_folders(cfg.run)}
    for extra in cfg.also:
        folders.update({f"{extra}:{hook}": path for hook, path in sae_folders(extra).items()})
    out = Path(cfg.run) / "circuits"
    check_writable(Path(cfg.run), "RUN")
    leading, lm = open_sae(next(iter(folders.values())), model=cfg.model.model, device=cfg.model.device)
    saes = [leading] + [load_sae(path, device=str(lm.device)) for path in list(folders.values())[1:]]
    target = one_token(lm.tokenizer, cfg.target, "target")
    contrast = one_token(lm.tokenizer, cfg.contrast, "contrast") if cfg.contrast is not None else None
    tokens = torch.tensor([lm.tokenizer(cfg.prompt)["input_ids"]])
    if tokens.shape[1] == 0:
        raise UserError("the prompt is empty; give --prompt some text.")
    metric = Metric(target=target, contrast=contrast, kind=cfg.metric)
    attr = attribute_nodes(lm, saes, tokens, metric)
    kept = prune(attr, cfg.node_fraction, cfg.max_nodes, first=FIRST)
    links = edges(lm, saes, tokens, attr, kept)
    reference = reference_text(cfg, leading, lm) if cfg.ablation == "mean" else None
    faith = faithfulness(lm, saes, tokens, metric, attr, kept, cfg.ablation, reference, cfg.ablate_errors, first=FIRST)
    total = len(ranked(attr, FIRST))
    sizes = sorted({min(2**i, total) for i in range(total.bit_length() + 1)} - {0})
    curve = faithfulness_curve(
        lm, saes, tokens, metric, attr, sizes, ablation=cfg.ablation, reference=reference, first=FIRST
    )
    text = [lm.tokenizer.decode([t]) for t in tokens[0].tolist()]
    folder_of = {_writes(sae): path for sae, path in zip(saes, folders.values())}
    tags = {hook: read_feature_tags(path / "features") for hook, path in folder_of.items()}
    sources = {hook: (read_sources(path / "features") or {}).get("features", {}) for hook, path in folder_of.items()}

    def node_id(node) -> str:
        return f"{node[0]}@{node[1]}:{node[2]}"

    data = {
        "format": 1,
        "prompt": cfg.prompt,
        "tokens": text,
        "metric": {"kind": cfg.metric, "target": cfg.target, "contrast": cfg.contrast, "value": attr.metric},
        "hooks": list(attr.features),
        "nodes": [
            {
                "id": node_id((hook, t, f)),
                "hook": hook,
                "layer": parse_hook(hook, lm.model).layer,
                "position": t,
                "token": text[t],
                "feature": f,
                "activation": float(attr.activations[hook][t, f]),
                "attribution": float(attr.features[hook][t, f]),
                "tags": [tag if isinstance(tag, str) else tag.get("name", "") for tag in tags[hook].get(f, [])],
                "sources": sources[hook].get(str(f), {}).get("summary", ""),
            }
            for hook, t, f in kept
        ],
        "embeddings": attr.embeddings.tolist(),
        "errors": {hook: e.tolist() for hook, e in attr.errors.items()},
        "edges": [{"source": node_id(u), "target": node_id(v), "weight": w} for u, v, w in links],
        "faithfulness": faith.to_dict(),
        "curve": curve,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "model"},
        "versions": {p: version(p) for p in ("saelab", "torch", "transformers")},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{cfg.name or _slug(cfg.prompt + ' ' + cfg.target)}.json"
    atomic_write_json(path, data, indent=1)
    dashboards = {
        hook: os.path.relpath(folder / "dashboard" / "index.html", out)
        for hook, folder in folder_of.items()
        if (folder / "dashboard" / "index.html").is_file()
    }
    page = write_circuit_page(data, path.with_suffix(".html"), dashboards)
    print(
        f"{cfg.metric} of {cfg.target!r}"
        + (f" - {cfg.contrast!r}" if cfg.contrast else "")
        + f" after {cfg.prompt!r}: {attr.metric:.3f}; {len(kept)} of {total} feature nodes kept, {len(links)} edges; "
        f"faithfulness {faith.faithfulness:.3f}, completeness {faith.completeness:.3f} ({cfg.ablation}-ablation)"
    )
    for node in data["nodes"][:10]:
        tag = f"  [{', '.join(node['tags'])}]" if node["tags"] else ""
        print(f"  {node['id']:<40} {node['token']!r:<12} attribution {node['attribution']:+.3f}{tag}")
    print(f"graph: {path}\npage: {page.resolve().as_uri()}")
    return path


def _writes(sae) -> str:
    return getattr(sae.cfg, "hook_name_out", "") or sae.cfg.hook_name
