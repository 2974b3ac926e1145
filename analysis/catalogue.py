"""The mechanism catalogue: load analysis/mechanisms.yaml, run its detectors on an SAE, store the tags,
and summarise a run (counts per mechanism, per layer when a run holds several SAEs).

Tags are written to `<sae folder>/features/mechanisms.json`: every feature's score per mechanism,
and for each feature that passed a threshold its tags with the evidence and the primer section.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from activations.config import HeldOutText
from activations.errors import UserError
from activations.files import atomic_write_json
from activations.hookpoints import n_layers, parse_hook, run_with_cache
from activations.sources import open_text_source
from activations.tokens import pack_contexts
from analysis.component_types import EMBEDDINGS
from analysis.detectors import DETECTORS, Subject, detect
from analysis.heads import HEAD_TYPES
from analysis.logits import unembedding
from analysis.neurons import NEURON_TYPES
from sae.io import load_sae
from sae.runs import check_sae_fits

CATALOGUE = Path(__file__).with_name("mechanisms.yaml")
TAGS_FILE = Path("features") / "mechanisms.json"
TAGS_FORMAT = 1
COMPONENT_KINDS = (*EMBEDDINGS, *(f"head:{k}" for k in HEAD_TYPES), *(f"neuron:{k}" for k in NEURON_TYPES))
_REQUIRED = ("id", "name", "primer_section", "papers", "description", "detector", "threshold", "score")


@dataclass(frozen=True)
class Mechanism:
    """One catalogue entry."""

    id: str
    name: str
    primer_section: str
    papers: tuple[dict, ...]
    description: str
    detector: str
    threshold: float
    score: str
    components: tuple[str, ...] = ()  # component types that compute such a feature (analysis.component_evidence)


@dataclass(frozen=True)
class Catalogue:
    version: int
    primer: dict
    mechanisms: tuple[Mechanism, ...]

    def __getitem__(self, mechanism_id: str) -> Mechanism:
        for m in self.mechanisms:
            if m.id == mechanism_id:
                return m
        raise UserError(f"unknown mechanism '{mechanism_id}'; the catalogue has: {', '.join(self.ids)}")

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.mechanisms]


def load_catalogue(path: str | os.PathLike | None = None) -> Catalogue:
    """Read and check the catalogue file (the packaged one by default)."""
    return _load(str(path or CATALOGUE))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Catalogue:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"mechanism catalogue {p} does not exist; reinstall saelab or give the path of a catalogue file."
        )
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"mechanism catalogue {p} is not valid YAML ({e}); fix its syntax.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("mechanisms"), list) or "version" not in raw:
        raise UserError(f"mechanism catalogue {p} needs a 'version' and a 'mechanisms' list; restore the file.")
    mechanisms = []
    for i, entry in enumerate(raw["mechanisms"]):
        missing = [k for k in _REQUIRED if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise UserError(f"mechanism catalogue {p}: entry {i + 1} lacks {', '.join(missing)}; add them.")
        if entry["detector"] not in DETECTORS:
            raise UserError(
                f"mechanism catalogue {p}: entry '{entry['id']}' names detector '{entry['detector']}', "
                f"which does not exist; use one of {', '.join(DETECTORS)}."
            )
        if not 0 <= float(entry["threshold"]) <= 1:
            raise UserError(
                f"mechanism catalogue {p}: entry '{entry['id']}' has threshold {entry['threshold']}; "
                "scores lie in [0, 1], so use a threshold in [0, 1]."
            )
        components = entry.get("components") or []
        unknown = [c for c in components if c not in COMPONENT_KINDS] if isinstance(components, list) else [components]
        if unknown:
            raise UserError(
                f"mechanism catalogue {p}: entry '{entry['id']}' lists unknown component types {unknown}; "
                f"use a list of {', '.join(COMPONENT_KINDS)}."
            )
        mechanisms.append(
            Mechanism(
                **{
                    **{k: entry[k] for k in _REQUIRED},
                    "papers": tuple(entry["papers"]),
                    "threshold": float(entry["threshold"]),
                    "components": tuple(components),
                }
            )
        )
    ids = [m.id for m in mechanisms]
    if len(set(ids)) != len(ids):
        raise UserError(f"mechanism catalogue {p} repeats an id; every mechanism id must be unique.")
    return Catalogue(version=int(raw["version"]), primer=raw.get("primer", {}), mechanisms=tuple(mechanisms))


# ---- an SAE as a detector subject ----------------------------------------------------------------


@dataclass
class CatalogueConfig:
    """How much held-out text the detectors read, and which mechanisms to test."""

    text_tokens: int = 4096  # held-out text for token statistics (whole contexts)
    context_size: int | None = None  # None: the SAE's training context size
    resid_positions: int = 256  # sampled final residuals for the entropy evidence
    batch_tokens: int = 2048
    mechanisms: list[str] | None = None  # None: all
    seed: int = 0


def held_out_text(
    source: Iterable, tokenizer, tokens: int, context_size: int, prepend_bos: bool | None, stride: int = 8
) -> torch.Tensor:
    """[B, context_size] token ids: `tokens` tokens of `source` in whole contexts, every `stride`-th
    context (so the sample spans more documents than the first few)."""
    rows, last = [], None
    for i, ctx in enumerate(pack_contexts(source, tokenizer, context_size, prepend_bos)):
        last = ctx.tokens
        if i % stride == 0:
            rows.append(ctx.tokens)
            if len(rows) * context_size >= tokens:
                break
    if not rows and last is not None:
        rows.append(last)
    return torch.stack(rows)


def sae_subject(sae, lm, text: torch.Tensor | None, cfg: CatalogueConfig = CatalogueConfig()):
    """A detector Subject for an SAE on its model: activations at the SAE's hook, decoder directions
    in raw residual units, the unembedding with the final norm's gain, and sampled final residuals."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    check_sae_fits(sae, lm)

    @torch.inference_mode()
    def encode(tokens: torch.Tensor) -> torch.Tensor:
        cache = run_with_cache(lm.model, tokens.to(lm.device), [hp])
        return sae.encode_raw(cache[hp.name].to(sae.dtype))

    un = unembedding(lm)
    final = None
    if text is not None and cfg.resid_positions > 0:
        last = parse_hook(f"blocks.{n_layers(lm.model) - 1}.hook_resid_post", lm.model)
        rows = text[: max(1, -(-cfg.resid_positions // max(text.shape[1] - 1, 1)))]
        with torch.inference_mode():
            resid = run_with_cache(lm.model, rows.to(lm.device), [last])[last.name][:, 1:]
        final = resid.reshape(-1, resid.shape[-1])[: cfg.resid_positions].float().cpu()
    return Subject(
        encode=encode,
        n_features=sae.cfg.d_sae,
        tokenizer=lm.tokenizer,
        text=text,
        directions=(sae.W_dec.detach().float() / sae.cfg.norm_scale).cpu(),
        unembed=(un.W_U * un.gain).cpu(),
        centre=un.center,
        final_resid=final,
        batch_tokens=cfg.batch_tokens,
        seed=cfg.seed,
    )


# ---- running the detectors and storing tags --------------------------------------------------------


@dataclass
class CatalogueResult:
    """Scores of every feature for every mechanism run, and the tags of the features that passed."""

    catalogue_version: int
    n_features: int
    scores: dict[str, list[float]]
    detectors: dict[str, dict]  # per mechanism: threshold, probe, passed count, seconds
    tags: dict[int, list[dict]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # model, hook, layer, text

    def counts(self) -> dict[str, int]:
        return {m: d["passed"] for m, d in self.detectors.items()}

    def features_with(self, mechanism: str) -> list[int]:
        """Tagged features, highest score first."""
        fs = [f for f, tags in self.tags.items() if any(t["mechanism"] == mechanism for t in tags)]
        return sorted(fs, key=lambda f: -self.scores[mechanism][f])

    def to_json(self) -> dict:
        return {
            "format": TAGS_FORMAT,
            "catalogue_version": self.catalogue_version,
            "n_features": self.n_features,
            "meta": self.meta,
            "detectors": self.detectors,
            "scores": self.scores,
            "tags": {str(f): t for f, t in sorted(self.tags.items())},
        }

    @classmethod
    def from_json(cls, d: dict) -> CatalogueResult:
        return cls(
            catalogue_version=d["catalogue_version"],
            n_features=d["n_features"],
            scores=d["scores"],
            detectors=d["detectors"],
            tags={int(f): t for f, t in d["tags"].items()},
            meta=d.get("meta", {}),
        )

    def save(self, sae_folder: str | os.PathLike) -> Path:
        """Write the result to <sae_folder>/features/mechanisms.json (atomically: a reader never sees half)."""
        path = Path(sae_folder) / TAGS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_json(), indent=None, ensure_ascii=False)
        return path


def tag_features(
    subject,
    catalogue: Catalogue | None = None,
    mechanisms: list[str] | None = None,
    progress: bool = False,
    meta: dict | None = None,
) -> CatalogueResult:
    """Run the catalogue's detectors on a Subject and turn scores above threshold into tags."""
    catalogue = catalogue or load_catalogue()
    entries = [catalogue[m] for m in mechanisms] if mechanisms else list(catalogue.mechanisms)
    scores, detectors, tags = {}, {}, {}
    for m in entries:
        result = detect(subject, m.detector)
        score = result.score.clamp(0, 1)
        passed = (score >= m.threshold).nonzero().flatten().tolist()
        scores[m.id] = [round(float(s), 4) for s in score]
        detectors[m.id] = {
            "threshold": m.threshold,
            "probe": result.probe,
            "passed": len(passed),
            "seconds": round(subject.cache.get(f"seconds:{m.detector}", 0.0), 2),
        }
        for f in passed:
            tags.setdefault(f, []).append(
                {
                    "mechanism": m.id,
                    "name": m.name,
                    "section": m.primer_section,
                    "score": round(float(score[f]), 4),
                    "threshold": m.threshold,
                    "evidence": result.evidence(f),
                }
            )
        if progress:
            print(f"  {m.id:<16} {len(passed):5d} tagged  ({detectors[m.id]['seconds']:.1f} s)", flush=True)
    return CatalogueResult(catalogue.version, subject.n_features, scores, detectors, tags, meta or {})


def run_catalogue(
    sae,
    lm,
    source: Iterable,
    cfg: CatalogueConfig = CatalogueConfig(),
    progress: bool = False,
    meta: dict | None = None,
) -> CatalogueResult:
    """Held-out text from `source`, the SAE as a Subject, every detector, tags."""
    ctx = cfg.context_size or sae.cfg.context_size or 128
    text = held_out_text(source, lm.tokenizer, cfg.text_tokens, ctx, sae.cfg.prepend_bos)
    subject = sae_subject(sae, lm, text, cfg)
    info = {
        "model": lm.name,
        "hook": sae.cfg.hook_name,
        "layer": sae.cfg.hook_layer,
        "text_tokens": int(text.numel()),
        **(meta or {}),
    }
    return tag_features(subject, mechanisms=cfg.mechanisms, progress=progress, meta=info)


def detect_run(
    folder: str | os.PathLike,
    lm,
    text: HeldOutText = HeldOutText(),
    *,
    tokens: int = 4096,
    only: list[str] | None = None,
    catalogue: str | None = None,
    progress: bool = True,
    save_to: str | os.PathLike | None = None,
) -> CatalogueResult:
    """Run the detectors on the SAE in `folder` (with model `lm`) over held-out text and store the tags in
    `save_to`/features (default `folder`); returns the CatalogueResult."""
    folder = Path(folder)
    cat = load_catalogue(catalogue)
    for m in only or []:
        cat[m]  # UserError naming the valid ids
    sae = load_sae(folder, device=str(lm.device))
    dataset = text.dataset or sae.cfg.dataset or "wikitext-2"
    source = open_text_source(
        dataset, split=text.split, config=text.dataset_config, text_field=text.text_field, data_dir=text.data_dir
    )
    held_out = held_out_text(source, lm.tokenizer, tokens, sae.cfg.context_size or 128, sae.cfg.prepend_bos)
    if progress:
        print(
            f"tagging {sae.cfg.d_sae} features of {folder} ({sae.cfg.hook_name}) against {len(cat.mechanisms)} "
            f"mechanisms, {held_out.numel()} held-out tokens of {dataset}",
            flush=True,
        )
    subject = sae_subject(sae, lm, held_out, CatalogueConfig(text_tokens=tokens, mechanisms=only))
    meta = {
        "model": lm.name,
        "hook": sae.cfg.hook_name,
        "layer": sae.cfg.hook_layer,
        "dataset": dataset,
        "split": text.split,
        "text_tokens": int(held_out.numel()),
    }
    result = tag_features(subject, cat, only, progress=progress, meta=meta)
    path = result.save(save_to or folder)
    if progress:
        print(f"tags written to {path}")
    return result


def load_tags(sae_folder: str | os.PathLike) -> CatalogueResult:
    """The mechanism tags stored for an SAE (its features/mechanisms.json), or a UserError saying how to make them."""
    path = Path(sae_folder) / TAGS_FILE
    if not path.is_file():
        raise UserError(
            f"{path} is missing; run 'sae catalogue {sae_folder} --detect' (or 'sae inspect') to tag the features."
        )
    try:
        return CatalogueResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError) as e:
        raise UserError(
            f"{path} is unreadable ({type(e).__name__}: {e}); run the detectors again to rewrite it."
        ) from None


def dashboard_catalogue(result: CatalogueResult, catalogue: Catalogue | None = None, limit: int = 1000) -> list[dict]:
    """The dashboard's mechanisms page: per mechanism its description, section, papers and the tagged
    features ([id, score], best first, at most `limit`)."""
    catalogue = catalogue or load_catalogue()
    pages = []
    for m in catalogue.mechanisms:
        if m.id not in result.detectors:
            continue
        features = result.features_with(m.id)
        pages.append(
            {
                "id": m.id,
                "name": m.name,
                "section": m.primer_section,
                "papers": list(m.papers),
                "description": m.description,
                "threshold": m.threshold,
                "score": m.score,
                "probe": result.detectors[m.id]["probe"],
                "count": len(features),
                "features": [[f, result.scores[m.id][f]] for f in features[:limit]],
            }
        )
    return pages


# ---- summary table ---------------------------------------------------------------------------------


def summary_table(results: dict[str, CatalogueResult], catalogue: Catalogue | None = None) -> str:
    """Counts per mechanism (rows) and per SAE / layer (columns), as a plain-text table."""
    catalogue = catalogue or load_catalogue()
    cols = list(results)
    labels = [_column_label(name, r) for name, r in results.items()]
    header = ["mechanism", "threshold", *labels]
    rows = []
    for m in catalogue.mechanisms:
        counts = [str(results[c].detectors[m.id]["passed"]) if m.id in results[c].detectors else "-" for c in cols]
        rows.append([m.id, f"{m.threshold:g}", *counts])
    tagged = [str(len(r.tags)) for r in results.values()]
    total = [str(r.n_features) for r in results.values()]
    rows.append(["any mechanism", "", *tagged])
    rows.append(["unlabelled", "", *[str(int(t) - int(g)) for t, g in zip(total, tagged)]])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _column_label(name: str, r: CatalogueResult) -> str:
    hook = r.meta.get("hook") or name or "sae"
    return f"{hook} ({r.n_features})"
