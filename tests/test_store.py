"""ActivationStore: shuffling across contexts, nothing lost or duplicated, normalisation, bounded memory."""

import numpy as np
import pytest
import torch

from activations.sources import open_text_source
from activations.store import ActivationStore, StoreConfig
from activations.tokens import batch_contexts, pack_contexts, special_token_mask

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def source():
    return open_text_source("tinyshakespeare", split="test")


def _store(lm, source, **kw):
    cfg = dict(hooks=[HOOK], context_size=32, model_batch_size=8, batch_size=256, buffer_tokens=1024, epochs=1)
    cfg.update(kw)
    return ActivationStore(lm, source, StoreConfig(**cfg))


def _limited(source, n_docs):
    return [d for _, d in zip(range(n_docs), source)]


def test_batches_are_a_shuffled_permutation_of_the_stream(tiny_llama, source):
    docs = _limited(source, 60)
    raw = torch.cat(list(_store(tiny_llama, docs, normalise=False).raw_activations()))[:, 0]
    batches = list(_store(tiny_llama, docs, normalise=False))
    out = torch.cat(batches)[:, 0]
    assert out.shape == raw.shape  # every kept token exactly once (epochs=1 flushes the buffer)

    # Same rows as a multiset: sort both lexicographically and compare exactly.
    def lexsorted(t):
        order = np.lexsort(t.numpy().T[::-1])
        return t[torch.from_numpy(order)]

    torch.testing.assert_close(lexsorted(out), lexsorted(raw), rtol=0, atol=0)
    # Where in the unshuffled stream did the first batch come from?
    idx = torch.cdist(out, raw).argmin(1)
    first = idx[: len(batches[0])]
    contexts_in_first_batch = len(set((first // 31).tolist()))  # 31 kept tokens per 32-token context
    assert contexts_in_first_batch > 10
    assert not torch.equal(first, first.sort().values)


def test_a_store_restarted_from_its_state_continues_exactly(tiny_llama, source):
    """The shuffle buffer's rows, the RNG and the stream position are the whole state: a new store given
    state_dict() between two batches hands out exactly the batches the first would have."""
    docs = _limited(source, 60)
    whole = list(_store(tiny_llama, docs))
    for cut in (1, 5, len(whole) - 1):
        store = _store(tiny_llama, docs)
        it = iter(store)
        for _ in range(cut):
            next(it)
        resumed = _store(tiny_llama, docs)
        resumed.load_state_dict(store.state_dict())
        rest = list(resumed)
        assert len(rest) == len(whole) - cut and all(torch.equal(a, b) for a, b in zip(rest, whole[cut:])), cut


def test_keep_mask_drops_first_position_and_special_tokens(tiny_llama, source):
    docs = _limited(source, 40)
    store = _store(tiny_llama, docs, normalise=False)
    n_out = sum(len(b) for b in store)
    contexts = list(batch_contexts(pack_contexts(docs, tiny_llama.tokenizer, 32), 8))
    tokens = torch.cat([c.tokens for c in contexts])
    expected = (~special_token_mask(tokens, tiny_llama.tokenizer))[:, 1:].sum().item()
    assert n_out == expected
    keep_all = _store(tiny_llama, docs, normalise=False, skip_first=False, skip_special=False)
    assert sum(len(b) for b in keep_all) == tokens.numel()


def test_normalised_mean_norm_is_sqrt_d(tiny_llama, source):
    store = _store(tiny_llama, _limited(source, 60))
    out = torch.cat(list(store))[:, 0]
    assert store.scales[HOOK] > 0
    assert out.norm(dim=-1).mean().item() == pytest.approx(tiny_llama.d_model**0.5, rel=0.05)


def test_several_hooks_come_from_the_same_tokens(tiny_llama, source):
    docs = _limited(source, 30)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]  # the same tensor, two names
    out = torch.cat(list(_store(tiny_llama, docs, hooks=hooks, normalise=False)))
    assert out.shape[1] == 2
    torch.testing.assert_close(out[:, 0], out[:, 1])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_memory_stays_bounded_over_a_long_stream(tiny_llama, source):
    # 100k tokens × 4 hooks × 64 dims would be 100 MB if the store kept them; its buffer holds 4 MB.
    hooks = [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_resid_post",
    ]
    store = _store(
        tiny_llama,
        source,
        hooks=hooks,
        epochs=None,
        buffer_tokens=4096,
        model_batch_size=32,
        context_size=64,
        batch_size=512,
    )
    it = iter(store)
    for _ in range(50):
        next(it)
    before = _rss_mb()
    n = 0
    while store.tokens_emitted < 100_000:
        next(it)
        n += 1
    grown = _rss_mb() - before
    assert store.epoch >= 1  # the source was looped over, so the stream outlived one pass
    assert grown < 30, f"resident memory grew {grown:.0f} MB over {n} batches"
