"""Probe inputs the detectors generate: random-token pools, repeated and duplicated sequences,
token-in-random-context grids, word/ordinal/script texts. Each returns token ids plus the masks
that say which positions are the condition and which the matched control.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from activations.tokens import special_token_mask

PROBE_TEXTS = Path(__file__).with_name("probe_texts.yaml")


@functools.lru_cache(maxsize=1)
def probe_texts() -> dict:
    """The fixed probe material (scripts, words, ordinal families)."""
    return yaml.safe_load(PROBE_TEXTS.read_text(encoding="utf-8"))


def token_pool(subject) -> Tensor:
    """Ordinary token ids to draw random tokens from: those in the held-out text, else the vocabulary,
    without special tokens (so random sequences stay inside what the model usually reads)."""
    if "pool" in subject.cache:
        return subject.cache["pool"]
    if subject.text is not None:
        ids = subject.text.unique()
    else:
        ids = torch.arange(len(subject.tokenizer))
    ids = ids[~special_token_mask(ids, subject.tokenizer)]
    if len(ids) < 256:  # too little text to be random over: use the whole vocabulary
        ids = torch.arange(len(subject.tokenizer))
        ids = ids[~special_token_mask(ids, subject.tokenizer)]
    subject.cache["pool"] = ids
    return ids


def random_tokens(pool: Tensor, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return pool[torch.randint(len(pool), shape, generator=gen)]


def distinct_rows(pool: Tensor, rows: int, length: int, gen: torch.Generator) -> Tensor:
    """[rows, length] random tokens, distinct within each row (so repeats are only the planted ones)."""
    return torch.stack([pool[torch.randperm(len(pool), generator=gen)[:length]] for _ in range(rows)])


@dataclass
class Probe:
    """Token ids and named boolean position masks of the same shape."""

    tokens: Tensor
    masks: dict[str, Tensor]


def repeated_sequences(pool: Tensor, rows: int, half: int, gen: torch.Generator) -> Probe:
    """Olsson et al.'s test: random tokens t1..tn then t1..tn again, against the same first halves
    followed by fresh random tokens. Condition = second-half positions after the first (whose
    previous token also repeats); control = the same positions of the fresh sequences."""
    first = distinct_rows(pool, rows, 2 * half, gen)
    repeated = torch.cat([first[:, :half], first[:, :half]], dim=1)
    fresh = first  # its second half is other random tokens, distinct from the first half
    second = torch.zeros(rows, 2 * half, dtype=torch.bool)
    second[:, half + 1 :] = True
    return Probe(
        torch.cat([repeated, fresh]),
        {
            "condition": torch.cat([second, torch.zeros_like(second)]),
            "control": torch.cat([torch.zeros_like(second), second]),
        },
    )


def duplicate_sequences(pool: Tensor, rows: int, length: int, gen: torch.Generator, every: int = 4) -> Probe:
    """Isolated repeated tokens: in copies of random sequences, every `every`-th position (from 8 on)
    takes the token of a random earlier position at least 3 back, so the token repeats but its
    neighbours do not. Control = the same positions in the untouched sequences."""
    base = distinct_rows(pool, rows, length, gen)
    dup = base.clone()
    cond = torch.zeros(rows, length, dtype=torch.bool)
    for t in range(8, length, every):
        src = torch.randint(1, t - 2, (rows,), generator=gen)
        dup[:, t] = dup[torch.arange(rows), src]
        cond[:, t] = True
    return Probe(
        torch.cat([dup, base]),
        {
            "condition": torch.cat([cond, torch.zeros_like(cond)]),
            "control": torch.cat([torch.zeros_like(cond), cond]),
        },
    )


def interleaved(pool: Tensor, targets: Tensor, reps: int, gen: torch.Generator, per_row: int = 32) -> Probe:
    """Each target token placed after a random token and followed by one, `reps` times in shuffled
    rows: [r, x1, r, x2, r, ...]. Mask "target" marks target positions, "after" the position after."""
    rows, where, after = [], [], []
    for _ in range(reps):
        order = targets[torch.randperm(len(targets), generator=gen)]
        for start in range(0, len(order), per_row):
            chunk = order[start : start + per_row]
            row = random_tokens(pool, (2 * len(chunk) + 2,), gen)
            row[1:-1:2] = chunk
            m = torch.zeros(len(row), dtype=torch.bool)
            m[1:-1:2] = True
            rows.append(row)
            where.append(m)
            after.append(torch.roll(m, 1))
    length = max(len(r) for r in rows)
    pad = lambda xs, v: torch.stack([torch.cat([x, x.new_full((length - len(x),), v)]) for x in xs])
    tokens = pad([r for r in rows], int(pool[0]))
    return Probe(tokens, {"target": pad(where, False), "after": pad(after, False)})


def position_sweep(pool: Tensor, rows: int, length: int, gen: torch.Generator) -> Tensor:
    """Random-token sequences, for statistics by position."""
    return random_tokens(pool, (rows, length), gen)


def decoded_table(tokenizer, ids: Tensor) -> dict[int, str]:
    """Each token id decoded on its own (cached per tokenizer)."""
    cache = getattr(tokenizer, "_saelab_decoded", None)
    if cache is None:
        cache = {}
        try:
            tokenizer._saelab_decoded = cache
        except AttributeError:
            pass
    for i in ids.unique().tolist():
        if i not in cache:
            cache[i] = tokenizer.decode([i])
    return cache


def word_roles(tokenizer, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(word_start, continuation) masks for a [B, T] batch: a start begins with a space or newline
    followed by a letter; a continuation begins with a letter right after a token ending in a letter."""
    table = decoded_table(tokenizer, tokens)
    starts_letter = torch.tensor([bool(table[i][:1].isalpha()) for i in tokens.flatten().tolist()]).view_as(tokens)
    starts_word = torch.tensor(
        [len(table[i]) > 1 and table[i][0] in " \n" and table[i][1].isalpha() for i in tokens.flatten().tolist()]
    ).view_as(tokens)
    ends_letter = torch.tensor([bool(table[i][-1:].isalpha()) for i in tokens.flatten().tolist()]).view_as(tokens)
    continuation = torch.zeros_like(starts_letter)
    continuation[:, 1:] = starts_letter[:, 1:] & ends_letter[:, :-1]
    return starts_word, continuation


