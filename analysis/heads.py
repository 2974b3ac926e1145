"""Every attention head scored on the head types of Ferrando et al. 2024 (arXiv 2405.00208, section 5).

Each score is in [0, 1] and a head is tagged with a type when its score reaches the type's threshold:

    previous_token    mean attention from t to t-1 on random tokens                       (Voita et al. 2019)
    induction         mean attention from a repeated token to the token after its first occurrence (Olsson 2022)
    duplicate_token   mean attention from a repeated token to its first occurrence          (Wang et al. 2023)
    attention_sink    mean attention to the first position; its value norm is the evidence (Xiao et al. 2024)
    copying           OV: fraction of tokens whose own logit ranks top-k when attended to   (Elhage et al. 2021)
    copy_suppression  min(OV bottom-k rate, attention to a repeated token's earlier copies) (McDougall 2023)
    successor         OV: fraction of ordinal elements n whose n+1 ranks first in the family (Gould et al. 2023)

Patterns come from one eager forward on repeated random tokens (analysis.head_probes), OV scores from the
weights (analysis.head_ov). The result is cached per model (name, config and a weight fingerprint) as JSON
under the saelab cache, and reused unless `refresh=True`. Tables and heat-maps: analysis.head_report; the
causal check: analysis.head_ablation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from activations.files import atomic_write_text
from activations.models import LoadedModel, cache_dir, model_slug
from analysis.head_ov import copying_scores, successor_scores
from analysis.head_probes import (
    Patterns,
    RepeatProbe,
    attention_patterns,
    ordinal_families,
    prefix_ids,
    repeated_tokens,
    token_pool,
)
from analysis.head_weights import head_layout, head_out_weights, head_values
from analysis.logits import unembedding

SCHEMA = 1
THRESHOLDS = {
    "previous_token": 0.5,
    "induction": 0.4,
    "duplicate_token": 0.4,
    "attention_sink": 0.7,
    "copying": 0.5,
    "copy_suppression": 0.3,
    "successor": 0.5,
}
HEAD_TYPES = tuple(THRESHOLDS)
PROBES = {
    "previous_token": "attention from t to t-1, first half of repeated random tokens (t >= 2)",
    "induction": "attention from the second x_j to x_{j+1} after its first occurrence, repeated random tokens",
    "duplicate_token": "attention from the second x_j to its first occurrence, repeated random tokens",
    "attention_sink": "attention to position 0 from positions >= 2, repeated random tokens; value norms as evidence",
    "copying": "OV through final-norm gain and W_U: own logit in the top-k of the sampled candidates",
    "copy_suppression": "min(own logit in the bottom-k of the sampled candidates, induction + duplicate attention)",
    "successor": "OV on ordinal families: successor's logit above every other member's",
}


@dataclass(frozen=True)
class ProbeSettings:
    """Probe sizes; part of the cache key."""

    rows: int = 8  # repeated random sequences
    half: int = 32  # tokens per half
    ov_tokens: int = 512  # sampled sources = candidates for the OV ranks
    top_k: int = 5  # rank an own logit must reach among the candidates
    seed: int = 0


@dataclass
class HeadCatalogue:
    """Per head type a [n_layers, n_heads] score in [0, 1], its threshold, and per-head evidence."""

    model: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    scores: dict[str, Tensor]  # type -> [L, H]
    thresholds: dict[str, float]
    evidence: dict[str, dict[str, Tensor]]  # type -> name -> [L, H]
    settings: dict

    def tagged(self, kind: str) -> list[tuple[int, int]]:
        """(layer, head) of the heads tagged `kind`, highest score first."""
        return [
            (layer, head)
            for layer, head, s in self.top(kind, self.n_layers * self.n_heads)
            if s >= self.thresholds[kind]
        ]

    def top(self, kind: str, n: int) -> list[tuple[int, int, float]]:
        """The n highest-scoring heads for `kind` as (layer, head, score)."""
        flat = self.scores[kind].flatten()
        order = flat.argsort(descending=True, stable=True)[:n]
        return [(int(i) // self.n_heads, int(i) % self.n_heads, float(flat[i])) for i in order]

    def rows(self) -> list[dict]:
        """One dict per head: layer, head and its score for every type."""
        return [
            {"layer": layer, "head": head, **{k: round(float(v[layer, head]), 4) for k, v in self.scores.items()}}
            for layer in range(self.n_layers)
            for head in range(self.n_heads)
        ]

    def to_json(self) -> str:
        data = {
            "schema": SCHEMA,
            "model": self.model,
            "layout": {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads},
            "settings": self.settings,
            "thresholds": self.thresholds,
            "probes": {k: PROBES.get(k, "") for k in self.scores},
            "scores": {k: _rounded(v) for k, v in self.scores.items()},
            "evidence": {k: {n: _rounded(v) for n, v in ev.items()} for k, ev in self.evidence.items()},
            "tagged": {
                k: [[a, b, round(float(self.scores[k][a, b]), 4)] for a, b in self.tagged(k)] for k in self.scores
            },
        }
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> HeadCatalogue:
        data = json.loads(text)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        return cls(
            model=data["model"],
            **data["layout"],
            scores={k: as_tensor(v) for k, v in data["scores"].items()},
            thresholds=data["thresholds"],
            evidence={k: {n: as_tensor(v) for n, v in ev.items()} for k, ev in data["evidence"].items()},
            settings=data["settings"],
        )


def _rounded(t: Tensor) -> list:
    return [[round(float(x), 5) for x in row] for row in t.tolist()]


def pattern_scores(p: Patterns, probe: RepeatProbe) -> dict[str, Tensor]:
    """[L, H] attention scores of every head from patterns [L, B, H, T, T] on a repeat probe."""
    P, n = probe.start, probe.half
    first = torch.arange(P + 2, P + n)  # first-half queries whose previous token is random text too
    j = torch.arange(1, n)
    second = P + n + j  # the second x_j; its first occurrence sits at P + j
    queries = torch.arange(P + 2, P + 2 * n)
    A = p.attn
    return {
        "previous_token": A[..., first, first - 1].mean((1, 3)),
        "induction": A[..., second, P + j + 1].mean((1, 3)),
        "duplicate_token": A[..., second, P + j].mean((1, 3)),
        "attention_sink": A[..., queries, 0].mean((1, 3)),
    }


def value_norms(lm: LoadedModel, p: Patterns) -> tuple[Tensor, Tensor]:
    """([L, H] mean norm of each head's value vector at position 0, [L, H] the same at later positions)."""
    first, later = [], []
    for layer, x in enumerate(p.inputs):
        v = head_values(lm.model, layer, x.to(lm.device, next(lm.model.parameters()).dtype)).float()
        norms = v.norm(dim=-1)  # [B, T, H]
        first.append(norms[:, 0].mean(0).cpu())
        later.append(norms[:, 1:].mean((0, 1)).cpu())
    return torch.stack(first), torch.stack(later)


def classify_heads(
    lm: LoadedModel, settings: ProbeSettings | None = None, refresh: bool = False, cache: bool = True
) -> HeadCatalogue:
    """Every head's scores on every type, from the cache when it holds this model and settings."""
    settings = settings or ProbeSettings()
    path = cache_path(lm, settings)
    if cache and not refresh and path.is_file():
        try:
            return HeadCatalogue.from_json(path.read_text())
        except (ValueError, KeyError, TypeError):  # a damaged cache file is recomputed and replaced
            pass
    result = compute_catalogue(lm, settings)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, result.to_json())
    return result


