"""`sae explain RUN [--features SPEC] [--explainer MODEL] [--scorer MODEL]`: a one-line explanation of each feature
from its `sae inspect` examples, scored by detection and fuzzing on held-out examples next to two baselines on the
same examples (another feature's explanation, and a list of the feature's top tokens); RUN/features/
explanations.jsonl, written feature by feature and resumed; then the dashboard is rebuilt to show them."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from activations.config import SAEModelConfig
from activations.errors import UserError
from activations.options import check_fields, option
from analysis.dashboard import read_feature_tags
from analysis.explain_examples import FeatureExamples, add_negatives, feature_examples, token_decoder
from analysis.explain_judge import LLMJudge
from analysis.explain_prompts import (
    DETECT_SYSTEM,
    EXPLAIN_SYSTEM,
    FUZZ_SYSTEM,
    MAX_WORDS,
    PROMPT_VERSION,
    clean_explanation,
    explainer_messages,
)
from analysis.explain_scoring import score_with_baselines, summarise, trivial_explanation
from analysis.explanations_store import FILE, append, done, read_records
from analysis.feature_stats import FeatureStats
from analysis.llm_backends import LocalBackend, backend_from_options
from analysis.logits import TopLogits
from sae.runs import open_sae

HELP = "explain features in words with an LLM and score the explanations against baselines"
DESCRIPTION = (
    "Show an explainer model each feature's marked examples and promoted tokens, ask for a one-line explanation, "
    "and score it with detection and fuzzing on held-out activating and non-activating examples, next to a "
    "shuffled explanation and a top-tokens one on the same examples. Any HF causal LM runs locally (default: the "
    "embedded SmolLM2-135M-Instruct, offline and weak); --api-base uses an OpenAI-compatible server."
)
SPEC_HELP = "all, ranges (0-99,120), top-density:N, random:N or tag:NAME"


@dataclass
class Config:
    """`sae explain`: which features, which explainer and scorer, and how many examples."""

    run: str = option(help="SAE folder that `sae inspect` has run on", positional=True)
    features: str = option("top-density:50", f"which features: {SPEC_HELP}")
    explainer: str = option("smollm2-135m", "explainer model: an HF id or folder, or the server's model name")
    scorer: str | None = option(None, "scorer model (default: the explainer)")
    api_base: str | None = option(None, "an OpenAI-compatible server (e.g. http://localhost:8000/v1) for both models")
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the server's API key (never stored)")
    concurrency: int = option(4, "parallel requests to the server", low=1)
    batch_size: int = option(8, "features explained per batch (and local model batch)", low=1)
    examples: int = option(12, "held-out activating examples scored per feature (spread over its range)", low=2)
    negatives: int = option(12, "non-activating examples scored per feature (half hard: holding its top tokens)", low=2)
    seed: int = option(0, "seed of the shuffled baseline, the fuzzing marks and the negatives")
    no_simulation: bool = option(False, "skip simulation (per-token predicted activations; local scorers only)")
    model: SAEModelConfig = field(default_factory=SAEModelConfig, metadata=dict(help="model"))

    def __post_init__(self) -> None:
        check_fields(self)


def select_features(spec: str, stats: FeatureStats, tags: dict[int, list], seed: int = 0) -> list[int]:
    """The features SPEC names, among those that fired in `sae inspect`'s text (others have no examples)."""
    alive = [i for i in range(stats.d_sae) if int(stats.count[i]) > 0]
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if spec == "all":
        return alive
    if kind in ("top-density", "random") and arg.isdigit() and int(arg) > 0:
        n = int(arg)
        if kind == "random":
            return sorted(random.Random(seed).sample(alive, min(n, len(alive))))
        return sorted(alive, key=lambda i: -float(stats.density[i]))[:n]
    if kind == "tag" and arg:
        names = {
            i: [t if isinstance(t, str) else f"{t.get('name', '')} {t.get('mechanism', '')}" for t in ts]
            for i, ts in tags.items()
        }
        chosen = [i for i in alive if any(arg.lower() in n.lower() for n in names.get(i, []))]
        if not chosen:
            raise UserError(f"no feature carries a tag matching {arg!r}; run 'sae catalogue RUN' or pick another tag.")
        return chosen
    if re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", spec):
        chosen = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            chosen |= set(range(int(lo), int(hi or lo) + 1))
        outside = sorted(i for i in chosen if i >= stats.d_sae)
        if outside:
            raise UserError(
                f"--features names feature {outside[0]}, but the SAE has {stats.d_sae} (0..{stats.d_sae - 1})."
            )
        return sorted(i for i in chosen if int(stats.count[i]) > 0)
    raise UserError(f"--features {spec!r} is not understood; give {SPEC_HELP}.")


