"""Tests for the SAEBench core metrics (analysis/bench_core.py) and the one evaluation pass behind them
(analysis/evaluate.py): each metric against hand-computed values on tiny hand-built cases, and the whole pass on
a tiny real Llama against a direct recomputation with the model's own hidden states and output hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from activations.sources import open_text_source
from analysis.bench_core import SAEBENCH_CORE, SAELAB_EXTRAS, core_metrics, decoder_max_cosine, kl_div_score
from analysis.evaluate import EvalConfig, EvalSums
from analysis.heldout import heldout_batches
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

HOOK_LAYER = 2
HOOK = f"blocks.{HOOK_LAYER}.hook_resid_pre"
EVAL = EvalConfig(tokens=96, model_batch_size=2)


def hand_relu_sae():
    """ReLU SAE, d_in 2, d_sae 3: f = (relu(x0), relu(x1 - 1), 0) and x_hat = (2 f0, f1); latent 2 never fires."""
    sae = make_sae(SAEConfig(d_in=2, d_sae=3, architecture="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
        sae.b_dec.zero_()
    return sae


def test_reconstruction_and_sparsity_metrics_by_hand():
    sae = hand_relu_sae()
    x = torch.tensor([[3.0, 4.0], [2.0, -1.0], [0.0, 2.0], [-1.0, 0.5]])
    # by hand, token by token: f, x_hat, ||x - x_hat||^2, <x, x_hat>, ||x_hat||
    #   (3, 4):   f (3, 3, 0)  x_hat (6, 3)  err 10    dot 30  |x_hat| sqrt(45)  |x| 5
    #   (2, -1):  f (2, 0, 0)  x_hat (4, 0)  err 5     dot 8   |x_hat| 4         |x| sqrt(5)
    #   (0, 2):   f (0, 1, 0)  x_hat (0, 1)  err 1     dot 2   |x_hat| 1         |x| 2
    #   (-1, .5): f (0, 0, 0)  x_hat (0, 0)  err 1.25  dot 0   |x_hat| 0         |x| sqrt(1.25)
    sums = EvalSums(d_sae=3, d_out=2, device="cpu")
    for rows in (slice(0, 3), slice(3, 4)):  # two batches: the sums carry across
        feats = sae.encode(x[rows])
        sums.add_reconstruction(x[rows], sae.decode(feats), feats)
    r = sums.result("hand")
    assert r.tokens == 4
    assert r.mse == pytest.approx((10 + 5 + 1 + 1.25) / 4)
    # variance about the mean (1, 1.375): dim 0 sums 10, dim 1 sums 13.6875
    assert r.fvu == pytest.approx(17.25 / 23.6875)
    assert r.explained_variance == pytest.approx(1 - 17.25 / 23.6875)
    assert r.l0 == pytest.approx((2 + 1 + 1 + 0) / 4)
    assert r.l1 == pytest.approx((6 + 2 + 1 + 0) / 4)
    # cos: 30 / (5 sqrt 45) = 2/sqrt5, 8 / (4 sqrt5) = 2/sqrt5, 1, and 0 for the zero reconstruction
    assert r.cossim == pytest.approx((4 / math.sqrt(5) + 1) / 4)
    assert r.l2_ratio == pytest.approx((math.sqrt(45) / 5 + 4 / math.sqrt(5) + 0.5 + 0) / 4)
    assert r.l2_norm_in == pytest.approx((5 + math.sqrt(5) + 2 + math.sqrt(1.25)) / 4)
    assert r.l2_norm_out == pytest.approx((math.sqrt(45) + 4 + 1 + 0) / 4)
    assert r.relative_reconstruction_bias == pytest.approx((45 + 16 + 1) / (30 + 8 + 2))
    # latent 0 fires on 2 tokens, latent 1 on 2, latent 2 never: densities (0.5, 0.5, 0)
    assert r.frac_alive == pytest.approx(2 / 3) and r.dead_fraction == pytest.approx(1 / 3)
    assert r.freq_over_1_percent == pytest.approx(2 / 3) and r.freq_over_10_percent == pytest.approx(2 / 3)
    assert r.normalized_freq_over_10_percent == pytest.approx(1.0)
    assert math.isnan(r.kl_sae)  # no predictions were added


def test_density_metrics_on_planted_firing():
    # 200 tokens; latent i fires (value 2) on counts[i] of them: densities 0, .5%, 1%, 10%, 10.5%, 100%
    counts = [0, 1, 2, 20, 21, 200]
    gen = torch.Generator().manual_seed(0)
    feats = torch.zeros(200, len(counts))
    for i, c in enumerate(counts):
        feats[torch.randperm(200, generator=gen)[:c], i] = 2.0
    sums = EvalSums(d_sae=len(counts), d_out=3, device="cpu")
    x = torch.randn(200, 3, generator=gen)
    sums.add_reconstruction(x, x, feats)
    r = sums.result("planted")
    assert r.frac_alive == pytest.approx(5 / 6) and r.dead_fraction == pytest.approx(1 / 6)
    assert r.freq_over_1_percent == pytest.approx(3 / 6)  # strictly over: the 1% latent does not count
    assert r.freq_over_10_percent == pytest.approx(2 / 6)  # nor the 10% one
    total = 0.005 + 0.01 + 0.1 + 0.105 + 1.0
    assert r.normalized_freq_over_1_percent == pytest.approx((0.1 + 0.105 + 1.0) / total)
    assert r.normalized_freq_over_10_percent == pytest.approx((0.105 + 1.0) / total)
    assert r.l0 == pytest.approx(sum(counts) / 200) and r.l1 == pytest.approx(2 * sum(counts) / 200)
    assert r.mse == 0 and r.explained_variance == 1 and r.cossim == pytest.approx(1.0)


def test_next_token_ce_and_kl_by_hand():
    # vocabulary of 2; one context of 4 tokens; predictions from t = 0, 1 count, t = 2 is masked, t = 3 has no target
    tokens = torch.tensor([[0, 1, 0, 1]])
    where = torch.tensor([[True, True, False, True]])
    junk = [7.0, -7.0]  # the masked position's logits: must not count

    def logits(p0: float, p1: float) -> torch.Tensor:
        """Logits whose softmax at t = 0 and t = 1 is (p0, 1 - p0) and (p1, 1 - p1)."""
        rows = [[math.log(p), math.log(1 - p)] for p in (p0, p1)]
        return torch.tensor([[*rows, junk, junk]])

    sums = EvalSums(d_sae=1, d_out=1, device="cpu")
    sums.add_reconstruction(torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    runs = {"clean": logits(0.5, 0.5), "sae": logits(0.75, 0.75), "zero": logits(0.9, 0.9)}
    sums.add_predictions(tokens, where, runs)
    r = sums.result("hand")
    # targets: token 1 after t = 0, token 0 after t = 1
    assert r.ce_loss_clean == pytest.approx(math.log(2))
    assert r.ce_loss_sae == pytest.approx((-math.log(0.25) - math.log(0.75)) / 2)
    assert r.ce_loss_zero == pytest.approx((-math.log(0.1) - math.log(0.9)) / 2)
    kl_sae = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # the same at both positions
    kl_zero = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert r.kl_sae == pytest.approx(kl_sae) and r.kl_zero == pytest.approx(kl_zero)
    assert kl_div_score(r.kl_sae, r.kl_zero) == pytest.approx((kl_zero - kl_sae) / kl_zero)
    expected = (r.ce_loss_zero - r.ce_loss_sae) / (r.ce_loss_zero - math.log(2))
    assert r.ce_recovered == pytest.approx(expected)
    assert math.isnan(kl_div_score(0.0, 0.0))


def test_decoder_max_cosine_by_hand():
    # latents at 0 deg, 60 deg and 180 deg (the last of norm 2): cos(0,1) = .5, cos(0,2) = -1, cos(1,2) = -.5
    W_dec = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-2.0, 0.0]])
    got = decoder_max_cosine(W_dec, chunk=2)  # the second chunk holds one latent
    assert got["decoder_mean_max_cos"] == pytest.approx((0.5 + 0.5 - 0.5) / 3)  # signed max per latent
    assert got["decoder_mean_max_abs_cos"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert got["decoder_max_abs_cos"] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in decoder_max_cosine(torch.ones(1, 4)).values())


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_decoder_max_cosine_chunks_match_the_full_matrix(chunk):
    W = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    cos = F.normalize(W, dim=1) @ F.normalize(W, dim=1).T
    off = ~torch.eye(50, dtype=torch.bool)
    signed = cos.masked_fill(~off, -2).max(1).values
    absolute = cos.abs().masked_fill(~off, -2).max(1).values
    got = decoder_max_cosine(W, chunk=chunk)
    assert got["decoder_mean_max_cos"] == pytest.approx(signed.mean().item(), abs=1e-6)
    assert got["decoder_mean_max_abs_cos"] == pytest.approx(absolute.mean().item(), abs=1e-6)
    assert got["decoder_max_abs_cos"] == pytest.approx(absolute.max().item(), abs=1e-6)


# ---- the whole pass on a tiny real Llama -----------------------------------------------------------------------


def tiny_sae(lm, **kw):
    """An SAE on the tiny Llama's HOOK, short contexts."""
    cfg = dict(d_in=lm.d_model, hook_name=HOOK, hook_layer=HOOK_LAYER, context_size=16, model_name=lm.name)
    return make_sae(SAEConfig(**{**cfg, **kw}))


