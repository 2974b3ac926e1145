"""Scoring explanations of SAE features, independent of any language model: a Judge answers per-example questions,
this module turns its answers into detection, fuzzing and simulation scores, next to two baselines.

Detection (Paulo et al. 2024, EleutherAI delphi): given the explanation, does a text activate the feature? Labels
are example.max > 0; scored by AUROC (threshold-free) and balanced accuracy at 0.5. Fuzzing: given the explanation,
are the marked tokens the ones where the feature fires? Half the activating examples carry their true marks, half
as many wrong ones, non-activating ones random marks (`fuzz_marks`). Simulation (Bills et al. 2023): the Pearson
correlation of predicted and true activations over all tokens of all examples at once. Baselines on the same
examples and the same marks: another feature's explanation (shuffled) and the feature's top tokens listed.
Depends on nothing else in saelab; explain_judge, explain_examples and the command build on it.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from dataclasses import dataclass
from typing import Protocol

FUZZ_MAX_MARKS = 5  # a true marking keeps at most this many of an example's firing tokens, the strongest first
THRESHOLD = 0.5  # a judge's score at or above this counts as "yes" for balanced accuracy
VARIANTS = ("explanation", "shuffled", "tokens")  # the explanation, another feature's, the top-tokens one
SCORES = {  # summary name -> (scorer, metric) in score_explanation's result
    "detection_auroc": ("detection", "auroc"),
    "detection_balanced_accuracy": ("detection", "balanced_accuracy"),
    "fuzzing_balanced_accuracy": ("fuzzing", "balanced_accuracy"),
    "fuzzing_auroc": ("fuzzing", "auroc"),
    "simulation_pearson": ("simulation", "pearson"),
}
GAINS = {  # what a gain compares
    "detection": ("detection", "auroc"),
    "fuzzing": ("fuzzing", "balanced_accuracy"),
    "simulation": ("simulation", "pearson"),
}


@dataclass
class Example:
    """A text window and the feature's activation on each of its tokens (0 where it does not fire)."""

    tokens: list[str]
    acts: list[float]
    partial: bool = False  # a negative cut to the quiet stretch of a window (dense and positional features)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts):
            raise ValueError(f"Example has {len(self.tokens)} tokens but {len(self.acts)} activations")

    @property
    def max(self) -> float:
        """The strongest activation in the window (0.0 for an empty one)."""
        return max(self.acts, default=0.0)


class Judge(Protocol):
    """What answers the scorers' questions: an LLM (analysis.explain_judge) or RuleJudge in tests."""

    name: str

    def detect(self, explanation: str, examples: list[Example]) -> list[float]:
        """Per example, a score in [0, 1] (or any monotone score) that the text activates a feature so explained."""
        ...

    def fuzz(self, explanation: str, examples: list[Example], marked: list[list[bool]]) -> list[float]:
        """Per example with some tokens marked, a score that the marked tokens are the ones where the feature fires."""
        ...

    def simulate(self, explanation: str, examples: list[Example]) -> list[list[float]] | None:
        """Per example, predicted activation per token (None when the judge cannot)."""
        ...


# --- metrics ---------------------------------------------------------------------------------------------------


def _check_lengths(labels: list, scores: list) -> None:
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")