def _plan(cfg: Config, todo: list[int], explainer, scorer, window: int) -> None:
    """What the run will do, printed before it starts: features, calls, and (over HTTP) tokens."""
    simulates = not cfg.no_simulation and isinstance(scorer, LocalBackend)
    questions = 3 * (2 + simulates) * (cfg.examples + cfg.negatives)  # detect, fuzz (and simulate) × 3 explanations
    line = (
        f"{len(todo)} features to explain with {explainer.name}, scored by {scorer.name}: "
        f"about {len(todo) * (1 + questions):,} model calls"
    )
    if cfg.api_base:
        text = 2 * window  # a window's tokens in the prompt, and about as many for its markup and spaces
        explain = explainer.count_tokens(EXPLAIN_SYSTEM) + 2 * cfg.examples * text + 32
        judge = scorer.count_tokens(DETECT_SYSTEM + FUZZ_SYSTEM) // 2 + text + 2 * MAX_WORDS + 8
        line += f", about {len(todo) * (explain + questions * judge):,} tokens over HTTP"
    if not simulates:
        why = "--no-simulation" if cfg.no_simulation else "a server gives no log-probs of a reply it did not write"
        line += f"; simulation skipped ({why})"
    print(line)
    if isinstance(explainer, LocalBackend) and explainer.name.endswith("smollm2-135m"):
        print(
            "note: the embedded 135M model runs offline but explains weakly; point --explainer (and --api-base) at a"
            " stronger model for explanations worth reading."
        )


def run(cfg: Config) -> Path:
    folder = Path(cfg.run)
    features_dir = folder / "features"
    stats = FeatureStats.load(features_dir)
    try:
        logits = TopLogits.load(features_dir / "logits.safetensors")
    except UserError:
        logits = None
    todo = select_features(cfg.features, stats, read_feature_tags(features_dir), cfg.seed)
    if not todo:
        raise UserError(f"--features {cfg.features!r} selects no feature that fired; pick others.")
    sae, lm = open_sae(folder, model=cfg.model.model, device=cfg.model.device)
    if cfg.api_base is None and cfg.explainer in (cfg.model.model, sae.cfg.model_name, lm.name):
        explainer = LocalBackend.from_loaded(lm, batch_size=cfg.batch_size)
    else:
        explainer = backend_from_options(
            cfg.explainer,
            cfg.api_base,
            cfg.api_key_env,
            cfg.model.device,
            concurrency=cfg.concurrency,
            batch_size=cfg.batch_size,
        )
    scorer = (
        explainer
        if cfg.scorer in (None, cfg.explainer)
        else backend_from_options(cfg.scorer, cfg.api_base, cfg.api_key_env, cfg.model.device)
    )
    finished = done(features_dir)
    todo = [f for f in todo if (f, explainer.name, scorer.name, PROMPT_VERSION) not in finished]
    _plan(cfg, todo, explainer, scorer, stats.cfg.left + stats.cfg.right)
    judge = LLMJudge(scorer, simulate=not cfg.no_simulation)
    decode = token_decoder(lm)
    started = time.time()
    for start in tqdm(range(0, len(todo), cfg.batch_size), desc="explain", unit="batch", disable=not todo):
        batch = [feature_examples(stats, f, decode) for f in todo[start : start + cfg.batch_size]]
        for item in batch:
            item.activating = spread(item.activating, cfg.examples)
        add_negatives(lm, sae, stats, batch, cfg.negatives, cfg.seed)
        t0 = time.time()
        promoted = [_promoted(logits, item.feature, decode) for item in batch]
        replies = explainer.chat([explainer_messages(i.shown, p) for i, p in zip(batch, promoted)], max_tokens=32)
        texts = [clean_explanation(r) for r in replies]
        for k, item in enumerate(batch):
            shuffled = _shuffled(texts, k, features_dir, item)
            scores = score_with_baselines(judge, texts[k], item.scoring, shuffled, item.top_tokens, cfg.seed)
            append(
                features_dir,
                _record(item, texts[k], shuffled, scores, explainer, scorer, (time.time() - t0) / len(batch)),
            )
    ours = (explainer.name, scorer.name, PROMPT_VERSION)
    records = [r for r in read_records(features_dir) if (r["explainer"], r["scorer"], r["prompt_version"]) == ours]
    _summary(records, time.time() - started, len(todo))
    return features_dir / FILE


