"""Tokenising and packing: Documents become fixed-length contexts that remember where each token came from.

Documents are tokenised without special tokens, joined into one stream with the EOS id between them,
and cut into disjoint consecutive contexts (optionally each starting with BOS). Every token carries
its document id and offset in that document, so analysis can point back at the source text.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from activations.errors import UserError
from activations.sources import Document

# Documents tokenised per tokenizer call: large enough for the fast tokenizer's batching to pay off,
# small enough that a few huge documents do not pile up in memory.
TOKENIZE_BATCH_DOCS = 64
TOKENIZE_BATCH_CHARS = 1 << 20

INSERTED = -1  # doc_id and position of tokens that come from no document (BOS, separators)


@dataclass
class Context:
    """One packed context of T tokens with, per token, its document id and offset (-1 for inserted tokens)."""

    tokens: torch.LongTensor  # [T]
    doc_ids: torch.LongTensor  # [T]
    positions: torch.LongTensor  # [T]


@dataclass
class ContextBatch:
    """B contexts stacked, as the model forward consumes them."""

    tokens: torch.LongTensor  # [B, T]
    doc_ids: torch.LongTensor  # [B, T]
    positions: torch.LongTensor  # [B, T]


def model_wants_bos(tokenizer) -> bool:
    """Whether the tokenizer adds a BOS by itself (Llama-2, Gemma: yes; GPT-2, SmolLM2: no).

    The model was trained on what its tokenizer produces, so its activations are most natural that way.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("hello", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def pack_contexts(
    docs: Iterable[Document], tokenizer, context_size: int, prepend_bos: bool | None = None
) -> Iterator[Context]:
    """Stream disjoint contexts of ``context_size`` tokens cut from the EOS-joined token stream of ``docs``.

    With BOS (``prepend_bos``, default: what the tokenizer does itself) each context is
    ``[bos] + context_size - 1`` stream tokens. The last incomplete chunk is dropped.
    """
    if context_size < 1:
        raise UserError(f"context size must be at least 1, got {context_size}. Pick a positive context size.")
    if prepend_bos is None:
        prepend_bos = model_wants_bos(tokenizer)
    bos = tokenizer.bos_token_id if prepend_bos else None
    if prepend_bos and bos is None:
        warnings.warn(
            "prepend_bos was asked for but the tokenizer has no BOS token; contexts start without one.", stacklevel=2
        )
    if bos is not None and context_size < 2:
        raise UserError(
            f"context size {context_size} leaves no room after the BOS token. Use a context size of 2 or more."
        )
    return _pack(docs, tokenizer, context_size, bos)


def _pack(docs: Iterable[Document], tokenizer, context_size: int, bos: int | None) -> Iterator[Context]:
    """The packing loop behind ``pack_contexts`` (a separate generator so argument errors raise at the call)."""
    body = context_size - (1 if bos is not None else 0)
    separator = tokenizer.eos_token_id
    # The part of the stream not yet emitted, as three parallel lists.
    tokens: list[int] = []
    doc_ids: list[int] = []
    positions: list[int] = []
    stream_length = 0
    contexts = 0
    first_doc = True
    for doc, ids in _tokenize_documents(docs, tokenizer):
        if not ids:
            continue
        if not first_doc and separator is not None:
            tokens.append(separator)
            doc_ids.append(INSERTED)
            positions.append(INSERTED)
            stream_length += 1
        first_doc = False
        tokens.extend(ids)
        doc_ids.extend([doc.id] * len(ids))
        positions.extend(range(len(ids)))
        stream_length += len(ids)

        start = 0
        while len(tokens) - start >= body:
            end = start + body
            yield _make_context(tokens[start:end], doc_ids[start:end], positions[start:end], bos)
            contexts += 1
            start = end
        del tokens[:start], doc_ids[:start], positions[:start]

    if contexts == 0:
        name = getattr(docs, "name", None)
        source = f"the text source '{name}'" if name else "the text source"
        raise UserError(
            f"{source} gave only {stream_length} tokens, fewer than one context of {context_size} tokens. "
            "Use a smaller context size or more text."
        )


def batch_contexts(contexts: Iterable[Context], batch_size: int) -> Iterator[ContextBatch]:
    """Stack contexts into batches of ``batch_size``; the last, partial batch is kept."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}. Pick a positive batch size.")
    pending: list[Context] = []
    for context in contexts:
        pending.append(context)
        if len(pending) == batch_size:
            yield _stack(pending)
            pending = []
    if pending:
        yield _stack(pending)


def special_token_mask(tokens: torch.LongTensor, tokenizer) -> torch.BoolTensor:
    """True where a token is BOS, EOS, PAD or any other special token, so analysis can leave them out."""
    return torch.isin(tokens, torch.tensor(sorted(_special_ids(tokenizer)), dtype=torch.long, device=tokens.device))


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            ids.add(token_id)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(token_id)
    return ids


def _tokenize_documents(docs: Iterable[Document], tokenizer) -> Iterator[tuple[Document, list[int]]]:
    """Tokenise documents several per call (no special tokens, no truncation), in order."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= TOKENIZE_BATCH_DOCS or chars >= TOKENIZE_BATCH_CHARS:
            yield from zip(batch, _tokenize(tokenizer, [d.text for d in batch]))
            batch, chars = [], 0
    if batch:
        yield from zip(batch, _tokenize(tokenizer, [d.text for d in batch]))


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False silences the "sequence length is longer than the model maximum" warning:
    # long documents are cut into contexts here, never fed to the model whole.
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, return_attention_mask=False, verbose=False)
    return encoded["input_ids"]


def _make_context(tokens: list[int], doc_ids: list[int], positions: list[int], bos: int | None) -> Context:
    if bos is not None:
        tokens, doc_ids, positions = [bos, *tokens], [INSERTED, *doc_ids], [INSERTED, *positions]
    return Context(
        tokens=torch.tensor(tokens, dtype=torch.long),
        doc_ids=torch.tensor(doc_ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
    )


def _stack(contexts: list[Context]) -> ContextBatch:
    return ContextBatch(
        tokens=torch.stack([c.tokens for c in contexts]),
        doc_ids=torch.stack([c.doc_ids for c in contexts]),
        positions=torch.stack([c.positions for c in contexts]),
    )
