"""Token packing: fixed-length contexts, BOS/EOS handling, provenance round trips, batching, special-token masks."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from activations.errors import UserError
from activations.sources import Document, open_text_source
from activations.tokens import (
    Context,
    ContextBatch,
    batch_contexts,
    model_wants_bos,
    pack_contexts,
    special_token_mask,
)

WORDS = "the cat sat on a mat dog ran far away and then came back home".split()


def word_tokenizer(
    *, adds_bos: bool = True, eos: bool = True, model_max_length: int = 10_000
) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer; with ``adds_bos`` it behaves like Llama-2 and puts BOS in front itself."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>" if eos else None,
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def word_docs(lengths: list[int]) -> list[Document]:
    """Documents of the given word counts, each word a single token of ``word_tokenizer``."""
    return [Document(i, " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))) for i, n in enumerate(lengths)]


def stream_of(contexts: list[Context], skip_bos: bool) -> list[tuple[int, int, int]]:
    """(token, doc_id, position) for every stream token of the contexts, in order."""
    out = []
    for context in contexts:
        start = 1 if skip_bos else 0
        out += list(
            zip(context.tokens[start:].tolist(), context.doc_ids[start:].tolist(), context.positions[start:].tolist())
        )
    return out


# --- model_wants_bos ----------------------------------------------------------------------------


def test_model_wants_bos(tokenizer):
    assert model_wants_bos(tokenizer) is False  # SmolLM2 adds no BOS by itself
    assert model_wants_bos(word_tokenizer(adds_bos=True)) is True
    assert model_wants_bos(word_tokenizer(adds_bos=False)) is False


# --- packing ------------------------------------------------------------------------------------


def test_contexts_have_fixed_length_and_eos_between_documents():
    tok = word_tokenizer(adds_bos=False)
    docs = word_docs([3, 4, 5, 2])  # stream: 3 + 1 + 4 + 1 + 5 + 1 + 2 = 17 tokens
    contexts = list(pack_contexts(docs, tok, context_size=4))
    assert len(contexts) == 4  # 17 // 4, the last token is dropped
    for context in contexts:
        assert context.tokens.shape == context.doc_ids.shape == context.positions.shape == (4,)
        assert context.tokens.dtype == context.doc_ids.dtype == context.positions.dtype == torch.long
    stream = stream_of(contexts, skip_bos=False)
    separators = [i for i, (_, doc, _) in enumerate(stream) if doc == -1]
    assert separators == [3, 8, 14]  # between documents, never before the first
    assert all(stream[i] == (tok.eos_token_id, -1, -1) for i in separators)
    assert [doc for _, doc, _ in stream if doc != -1] == [0] * 3 + [1] * 4 + [2] * 5 + [3] * 1


def test_bos_prepended_iff_asked():
    tok = word_tokenizer(adds_bos=True)
    docs = word_docs([7, 6, 9])
    with_bos = list(pack_contexts(docs, tok, context_size=5))  # default follows the tokenizer: BOS
    assert all(c.tokens[0] == tok.bos_token_id and c.doc_ids[0] == -1 and c.positions[0] == -1 for c in with_bos)
    assert all(len(c.tokens) == 5 for c in with_bos)
    assert len(with_bos) == (7 + 1 + 6 + 1 + 9) // 4
    without = list(pack_contexts(docs, tok, context_size=5, prepend_bos=False))
    assert len(without) == (7 + 1 + 6 + 1 + 9) // 5
    assert all(tok.bos_token_id not in c.tokens.tolist() for c in without)
    forced = list(pack_contexts(docs, word_tokenizer(adds_bos=False), context_size=5, prepend_bos=True))
    assert all(c.tokens[0] == tok.bos_token_id for c in forced)


def test_no_tokens_lost_or_duplicated_between_contexts():
    tok = word_tokenizer(adds_bos=True)
    docs = word_docs([5, 11, 2, 8, 3])
    expected = []
    for doc in docs:
        if expected:
            expected.append((tok.eos_token_id, -1, -1))
        ids = tok(doc.text, add_special_tokens=False)["input_ids"]
        expected += [(t, doc.id, p) for p, t in enumerate(ids)]
    for prepend_bos in (True, False):
        contexts = list(pack_contexts(docs, tok, context_size=6, prepend_bos=prepend_bos))
        body = 5 if prepend_bos else 6
        assert stream_of(contexts, skip_bos=prepend_bos) == expected[: len(contexts) * body]
        assert len(expected) - len(contexts) * body < body  # only the final incomplete chunk is dropped


def test_no_separator_without_eos():
    tok = word_tokenizer(adds_bos=False, eos=False)
    contexts = list(pack_contexts(word_docs([3, 3]), tok, context_size=6))
    assert len(contexts) == 1 and (contexts[0].doc_ids >= 0).all()
    assert contexts[0].doc_ids.tolist() == [0, 0, 0, 1, 1, 1]


def test_provenance_round_trip_on_wikitext(tokenizer):
    paragraphs = [
        "= Alpha =\nThe lobster lives in the sea and eats small fish , crabs and worms .",
        "= Beta =\n" + " ".join(f"Sentence {i} about a long history of the region ." for i in range(40)),
        "= Gamma =\nA short article .",
        "= Delta =\nAnother article , with commas , numbers like 1 @,@ 234 and <unk> words .",
    ]
    docs = [Document(i, text, text.split("\n")[0]) for i, text in enumerate(paragraphs)]
    contexts = list(pack_contexts(docs, tokenizer, context_size=64))
    assert all(len(c.tokens) == 64 for c in contexts)
    assert all(tokenizer.bos_token_id not in c.tokens.tolist() for c in contexts)  # SmolLM2: no BOS
    tokens = torch.cat([c.tokens for c in contexts])
    doc_ids = torch.cat([c.doc_ids for c in contexts])
    positions = torch.cat([c.positions for c in contexts])
    spanning = {int(c.doc_ids[0]) for c in contexts[1:]} & {int(c.doc_ids[-1]) for c in contexts[:-1]}
    assert 1 in spanning  # the long Beta article crosses context boundaries
    seen_docs = sorted(set(doc_ids.tolist()) - {-1})
    assert seen_docs[:3] == [0, 1, 2]
    for doc_id in seen_docs:
        mine = doc_ids == doc_id
        alone = tokenizer(docs[doc_id].text, add_special_tokens=False)["input_ids"]
        assert positions[mine].tolist() == list(range(int(mine.sum())))  # positions continue across contexts
        assert tokens[mine].tolist() == alone[: int(mine.sum())]
        if doc_id < seen_docs[-1]:  # every document but the last is complete
            assert int(mine.sum()) == len(alone)
            assert tokenizer.decode(tokens[mine]) == docs[doc_id].text
    assert (tokens[doc_ids == -1] == tokenizer.eos_token_id).all()


def test_packs_a_real_source(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(f'{{"text": "Document {i} says hello to the world."}}\n' for i in range(30)), encoding="utf-8"
    )
    contexts = list(pack_contexts(open_text_source(str(path)), tokenizer, context_size=16))
    assert len(contexts) > 5
    assert all(c.tokens.shape == (16,) for c in contexts)


def test_too_little_text_is_a_user_error(tmp_path):
    tok = word_tokenizer(adds_bos=False)
    path = tmp_path / "tiny.txt"
    path.write_text("the cat sat", encoding="utf-8")
    with pytest.raises(
        UserError, match=r"gave only 3 tokens, fewer than one context of 128 tokens.*smaller context size"
    ):
        list(pack_contexts(open_text_source(str(path)), tok, context_size=128))


def test_bad_context_size_raises_at_call():
    with pytest.raises(UserError, match="context size must be at least 1"):
        pack_contexts([], word_tokenizer(), context_size=0)
    with pytest.raises(UserError, match="no room after the BOS"):
        pack_contexts([], word_tokenizer(adds_bos=True), context_size=1)


def test_long_documents_do_not_spam_length_warnings(caplog):
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # another test (load_model) may have turned transformers' warnings off
    try:
        _check_length_warning_silenced(caplog)
    finally:
        hf_logging.set_verbosity(previous)


def _check_length_warning_silenced(caplog):
    loud = word_tokenizer(adds_bos=False, model_max_length=4)
    loud(["the cat sat on a mat"], add_special_tokens=False)
    assert "longer than the specified maximum" in caplog.text  # the warning we silence exists
    caplog.clear()
    quiet = word_tokenizer(adds_bos=False, model_max_length=4)
    contexts = list(pack_contexts(word_docs([20, 30]), quiet, context_size=8))
    assert len(contexts) == 51 // 8
    assert "longer than the specified maximum" not in caplog.text


def test_packing_is_lazy():
    def endless():
        i = 0
        while True:
            yield Document(i, "the cat sat on a mat")
            i += 1

    contexts = pack_contexts(endless(), word_tokenizer(adds_bos=False), context_size=7)
    first = [next(contexts) for _ in range(3)]
    assert all(len(c.tokens) == 7 for c in first)


# --- batching and masks -------------------------------------------------------------------------


def test_batch_contexts_keeps_last_partial_batch():
    contexts = list(pack_contexts(word_docs([9] * 10), word_tokenizer(adds_bos=True), context_size=8))
    assert len(contexts) == (10 * 9 + 9) // 7
    batches = list(batch_contexts(contexts, batch_size=4))
    sizes = [b.tokens.shape[0] for b in batches]
    assert sizes == [4] * (len(contexts) // 4) + ([len(contexts) % 4] if len(contexts) % 4 else [])
    assert sizes[-1] == len(contexts) % 4 != 0
    assert isinstance(batches[0], ContextBatch)
    assert batches[0].doc_ids.shape == batches[0].positions.shape == (4, 8)
    assert torch.equal(torch.cat([b.tokens for b in batches]), torch.stack([c.tokens for c in contexts]))
    assert torch.equal(torch.cat([b.positions for b in batches]), torch.stack([c.positions for c in contexts]))


def test_special_token_mask_marks_bos_and_eos(tokenizer):
    tok = word_tokenizer(adds_bos=True)
    batch = next(batch_contexts(pack_contexts(word_docs([3, 3, 3]), tok, context_size=6), batch_size=2))
    mask = special_token_mask(batch.tokens, tok)
    assert mask.shape == batch.tokens.shape and mask.dtype == torch.bool
    assert torch.equal(mask, batch.doc_ids == -1)  # exactly the inserted BOS and EOS tokens
    ids = torch.tensor([[tokenizer.bos_token_id, 504, tokenizer.eos_token_id, 0, 3]])
    assert special_token_mask(ids, tokenizer).tolist() == [[True, False, True, True, True]]  # 0 and 3: other specials