@torch.inference_mode()
def compute_catalogue(lm: LoadedModel, settings: ProbeSettings) -> HeadCatalogue:
    """Run the probes and read the weights (no cache)."""
    lay = head_layout(lm.model)
    gen = torch.Generator().manual_seed(settings.seed)
    pool = token_pool(lm.tokenizer, lm.model.config.vocab_size)
    probe = repeated_tokens(pool, prefix_ids(lm.tokenizer), settings.rows, settings.half, gen)
    patterns = attention_patterns(lm.model, probe.tokens)
    scores = pattern_scores(patterns, probe)
    first_norm, later_norm = value_norms(lm, patterns)
    del patterns
    unembed = unembedding(lm)
    sample = pool[torch.randperm(len(pool), generator=gen)[: settings.ov_tokens]]
    copying, suppression = copying_scores(lm.model, unembed, sample, settings.top_k)
    families = ordinal_families(lm.tokenizer)
    earlier = (scores["induction"] + scores["duplicate_token"]).clamp(0, 1)
    scores["copying"] = copying
    scores["copy_suppression"] = torch.minimum(suppression, earlier)
    scores["successor"] = successor_scores(lm.model, unembed, families)
    evidence = {
        "attention_sink": {"first_value_norm": first_norm, "later_value_norm": later_norm},
        "induction": {"copying": copying},
        "copy_suppression": {"negative_copying": suppression, "earlier_copy_attention": earlier},
    }
    return HeadCatalogue(
        model=lm.name,
        n_layers=lay.n_layers,
        n_heads=lay.n_heads,
        n_kv_heads=lay.n_kv_heads,
        scores={k: scores[k].float().clamp(0, 1).cpu() for k in HEAD_TYPES},
        thresholds=dict(THRESHOLDS),
        evidence=evidence,
        settings={**dataclasses.asdict(settings), "half_used": probe.half, "ordinal_families": sorted(families)},
    )


def cache_path(lm: LoadedModel, settings: ProbeSettings) -> Path:
    """cache_dir()/heads/<model>-<hash of config, settings and a weight fingerprint>.json"""
    key = json.dumps(
        [SCHEMA, lm.model.config.to_json_string(use_diff=False), dataclasses.asdict(settings), _fingerprint(lm)]
    )
    slug = model_slug(lm.name)
    return cache_dir() / "heads" / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


@torch.inference_mode()
def _fingerprint(lm: LoadedModel) -> list[float]:
    """Cheap sums of the embedding and of every head's W_O, so a retrained model under the same name misses."""
    lay = head_layout(lm.model)
    sums = [float(lm.model.get_input_embeddings().weight.float().sum())]
    return sums + [round(float(head_out_weights(lm.model, i).float().abs().sum()), 3) for i in range(lay.n_layers)]
