"""Feature statistics: the streaming two-pass result equals a brute-force computation over all activations."""

from dataclasses import replace

import pytest
import torch

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from activations.sources import open_text_source
from activations.store import ActivationStore, StoreConfig
from analysis.feature_stats import EMPTY_KEY, FeatureStats, StatsConfig, feature_stats, sample_key
from sae.config import SAEConfig
from sae.registry import make_sae

HOOK = "blocks.2.hook_resid_post"
CFG = StatsConfig(
    tokens=1200,
    top_k=5,
    left=3,
    right=2,
    intervals=3,
    per_interval=2,
    bins=8,
    context_size=32,
    model_batch_size=4,
    seed=7,
)


def _sae(lm, d_sae=48, k=6, seed=0):
    """A random TopK SAE centred on the model's mean activation (so every feature gets its turn), one feature dead."""
    tokens = torch.tensor([lm.tokenizer("To be, or not to be, that is the question")["input_ids"]])
    x = run_with_cache(lm.model, tokens, [parse_hook(HOOK, lm.model)])[HOOK][0, 1:]
    scale = lm.d_model**0.5 / x.norm(dim=-1).mean().item()
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=d_sae, k=k, hook_name=HOOK, model_name=lm.name, norm_scale=scale))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0) * scale)
        sae.b_enc[0] = -1e4  # a dead feature: no examples at all
    return sae


def _brute_force(sae, lm, source, cfg):
    """Every activation of every token, with the stream's batching: [C, T, F], tokens [C, T], docs, offsets."""
    hp = parse_hook(HOOK, lm.model)
    store = ActivationStore(
        lm,
        source,
        StoreConfig(
            hooks=[HOOK],
            context_size=cfg.context_size,
            model_batch_size=cfg.model_batch_size,
            epochs=1,
            normalise=False,
        ),
    )
    acts, tokens, docs, offsets, seen = [], [], [], [], 0
    for batch in store.context_batches():
        x = run_with_cache(lm.model, batch.tokens, [hp])[HOOK]
        keep = store.keep_mask(batch.tokens)
        acts.append(sae.encode_raw(x.float()).float() * keep[..., None])
        tokens.append(batch.tokens), docs.append(batch.doc_ids), offsets.append(batch.positions)
        seen += int(keep.sum())
        if seen >= cfg.tokens:
            break
    return torch.cat(acts), torch.cat(tokens), torch.cat(docs), torch.cat(offsets), seen


@pytest.fixture(scope="module")
def computed(tiny_llama):
    source = open_text_source("tinyshakespeare", split="test")
    sae = _sae(tiny_llama)
    with torch.inference_mode():
        stats = feature_stats(sae, tiny_llama, source, CFG)
        brute = _brute_force(sae, tiny_llama, source, CFG)
    return stats, brute, tiny_llama


def _check_example(stats, brute, f, act, g, doc, doc_pos, win_tokens, win_acts):
    A, tokens, docs, offsets, _ = brute
    C, T, _ = A.shape
    c, p = divmod(int(g), T)
    assert A[c, p, f] == act > 0
    assert docs[c, p] == doc and offsets[c, p] == doc_pos
    for i, q in enumerate(range(p - CFG.left, p + CFG.right + 1)):
        inside = 0 <= q < T
        assert win_tokens[i] == (tokens[c, q] if inside else -1)
        assert win_acts[i] == (A[c, q, f] if inside else 0)


def test_counts_sums_and_max_match_brute_force(computed):
    stats, brute, _ = computed
    A, tokens, _, _, seen = brute
    flat = A.reshape(-1, A.shape[-1])
    assert stats.tokens == seen and stats.contexts == len(A) and stats.context_size == CFG.context_size
    assert torch.equal(stats.count, (flat > 0).sum(0))
    assert torch.equal(stats.max, flat.max(0).values)
    torch.testing.assert_close(stats.act_sum, flat.double().sum(0))
    torch.testing.assert_close(stats.density, (flat > 0).double().mean(0) * len(flat) / seen)
    assert stats.count[0] == 0 and stats.max[0] == 0  # the dead feature
    assert (stats.count[1:] > 0).float().mean() > 0.8
    assert ((stats.count > 0) & (stats.count < CFG.top_k)).any()  # a rare feature: fewer examples than k


