"""Memory stays flat while streaming: 300 MB of text pass through the source, then packing and the
ActivationStore run on, while the process RSS is sampled; a leak (a source that reads a whole file, contexts
or activations kept after use) grows it past the bounds. Bounds on memory only, never on time; about 30 s.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest
import torch

from activations.sources import open_text_source
from activations.store import ActivationStore, StoreConfig
from activations.tokens import pack_contexts

CORPUS_MB = 300
MB = 1 << 20


def _rss_mb() -> float:
    """The process's resident memory now, in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> Path:
    """CORPUS_MB of random real words, one sentence per line and no blank lines (so nothing splits it into
    paragraphs), written in 256 KiB blocks drawn at random from a pool (fast: a few seconds)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the RSS from /proc (Linux)")
    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha())
    rng = random.Random(0)

    def block() -> str:
        lines, size = [], 0
        while size < MB // 4:
            lines.append(" ".join(rng.choices(words, k=rng.randint(4, 20))).capitalize() + ".")
            size += len(lines[-1]) + 1
        return "\n".join(lines) + "\n"

    pool = [block() for _ in range(16)]
    path = tmp_path_factory.mktemp("corpus") / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < CORPUS_MB * MB:
            chunk = "".join(rng.choices(pool, k=16))
            f.write(chunk)
            written += len(chunk)
    return path


def test_the_text_source_streams_a_large_file_in_flat_memory(corpus):
    source = open_text_source(str(corpus))
    passed, early, longest = 0, None, 0
    for doc in source:
        passed += len(doc.text)
        longest = max(longest, len(doc.text))
        if early is None and passed > 20 * MB:
            early = _rss_mb()
    late = _rss_mb()
    assert passed > 0.95 * CORPUS_MB * MB  # the whole file went through
    assert longest <= 2 * MB  # a file without blank lines is still cut into documents
    assert late - early < 100, f"RSS grew {late - early:.0f} MiB while {passed / MB:.0f} MiB of text streamed"


def _peaks(items: Iterator, warmup: int, n: int, every: int) -> tuple[float, float]:
    """Take `warmup` items, then `n` more sampling the RSS every `every`: the highest RSS of the first and of
    the last quarter of the samples (peaks, since transient buffers make the RSS a sawtooth)."""
    for _ in islice(items, warmup):  # tokenizer buffers, allocator pools, the shuffle buffer fill up
        pass
    samples = [_rss_mb() for i, _ in enumerate(islice(items, n)) if i % every == 0]
    assert len(samples) == -(-n // every), "the stream ended early"
    quarter = max(len(samples) // 4, 1)
    return max(samples[:quarter]), max(samples[-quarter:])


def test_packing_keeps_memory_flat(corpus, tokenizer):
    contexts = pack_contexts(open_text_source(str(corpus)), tokenizer, context_size=128)
    early, late = _peaks(contexts, warmup=6000, n=20000, every=250)  # 2.6M tokens (~18 MB of text) measured
    assert late - early < 50, f"RSS grew {late - early:.0f} MiB over 20000 contexts"


def test_the_activation_store_keeps_memory_flat(corpus, tiny_llama, one_thread):
    cfg = StoreConfig(
        hooks=["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"],
        context_size=128,
        model_batch_size=16,
        batch_size=1024,
        buffer_tokens=16384,
        normalise=False,
        seed=0,
    )
    with torch.inference_mode():
        batches = iter(ActivationStore(tiny_llama, open_text_source(str(corpus)), cfg))
        # 266k tokens x 2 hooks x 64 floats measured: 136 MiB if every activation were kept
        early, late = _peaks(batches, warmup=40, n=260, every=5)
    assert late - early < 50, f"RSS grew {late - early:.0f} MiB over 260 batches"
