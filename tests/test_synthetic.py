"""Synthetic ground truth (activations/synthetic.py) and the recovery score (analysis/recovery.py).

The generator's statistics are checked against its config (firing rates, hierarchy rules, copula correlation,
magnitudes, determinism); the score against hand-built SAEs whose answer is known (the true dictionary itself,
a random one, an exact encoder, one built to absorb its parents); and saelab's real Trainer must recover a simple
planted dictionary with TopK. Tolerances are several binomial standard deviations of the sample sizes used.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from activations.errors import UserError
from activations.synthetic import (
    SyntheticBatches,
    SyntheticConfig,
    SyntheticFeatures,
    firing_probabilities,
    stream_generator,
)
from analysis.recovery import recovery
from sae.config import SAEConfig
from sae.registry import make_sae
from training.config import TrainConfig
from training.data import ActivationBatches
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
N = 40_000  # held-out samples for the statistics


@pytest.fixture(scope="module")
def truth() -> SyntheticFeatures:
    """The default config (512 features, 16 parents × 3 children, 16 groups of 4), at a second seed."""
    return SyntheticFeatures(SyntheticConfig(seed=3))


@pytest.fixture(scope="module")
def sample(truth):
    return truth.heldout(N)


def binomial_tol(p: torch.Tensor, n: int, sigmas: float = 5.0) -> torch.Tensor:
    return sigmas * (p * (1 - p) / n).sqrt() + 1e-4


# ---- the generator -----------------------------------------------------------------------------------------


def test_firing_probabilities_by_hand():
    """Zipf exponent 1 over 4 ranks with mean 1: c (1 + 1/2 + 1/3 + 1/4) = 1; with a cap of 0.4 the first is
    pinned and c is solved over the rest: c (1/2 + 1/3 + 1/4) = 0.6; a weight counts a parent's children too."""
    ranks, ones = torch.arange(4), torch.ones(4)
    p = firing_probabilities(ranks, ones, 1.0, 1.0, 1.0)
    assert torch.allclose(p, torch.tensor([12, 6, 4, 3]) / 25)
    c = 0.6 / (1 / 2 + 1 / 3 + 1 / 4)
    p = firing_probabilities(ranks, ones, 1.0, 1.0, 0.4)
    assert torch.allclose(p, torch.tensor([0.4, c / 2, c / 3, c / 4]))
    p = firing_probabilities(ranks.flip(0), torch.tensor([1.5, 1, 1, 1]), 1.0, 0.0, 1.0)
    assert torch.allclose(p, torch.full((4,), 1 / 4.5))
    with pytest.raises(UserError, match="unreachable"):
        firing_probabilities(ranks, ones, 3.0, 1.0, 0.5)


def test_firing_rates_and_sparsity_match_the_config(truth, sample):
    cfg = truth.cfg
    p = truth.probabilities
    assert float(p.sum()) == pytest.approx(cfg.mean_active, rel=1e-5)
    assert float(p.max()) <= cfg.max_probability + 1e-6
    free = p[truth.free]
    assert float(free.max() / free.min()) == pytest.approx(len(free) ** cfg.zipf_exponent, rel=1e-3)  # Zipf spread
    fires = sample.acts > 0
    rates = fires.float().mean(0)
    assert ((rates - p).abs() <= binomial_tol(p, N)).all()  # every feature, grouped and children included
    counts = fires.sum(1).float()
    assert float(counts.mean()) == pytest.approx(cfg.mean_active, abs=5 * float(counts.std()) / math.sqrt(N))


def test_directions_are_unit_and_in_superposition_and_x_is_their_sum(truth, sample):
    assert truth.directions.shape == (512, 64)
    assert torch.allclose(truth.directions.norm(dim=1), torch.ones(512), atol=1e-5)
    off = truth.directions @ truth.directions.T - torch.eye(512)
    assert float(off.abs().max()) > 0.3  # 512 directions in 64 dims cannot be orthogonal
    assert torch.allclose(sample.x, sample.acts @ truth.directions, atol=1e-5)


def test_a_child_never_fires_without_its_parent_and_siblings_exclude_each_other(truth, sample):
    cfg, fires = truth.cfg, sample.acts > 0
    kids = fires[:, truth.children]  # [N, parents, children]
    parents = fires[:, truth.parents]
    assert not (kids & ~parents[:, :, None]).any()
    assert int(kids.sum(-1).max()) == 1
    with_child = kids.any(-1)
    share = float(with_child[parents].float().mean())  # P(a child | parent fires)
    n_parent = int(parents.sum())
    assert share == pytest.approx(cfg.child_probability, abs=5 * math.sqrt(0.25 / n_parent))
    assert truth.parent_of[truth.children[2, 1]] == truth.parents[2]
    assert int((truth.parent_of >= 0).sum()) == cfg.n_parents * cfg.n_children


