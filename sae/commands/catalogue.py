"""`sae catalogue`: the mechanism catalogue (primer sections, papers, detectors), and per run the
features tagged with each mechanism (run the detectors with --detect, or read what `sae inspect` stored)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from activations.errors import UserError
from sae.commands.common import open_sae

HELP = "list known transformer mechanisms, or count a run's features tagged with each"
DESCRIPTION = ("Without RUN: the mechanism catalogue (from Ferrando et al. 2024, 'A Primer on the Inner Workings of "
               "Transformer-based Language Models', section 5) with each entry's papers and detector. With RUN: counts "
               "of tagged features per mechanism (one column per SAE of the run); --detect runs the detectors first.")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `sae catalogue`."""
    p.add_argument("run", nargs="?", default=None, help="run folder (or SAE folder); omit to list the catalogue")
    p.add_argument("--detect", action="store_true", help="run the detectors now and store the tags (RUN/features/mechanisms.json)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="also list the N highest-scoring tagged features per mechanism")
    p.add_argument("--only", default=None, help="comma-separated mechanism ids to run (with --detect)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out text tokens the detectors read (default 4096)")
    p.add_argument("--model", default=None, help="model (default: the one the SAE was trained on)")
    p.add_argument("--dataset", default=None, help="held-out text (default: the training corpus)")
    p.add_argument("--split", default="test", help="held-out split (default test)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--catalogue", default=None, help="a catalogue file to use instead of the packaged one")


def list_catalogue(path: str | None = None) -> str:
    """The catalogue as readable text."""
    from analysis.catalogue import load_catalogue

    cat = load_catalogue(path)
    primer = cat.primer
    lines = [f"Mechanism catalogue v{cat.version}: {primer.get('authors', '')} ({primer.get('year', '')}), "
             f"\"{primer.get('title', '')}\", arXiv {primer.get('arxiv', '')}, section {primer.get('section', '')}", ""]
    for m in cat.mechanisms:
        lines.append(f"{m.id}: {m.name}")
        lines.append(f"    primer section: {m.primer_section}")
        for paper in m.papers:
            arxiv = f", arXiv {paper['arxiv']}" if paper.get("arxiv") else ""
            lines.append(f"    paper: {paper['authors']} ({paper['year']}), \"{paper['title']}\"{arxiv}")
        lines.append(f"    detector: {m.detector}, tagged when score >= {m.threshold:g}")
        lines += textwrap.wrap(m.score, width=100, initial_indent="    score: ", subsequent_indent="           ")
        lines.append("")
    return "\n".join(lines).rstrip()


def detect_run(folder: Path, *, lm=None, model: str | None = None, dataset: str | None = None, split: str = "test",
               data_dir: str | None = None, tokens: int = 4096, device: str = "auto", only: list[str] | None = None,
               catalogue: str | None = None, progress: bool = True, save_to: Path | None = None):
    """Run the detectors on the SAE in `folder` and store the tags in `save_to`/features (default
    `folder`); returns the CatalogueResult."""
    from activations.sources import open_text_source
    from analysis.catalogue import CatalogueConfig, held_out_text, sae_subject, tag_features, load_catalogue

    cat = load_catalogue(catalogue)
    for m in only or []:
        cat[m]  # UserError naming the valid ids
    sae, lm = open_sae(folder, lm=lm, model=model, device=device)
    cfg = CatalogueConfig(text_tokens=tokens, mechanisms=only)
    dataset = dataset or sae.cfg.dataset or "wikitext-2"
    source = open_text_source(dataset, split=split, data_dir=data_dir)
    text = held_out_text(source, lm.tokenizer, tokens, sae.cfg.context_size or 128, sae.cfg.prepend_bos)
    if progress:
        print(f"tagging {sae.cfg.d_sae} features of {folder} ({sae.cfg.hook_name}) against {len(cat.mechanisms)} mechanisms, "
              f"{text.numel()} held-out tokens of {dataset}", flush=True)
    subject = sae_subject(sae, lm, text, cfg)
    meta = {"model": lm.name, "hook": sae.cfg.hook_name, "layer": sae.cfg.hook_layer, "dataset": dataset,
            "split": split, "text_tokens": int(text.numel())}
    result = tag_features(subject, cat, only, progress=progress, meta=meta)
    path = result.save(save_to or folder)
    if progress:
        print(f"tags written to {path}")
    return result


def describe(result, mechanism: str, n: int) -> list[str]:
    """The n highest-scoring features tagged with a mechanism, one line each with the key evidence."""
    lines = []
    for f in result.features_with(mechanism)[:n]:
        tag = next(t for t in result.tags[f] if t["mechanism"] == mechanism)
        ev = {k: v for k, v in tag["evidence"].items() if k != "probe" and not isinstance(v, list)}
        lists = {k: v[:5] for k, v in tag["evidence"].items() if isinstance(v, list)}
        lines.append(f"    feature {f}: score {tag['score']:.2f}  {_short(ev)}  {_short(lists)}")
    return lines


def _short(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def run(args: argparse.Namespace):
    from analysis.catalogue import load_catalogue, load_tags, summary_table
    from sae.commands.export import sae_folders

    if args.run is None:
        if args.detect:
            raise UserError("--detect needs a run folder: sae catalogue RUN --detect")
        print(list_catalogue(args.catalogue))
        return None
    only = [m.strip() for m in args.only.split(",")] if args.only else None
    results = {}
    for hook, folder in sae_folders(Path(args.run)).items():
        if args.detect:
            results[hook] = detect_run(folder, model=args.model, dataset=args.dataset, split=args.split,
                                       data_dir=args.data_dir, tokens=args.tokens, device=args.device, only=only,
                                       catalogue=args.catalogue)
        else:
            results[hook] = load_tags(folder)
    cat = load_catalogue(args.catalogue)
    print(summary_table(results, cat))
    if args.show:
        for hook, result in results.items():
            for m in cat.mechanisms:
                if result.detectors.get(m.id, {}).get("passed"):
                    print(f"{m.id}{f' ({hook})' if hook else ''}:")
                    print("\n".join(describe(result, m.id, args.show)))
    return results
