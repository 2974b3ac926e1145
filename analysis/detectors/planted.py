"""Planted ground truth: synthetic features whose mechanism is known by construction, to measure each
detector's precision and recall (tests/test_mechanisms.py, scripts/validate_mechanisms.py).

A planted feature is a rule from token ids to activations (fires on token X, on the second half of
repeated sequences, on positions 1-4, ...) plus a decoder direction (the unembedding row of a token,
its negative, a null-space direction, or random). The bank mixes several positives per mechanism
with negatives (random, dense, many-token, bigram features) and is scored as one Subject.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from analysis.detectors import probes
from analysis.detectors.base import Subject
from analysis.detectors.output import null_space

Rule = Callable[[Tensor], Tensor]  # tokens [B, T] -> activations [B, T] (>= 0)


@dataclass
class Planted:
    name: str
    labels: frozenset[str]  # mechanisms the feature has by construction
    rule: Rule
    direction: Tensor | None = None  # [d]; None: a random direction


# ---- deterministic noise -------------------------------------------------------------------------


def _hash(tokens: Tensor, salt: int) -> Tensor:
    """Uniform [0, 1) per (token id, position, salt), the same for every call (a sine hash in float64)."""
    pos = torch.arange(tokens.shape[1], dtype=torch.float64)[None, :]
    x = tokens.double() * 12.9898 + pos * 78.233 + salt * 37.719
    y = torch.sin(x) * 43758.5453
    y = torch.sin((y - y.floor()) * 7919.0 + salt) * 24634.6345
    return (y - y.floor()).float()


def noisy(
    fire: Tensor, tokens: Tensor, salt: int, reliability: float = 1.0, background: float = 0.0, scale: float = 2.0
) -> Tensor:
    """Activations from a boolean firing pattern: amplitude scale * U(0.6, 1.4), each planned firing
    kept with probability `reliability`, plus spurious weak firings (0.2 * scale) at rate `background`."""
    u = _hash(tokens, salt)
    keep = fire & (_hash(tokens, salt + 1) < reliability)
    spurious = (~fire) & (_hash(tokens, salt + 2) < background)
    return scale * ((0.6 + 0.8 * u) * keep + 0.2 * u * spurious)


# ---- firing patterns -----------------------------------------------------------------------------


def is_token(ids: list[int]) -> Rule:
    return lambda t: torch.isin(t, torch.tensor(ids))


def after_token(ids: list[int]) -> Rule:
    def rule(t: Tensor) -> Tensor:
        out = torch.zeros_like(t, dtype=torch.bool)
        out[:, 1:] = torch.isin(t[:, :-1], torch.tensor(ids))
        return out

    return rule


def bigram(a: int, b: int) -> Rule:
    def rule(t: Tensor) -> Tensor:
        out = torch.zeros_like(t, dtype=torch.bool)
        out[:, 1:] = (t[:, :-1] == a) & (t[:, 1:] == b)
        return out

    return rule


def positions(lo: int, hi: int) -> Rule:
    def rule(t: Tensor) -> Tensor:
        pos = torch.arange(t.shape[1])[None, :].expand_as(t)
        return (pos >= lo) & (pos < hi)

    return rule


def seen_before(t: Tensor) -> Tensor:
    """The current token occurred earlier in the row."""
    same = t[:, :, None] == t[:, None, :]  # [B, i, j]
    earlier = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool).tril(-1)
    return (same & earlier).any(-1)


def bigram_seen_before(t: Tensor) -> Tensor:
    """The current token and its predecessor occurred together earlier (second half of a repeat)."""
    same = t[:, :, None] == t[:, None, :]
    prev_same = torch.zeros_like(same)
    prev_same[:, 1:, 1:] = same[:, :-1, :-1]
    earlier = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool).tril(-1)
    return (same & prev_same & earlier).any(-1)


def induction_target(b: int) -> Rule:
    """An earlier occurrence of the current token was followed by b (b is the induction prediction)."""

    def rule(t: Tensor) -> Tensor:
        same = t[:, :, None] == t[:, None, :]  # [B, i, j]
        followed = torch.zeros_like(t, dtype=torch.bool)
        followed[:, :-1] = t[:, 1:] == b  # position j is followed by b
        earlier = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool).tril(-2)  # j + 1 < i
        return (same & followed[:, None, :] & earlier).any(-1)

    return rule


def continuation(tokenizer) -> Rule:
    return lambda t: probes.word_roles(tokenizer, t)[1]


def script_tokens(tokenizer, script: str) -> Rule:
    """Fires on token ids that occur in the probe texts of `script` and in no other script's."""
    texts = probes.probe_texts()["scripts"]
    ids: dict[str, set[int]] = {}
    for name, langs in texts.items():
        ids[name] = {
            i
            for lang in langs.values()
            for text in lang
            for i in tokenizer(text, add_special_tokens=False)["input_ids"]
        }
    others = set().union(*(v for k, v in ids.items() if k != script))
    return is_token(sorted(ids[script] - others))


