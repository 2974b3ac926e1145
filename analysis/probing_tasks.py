"""Binary probing tasks for sparse probing, built from offline text: activations and SAE latents per example.

Sequence tasks mean-pool over a context (as SAEBench does: the model's activations, and the SAE's latents of each
token, averaged over the context's positions except the first and special tokens):
- shakespeare_vs_wikitext: contexts of `sequence_tokens` tokens from tinyshakespeare (1) or wikitext-2 (0); train
  from wikitext's validation and tinyshakespeare's train split, test from both test splits (no shared text).
- latin_script, english_language: the catalogue's probe texts (analysis/detectors/probe_texts.yaml), one text an
  example: latin script (1) against the other natural-language scripts (0), English (1) against the other
  latin-script languages (0). The file holds 3 texts per language (12 latin, 18 other, 3 English, 9 other), so
  these are left out, with the reason, unless the requested sizes fit (a few examples per class).
Token tasks take the activation at one position of wikitext-2 contexts packed like the SAE's training contexts
(its context size and BOS rule; train from the validation split, test from the test split). Labels are lexical,
read from what the model sees in the context (`token_labels`):
- sentence_start: a word whose previous non-space token ends in . ! ? (1) against other words (0); words after a
  line break (paragraph and heading starts) are left out. The rule is lexical: "Mr. Smith" counts as a start.
- inside_parentheses: an ordinary token inside ( ... ) (1) against one outside (0); nesting counts, a stray ")"
  does nothing, depth restarts at special tokens; tokens holding a parenthesis are left out.
- digit: a token of decimal digits only (1) against a token with no digit (0).
- capitalised_word: a word starting with an upper-case letter (1) against one starting with a lower-case one (0).
A "word" is a token starting with a letter after a space or line break (or after a token ending in whitespace).
Every task is class-balanced (half of each split positive) and drawn with a generator seeded from (seed, task,
split), so the same seed gives the same examples, whatever other tasks are asked for.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from activations.models import LoadedModel
from activations.sources import Document, open_text_source
from activations.tokens import pack_contexts, special_token_mask
from analysis.detectors.probes import decoded_table, probe_texts
from sae.base import SAE

POSITIVE, NEGATIVE, SKIP = 1, 0, -1
DIGITS = set("0123456789")
SENTENCE_ENDS = (".", "!", "?")
POOL_CAP = 50  # a sequence task samples its contexts from at most this many times the number it needs


@dataclass
class ProbeSplit:
    """One split of a task: raw model activations, SAE latents and 0/1 labels of the same examples."""

    acts: Tensor  # [n, d_model] float32, raw (unnormalised); mean-pooled for sequence tasks
    latents: Tensor  # [n, d_sae] float32
    labels: Tensor  # [n] long, 1 = the task's positive class


@dataclass
class ProbeTask:
    """A binary task ready to probe: name, kind ("sequence" or "token"), what its classes are, train and test."""

    name: str
    kind: str
    description: str
    train: ProbeSplit
    test: ProbeSplit


@dataclass(frozen=True)
class TaskSpec:
    """What kind a task is and, in a line, what its two classes are."""

    kind: str
    description: str


TASKS: dict[str, TaskSpec] = {
    "shakespeare_vs_wikitext": TaskSpec("sequence", "tinyshakespeare (1) vs wikitext-2 (0) contexts, mean-pooled"),
    "latin_script": TaskSpec("sequence", "latin-script probe texts (1) vs other scripts (0), mean-pooled"),
    "english_language": TaskSpec("sequence", "English probe texts (1) vs French/German/Spanish (0), mean-pooled"),
    "sentence_start": TaskSpec("token", "a word right after . ! ? (1) vs another word (0), wikitext-2"),
    "inside_parentheses": TaskSpec("token", "a token inside parentheses (1) vs outside (0), wikitext-2"),
    "digit": TaskSpec("token", "a digits-only token (1) vs a token without digits (0), wikitext-2"),
    "capitalised_word": TaskSpec("token", "a word starting upper-case (1) vs lower-case (0), wikitext-2"),
}
TOKEN_TASKS = tuple(name for name, spec in TASKS.items() if spec.kind == "token")


def check_task_names(names: Sequence[str]) -> None:
    """UserError for an unknown or repeated task name, listing the valid ones."""
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names or len(set(names)) != len(names):
        what = f"unknown probing task(s) {', '.join(unknown)}" if unknown else "a probing task is repeated or none is"
        raise UserError(f"{what}; choose from {', '.join(TASKS)} (comma-separated, each once).")


# ---- token labels ----------------------------------------------------------------------------


def _is_word(pieces: Sequence[str], ordinary: Sequence[bool], i: int) -> bool:
    """Whether token i starts a word: a letter after a leading space/newline, or after a whitespace-ended token."""
    p = pieces[i]
    if p[:1] in (" ", "\n"):
        return p.lstrip(" \n")[:1].isalpha()
    return p[:1].isalpha() and i > 0 and (pieces[i - 1][-1:].isspace() or not ordinary[i - 1])


def _sentence_start(pieces: Sequence[str], ordinary: Sequence[bool]) -> list[int]:
    """Words after a sentence end (1) or after another non-space token of the same line (0)."""
    out = [SKIP] * len(pieces)
    for i in range(1, len(pieces)):
        if not (ordinary[i] and _is_word(pieces, ordinary, i)) or "\n" in pieces[i]:
            continue
        j = i - 1
        while j >= 0 and ordinary[j] and not pieces[j].strip():
            j -= 1
        if j < 0 or not ordinary[j] or any("\n" in pieces[m] for m in range(j + 1, i)):
            continue
        out[i] = POSITIVE if pieces[j].strip().endswith(SENTENCE_ENDS) else NEGATIVE
    return out


def _inside_parentheses(pieces: Sequence[str], ordinary: Sequence[bool]) -> list[int]:
    """Ordinary tokens at parenthesis depth > 0 (1) or 0 (0), the depth counted from the context's start."""
    out, depth = [SKIP] * len(pieces), 0
    for i, p in enumerate(pieces):
        if not ordinary[i]:
            depth = 0
            continue
        if "(" in p or ")" in p:
            for c in p:
                depth = depth + 1 if c == "(" else max(depth - 1, 0) if c == ")" else depth
            continue
        out[i] = POSITIVE if depth > 0 else NEGATIVE
    return out