def text():
    return open_text_source("tinyshakespeare", split="test")


def direct_metrics(sae, lm) -> dict:
    """The core metrics recomputed from scratch: the hook activation read off the model's hidden states, the
    reconstruction spliced in by an output hook on the layer before, and the formulas written out again."""
    layer_before = lm.model.model.layers[HOOK_LAYER - 1]
    xs, x_hats, fs, ce, kl = [], [], [], {"clean": [], "sae": [], "zero": []}, {"sae": [], "zero": []}
    for _, tokens, keep in heldout_batches(sae, lm, text(), EVAL.tokens, EVAL.model_batch_size):
        out = lm.model(input_ids=tokens, output_hidden_states=True, use_cache=False)
        x = out.hidden_states[HOOK_LAYER][keep]
        f = sae.encode(x * sae.cfg.norm_scale)
        x_hat = sae.decode(f) / sae.cfg.norm_scale
        xs.append(x), x_hats.append(x_hat), fs.append(f)
        logp = {"clean": out.logits.log_softmax(-1)}
        for run, replacement in (("sae", x_hat), ("zero", torch.zeros_like(x_hat))):

            def replace(module, args, output, replacement=replacement):
                hidden = (output[0] if isinstance(output, tuple) else output).clone()
                hidden[keep] = replacement
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handle = layer_before.register_forward_hook(replace)
            try:
                logp[run] = lm.model(input_ids=tokens, use_cache=False).logits.log_softmax(-1)
            finally:
                handle.remove()
        pred = keep[:, :-1]
        for run, lp in logp.items():
            nll = F.nll_loss(lp[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
            ce[run].append(nll[pred.flatten()])
            if run != "clean":
                kl[run].append(F.kl_div(lp, logp["clean"], log_target=True, reduction="none").sum(-1)[:, :-1][pred])
    x, x_hat, f = torch.cat(xs).double(), torch.cat(x_hats).double(), torch.cat(fs).double()
    density = (f > 0).double().mean(0)
    ce = {run: torch.cat(v).mean().item() for run, v in ce.items()}
    kl = {run: torch.cat(v).mean().item() for run, v in kl.items()}
    err = (x - x_hat).pow(2).sum(-1)
    return {
        "mse": err.mean().item(),
        "explained_variance": 1 - err.sum().item() / (x.var(0, correction=0).sum() * len(x)).item(),
        "cossim": F.cosine_similarity(x, x_hat, dim=-1).mean().item(),
        "l2_norm_in": x.norm(dim=-1).mean().item(),
        "l2_norm_out": x_hat.norm(dim=-1).mean().item(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
        "relative_reconstruction_bias": (x_hat.pow(2).sum() / (x * x_hat).sum()).item(),
        "l0": (f != 0).double().sum(-1).mean().item(),
        "l1": f.sum(-1).mean().item(),
        "frac_alive": (density > 0).double().mean().item(),
        "freq_over_1_percent": (density > 0.01).double().mean().item(),
        "freq_over_10_percent": (density > 0.1).double().mean().item(),
        "ce_loss_without_sae": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_with_ablation": ce["zero"],
        "kl_div_with_sae": kl["sae"],
        "kl_div_with_ablation": kl["zero"],
        "tokens": len(x),
    }


@torch.inference_mode()
def test_core_metrics_match_a_direct_computation(tiny_llama):
    torch.manual_seed(0)
    sae = tiny_sae(tiny_llama, d_sae=96, k=8, norm_scale=0.7)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    got = core_metrics(sae, tiny_llama, text(), EVAL)
    assert set(got) == {e.name for e in SAEBENCH_CORE.values()} | set(SAELAB_EXTRAS)
    want = direct_metrics(sae, tiny_llama)
    assert got["tokens"] == want.pop("tokens") >= EVAL.tokens
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert got["l0"] == pytest.approx(8.0, abs=0.5)  # TopK: k latents (a few may be clamped at 0)
    assert got["kl_div_score"] == pytest.approx(
        (got["kl_div_with_ablation"] - got["kl_div_with_sae"]) / got["kl_div_with_ablation"]
    )
    assert got["ce_loss_score"] == pytest.approx(
        (got["ce_loss_with_ablation"] - got["ce_loss_with_sae"])
        / (got["ce_loss_with_ablation"] - got["ce_loss_without_sae"])
    )
    assert got["explained_variance"] == pytest.approx(1 - got["fvu"]) and got["hook"] == HOOK
    assert got["average_max_decoder_cosine_sim"] == decoder_max_cosine(sae.W_dec)["decoder_mean_max_cos"]


@torch.inference_mode()
def test_an_exact_reconstruction_scores_one(tiny_llama):
    # ReLU latents +x_i and -x_i: relu(x) - relu(-x) = x exactly, so splicing it in changes nothing
    d = tiny_llama.d_model
    sae = tiny_sae(tiny_llama, d_sae=2 * d, architecture="relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    got = core_metrics(sae, tiny_llama, text(), EVAL)
    assert got["kl_div_with_sae"] == 0 and got["kl_div_with_ablation"] > 0
    assert got["ce_loss_with_sae"] == got["ce_loss_without_sae"] != got["ce_loss_with_ablation"]
    assert got["kl_div_score"] == 1.0 and got["ce_loss_score"] == 1.0
    assert got["mse"] == 0 and got["explained_variance"] == 1.0 and got["fvu"] == 0
    for name in ("cossim", "l2_ratio", "relative_reconstruction_bias"):
        assert got[name] == pytest.approx(1.0, abs=1e-12), name
    assert got["l0"] == pytest.approx(d, abs=0.01)  # one of +x_i, -x_i per dimension (bar exact zeros)
    # each latent is orthogonal to all but its opposite (cos -1): the signed max is 0, the absolute 1
    assert got["average_max_decoder_cosine_sim"] == pytest.approx(0.0)
    assert got["decoder_mean_max_abs_cos"] == pytest.approx(1.0) and got["decoder_max_abs_cos"] == pytest.approx(1.0)