def first_position(t: Tensor) -> Tensor:
    out = torch.zeros_like(t, dtype=torch.bool)
    out[:, 0] = True
    return out


def random_positions(rate: float, salt: int) -> Rule:
    return lambda t: _hash(t, salt + 50) < rate


def vocab_subset(fraction: float, salt: int) -> Rule:
    return lambda t: ((t * 2654435761 + salt * 7919) % 1000) < fraction * 1000


# ---- the bank ------------------------------------------------------------------------------------


def _single(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not a single token for this tokenizer")
    return ids[0]


# (reliability, background rate) of the positives: clean to noisy; `hard` adds two noisier levels
LEVELS = [(1.0, 0.0), (0.85, 0.005), (0.7, 0.01)]
HARD_LEVELS = [(0.55, 0.02), (0.4, 0.04)]


def planted_bank(tokenizer, unembed: Tensor, centre: bool = False, seed: int = 0, hard: bool = False) -> list[Planted]:
    """Positives for every mechanism (several each, from clean to noisy) and negatives, by construction.

    `hard` adds noisier positives (firing on only 40-55% of their condition, 2-4% spurious firings,
    output directions only partly aligned with the token) and more negatives.
    """
    tok = lambda s: _single(tokenizer, s)
    gen = torch.Generator().manual_seed(seed)
    w = unembed.float()
    null = null_space(w, centre)
    levels = LEVELS + (HARD_LEVELS if hard else [])
    bank: list[Planted] = []

    def add(name, labels, rule, direction=None, level=(1.0, 0.0), scale=2.0):
        bank.append(Planted(name, frozenset(labels), _with_noise(rule, len(bank), *level, scale), direction))

    def row(text: str, sign: float = 1.0, align: float = 1.0) -> Tensor:
        """Unit direction with cosine `align` to the token's unembedding row (times sign)."""
        r = w[tok(text)] / w[tok(text)].norm()
        noise = torch.randn(w.shape[1], generator=gen)
        noise = noise - (noise @ r) * r
        d = align * r + (1 - align**2) ** 0.5 * noise / noise.norm()
        return sign * d

    cycle = lambda xs, i: xs[i % len(xs)]
    aligns = [1.0, 0.9, 0.8] + ([0.7, 0.6] if hard else [])
    for i, level in enumerate(levels):
        name = f"(r={level[0]:g}, bg={level[1]:g})"
        add(
            f"token '{cycle([' the', ' of', ' and', ' in', ' was'], i)}' {name}",
            {"token"},
            is_token([tok(cycle([" the", " of", " and", " in", " was"], i))]),
            level=level,
        )
        add(
            f"after '{cycle([' the', ' of', ' a', ' to', ' and'], i)}' {name}",
            {"previous_token"},
            after_token([tok(cycle([" the", " of", " a", " to", " and"], i))]),
            level=level,
        )
        lo, hi = cycle([(1, 5), (40, 64), (96, 10_000), (10, 20), (20, 40)], i)
        add(f"positions {lo}-{hi} {name}", {"positional"}, positions(lo, hi), level=level)
        add(f"continuation {name}", {"subword_merging"}, continuation(tokenizer), level=level)
        add(f"duplicate {name}", {"duplicate_token"}, seen_before, level=level)
        add(f"repeated sequence {name}", {"induction"}, bigram_seen_before, level=level)
        script = cycle(["cyrillic", "greek", "cjk", "arabic", "devanagari"], i)
        add(f"script {script} {name}", {"script"}, script_tokens(tokenizer, script), level=level)
        add(
            f"first position {name}", {"attention_sink"}, first_position, level=level, scale=cycle([40.0, 20.0, 5.0], i)
        )
    add("token ' was'/' is'", {"token"}, is_token([tok(" was"), tok(" is")]))
    for i, s in enumerate([" time", " house"]):
        add(
            f"induction target '{s}'",
            {"induction", "token_promoting"},
            induction_target(tok(s)),
            row(s),
            level=levels[i],
        )
    for i, (a, b) in enumerate([("1", "2"), ("2", "3"), ("4", "5")]):
        add(
            f"successor {a}->{b}",
            {"successor", "token", "token_promoting"},
            is_token([tok(a)]),
            row(b),
            level=levels[i],
        )

    # output side (firing at random, 3% of positions), directions more or less aligned with a token
    words = [" water", " king", " music", " said", " river"]
    for i, align in enumerate(aligns):
        add(
            f"promotes '{words[i]}' (cos {align:g})",
            {"token_promoting"},
            random_positions(0.03, len(bank)),
            row(words[i], 1.0, align),
        )
        add(
            f"suppresses '{words[i]}' (cos {align:g})",
            {"suppression"},
            random_positions(0.03, len(bank)),
            row(words[i], -1.0, align),
        )
        mix = torch.randn(len(null), generator=gen) @ null  # a random mix of the bottom singular directions
        noise = torch.randn(w.shape[1], generator=gen)
        d = align * mix / mix.norm() + (1 - align**2) ** 0.5 * noise / noise.norm()
        add(f"null-space direction (cos {align:g})", {"entropy"}, random_positions(0.03, len(bank)), d / d.norm())
    add("copy-suppresses ' the'", {"suppression", "token"}, is_token([tok(" the")]), row(" the", -1.0))

    # negatives: random, dense, many-token and bigram features with random directions
    for i in range(12 if hard else 6):
        add(f"random sparse #{i}", set(), random_positions(0.02 + 0.01 * (i % 6), 100 + i))
    for i in range(4 if hard else 2):
        add(f"dense #{i}", set(), random_positions(0.6, 200 + i))
    for i in range(6 if hard else 3):
        add(f"many tokens #{i}", set(), vocab_subset(0.03, 300 + i))
    add("bigram ' of'+' the'", set(), bigram(tok(" of"), tok(" the")))
    add("bigram ' in'+' the'", set(), bigram(tok(" in"), tok(" the")))
    if hard:  # structured confounders: a token feature that also fires on 10% of everything else
        add(
            "' the' + 10% elsewhere",
            {"token"},
            lambda t: torch.isin(t, torch.tensor([tok(" the")])) | (_hash(t, 77) < 0.1),
        )
        add(
            "late positions on ' the' only",
            set(),
            lambda t: positions(64, 10_000)(t) & torch.isin(t, torch.tensor([tok(" the")])),
        )
    return bank


def _with_noise(rule: Rule, salt: int, reliability: float, background: float, scale: float) -> Rule:
    return lambda t: noisy(rule(t), t, 1000 + 7 * salt, reliability, background, scale)


def planted_subject(
    bank: list[Planted],
    tokenizer,
    unembed: Tensor | None,
    text: Tensor | None,
    centre: bool = False,
    final_resid: Tensor | None = None,
    seed: int = 0,
) -> Subject:
    """One Subject whose feature f is bank[f]; random directions where a feature has none."""
    gen = torch.Generator().manual_seed(seed + 1)
    directions = None
    if unembed is not None:
        d = unembed.shape[1]
        rows = []
        for p in bank:
            r = p.direction if p.direction is not None else torch.randn(d, generator=gen)
            rows.append(r / r.norm())
        directions = torch.stack(rows)

    def encode(tokens: Tensor) -> Tensor:
        tokens = tokens.cpu()
        return torch.stack([p.rule(tokens).float() for p in bank], dim=-1)

    return Subject(
        encode=encode,
        n_features=len(bank),
        tokenizer=tokenizer,
        text=text,
        directions=directions,
        unembed=unembed,
        centre=centre,
        final_resid=final_resid,
        seed=seed,
    )


def precision_recall(bank: list[Planted], passed: dict[str, Tensor]) -> dict[str, dict]:
    """Per mechanism: true/false positives, false negatives, precision and recall against the labels."""
    out = {}
    for mech, p in passed.items():
        truth = torch.tensor([mech in b.labels for b in bank])
        tp = int((p & truth).sum())
        fp = int((p & ~truth).sum())
        fn = int((~p & truth).sum())
        out[mech] = {
            "positives": int(truth.sum()),
            "negatives": int((~truth).sum()),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "false_positives": [bank[i].name for i in (p & ~truth).nonzero().flatten().tolist()],
            "missed": [bank[i].name for i in (~p & truth).nonzero().flatten().tolist()],
        }
    return out