def _digit(pieces: Sequence[str], ordinary: Sequence[bool]) -> list[int]:
    """Tokens of ASCII digits only (1), tokens without a digit (0); mixed ones such as "1st" are left out."""
    out = []
    for p, o in zip(pieces, ordinary):
        core = p.strip()
        if not o:
            out.append(SKIP)
        elif core and set(core) <= DIGITS:
            out.append(POSITIVE)
        else:
            out.append(SKIP if DIGITS & set(p) else NEGATIVE)
    return out


def _capitalised_word(pieces: Sequence[str], ordinary: Sequence[bool]) -> list[int]:
    """Words whose first letter is upper-case (1) or lower-case (0); caseless scripts are left out."""
    out = [SKIP] * len(pieces)
    for i, p in enumerate(pieces):
        if ordinary[i] and _is_word(pieces, ordinary, i):
            first = p.lstrip(" \n")[0]
            out[i] = POSITIVE if first.isupper() else NEGATIVE if first.islower() else SKIP
    return out


LABELLERS: dict[str, Callable[[Sequence[str], Sequence[bool]], list[int]]] = {
    "sentence_start": _sentence_start,
    "inside_parentheses": _inside_parentheses,
    "digit": _digit,
    "capitalised_word": _capitalised_word,
}


def token_labels(tokens: Tensor, tokenizer, names: Sequence[str]) -> dict[str, Tensor]:
    """Per token task, labels [B, T] int8 (1 positive, 0 negative, -1 left out) of contexts `tokens` [B, T];
    each context's first position is always left out (the SAE never trains on it)."""
    table = decoded_table(tokenizer, tokens)
    ordinary = ~special_token_mask(tokens, tokenizer)
    out = {name: torch.full(tokens.shape, SKIP, dtype=torch.int8) for name in names}
    for r in range(len(tokens)):
        pieces = [table[i] for i in tokens[r].tolist()]
        keep = ordinary[r].tolist()
        for name in names:
            row = torch.tensor(LABELLERS[name](pieces, keep), dtype=torch.int8)
            row[0] = SKIP
            out[name][r] = row
    return out