def balanced_accuracy(labels: list[bool], scores: list[float], threshold: float = THRESHOLD) -> float:
    """The mean of the true-positive and true-negative rates, predicting True where score >= threshold; robust to
    unequal classes (fuzzing has more False than True). nan when one class is missing."""
    _check_lengths(labels, scores)
    pos = [s >= threshold for label, s in zip(labels, scores) if label]
    neg = [s < threshold for label, s in zip(labels, scores) if not label]
    if not pos or not neg:
        return math.nan
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def auroc(labels: list[bool], scores: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (the Mann-Whitney U over
    mid-ranks, O(n log n)). nan when one class is missing."""
    _check_lengths(labels, scores)
    n_pos = sum(1 for label in labels if label)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mid = (i + j) / 2 + 1  # ranks are 1-based; tied scores share the mean of their ranks
        for k in range(i, j + 1):
            ranks[order[k]] = mid
        i = j + 1
    rank_sum = sum(r for r, label in zip(ranks, labels) if label)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pearson(xs: list[float], ys: list[float]) -> float:
    """The Pearson correlation of two equally long sequences; nan when either is constant (or shorter than 2)."""
    _check_lengths(xs, ys)
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    syy = math.fsum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return math.nan
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


# --- fuzzing marks -------------------------------------------------------------------------------------------------


def _true_marks(example: Example) -> list[int]:
    """The firing positions, the FUZZ_MAX_MARKS strongest (earlier first on ties), in text order."""
    firing = sorted((i for i, a in enumerate(example.acts) if a > 0), key=lambda i: -example.acts[i])
    return sorted(firing[:FUZZ_MAX_MARKS])


def _as_mask(positions: list[int], length: int) -> list[bool]:
    chosen = set(positions)
    return [i in chosen for i in range(length)]


def fuzz_marks(examples: list[Example], rng: random.Random) -> tuple[list[list[bool]], list[bool]]:
    """Marks per example and whether they are the true ones. Half the activating examples (a coin decides an odd
    one) get a wrong marking, as many non-firing tokens as their true marking would have; the rest their true
    marking. An example firing on every token cannot be marked wrongly and keeps its true marks. Non-activating
    examples get as many random marks as a random activating example's true marking (labelled False), so the
    number of marks gives nothing away. Deterministic given the rng's state."""
    activating = [i for i, e in enumerate(examples) if e.max > 0]
    can_be_wrong = [i for i in activating if any(a <= 0 for a in examples[i].acts)]
    n_wrong = len(activating) // 2 + (len(activating) % 2 == 1 and rng.random() < 0.5)
    wrong = set(rng.sample(can_be_wrong, min(n_wrong, len(can_be_wrong))))
    counts = [len(_true_marks(examples[i])) for i in activating] or [1]
    marks: list[list[bool]] = []
    labels: list[bool] = []
    for i, example in enumerate(examples):
        n = len(example.tokens)
        if example.max > 0:
            true = _true_marks(example)
            if i in wrong:
                quiet = [j for j, a in enumerate(example.acts) if a <= 0]
                marks.append(_as_mask(rng.sample(quiet, min(len(true), len(quiet))), n))
                labels.append(False)
            else:
                marks.append(_as_mask(true, n))
                labels.append(True)
        else:
            marks.append(_as_mask(rng.sample(range(n), min(rng.choice(counts), n)), n))
            labels.append(False)
    return marks, labels


# --- scores ------------------------------------------------------------------------------------------------------


def _answers(scores: list, examples: list[Example], judge: Judge, question: str) -> list[float]:
    if len(scores) != len(examples):
        raise ValueError(f"judge {judge.name!r} answered {len(scores)} {question} questions for {len(examples)}")
    return [float(s) for s in scores]


def score_explanation(judge: Judge, explanation: str, examples: list[Example], rng_seed: int = 0) -> dict:
    """Detection, fuzzing and (when the judge can) simulation scores of one explanation on one feature's held-out
    examples; a metric that is undefined (one class missing, constant predictions) is nan."""
    labels = [e.max > 0 for e in examples]
    detect = _answers(judge.detect(explanation, examples), examples, judge, "detection")
    marks, fuzz_labels = fuzz_marks(examples, random.Random(rng_seed))
    fuzz = _answers(judge.fuzz(explanation, examples, marks), examples, judge, "fuzzing")
    result: dict = {
        "detection": {
            "balanced_accuracy": balanced_accuracy(labels, detect),
            "auroc": auroc(labels, detect),
            "n": len(examples),
        },
        "fuzzing": {
            "balanced_accuracy": balanced_accuracy(fuzz_labels, fuzz),
            "auroc": auroc(fuzz_labels, fuzz),
            "n": len(examples),
        },
        "simulation": None,
    }
    predicted = judge.simulate(explanation, examples)
    if predicted is not None:
        if len(predicted) != len(examples) or any(len(p) != len(e.acts) for p, e in zip(predicted, examples)):
            raise ValueError(f"judge {judge.name!r} simulated activations of another shape than the examples'")
        xs = [float(p) for row in predicted for p in row]
        ys = [float(a) for e in examples for a in e.acts]
        result["simulation"] = {"pearson": pearson(xs, ys), "n": len(ys)}
    return result


def _quote(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)


def trivial_explanation(top_tokens: list[str], n: int = 5) -> str:
    """The top-tokens baseline: 'the token "cat"' or 'the tokens "cat", "dog", ...' (the first n, JSON-quoted so
    spaces and quotes inside a token survive); '(no top tokens)' when there are none, which says nothing."""
    if n < 1:
        raise ValueError(f"trivial_explanation needs n >= 1, got {n}")
    tokens = top_tokens[:n]
    if not tokens:
        return "(no top tokens)"
    if len(tokens) == 1:
        return f"the token {_quote(tokens[0])}"
    return "the tokens " + ", ".join(_quote(t) for t in tokens)


def _metric(scores: dict, scorer: str, metric: str) -> float:
    value = (scores.get(scorer) or {}).get(metric)
    return float(value) if isinstance(value, int | float) else math.nan


def score_with_baselines(
    judge: Judge,
    explanation: str,
    examples: list[Example],
    shuffled: str,
    top_tokens: list[str],
    rng_seed: int = 0,
) -> dict:
    """The explanation's scores next to the shuffled one's (another feature's explanation) and the top-tokens one's,
    on the same examples and fuzzing marks. gain[over_X] = {"detection": explanation's detection AUROC minus X's,
    "fuzzing": explanation's fuzzing balanced accuracy minus X's} (nan when either is undefined)."""
    out = {
        "explanation": score_explanation(judge, explanation, examples, rng_seed),
        "shuffled": score_explanation(judge, shuffled, examples, rng_seed),
        "tokens": score_explanation(judge, trivial_explanation(top_tokens), examples, rng_seed),
    }
    out["gain"] = {
        f"over_{variant}": {
            name: _metric(out["explanation"], *key) - _metric(out[variant], *key) for name, key in GAINS.items()
        }
        for variant in ("shuffled", "tokens")
    }
    return out


def _distribution(values: list[float]) -> dict:
    """mean, median, quartiles and n of the finite values (None for each statistic when there are none)."""
    values = sorted(v for v in values if math.isfinite(v))
    if not values:
        return {"mean": None, "median": None, "q1": None, "q3": None, "n": 0}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"mean": statistics.fmean(values), "median": median, "q1": q1, "q3": q3, "n": len(values)}


