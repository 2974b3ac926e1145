"""Explanation scoring (analysis.explain_scoring): the metrics against hand-worked values and brute force, fuzzing
marks, and planted features on WikiText windows whose right, shuffled, too broad and top-token explanations
RuleJudge scores as they deserve."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest

from activations import sources
from analysis.explain_scoring import (
    FUZZ_MAX_MARKS,
    Example,
    RuleJudge,
    auroc,
    balanced_accuracy,
    fuzz_marks,
    parse_token_explanation,
    pearson,
    score_explanation,
    score_with_baselines,
    summarise,
    trivial_explanation,
)

WIKITEXT = Path(sources.__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "test.txt"
needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_file(), reason="shared/data is not present on this machine")
WINDOW = 24
COMMON = ["his", "he", "it", "its", "their"]  # feature B's pronouns most frequent in WikiText
RARE = ["they", "him", "her", "them", "she"]  # and its rarer ones, which a top-5 token list misses


# --- metrics ---------------------------------------------------------------------------------------------------


def brute_auroc(labels: list[bool], scores: list[float]) -> float:
    """AUROC by definition: over every (positive, negative) pair, 1 for a win, 1/2 for a tie."""
    pos = [s for s, label in zip(scores, labels) if label]
    neg = [s for s, label in zip(scores, labels) if not label]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_perfect_reversed_tied_and_hand_worked():
    labels = [True, True, False, False]
    assert auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([True, False, True, False], [0.9, 0.8, 0.7, 0.1]) == 0.75  # 0.7 loses to 0.8 only
    assert auroc([True, True, False], [1.0, 0.5, 0.5]) == 0.75  # one win, one tie
    assert math.isnan(auroc([True, True], [0.1, 0.9]))
    assert math.isnan(auroc([], []))


def test_auroc_matches_pairwise_definition_with_many_ties():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(2, 40)
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
        assert auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores), abs=1e-12)


def test_balanced_accuracy():
    assert balanced_accuracy([True, True, True, False], [1, 1, 0, 0]) == pytest.approx((2 / 3 + 1) / 2)
    assert balanced_accuracy([True, False, False, False], [1, 1, 1, 1]) == 0.5  # always-yes: no skill, however unequal
    assert balanced_accuracy([True, False], [0.5, 0.49]) == 1.0  # at the threshold counts as yes
    assert balanced_accuracy([True, False], [0.7, 0.4], threshold=0.8) == 0.5
    assert math.isnan(balanced_accuracy([False, False], [0.0, 1.0]))
    with pytest.raises(ValueError):
        balanced_accuracy([True], [0.1, 0.2])


def test_pearson():
    xs = [1.0, 2.0, 3.0, 4.0, 7.0]
    assert pearson(xs, [2 * x + 1 for x in xs]) == pytest.approx(1.0)
    assert pearson(xs, [-x for x in xs]) == pytest.approx(-1.0)
    ys = [3.0, 1.0, 4.0, 1.0, 5.0]
    assert pearson(xs, ys) == pytest.approx(statistics.correlation(xs, ys))
    assert math.isnan(pearson(xs, [2.0] * 5))
    assert math.isnan(pearson([0.0] * 5, ys))
    assert math.isnan(pearson([1.0], [1.0]))


# --- fuzzing marks ------------------------------------------------------------------------------------------------


def toy_examples(rng: random.Random, n_active: int = 21, n_quiet: int = 9) -> list[Example]:
    """Random windows: activating ones fire on 1-8 random tokens with random strengths, quiet ones nowhere."""
    out = []
    for k in range(n_active + n_quiet):
        tokens = [f"w{k}_{i}" for i in range(12)]
        acts = [0.0] * 12
        if k < n_active:
            for i in rng.sample(range(12), rng.randint(1, 8)):
                acts[i] = round(rng.uniform(0.1, 3.0), 3)
        out.append(Example(tokens, acts))
    out.append(Example(["a", "b", "c"], [1.0, 2.0, 3.0]))  # fires on every token: cannot be marked wrongly
    return out


def test_fuzz_marks_are_deterministic_balanced_and_honest():
    examples = toy_examples(random.Random(0))
    marks, labels = fuzz_marks(examples, random.Random(7))
    assert (marks, labels) == fuzz_marks(examples, random.Random(7))
    assert (marks, labels) != fuzz_marks(examples, random.Random(8))
    active = [i for i, e in enumerate(examples) if e.max > 0]
    n_true = sum(labels[i] for i in active)
    assert n_true in (len(active) // 2, (len(active) + 1) // 2)
    assert labels[-1] is True  # the all-firing example keeps its true marks
    for example, mark, label in zip(examples, marks, labels):
        chosen = [i for i, m in enumerate(mark) if m]
        firing = [i for i, a in enumerate(example.acts) if a > 0]
        assert len(mark) == len(example.tokens) and chosen
        if example.max <= 0:
            assert label is False and len(chosen) <= FUZZ_MAX_MARKS
        elif label:  # the strongest firing tokens, at most FUZZ_MAX_MARKS
            strongest = sorted(firing, key=lambda i: -example.acts[i])[:FUZZ_MAX_MARKS]
            assert sorted(chosen) == sorted(strongest)
        else:  # as many tokens as the true marking (or all the quiet ones, if fewer), none of them firing
            quiet = len(example.tokens) - len(firing)
            assert len(chosen) == min(len(firing), FUZZ_MAX_MARKS, quiet) and not set(chosen) & set(firing)


# --- planted features on WikiText -----------------------------------------------------------------------------------


def windows() -> list[list[str]]:
    """WikiText-2 test words in consecutive windows of WINDOW, shuffled reproducibly."""
    words = WIKITEXT.read_text(encoding="utf-8").split()
    out = [words[i : i + WINDOW] for i in range(0, len(words) - WINDOW, WINDOW)]
    random.Random(0).shuffle(out)
    return out


def pick(pool: list[list[str]], want: dict[str, int], category) -> dict[str, list[list[str]]]:
    """The first windows of each category (category(window) -> name or None) until each has its count."""
    got: dict[str, list[list[str]]] = {name: [] for name in want}
    for w in pool:
        name = category(w)
        if name in got and len(got[name]) < want[name]:
            got[name].append(w)
    assert all(len(got[n]) == want[n] for n in want), {n: len(v) for n, v in got.items()}
    return got


def planted(tokens: list[str], fires: set[str], scale: float) -> Example:
    return Example(tokens, [scale if t in fires else 0.0 for t in tokens])


@pytest.fixture(scope="module")
def feature_the() -> list[Example]:
    """Feature A fires on "the" only (scale 1-2 per window). 20 activating windows, 20 not: 10 random, 10 hard
    (holding "The"); "of" occurs in exactly half of each group, so it says nothing about A."""

    def category(w):
        kind = "act" if "the" in w else "hard" if "The" in w else "easy"
        return f"{kind}_{'of' in w}"

    want = {f"{kind}_{of}": 10 if kind == "act" else 5 for kind in ("act", "hard", "easy") for of in (True, False)}
    got = pick(windows(), want, category)
    active = got["act_True"] + got["act_False"]
    quiet = got["hard_True"] + got["hard_False"] + got["easy_True"] + got["easy_False"]
    return [planted(w, {"the"}, 1 + i / 19) for i, w in enumerate(active)] + [planted(w, set(), 0) for w in quiet]


@needs_wikitext
def test_planted_windows_are_what_they_claim(feature_the):
    active = [e for e in feature_the if e.max > 0]
    assert len(active) == 20 and len(feature_the) == 40
    assert all(("the" in e.tokens) == (e.max > 0) for e in feature_the)
    assert sum("The" in e.tokens for e in feature_the if e.max == 0) == 10
    assert sum("of" in e.tokens for e in active) == 10 and sum("of" in e.tokens for e in feature_the) == 20


@needs_wikitext
def test_right_explanation_scores_high_and_shuffled_near_chance(feature_the):
    judge = RuleJudge()
    right = score_explanation(judge, 'the token "the"', feature_the)
    assert right["detection"]["auroc"] >= 0.95 and right["detection"]["balanced_accuracy"] >= 0.9
    assert right["detection"]["n"] == 40
    assert right["fuzzing"]["balanced_accuracy"] >= 0.9
    assert right["simulation"]["pearson"] >= 0.9 and right["simulation"]["n"] == 40 * WINDOW

    shuffled = score_explanation(judge, 'the token "of"', feature_the)
    assert 0.35 <= shuffled["detection"]["auroc"] <= 0.65
    assert 0.35 <= shuffled["detection"]["balanced_accuracy"] <= 0.65
    assert 0.35 <= shuffled["fuzzing"]["balanced_accuracy"] <= 0.65
    assert abs(shuffled["simulation"]["pearson"]) < 0.3


@needs_wikitext
def test_hard_negatives_penalise_a_too_broad_explanation(feature_the):
    """'the' or 'The' finds every activating window but also every hard negative: AUROC 1 * 1/2 + 1/2 * 1/2."""
    broad = score_explanation(RuleJudge(), 'the tokens "the", "The"', feature_the)
    assert broad["detection"]["auroc"] == pytest.approx(0.75)
    assert broad["detection"]["balanced_accuracy"] == pytest.approx(0.75)


@needs_wikitext
def test_gains_over_baselines(feature_the):
    judge = RuleJudge()
    top = [t for t, _ in Counter(t for e in feature_the for t, a in zip(e.tokens, e.acts) if a > 0).most_common()]
    assert top == ["the"]
    scores = score_with_baselines(judge, 'the token "the"', feature_the, 'the token "of"', top)
    assert scores["tokens"] == scores["explanation"]  # one-token feature: the top-token baseline is the explanation
    assert scores["gain"]["over_tokens"] == {"detection": 0.0, "fuzzing": 0.0, "simulation": 0.0}
    gain = scores["gain"]["over_shuffled"]
    assert gain["detection"] == pytest.approx(
        scores["explanation"]["detection"]["auroc"] - scores["shuffled"]["detection"]["auroc"]
    )
    assert gain["detection"] > 0.3 and gain["fuzzing"] > 0.3


@pytest.fixture(scope="module")
def feature_pronouns() -> list[Example]:
    """Feature B fires on ten lower-case pronouns: 12 activating windows hold a common one, 8 only rare ones; 20
    quiet windows hold none (10 of them a capitalised pronoun)."""
    pronouns = set(COMMON + RARE)

    def category(w):
        if any(t in COMMON for t in w):
            return "common"
        if any(t in RARE for t in w):
            return "rare"
        return "hard" if any(t in ("He", "It", "His", "They", "Its") for t in w) else "easy"

    got = pick(windows(), {"common": 12, "rare": 8, "hard": 10, "easy": 10}, category)
    active = got["common"] + got["rare"]
    return [planted(w, pronouns, 1.0) for w in active] + [planted(w, set(), 0) for w in got["hard"] + got["easy"]]


@needs_wikitext
def test_a_full_explanation_beats_the_top_token_baseline(feature_pronouns):
    fired = Counter(t for e in feature_pronouns for t, a in zip(e.tokens, e.acts) if a > 0)
    top = sorted(fired, key=lambda t: (-fired[t], t))
    missed = [e for e in feature_pronouns if e.max > 0 and not set(top[:5]) & set(e.tokens)]
    assert len(missed) >= 4  # the precondition: five top tokens do not cover the feature
    explanation = trivial_explanation(COMMON + RARE, n=10)
    scores = score_with_baselines(RuleJudge(), explanation, feature_pronouns, 'the token "of"', top)
    assert scores["explanation"]["detection"]["auroc"] == 1.0
    # the baseline finds the covered windows only: AUROC = 1/2 + covered share / 2
    covered = 1 - len(missed) / 20
    assert scores["tokens"]["detection"]["auroc"] == pytest.approx(0.5 + covered / 2)
    assert scores["gain"]["over_tokens"]["detection"] == pytest.approx(0.5 - covered / 2)
    assert scores["gain"]["over_tokens"]["detection"] > 0 and scores["gain"]["over_shuffled"]["detection"] > 0


def test_unparsable_explanation_carries_no_information():
    examples = toy_examples(random.Random(1))
    scores = score_explanation(RuleJudge(), "words about weather", examples)
    assert scores["detection"]["auroc"] == 0.5 and scores["detection"]["balanced_accuracy"] == 0.5
    assert scores["fuzzing"]["balanced_accuracy"] == 0.5
    assert math.isnan(scores["simulation"]["pearson"])


# --- explanations, judges and the summary ----------------------------------------------------------------------------


def test_trivial_explanation_round_trips_through_the_rule_judge():
    assert trivial_explanation(["cat", "dog", "a", "b", "c", "d"]) == 'the tokens "cat", "dog", "a", "b", "c"'
    assert trivial_explanation(["cat"]) == 'the token "cat"'
    odd = [" the", 'say "hi"', "\n", "ü"]
    assert parse_token_explanation(trivial_explanation(odd)) == {"the", 'say "hi"', "", "ü"}
    assert parse_token_explanation('the tokens "a" and "b"') == {"a", "b"}
    assert parse_token_explanation("the token cat") is None
    assert parse_token_explanation(trivial_explanation([])) is None


def test_rule_judge_reads_tokenizer_tokens_with_their_spaces():
    """Decoded BPE tokens carry a leading space (" the"); the judge matches them stripped but case-sensitive."""
    examples = [Example([" The", " cat", " sat"], [0.0] * 3), Example(["On", " the", " mat"], [0.0, 2.0, 0.0])]
    judge, explanation = RuleJudge(), trivial_explanation([" the"])
    assert judge.detect(explanation, examples) == [0.0, 1.0]
    assert judge.simulate(explanation, examples) == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    marks = [[True, False, False], [False, True, False]]
    assert judge.fuzz(explanation, examples, marks) == [0.0, 1.0]
    assert judge.fuzz(explanation, examples, [[False] * 3, [False, True, True]]) == [0.0, 0.0]  # none; one too many


def test_a_judge_answering_the_wrong_number_of_questions_is_refused():
    class Short(RuleJudge):
        def detect(self, explanation, examples):
            return super().detect(explanation, examples)[:-1]

    with pytest.raises(ValueError, match="answered"):
        score_explanation(Short(), 'the token "a"', toy_examples(random.Random(2)))


def json_round_trip(value):
    """What explanations.jsonl gives back: nan stored as null."""

    def finite(v):
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return json.loads(json.dumps(finite(value), allow_nan=False))


def test_summarise_distributions_and_gains():
    rng = random.Random(5)
    judge = RuleJudge()
    results = []
    for k in range(5):
        examples = toy_examples(rng, n_active=10, n_quiet=10)
        firing = sorted({t for e in examples for t, a in zip(e.tokens, e.acts) if a > 0})
        # explanation k names the first 2k + 2 firing tokens: scores rise with k
        results.append(score_with_baselines(judge, trivial_explanation(firing, 2 * k + 2), examples, "vague", firing))
    results.append(json_round_trip(score_with_baselines(judge, "vague", examples, "vague", firing)))  # nan -> null
    s = summarise(results)
    assert s["features"] == 6
    det = s["scores"]["detection_auroc"]
    values = sorted(r["explanation"]["detection"]["auroc"] for r in results)
    assert det["explanation"]["n"] == 6 and det["explanation"]["mean"] == pytest.approx(statistics.fmean(values))
    assert det["explanation"]["median"] == pytest.approx(statistics.median(values))
    assert det["explanation"]["q1"] <= det["explanation"]["median"] <= det["explanation"]["q3"]
    assert det["shuffled"]["mean"] == 0.5  # "vague" cannot be parsed: no information
    empty = {"mean": None, "median": None, "q1": None, "q3": None, "n": 0}
    assert s["scores"]["simulation_pearson"]["shuffled"] == empty
    gains = [r["gain"]["over_shuffled"]["detection"] for r in results]
    assert s["gain"]["over_shuffled"]["detection"]["mean"] == pytest.approx(statistics.fmean(gains))
    assert s["gain"]["over_shuffled"]["detection"]["share_positive"] == pytest.approx(sum(g > 0 for g in gains) / 6)
    assert summarise([])["scores"]["detection_auroc"]["explanation"]["n"] == 0