# ---- sampling --------------------------------------------------------------------------------


def task_generator(seed: int, name: str, split: str) -> torch.Generator:
    """A generator for one task's split, fixed by the seed alone (independent of the other tasks asked for)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}/{split}".encode()))


def balanced_positions(labels: Tensor, per_class: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """`per_class` random positions labelled 1 and as many labelled 0, shuffled: (positions [2n, 2], labels [2n])."""
    picked = []
    for value in (POSITIVE, NEGATIVE):
        where = (labels == value).nonzero()
        if len(where) < per_class:
            raise ValueError(f"only {len(where)} positions labelled {value}, {per_class} needed")
        picked.append(where[torch.randperm(len(where), generator=gen)[:per_class]])
    y = torch.cat([torch.ones(per_class, dtype=torch.long), torch.zeros(per_class, dtype=torch.long)])
    order = torch.randperm(2 * per_class, generator=gen)
    return torch.cat(picked)[order], y[order]


# ---- activations -----------------------------------------------------------------------------


def _forward(sae: SAE, lm: LoadedModel, tokens: Tensor) -> Tensor:
    """Raw float32 activations [B, T, d_model] at the SAE's input hook (the forward stops after it)."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    return run_with_cache(lm.model, tokens.to(lm.device), [hp])[hp.name].float()


@torch.inference_mode()
def pooled_examples(
    sae: SAE, lm: LoadedModel, rows: Sequence[Tensor], batch_size: int, desc: str
) -> tuple[Tensor, Tensor]:
    """(mean activations [n, d_model], mean latents [n, d_sae]) of token sequences over their positions except the
    first and special tokens; rows of different lengths are right-padded (causal: padding changes nothing before)."""
    acts, latents = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        chunk = rows[start : start + batch_size]
        length = max(len(r) for r in chunk)
        tokens = torch.stack([torch.cat([r, r[-1:].expand(length - len(r))]) for r in chunk])
        keep = ~special_token_mask(tokens, lm.tokenizer)
        keep[:, 0] = False
        for i, r in enumerate(chunk):
            keep[i, len(r) :] = False
        if not keep.any(1).all():
            raise UserError(f"{desc}: an example has no position to pool over; use --probe-sequence-tokens 2 or more.")
        x = _forward(sae, lm, tokens)
        weights = keep.to(x.device, torch.float32) / keep.sum(1, keepdim=True).to(x.device)
        acts.append(torch.einsum("bt,btd->bd", weights, x).cpu())
        f = sae.encode_raw(x.to(sae.device)).float()  # [B, T, d_sae]
        latents.append(torch.einsum("bt,btf->bf", weights.to(f.device), f).cpu())
    return torch.cat(acts), torch.cat(latents)


@torch.inference_mode()
def position_examples(
    sae: SAE, lm: LoadedModel, contexts: Tensor, positions: Tensor, batch_size: int, desc: str
) -> tuple[Tensor, Tensor]:
    """(activations [n, d_model], latents [n, d_sae]) at positions [n, 2] = (context, token) of `contexts`; only
    contexts holding a position run, each batch up to its last needed token."""
    rows = positions[:, 0].unique()
    acts = torch.zeros(len(positions), lm.d_model)
    latents = torch.zeros(len(positions), sae.cfg.d_sae)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        chunk = rows[start : start + batch_size]
        mine = torch.isin(positions[:, 0], chunk).nonzero().squeeze(1)
        length = int(positions[mine, 1].max()) + 1
        x = _forward(sae, lm, contexts[chunk, :length])
        local = torch.searchsorted(chunk, positions[mine, 0])
        picked = x[local.to(x.device), positions[mine, 1].to(x.device)]
        acts[mine] = picked.cpu()
        latents[mine] = sae.encode_raw(picked.to(sae.device)).float().cpu()
    return acts, latents


# ---- the tasks -------------------------------------------------------------------------------