def summarise(results: list[dict]) -> dict:
    """Across features (score_with_baselines results, also as read back from JSON with None for nan): per score and
    variant the distribution, and per baseline the mean gain and the share of features where the explanation won.
    {"features": n, "scores": {score: {variant: distribution}}, "gain": {over_X: {detection|fuzzing: {...}}}}."""
    scores = {
        name: {v: _distribution([_metric(r.get(v) or {}, *key) for r in results]) for v in VARIANTS}
        for name, key in SCORES.items()
    }
    gain = {}
    for baseline in ("over_shuffled", "over_tokens"):
        gain[baseline] = {}
        for name in GAINS:
            values = [(r.get("gain") or {}).get(baseline, {}).get(name) for r in results]
            finite = [float(x) for x in values if isinstance(x, int | float) and math.isfinite(x)]
            gain[baseline][name] = {
                "mean": statistics.fmean(finite) if finite else None,
                "share_positive": sum(x > 0 for x in finite) / len(finite) if finite else None,
                "n": len(finite),
            }
    return {"features": len(results), "scores": scores, "gain": gain}


# --- a deterministic judge for tests ---------------------------------------------------------------------------------

_QUOTED = r'"(?:[^"\\]|\\.)*"'
_TOKEN_LIST = re.compile(rf"the tokens? ({_QUOTED}(?:,? (?:and )?{_QUOTED})*)")


def parse_token_explanation(explanation: str) -> set[str] | None:
    """The tokens of 'the token "X"' or 'the tokens "X", "Y"' (trivial_explanation's form), stripped of surrounding
    whitespace; None for any other explanation."""
    match = _TOKEN_LIST.fullmatch(explanation.strip())
    if match is None:
        return None
    try:
        return {json.loads(q).strip() for q in re.findall(_QUOTED, match.group(1))}
    except json.JSONDecodeError:
        return None


@dataclass
class RuleJudge:
    """Reads token-list explanations literally: a token matches when it equals a listed one after stripping
    whitespace (case-sensitive). An explanation it cannot parse gets 0.5 everywhere: no information."""

    name: str = "rule"

    def detect(self, explanation: str, examples: list[Example]) -> list[float]:
        """1.0 where any listed token occurs in the example, else 0.0."""
        tokens = parse_token_explanation(explanation)
        if tokens is None:
            return [0.5] * len(examples)
        return [float(any(t.strip() in tokens for t in e.tokens)) for e in examples]

    def fuzz(self, explanation: str, examples: list[Example], marked: list[list[bool]]) -> list[float]:
        """1.0 where some tokens are marked and every marked one is a listed token, else 0.0."""
        tokens = parse_token_explanation(explanation)
        if tokens is None:
            return [0.5] * len(examples)
        out = []
        for e, marks in zip(examples, marked):
            chosen = [t for t, m in zip(e.tokens, marks) if m]
            out.append(float(bool(chosen) and all(t.strip() in tokens for t in chosen)))
        return out

    def simulate(self, explanation: str, examples: list[Example]) -> list[list[float]] | None:
        """1.0 on listed tokens, 0.0 elsewhere."""
        tokens = parse_token_explanation(explanation)
        if tokens is None:
            return [[0.5] * len(e.tokens) for e in examples]
        return [[float(t.strip() in tokens) for t in e.tokens] for e in examples]