def spread(items: list, n: int) -> list:
    """At most n of items, evenly spaced (the held-out examples run from the top down through the intervals)."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _promoted(logits: TopLogits | None, feature: int, decode) -> list[str]:
    return [] if logits is None else [decode(int(i)) for i in logits.promoted_ids[feature, :8]]


def _shuffled(texts: list[str], k: int, features_dir: Path, item: FeatureExamples) -> str:
    """Another feature's explanation (the next one in the batch, or the newest on file for a batch of one)."""
    if len(texts) > 1:
        return texts[(k + 1) % len(texts)]
    others = [r["explanation"] for r in read_records(features_dir) if r["feature"] != item.feature]
    return others[-1] if others else trivial_explanation(["(none)"])


def _record(item: FeatureExamples, text: str, shuffled: str, scores: dict, explainer, scorer, seconds: float) -> dict:
    return {
        "feature": item.feature,
        "explanation": text,
        "explainer": explainer.name,
        "scorer": scorer.name,
        "prompt_version": PROMPT_VERSION,
        "scores": scores,
        "baselines": {"shuffled": shuffled, "tokens": trivial_explanation(item.top_tokens)},
        "examples": {
            "shown": len(item.shown),
            "activating": len(item.activating),
            "negatives": len(item.negatives or []),
            "partial_negatives": sum(e.partial for e in item.negatives or []),
            "scored": [{"tokens": e.tokens, "acts": e.acts} for e in item.scoring],
        },
        "seconds": round(seconds, 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _summary(records: list[dict], seconds: float, new: int) -> None:
    """Score distributions with both baselines, and the gains, for this explainer and scorer."""
    if not records:
        return
    s = summarise([r["scores"] for r in records])
    print(f"{len(records)} features explained ({new} now, {seconds / max(new, 1):.1f} s each)")
    print(_format_summary(s))


def _format_summary(s: dict) -> str:
    """One line per score: the explanation's, the shuffled baseline's and the top-tokens baseline's median [q1, q3],
    then the mean gains and the share of features that gain."""
    lines = []
    for score, per in s["scores"].items():
        cells = []
        for variant in ("explanation", "shuffled", "tokens"):
            d = per.get(variant) or {}
            cells.append(
                f"{variant} "
                + ("n/a" if d.get("median") is None else f"{d['median']:.2f} [{d['q1']:.2f}, {d['q3']:.2f}]")
            )
        lines.append(f"  {score:<28} " + " | ".join(cells))
    for over, per in s["gain"].items():
        parts = [
            f"{k} {d['mean']:+.3f} ({100 * d['share_positive']:.0f} % of features gain)"
            for k, d in per.items()
            if d.get("mean") is not None
        ]
        lines.append(f"  gain {over.replace('_', ' ')}: " + (", ".join(parts) or "n/a"))
    return "\n".join(lines)


def follow_up(cfg: Config, result: Path | None) -> list[list[str]]:
    """Rebuild the run's dashboard so it shows the explanations."""
    if result is None or not (Path(cfg.run) / "dashboard" / "index.html").is_file():
        return []
    return [["inspect", cfg.run, "--dashboard-only", "--device", cfg.model.device]]