def _contexts(docs: Iterable[Document], tokenizer, size: int, prepend_bos: bool | None) -> Iterator[Tensor]:
    """The token ids [size] of each packed context of `docs`, as the SAE's training store packs them."""
    return (c.tokens for c in pack_contexts(docs, tokenizer, size, prepend_bos))


def _wikitext(split: str) -> Iterable[Document]:
    """wikitext-2 for a probe split: train reads its validation split (test.txt stays for the test split)."""
    return open_text_source("wikitext-2", split="validation" if split == "train" else "test")


def _shakespeare(split: str) -> Iterable[Document]:
    """tinyshakespeare for a probe split: its first 90% of speeches for train, the rest for test."""
    return open_text_source("tinyshakespeare", split=split)


def _shakespeare_split(
    sae: SAE, lm: LoadedModel, split: str, per_class: int, sequence_tokens: int, batch_size: int, seed: int
) -> ProbeSplit:
    """One split of shakespeare_vs_wikitext: `per_class` random contexts of each corpus (from the first ones)."""
    rows: list[Tensor] = []
    for label, source in enumerate((_wikitext(split), _shakespeare(split))):
        pool = []
        for tokens in _contexts(source, lm.tokenizer, sequence_tokens, sae.cfg.prepend_bos):
            pool.append(tokens)
            if len(pool) >= POOL_CAP * per_class:
                break
        if len(pool) < per_class:
            raise UserError(
                f"shakespeare_vs_wikitext: {source.describe()} gives {len(pool)} contexts of {sequence_tokens} "
                f"tokens, {per_class} needed; ask for fewer examples or shorter --probe-sequence-tokens."
            )
        gen = task_generator(seed, "shakespeare_vs_wikitext", f"{split}/class{label}")
        rows += [pool[i] for i in torch.randperm(len(pool), generator=gen)[:per_class].tolist()]
    labels = torch.cat([torch.zeros(per_class, dtype=torch.long), torch.ones(per_class, dtype=torch.long)])
    acts, latents = pooled_examples(sae, lm, rows, batch_size, f"probe shakespeare_vs_wikitext {split}")
    return ProbeSplit(acts, latents, labels)


def probe_text_classes(name: str) -> tuple[list[str], list[str]]:
    """(positive texts, negative texts) of a probe-text task, from analysis/detectors/probe_texts.yaml."""
    scripts = probe_texts()["scripts"]
    if name == "latin_script":
        pos = [t for texts in scripts["latin"].values() for t in texts]
        other = [langs for script, langs in scripts.items() if script not in ("latin", "code")]
        neg = [t for langs in other for texts in langs.values() for t in texts]
    else:
        pos = list(scripts["latin"]["english"])
        neg = [t for lang, texts in scripts["latin"].items() if lang != "english" for t in texts]
    return pos, neg


def probe_text_shortfall(name: str, per_class_train: int, per_class_test: int) -> str | None:
    """Why a probe-text task cannot be built at these sizes (too few texts in a class), or None when it can."""
    pos, neg = probe_text_classes(name)
    need = per_class_train + per_class_test
    if min(len(pos), len(neg)) >= need:
        return None
    return (
        f"probe_texts.yaml holds {len(pos)} positive and {len(neg)} negative texts; {need} per class are needed "
        f"for {2 * per_class_train} train + {2 * per_class_test} test examples, one text each"
    )


