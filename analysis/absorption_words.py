"""The words and the prompt of the first-letter absorption benchmark, and the model's activations on them.

A word is one token of the model's vocabulary that decodes to a space and two or more lower-case ASCII
letters (" cat") and encodes back to that same token, so its first letter is a property of a single token.
Every word is read at its own position at the end of one fixed in-context prompt, SAEBench's template
"{word} has the first letter:" with `icl_examples` answered examples before it (drawn, seeded, from vocabulary
words outside the benchmark's sample):

    "\\n dog has the first letter: D\\n tree has the first letter: T\\n ... \\n{word}"

The text after the word (" has the first letter:") cannot change a causal model's activation at the word's
position, so it is not run. Because every prompt shares the prefix, the prefix runs once and its key/value cache
is reused: a batch of words then costs one token per word, and the forward stops at the hook's layer.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.errors import UserError
from activations.hookpoints import HookPoint, hooks_installed
from activations.models import LoadedModel

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LETTERS = 2  # a word has at least this many letters after its space
TEMPLATE = "{word} has the first letter:"  # SAEBench's; an example is answered with " " + the capital letter


@dataclass(frozen=True)
class Word:
    """One single-token word: its token id, its letters (no space) and its first letter as 0..25."""

    token_id: int
    text: str

    @property
    def letter(self) -> int:
        """The first letter's index in LETTERS (the label the probes predict)."""
        return LETTERS.index(self.text[0])


@dataclass
class WordSplit:
    """The benchmark's words: train and test (disjoint) and the in-context examples (disjoint from both)."""

    train: list[Word]
    test: list[Word]
    examples: list[Word]


def vocabulary_words(tokenizer) -> list[Word]:
    """Every token of `tokenizer` that is a space + MIN_LETTERS or more lower-case ASCII letters and encodes
    back to itself, in token-id order."""
    found = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        body = text[1:]
        if text[:1] == " " and len(body) >= MIN_LETTERS and body.isascii() and body.isalpha() and body.islower():
            found.append(Word(token_id, body))
    encoded = tokenizer([" " + w.text for w in found], add_special_tokens=False)["input_ids"]
    return [w for w, ids in zip(found, encoded) if list(ids) == [w.token_id]]


def train_count(words: int, train_fraction: float) -> int:
    """How many of `words` are train words; a UserError when that leaves no train or no test word."""
    n_train = round(words * train_fraction)
    if not 0 < n_train < words:
        raise UserError(
            f"--absorption-train-fraction {train_fraction} leaves no train or no test words out of {words}; "
            "use a value such as 0.8, or more --absorption-words."
        )
    return n_train


def split_words(tokenizer, words: int, icl_examples: int, train_fraction: float, seed: int) -> WordSplit:
    """A seeded sample of `words` vocabulary words split train/test, and `icl_examples` prompt examples drawn
    from the rest of the vocabulary; a UserError when the vocabulary has too few words."""
    pool = vocabulary_words(tokenizer)
    if len(pool) < words + icl_examples:
        raise UserError(
            f"the tokenizer has {len(pool)} single-token lower-case words, fewer than the {words} words + "
            f"{icl_examples} prompt examples asked for; lower --absorption-words (or --absorption-icl-examples)."
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    sample = [pool[i] for i in order[:words]]
    n_train = train_count(words, train_fraction)
    return WordSplit(sample[:n_train], sample[n_train:], [pool[i] for i in order[words : words + icl_examples]])


def prompt_prefix(tokenizer, examples: list[Word], bos: bool) -> list[int]:
    """Token ids of the prompt before the word: the answered examples, each on its own line (a line break
    first, as SAEBench does), then the line break that the word follows; with a BOS token first if `bos`."""
    lines = "".join("\n" + TEMPLATE.format(word=" " + w.text) + " " + w.text[0].upper() for w in examples)
    ids = tokenizer(lines + "\n", add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return list(ids)


class _Captured(Exception):
    """Raised from the hook once the batch's activation is captured, so later layers never run."""


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes a key/value cache: `cache` (transformers 5) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _new_cache(model: torch.nn.Module):
    """An empty key/value cache for `model` (transformers >= 4.56 takes the config; older versions do not)."""
    from transformers import DynamicCache  # imported when used, like activations/models.py: it is slow to import

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _run_to_hook(model: torch.nn.Module, hp: HookPoint, input_ids: Tensor, cache) -> Tensor:
    """The activation at `hp` for `input_ids` [B, T] after the cached prefix, [B, T, d]; updates `cache`."""
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor) -> None:
        captured["act"] = act.detach()
        raise _Captured

    with hooks_installed(model, {hp: capture}):
        try:
            model(input_ids=input_ids, use_cache=True, **{_cache_keyword(model): cache})
        except _Captured:
            pass
    return captured["act"]


@torch.inference_mode()
def word_activations(
    lm: LoadedModel, hp: HookPoint, prefix: list[int], words: list[Word], batch_size: int, desc: str = "words"
) -> Tensor:
    """Raw activations [len(words), d] (float32, CPU) at `hp` at each word's position after `prefix`."""
    device = lm.device
    prefix_cache = _new_cache(lm.model)
    _run_to_hook(lm.model, hp, torch.tensor([prefix], device=device), prefix_cache)
    out = []
    for start in tqdm(range(0, len(words), batch_size), desc=desc, unit="batch"):
        batch = words[start : start + batch_size]
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(batch))
        ids = torch.tensor([[w.token_id] for w in batch], device=device)
        out.append(_run_to_hook(lm.model, hp, ids, cache)[:, -1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, lm.d_model)