def word_sentences(tokenizer, gen: torch.Generator, rows: int = 12, words_per_row: int = 24) -> Probe:
    """Sentences of long (multi-token) and short words in random order, with word-role masks."""
    material = probe_texts()
    words = material["long_words"] + material["short_words"]
    rows_ids = []
    for _ in range(rows):
        order = torch.randperm(len(words), generator=gen)[:words_per_row].tolist()
        text = " " + " ".join(words[i] for i in order) + "."
        rows_ids.append(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]))
    length = min(len(r) for r in rows_ids)
    tokens = torch.stack([r[:length] for r in rows_ids])
    start, cont = word_roles(tokenizer, tokens)
    return Probe(tokens, {"continuation": cont, "start": start})


@dataclass
class OrdinalProbe:
    """Ordinal lists: tokens [B, T], and per position the family (-1: not an element), the element's
    index in its family and the family's token ids."""

    tokens: Tensor
    family: Tensor
    index: Tensor
    families: dict[str, list[int]]


def ordinal_lists(tokenizer, gen: torch.Generator, per_family: int = 4, length: int = 6) -> OrdinalProbe:
    """Runs of consecutive elements (e.g. ", Tuesday, Wednesday, Thursday") from random starting
    points, for every ordinal family whose elements are single tokens for this tokenizer."""
    families: dict[str, list[int]] = {}
    seqs = []
    for name, fam in probe_texts()["ordinal"].items():
        ids = [tokenizer(e, add_special_tokens=False)["input_ids"] for e in fam["elements"]]
        if any(len(i) != 1 for i in ids):
            continue
        ids = [i[0] for i in ids]
        sep = tokenizer(fam["separator"], add_special_tokens=False)["input_ids"]
        families[name] = ids
        fam_idx = len(families) - 1
        run = min(length, len(ids) - 1)
        for _ in range(per_family):
            first = int(torch.randint(0, len(ids) - run, (1,), generator=gen))
            toks, fams, idx = [], [], []
            for k in range(first, first + run):
                toks += [ids[k]] + sep
                fams += [fam_idx] + [-1] * len(sep)
                idx += [k] + [-1] * len(sep)
            seqs.append((toks, fams, idx))
    if not seqs:
        return OrdinalProbe(
            torch.zeros(0, 1, dtype=torch.long),
            torch.zeros(0, 1, dtype=torch.long),
            torch.zeros(0, 1, dtype=torch.long),
            {},
        )
    n = max(len(s[0]) for s in seqs) + 1
    pad_id = tokenizer(".", add_special_tokens=False)["input_ids"][0]
    tokens = torch.full((len(seqs), n), pad_id)
    family = torch.full((len(seqs), n), -1)
    index = torch.full((len(seqs), n), -1)
    for r, (t, f, i) in enumerate(seqs):  # position 0 is a '.' so no element sits at position 0
        tokens[r, 1 : 1 + len(t)] = torch.tensor(t)
        family[r, 1 : 1 + len(t)] = torch.tensor(f)
        index[r, 1 : 1 + len(t)] = torch.tensor(i)
    return OrdinalProbe(tokens, family, index, families)


@dataclass
class ScriptProbe:
    """Texts in several scripts/languages, one per row (padded), with per-row group labels."""

    tokens: Tensor
    valid: Tensor  # [B, T] real (non-pad) positions
    script: list[str]  # per row
    language: list[str]  # per row


def script_texts(tokenizer) -> ScriptProbe:
    rows, scripts, languages = [], [], []
    for script, langs in probe_texts()["scripts"].items():
        for lang, texts in langs.items():
            for text in texts:
                rows.append(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]))
                scripts.append(script)
                languages.append(lang)
    n = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), n, dtype=torch.long)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        tokens[i, len(r) :] = r[-1]
        valid[i, : len(r)] = True
    return ScriptProbe(tokens, valid, scripts, languages)