def _probe_text_task(
    sae: SAE, lm: LoadedModel, name: str, per_class: dict[str, int], batch_size: int, seed: int
) -> ProbeTask:
    """A probe-text task: each class's texts in a seeded order, the first ones train, the next ones test."""
    classes = probe_text_classes(name)
    orders = [torch.randperm(len(c), generator=task_generator(seed, name, f"class{v}")) for v, c in enumerate(classes)]
    splits = {}
    for split, offset in (("train", 0), ("test", per_class["train"])):
        n = per_class[split]
        texts = [classes[v][i] for v in (1, 0) for i in orders[v][offset : offset + n].tolist()]
        rows = [torch.tensor(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
        acts, latents = pooled_examples(sae, lm, rows, batch_size, f"probe {name} {split}")
        splits[split] = ProbeSplit(acts, latents, labels)
    return ProbeTask(name, "sequence", TASKS[name].description, splits["train"], splits["test"])


def _token_split(
    sae: SAE, lm: LoadedModel, names: Sequence[str], split: str, per_class: int, batch_size: int, seed: int
) -> dict[str, ProbeSplit]:
    """One split of every token task in `names`, from one pool of wikitext-2 contexts and one model pass."""
    source = _wikitext(split)
    size = sae.cfg.context_size or 128
    pool: list[Tensor] = []
    labels: dict[str, list[Tensor]] = {name: [] for name in names}
    counts = {name: torch.zeros(2, dtype=torch.long) for name in names}  # (negatives, positives)
    for tokens in _contexts(source, lm.tokenizer, size, sae.cfg.prepend_bos):
        pool.append(tokens)
        for name, row in token_labels(tokens[None], lm.tokenizer, names).items():
            labels[name].append(row[0])
            counts[name] += torch.stack([(row == NEGATIVE).sum(), (row == POSITIVE).sum()])
        if all(int(c.min()) >= per_class for c in counts.values()):
            break
    short = {name: c.tolist() for name, c in counts.items() if int(c.min()) < per_class}
    if short:
        found = "; ".join(f"{n}: {pos} positive, {neg} negative" for n, (neg, pos) in short.items())
        raise UserError(
            f"{source.describe()} holds too few examples for {per_class} per class ({found}); "
            "ask for fewer --probe-train-examples/--probe-test-examples."
        )
    contexts = torch.stack(pool)
    picks = {n: balanced_positions(torch.stack(labels[n]), per_class, task_generator(seed, n, split)) for n in names}
    positions = torch.cat([p for p, _ in picks.values()])
    acts, latents = position_examples(sae, lm, contexts, positions, batch_size, f"probe token tasks {split}")
    out, start = {}, 0
    for name, (p, y) in picks.items():
        out[name] = ProbeSplit(acts[start : start + len(p)], latents[start : start + len(p)], y)
        start += len(p)
    return out


def build_tasks(
    sae: SAE,
    lm: LoadedModel,
    names: Sequence[str],
    train_examples: int,
    test_examples: int,
    sequence_tokens: int,
    batch_size: int,
    seed: int,
) -> tuple[list[ProbeTask], dict[str, str]]:
    """The tasks `names` (in that order) at these sizes (per task, half of each class), and {name: why} for the
    probe-text tasks left out for want of text. Sizes and sources are checked before any model pass."""
    check_task_names(names)
    per_class = {"train": train_examples // 2, "test": test_examples // 2}
    if min(per_class.values()) < 1:
        raise UserError("probing needs at least 2 train and 2 test examples per task (one per class); ask for more.")
    lm.check_context_size(max(sequence_tokens, sae.cfg.context_size or 128))
    skipped = {
        n: reason
        for n in names
        if n in ("latin_script", "english_language")
        and (reason := probe_text_shortfall(n, per_class["train"], per_class["test"]))
    }
    token_names = [n for n in names if n in TOKEN_TASKS]
    for split in per_class:  # a missing corpus fails here, before the model runs
        if token_names or "shakespeare_vs_wikitext" in names:
            _wikitext(split)
        if "shakespeare_vs_wikitext" in names:
            _shakespeare(split)
    token_splits = {
        s: _token_split(sae, lm, token_names, s, per_class[s], batch_size, seed) if token_names else {}
        for s in per_class
    }
    tasks = []
    for name in names:
        if name in skipped:
            continue
        if name in TOKEN_TASKS:
            train, test = token_splits["train"][name], token_splits["test"][name]
            tasks.append(ProbeTask(name, "token", TASKS[name].description, train, test))
        elif name == "shakespeare_vs_wikitext":
            train, test = (
                _shakespeare_split(sae, lm, s, per_class[s], sequence_tokens, batch_size, seed) for s in per_class
            )
            tasks.append(ProbeTask(name, "sequence", TASKS[name].description, train, test))
        else:
            tasks.append(_probe_text_task(sae, lm, name, per_class, batch_size, seed))
    return tasks, skipped
