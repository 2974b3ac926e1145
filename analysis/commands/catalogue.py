"""`sae catalogue`: the mechanism catalogue (primer sections, papers, detectors), and per run the
features tagged with each mechanism (run the detectors with --detect, or read what `sae inspect` stored)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from activations.config import HeldOutText, SAEModelConfig
from activations.errors import UserError
from activations.options import check_fields, option
from analysis.catalogue import CatalogueResult, detect_run, load_catalogue, load_tags, summary_table
from sae.runs import open_sae, sae_folders

HELP = "list known transformer mechanisms, or count a run's features tagged with each"
DESCRIPTION = (
    "Without RUN: the mechanism catalogue (from Ferrando et al. 2024, 'A Primer on the Inner Workings of "
    "Transformer-based Language Models', section 5) with each entry's papers and detector. With RUN: counts "
    "of tagged features per mechanism (one column per SAE of the run); --detect runs the detectors first."
)


@dataclass
class Config:
    """`sae catalogue`: list the catalogue, or count (and with --detect, compute) a run's tags."""

    run: str | None = option(None, "run folder (or SAE folder); omit to list the catalogue", positional=True)
    detect: bool = option(False, "run the detectors now and store the tags (RUN/features/mechanisms.json)")
    show: int = option(0, "also list the N highest-scoring tagged features per mechanism", low=0, metavar="N")
    only: list[str] | None = option(None, "comma-separated mechanism ids to run (with --detect)")
    tokens: int = option(4096, "held-out text tokens the detectors read", low=1)
    catalogue: str | None = option(None, "a catalogue file to use instead of the packaged one")
    model: SAEModelConfig = field(default_factory=SAEModelConfig, metadata=dict(help="model"))
    text: HeldOutText = field(default_factory=HeldOutText, metadata=dict(help="held-out text"))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.run is None and self.detect:
            raise UserError("--detect needs a run folder: sae catalogue RUN --detect")


def list_catalogue(path: str | None = None) -> str:
    """The catalogue as readable text."""
    cat = load_catalogue(path)
    primer = cat.primer
    lines = [
        f"Mechanism catalogue v{cat.version}: {primer.get('authors', '')} ({primer.get('year', '')}), "
        f'"{primer.get("title", "")}", arXiv {primer.get("arxiv", "")}, section {primer.get("section", "")}',
        "",
    ]
    for m in cat.mechanisms:
        lines.append(f"{m.id}: {m.name}")
        lines.append(f"    primer section: {m.primer_section}")
        for paper in m.papers:
            arxiv = f", arXiv {paper['arxiv']}" if paper.get("arxiv") else ""
            lines.append(f'    paper: {paper["authors"]} ({paper["year"]}), "{paper["title"]}"{arxiv}')
        lines.append(f"    detector: {m.detector}, tagged when score >= {m.threshold:g}")
        lines += textwrap.wrap(m.score, width=100, initial_indent="    score: ", subsequent_indent="           ")
        lines.append("")
    return "\n".join(lines).rstrip()


def describe(result: CatalogueResult, mechanism: str, n: int) -> list[str]:
    """The n highest-scoring features tagged with a mechanism, one line each with the key evidence."""
    lines = []
    for f in result.features_with(mechanism)[:n]:
        tag = next(t for t in result.tags[f] if t["mechanism"] == mechanism)
        ev = {k: v for k, v in tag["evidence"].items() if k != "probe" and not isinstance(v, list)}
        lists = {k: v[:5] for k, v in tag["evidence"].items() if isinstance(v, list)}
        lines.append(f"    feature {f}: score {tag['score']:.2f}  {_short(ev)}  {_short(lists)}")
        comp = tag.get("components")
        if comp:
            share = f" {100 * comp['share']:.0f} % from {' / '.join(comp['types'])}" if "share" in comp else ""
            top = ", ".join(f"{n} {100 * x:.0f} %" for n, x, *_ in comp.get("components", [])[:3])
            why = f" ({comp['reason']})" if "reason" in comp else ""
            lines.append(f"      components: {comp['status']}{share}{f' ({top})' if top else ''}{why}")
    return lines


def evidence_lines(results: dict[str, CatalogueResult]) -> list[str]:
    """Per SAE and mechanism, how many tags their sources support, contradict (flagged) or cannot test."""
    lines = []
    for hook, result in results.items():
        for m, d in result.detectors.items():
            if d.get("component_evidence"):
                counts = ", ".join(f"{n} {status}" for status, n in d["component_evidence"].items())
                lines.append(f"  {m}{f' ({hook})' if hook else ''}: {counts}")
    return ["component evidence (features/components.json, from 'sae inspect'):", *lines] if lines else []


def _short(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def run(cfg: Config) -> dict[str, CatalogueResult] | None:
    """Print the catalogue, or the run's tag counts per mechanism (and --show N examples each)."""
    if cfg.run is None:
        print(list_catalogue(cfg.catalogue))
        return None
    cat = load_catalogue(cfg.catalogue)
    for m in cfg.only or []:
        cat[m]  # UserError naming the valid ids, before any model is loaded
    folders = sae_folders(cfg.run)
    lm = (
        open_sae(next(iter(folders.values())), model=cfg.model.model, device=cfg.model.device)[1]
        if cfg.detect
        else None
    )
    results = {
        hook: detect_run(folder, lm, cfg.text, tokens=cfg.tokens, only=cfg.only, catalogue=cfg.catalogue)
        if cfg.detect
        else load_tags(folder)
        for hook, folder in folders.items()
    }
    print(summary_table(results, cat))
    print("\n".join(evidence_lines(results)))
    if cfg.show:
        for hook, result in results.items():
            for m in cat.mechanisms:
                if result.detectors.get(m.id, {}).get("passed"):
                    print(f"{m.id}{f' ({hook})' if hook else ''}:")
                    print("\n".join(describe(result, m.id, cfg.show)))
    return results