def test_groups_co_fire_and_keep_their_rates():
    """Within a group the firing indicators correlate (more strongly for a stronger copula); across groups and
    with correlation 0 they do not, and the marginal rates stay p_i either way."""
    corr = {}
    for rho in (0.0, 0.8):
        truth = SyntheticFeatures(SyntheticConfig(n_parents=0, correlation=rho, zipf_exponent=0.0, mean_active=40))
        fires = (truth.heldout(N).acts > 0).float()
        c = torch.corrcoef(fires[:, truth.groups.flatten()].T)  # 64 grouped features, groups of 4 in a row
        same = torch.block_diag(*[torch.ones(4, 4)] * 16).bool() & ~torch.eye(64, dtype=torch.bool)
        other = ~torch.block_diag(*[torch.ones(4, 4)] * 16).bool()
        corr[rho] = (float(c[same].mean()), float(c[other].mean()))
        p = truth.probabilities[truth.groups.flatten()]
        assert ((fires[:, truth.groups.flatten()].mean(0) - p).abs() <= binomial_tol(p, N)).all()
    assert abs(corr[0.0][0]) < 0.02 and abs(corr[0.0][1]) < 0.02
    assert corr[0.8][0] > 0.25 and abs(corr[0.8][1]) < 0.02


@pytest.mark.parametrize("kind", ["lognormal", "uniform", "exponential", "constant"])
def test_magnitudes_have_the_configured_mean(kind):
    truth = SyntheticFeatures(SyntheticConfig(magnitude=kind, magnitude_mean=2.0, magnitude_std=0.5))
    m = truth.magnitudes((200_000,), torch.Generator().manual_seed(0))
    assert float(m.min()) > 0
    assert float(m.mean()) == pytest.approx(2.0, rel=0.02)
    expected_std = {"lognormal": 0.5, "uniform": 0.5, "exponential": 2.0, "constant": 0.0}[kind]
    assert float(m.std()) == pytest.approx(expected_std, rel=0.03, abs=1e-6)


def test_same_seed_same_truth_and_batches_and_a_stream_resumes_at_its_position():
    a, b = SyntheticFeatures(SyntheticConfig()), SyntheticFeatures(SyntheticConfig())
    other = SyntheticFeatures(SyntheticConfig(seed=1))
    assert torch.equal(a.directions, b.directions) and torch.equal(a.probabilities, b.probabilities)
    assert not torch.allclose(a.directions, other.directions)
    first = iter(SyntheticBatches(a, 256))
    batches = [next(first) for _ in range(3)]
    again = iter(SyntheticBatches(b, 256))
    assert all(torch.equal(x, next(again)) for x in batches)
    assert not torch.equal(batches[0], batches[1])
    resumed = SyntheticBatches(a, 256, start=512)
    assert torch.equal(next(iter(resumed)), batches[2]) and resumed.contexts_consumed == 768
    assert not torch.equal(a.heldout(256).x * resumed.factor, batches[0][:, 0])  # held out: its own stream


def test_batches_follow_the_trainers_protocol_normalised_like_the_store():
    truth = SyntheticFeatures(SyntheticConfig())
    store = SyntheticBatches(truth, 512)
    assert isinstance(store, ActivationBatches)
    x = torch.cat([b for _, b in zip(range(8), store)])
    assert x.shape == (8 * 512, 1, 64) and x.dtype == torch.float32
    assert store.contexts_consumed == 8 * 512
    assert float(x[:, 0].norm(dim=1).mean()) == pytest.approx(8.0, rel=0.02)  # sqrt(d_model)
    raw = SyntheticBatches(truth, 512, normalise=False)
    assert raw.scales is None and torch.allclose(next(iter(raw)) * store.factor, x[:512])


def test_a_seeded_sae_does_not_start_at_the_truth():
    """The dictionary's stream is scrambled: it never equals torch.manual_seed(0)'s, which SAE init uses."""
    torch.manual_seed(0)
    assert not torch.equal(torch.randn(4), torch.randn(4, generator=stream_generator(0, 0)))


def test_impossible_configs_are_user_errors():
    with pytest.raises(UserError, match="n-features"):
        SyntheticConfig(n_features=100, n_parents=20, n_children=3, n_groups=10)
    with pytest.raises(UserError, match="mean-active"):
        SyntheticFeatures(SyntheticConfig(mean_active=300, max_probability=0.5))
    with pytest.raises(UserError, match="uniform"):
        SyntheticConfig(magnitude="uniform", magnitude_mean=1.0, magnitude_std=1.0)
    with pytest.raises(UserError, match="correlation"):
        SyntheticConfig(correlation=1.0)
    with pytest.raises(UserError, match="multiple"):
        SyntheticBatches(SyntheticFeatures(SyntheticConfig()), 100, start=150)


# ---- the recovery score on hand-built SAEs -----------------------------------------------------------------