def test_top_examples_match_brute_force(computed, tokenizer):
    stats, brute, _ = computed
    A = brute[0]
    flat = A.reshape(-1, A.shape[-1])
    special = set(tokenizer.all_special_ids)
    for f in range(A.shape[-1]):
        expected = flat[:, f].sort(descending=True).values[: CFG.top_k]
        expected = torch.where(expected > 0, expected, 0.0)
        assert torch.equal(stats.top_act[f], expected), f
        for j in range(CFG.top_k):
            if stats.top_act[f, j] == 0:
                assert stats.top_g[f, j] == -1 and (stats.top_tokens[f, j] == -1).all()
                continue
            _check_example(
                stats,
                brute,
                f,
                stats.top_act[f, j],
                stats.top_g[f, j],
                stats.top_doc[f, j],
                stats.top_doc_pos[f, j],
                stats.top_tokens[f, j],
                stats.top_window_acts[f, j],
            )
            c, p = stats.position(stats.top_g[f, j])
            assert p > 0 and int(brute[1][c, p]) not in special  # positions the SAE never saw are left out


def test_histogram_and_interval_samples_match_brute_force(computed):
    stats, brute, _ = computed
    A = brute[0]
    T = A.shape[1]
    flat = A.reshape(-1, A.shape[-1])
    n, m = CFG.intervals, CFG.per_interval
    for f in range(1, A.shape[-1]):
        g = (flat[:, f] > 0).nonzero().squeeze(1)
        a = flat[g, f].double()
        mx = float(stats.max[f])
        edges = [mx * i / CFG.bins for i in range(CFG.bins + 1)]
        expected_hist = [
            int(((a >= lo) & ((a < hi) if i < CFG.bins - 1 else (a <= hi))).sum())
            for i, (lo, hi) in enumerate(zip(edges, edges[1:]))
        ]
        assert stats.hist[f].tolist() == expected_hist, f
        assert stats.hist[f].sum() == stats.count[f]
        interval = (a * n / mx).floor().long().clamp(max=n - 1)
        assert stats.interval_count[f].tolist() == torch.bincount(interval, minlength=n).tolist()
        for j in range(n):
            members = g[interval == j]
            keys = sample_key(members, torch.full_like(members, f), CFG.seed)
            order = keys.argsort()[:m]
            want = members[order].tolist() + [-1] * (m - len(order))
            assert stats.sample_g[f, j].tolist() == want, (f, j)
            for s in range(m):
                if want[s] == -1:
                    assert stats.sample_key[f, j, s] == EMPTY_KEY
                    continue
                c, p = divmod(want[s], T)
                assert stats.sample_act[f, j, s] == A[c, p, f]
                _check_example(
                    stats,
                    brute,
                    f,
                    stats.sample_act[f, j, s],
                    stats.sample_g[f, j, s],
                    stats.sample_doc[f, j, s],
                    stats.sample_doc_pos[f, j, s],
                    stats.sample_tokens[f, j, s],
                    stats.sample_window_acts[f, j, s],
                )
    assert (stats.sample_g[0] == -1).all() and (stats.top_g[0] == -1).all()


def test_recomputing_pass_two_gives_the_same_result(computed):
    """With no room to keep the hook activations, pass 2 runs the model again: same numbers."""
    stats, _, lm = computed
    again = feature_stats(_sae(lm), lm, open_text_source("tinyshakespeare", split="test"), replace(CFG, cache_mb=0))
    for name in (
        "count",
        "max",
        "hist",
        "top_act",
        "top_g",
        "top_tokens",
        "interval_count",
        "sample_key",
        "sample_g",
        "sample_window_acts",
    ):
        assert torch.equal(getattr(again, name), getattr(stats, name)), name


def test_sample_key_is_unique_per_token_and_spread():
    g = torch.arange(100_000)
    keys = sample_key(g, torch.full_like(g, 3), seed=1)
    assert len(keys.unique()) == len(g)
    first = g[keys.argsort()[:1000]]
    # the smallest keys are spread over the whole range, not clustered at the start
    assert first.float().mean().item() == pytest.approx(50_000, rel=0.1)
    assert not torch.equal(keys, sample_key(g, torch.full_like(g, 4), seed=1))


def test_save_and_load_round_trip(computed, tmp_path):
    stats = computed[0]
    stats.save(tmp_path)
    back = FeatureStats.load(tmp_path)
    assert back.tokens == stats.tokens and back.cfg == stats.cfg and back.meta == stats.meta
    for name in ("count", "max", "hist", "top_g", "top_tokens", "sample_key", "sample_window_acts"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    with pytest.raises(UserError, match="no feature statistics"):
        FeatureStats.load(tmp_path / "nothing")


def test_bad_settings_are_user_errors(tiny_llama, tiny_gpt2):
    source = open_text_source("tinyshakespeare", split="test")
    with pytest.raises(UserError, match="--top-k 0 is too small"):  # refused when the config is made
        StatsConfig(top_k=0)
    with pytest.raises(UserError, match="--left -1 is too small"):
        StatsConfig(left=-1)
    wide = make_sae(SAEConfig(d_in=32, d_sae=16, k=2, hook_name=HOOK))
    with pytest.raises(UserError, match="d_in=32"):
        feature_stats(wide, tiny_llama, source, CFG)