def test_the_true_dictionary_recovers_everything_and_a_random_one_nothing(truth):
    sae = make_sae(SAEConfig(d_in=64, d_sae=600, k=8))
    with torch.no_grad():
        sae.W_dec[:512] = truth.directions[torch.randperm(512)]  # the truth, shuffled, among random rows
    r = recovery(sae, truth, n_samples=1024)
    assert r["n_recovered"] == 512 and r["fraction_recovered"] == 1.0
    assert r["mean_max_cos"] == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    r = recovery(make_sae(SAEConfig(d_in=64, d_sae=1024, k=8)), truth, n_samples=1024)
    assert r["n_recovered"] == 0
    assert 0.25 < r["mean_max_cos"] < 0.5  # the best of 1024 random cosines in 64 dims, about 3 sigma of 1/8
    with pytest.raises(UserError, match="d_model"):
        recovery(make_sae(SAEConfig(d_in=32, d_sae=64, k=8)), truth)


def orthogonal_truth() -> SyntheticFeatures:
    """24 features (4 parents × 2 children, 2 groups of 4, 8 independent) on orthonormal directions in 32 dims."""
    truth = SyntheticFeatures(
        SyntheticConfig(d_model=32, n_features=24, mean_active=3, n_parents=4, n_children=2, n_groups=2)
    )
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    truth.directions = q[:24].contiguous()
    return truth


def exact_relu_sae(truth: SyntheticFeatures):
    """A ReLU SAE with W_dec = the directions and W_enc their transpose: it encodes orthonormal truth exactly
    (up to a 1e-4 threshold)."""
    sae = make_sae(SAEConfig(d_in=32, d_sae=24, architecture="relu"))
    with torch.no_grad():
        sae.W_dec.copy_(truth.directions)
        sae.W_enc.copy_(truth.directions.T)
        sae.b_enc.fill_(-1e-4)  # a silent feature's pre-activation is rounding noise: keep it off
        sae.b_dec.zero_()
    return sae


def test_an_exact_encoder_absorbs_nothing():
    truth = orthogonal_truth()
    r = recovery(exact_relu_sae(truth), truth, n_samples=8192)
    assert r["n_recovered"] == 24 and r["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert r["l0"] == pytest.approx(r["true_l0"])
    assert r["absorption"] == 0.0 and r["parent_recall"] == 1.0
    assert r["child_leaning"] == pytest.approx(0.0, abs=1e-5)


def test_an_sae_built_to_absorb_its_parents_scores_absorption_one():
    """Parents 0 and 1: their latents are inhibited by their children and the child latents' decoders point at
    child + parent, so whenever a child fires the parent latent is silent and the child latent fires (absorption
    1 for them, 0 for parents 2 and 3); alone, the parent latent still fires; the lean is cos 45° = 1/sqrt(2)."""
    truth = orthogonal_truth()
    sae = exact_relu_sae(truth)
    d = truth.directions
    with torch.no_grad():
        for parent in (0, 1):
            children = truth.children[parent]
            sae.W_enc[:, parent] = d[parent] - 1000 * d[children].sum(0)
            for child in children:
                sae.W_dec[child] = (d[child] + d[parent]) / math.sqrt(2)
    r = recovery(sae, truth, n_samples=8192)
    assert r["absorption_per_parent"] == [1.0, 1.0, 0.0, 0.0]
    assert r["absorption"] == 0.5 and r["parent_recall"] == 1.0
    assert r["child_leaning"] == pytest.approx(0.5 / math.sqrt(2), abs=1e-5)  # half the children lean by 1/sqrt(2)
    assert r["n_recovered"] == 24 - 4  # the leaning children sit at cos 0.707 from their own direction


# ---- real training -----------------------------------------------------------------------------------------


def test_topk_trained_by_the_trainer_recovers_a_planted_dictionary(tmp_path):
    """64 features in 32 dims, 3 active, equal rates: TopK (k 3, 128 latents) at the Trainer's defaults."""
    torch.set_num_threads(1)
    cfg = SyntheticConfig(d_model=32, n_features=64, mean_active=3, zipf_exponent=0.0, n_groups=0, n_parents=0)
    truth = SyntheticFeatures(cfg)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=32, d_sae=128, architecture="topk", k=3, hook_name="synthetic"))
    before = recovery(sae, truth, n_samples=4096)
    store = SyntheticBatches(truth, 1024)
    trainer = Trainer(sae, store, TrainConfig(tokens=150_000, checkpoint_every=10**9), tmp_path)
    trainer.show_progress = False
    trainer.train()
    assert sae.cfg.norm_scale == pytest.approx(store.factor)  # the trainer recorded the stream's scale
    after = recovery(sae, truth, n_samples=4096)
    assert before["n_recovered"] == 0
    assert after["fraction_recovered"] >= 0.9 and after["mean_max_cos"] > 0.95
    assert after["l0"] == pytest.approx(3, abs=0.2) and after["fvu"] < 0.3


def test_the_benchmark_script_writes_its_table(tmp_path):
    out = tmp_path / "synthetic.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_synthetic.py"), "--tokens", "4096", "--archs", "topk,relu",
         "--d-sae", "64", "--d-model", "16", "--n-features", "48", "--n-parents", "2", "--n-groups", "2",
         "--eval-samples", "512", "--out", str(out)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| topk |") or line.startswith("| relu |")]
    assert len(rows) == 2 and "/48 (" in rows[0]
    assert '"n_features": 48' in text
