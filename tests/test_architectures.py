"""The SAE family (relu, batchtopk, jumprelu, gated, matryoshka, transcoder): each learns a planted sparse
dictionary, saves and loads exactly, and its own mechanism (thresholds, STE, tied gate, prefixes,
warm-up) behaves as the papers say; each trains and evaluates through the CLI on a tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file

from activations.errors import UserError
from sae.base import SAE, ForwardPass, fvu
from sae.batchtopk import THRESHOLD_AVERAGE_C
from sae.cli import main
from sae.config import SAEConfig
from sae.io import load_sae, save_sae
from sae.jumprelu import JumpReLU, Step
from sae.matryoshka import default_prefixes, parse_prefixes
from sae.registry import ARCHITECTURES, make_sae
from sae.relu import DECODER_INIT_NORM
from training.step import train_step

D_IN, N_TRUE, N_ACTIVE, D_SAE, BATCH = 32, 64, 3, 128, 256


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, d, generator=gen)
    return w / w.norm(dim=1, keepdim=True)


class Planted:
    """Sparse nonnegative codes over N_TRUE known unit directions (3 active, coefficients 0.5-1.5), scaled
    so the mean norm is about sqrt(D_IN) as the store's normalisation makes it; `out` maps the same codes
    through other directions (a transcoder's target)."""

    def __init__(self, seed: int = 0, d_out: int = 24):
        self.gen = torch.Generator().manual_seed(seed)
        self.true = unit_rows(N_TRUE, D_IN, self.gen)
        self.true_out = unit_rows(N_TRUE, d_out, self.gen)

    def codes(self, n: int = BATCH) -> torch.Tensor:
        which = torch.rand(n, N_TRUE, generator=self.gen).argsort(dim=1)[:, :N_ACTIVE]
        coef = torch.rand(n, N_ACTIVE, generator=self.gen) + 0.5
        return torch.zeros(n, N_TRUE).scatter(1, which, coef) * 3.0

    def batch(self, n: int = BATCH) -> torch.Tensor:
        return self.codes(n) @ self.true


def mean_max_cos(true: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over true directions of the best cosine with a decoder row."""
    rows = W_dec.detach() / W_dec.detach().norm(dim=1, keepdim=True)
    return (true @ rows.T).max(dim=1).values.mean().item()


def train(sae: SAE, batches: Callable[[], tuple[torch.Tensor, torch.Tensor | None]], steps: int, lr: float = 1e-2):
    """The trainer's step (training.step.train_step) on in-memory data, with progress and dead-latent
    bookkeeping around it. Returns the last TrainOutput."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for step in range(steps):
        x, target = batches()
        sae.set_progress(step / steps)
        out = train_step(sae, opt, x, target=target, dead_mask=since_fired > 20).out
        since_fired += 1
        since_fired[out.fired] = 0
    return out


def make(arch: str, seed: int = 1234, **kw) -> SAE:
    torch.manual_seed(seed)  # not the data seed: the init must not start on the true directions
    return make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, **kw))


# ---- every architecture learns a planted dictionary ------------------------------------------------

PLANTED = {
    "relu": (dict(l1_coefficient=1.0), 300),
    "batchtopk": (dict(k=4), 300),
    "jumprelu": (dict(l0_coefficient=1.0), 400),
    "gated": (dict(l1_coefficient=3.0), 500),
    "matryoshka": (dict(k=4, matryoshka_prefixes=[64, 128]), 300),
}


@pytest.mark.parametrize("arch", list(PLANTED))
def test_learns_planted_dictionary(arch):
    kw, steps = PLANTED[arch]
    data = Planted()
    sae = make(arch, **kw)
    assert mean_max_cos(data.true, sae.W_dec) < 0.6  # random init is far from the answer
    train(sae, lambda: (data.batch(), None), steps)
    assert mean_max_cos(data.true, sae.W_dec) > 0.9
    with torch.no_grad():  # inference (encode, per token) reconstructs held-out data sparsely
        x = data.batch(2048)
        f = sae.encode(x)
        assert fvu(x, sae.decode(f)) < 0.2
        assert 1.5 < (f != 0).sum(-1).float().mean() < 12  # 3 true features per token; dense would be ~64


def test_transcoder_learns_planted_map():
    """Input = codes @ A_in (32 dims), target = codes @ A_out (24 dims): the transcoder predicts the target
    and its decoder rows are the output directions."""
    data = Planted(d_out=24)
    sae = make("transcoder", k=4, d_out=24)
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, 24) and sae.b_dec.shape == (24,)

    def pairs():
        codes = data.codes()
        return codes @ data.true, codes @ data.true_out

    assert mean_max_cos(data.true_out, sae.W_dec) < 0.6
    train(sae, pairs, 300)
    assert mean_max_cos(data.true_out, sae.W_dec) > 0.9
    with torch.no_grad():
        x, y = pairs()
        y_hat = sae(x)
        assert y_hat.shape == (BATCH, 24)
        assert fvu(y, y_hat) < 0.15
        assert fvu(x[:, :24], y_hat) > 0.9  # it predicts the target, not its own input
    with pytest.raises(UserError, match="transcoder trains on .input, target. pairs"):
        sae.training_forward(x)
    with pytest.raises(UserError, match="d_out=24"):
        sae.training_forward(x, target=x)


# ---- save / load ----------------------------------------------------------------------------

ROUND_TRIP = {
    "relu": {},
    "batchtopk": dict(k=4),
    "jumprelu": {},
    "gated": {},
    "matryoshka": dict(k=4, matryoshka_prefixes=[16, 64]),
    "transcoder": dict(k=4, d_out=20),
}
SAELENS_TENSORS = {  # what SAELens 6's inference class of the exported architecture loads
    "standard": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"},
    "gated": {"W_enc", "W_dec", "b_gate", "b_mag", "r_mag", "b_dec"},
    "transcoder": {"W_enc", "W_dec", "b_enc", "b_dec"},
}


@pytest.mark.parametrize("arch", list(ROUND_TRIP))
def test_save_load_round_trip(arch, tmp_path):
    sae = make(arch, **ROUND_TRIP[arch])
    data = Planted(d_out=20)

    def batches():
        codes = data.codes()
        return codes @ data.true, codes @ data.true_out if arch == "transcoder" else None

    train(sae, batches, 3)  # thresholds and biases move off their initial values
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x = data.batch(64)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["saelab"]["architecture"] == arch
    names = set(load_file(tmp_path / "sae_weights.safetensors"))
    assert names == SAELENS_TENSORS[cfg["architecture"]]


def test_saelens_architecture_names_in_cfg_json():
    names = {arch: SAEConfig(d_in=8, d_sae=16, architecture=arch).to_saelens_dict() for arch in ARCHITECTURES}
    assert {a: d["architecture"] for a, d in names.items()} == {
        "topk": "topk",
        "relu": "standard",
        "batchtopk": "jumprelu",
        "matryoshka": "jumprelu",
        "jumprelu": "jumprelu",
        "gated": "gated",
        "transcoder": "transcoder",
    }
    assert names["transcoder"]["apply_b_dec_to_input"] is False and names["relu"]["apply_b_dec_to_input"] is True
    assert names["transcoder"]["d_out"] == 8


# ---- batchtopk ------------------------------------------------------------------------------


def test_batchtopk_trains_on_the_batch_and_infers_with_its_threshold():
    sae = make("batchtopk", k=4)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    x = Planted().batch()
    pre = sae.encode_pre(x)
    code = sae.train_code(pre)
    kept = code.acts != 0
    assert kept.sum() == 4 * BATCH  # k * B over the whole batch ...
    assert (kept.sum(-1) != 4).any()  # ... not k on every token
    smallest = code.acts[kept].min()
    assert torch.all(code.acts[~kept] == 0) and (pre.relu()[~kept] <= smallest + 1e-6).all()
    torch.testing.assert_close(sae.threshold, smallest.expand(D_SAE))  # the first batch sets the threshold

    code2 = sae.train_code(sae.encode_pre(Planted(seed=1).batch()))
    rate = (THRESHOLD_AVERAGE_C + 1) / (THRESHOLD_AVERAGE_C + 2)  # the second batch's weight
    ema = (1 - rate) * smallest + rate * code2.acts[code2.acts > 0].min()
    torch.testing.assert_close(sae.threshold, ema.expand(D_SAE))

    with torch.no_grad():  # inference: per token, JumpReLU at the threshold, independent of the batch
        f = sae.encode(x)
        torch.testing.assert_close(f, pre.relu() * (pre > sae.threshold))

        alone = torch.stack([sae.encode(x[i : i + 1])[0] for i in range(8)])
        torch.testing.assert_close(f[:8], alone)
        torch.testing.assert_close(sae.encode(x[:8]), f[:8])


def test_batchtopk_selects_per_token_during_its_warmup_and_still_tracks_the_batch_threshold():
    """Before batch_topk_warmup_fraction of training: the k largest of each token (TopK's code, dense); the threshold
    moves to the batch's k * B-th value all the same, so inference after the warm-up starts from it."""
    sae = make("batchtopk", k=4, batch_topk_warmup_fraction=0.5)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    pre = sae.encode_pre(Planted().batch())
    sae.set_progress(0.4)
    code = sae.train_code(pre)
    assert ((code.acts != 0).sum(-1) == 4).all()  # k on every token
    top = pre.relu().topk(4)
    torch.testing.assert_close(code.acts, torch.zeros_like(pre).scatter(-1, top.indices, top.values))
    batch_kth = pre.relu().flatten().topk(4 * BATCH).values.min()
    torch.testing.assert_close(sae.threshold, batch_kth.expand(D_SAE))
    sae.set_progress(0.5)
    assert ((sae.train_code(pre).acts != 0).sum(-1) != 4).any()  # the warm-up is over: the batch's selection


# ---- jumprelu -------------------------------------------------------------------------------


def test_jumprelu_threshold_gradients_follow_the_paper():
    """dL0/dtheta = -(1/eps) K((z-theta)/eps) and dJumpReLU/dtheta = -(theta/eps) K(...), K the rectangle."""
    eps = 0.1
    z = torch.tensor([[0.52, 0.30, 2.0], [0.47, 0.26, -1.0], [0.70, 0.36, 0.0]], requires_grad=True)
    theta = torch.tensor([0.5, 0.3, 1.0], requires_grad=True)
    Step.apply(z, theta, eps).sum().backward()
    # latent 0: z=0.52, 0.47 inside the window |z - 0.5| < 0.05 -> 2 hits; latent 1: 0.30, 0.26 -> 2; latent 2: none
    torch.testing.assert_close(theta.grad, torch.tensor([-2 / eps, -2 / eps, 0.0]))
    assert z.grad is None  # the L0 term does not move the pre-activations

    theta.grad = None
    y = JumpReLU.apply(z, theta, eps)
    torch.testing.assert_close(y.detach(), z.detach() * (z.detach() > theta.detach()))
    y.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-2 * 0.5 / eps, -2 * 0.3 / eps, 0.0]))
    torch.testing.assert_close(z.grad, (z > theta).float())

    # a threshold pushed below 0 acts as 0 but still feels the L0 gradient that pulls it back up
    neg = torch.tensor([-0.2], requires_grad=True)
    Step.apply(torch.tensor([[0.01], [0.5]]), neg, eps).sum().backward()
    assert neg.grad.item() == pytest.approx(-1 / eps)


def test_jumprelu_l0_penalty_raises_thresholds_and_cuts_l0():
    data = Planted()
    sparse, dense = make("jumprelu", l0_coefficient=3.0), make("jumprelu", l0_coefficient=0.0)
    out_sparse = train(sparse, lambda: (data.batch(), None), 60)
    out_dense = train(dense, lambda: (data.batch(), None), 60)
    assert sparse.threshold.mean() > dense.threshold.mean() + 0.1
    assert out_sparse.l0 < 0.5 * out_dense.l0
    assert set(out_sparse.losses) == {"fvu", "l0_penalty", "pre_act"}  # pre_act on by default (on dead latents)
    with_pre_act = make("jumprelu", pre_act_loss_coefficient=1e-2)
    out = with_pre_act.training_forward(data.batch(), dead_mask=torch.ones(D_SAE, dtype=torch.bool))
    assert out.losses["pre_act"] > 0


# ---- gated ----------------------------------------------------------------------------------


def test_gated_paths_share_tied_weights_and_aux_loss_freezes_the_decoder():
    sae = make("gated")
    assert "b_enc" not in dict(sae.named_parameters())
    with torch.no_grad():
        sae.r_mag.normal_(0, 0.5)
        sae.b_mag.normal_(0, 0.5)
        sae.b_gate.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.1)
    x = Planted().batch(64)
    centred = x - sae.b_dec
    gate = centred @ sae.W_enc + sae.b_gate
    magnitude = centred @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag  # W_mag = W_enc * exp(r_mag)
    torch.testing.assert_close(sae.encode(x), (gate > 0) * magnitude.relu())

    with torch.no_grad():  # without b_mag, r_mag scales each latent's magnitude by exp(r_mag) and no more
        sae.b_mag.zero_()
        before = sae.encode(x)
        sae.r_mag.add_(1.0)
        torch.testing.assert_close(sae.encode(x), before * torch.e)

    out = sae.training_forward(x)
    assert set(out.losses) == {"fvu", "l1", "aux"}
    pre = (x - sae.b_dec.detach()) @ sae.W_enc  # encode_pre with the input centring held fixed
    aux = sae.aux_losses(ForwardPass(x, x, out.x_hat, pre, sae.train_code(pre)), None)["aux"]
    grads = torch.autograd.grad(
        aux,
        [sae.W_dec, sae.b_dec, sae.W_enc, sae.b_gate, sae.r_mag, sae.b_mag],
        allow_unused=True,
        materialize_grads=True,
    )
    assert not grads[0].any() and not grads[1].any()  # decoder (W_dec, b_dec) frozen in the aux reconstruction
    assert grads[2].any() and grads[3].any()  # it trains the gate path
    assert not grads[4].any() and not grads[5].any()  # and not the magnitude path


# ---- matryoshka -----------------------------------------------------------------------------


def test_matryoshka_prefixes_reconstruct_on_their_own():
    data = Planted()
    sae = make("matryoshka", k=4, matryoshka_prefixes=[64, 128])
    out = train(sae, lambda: (data.batch(), None), 300)
    assert set(out.losses) == {"fvu", "auxk", "fvu_64"}
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.losses.values()), rel=1e-5)
    with torch.no_grad():
        x = data.batch(2048)
        f = sae.encode(x)
        first = fvu(x, f[:, :64] @ sae.W_dec[:64] + sae.b_dec).item()
        last = fvu(x, f[:, 64:] @ sae.W_dec[64:] + sae.b_dec).item()
    assert first < 0.3  # the first half alone reconstructs ...
    assert last > first + 0.3  # ... the second half (never asked to) does not


def test_matryoshka_prefix_config():
    assert default_prefixes(4096) == [256, 512, 1024, 2048, 4096] and default_prefixes(8) == [1, 2, 4, 8]
    assert make("matryoshka", k=4).prefixes == [8, 16, 32, 64, 128]
    assert make("matryoshka", k=4, matryoshka_prefixes=[32, 64]).prefixes == [32, 64, 128]
    assert parse_prefixes("32, 64,128") == [32, 64, 128] and parse_prefixes(None) is None
    with pytest.raises(UserError, match="comma-separated integers"):
        parse_prefixes("32;64")
    for bad in ([64, 32], [0, 64], [32, 256]):
        with pytest.raises(UserError, match="strictly increasing integers between 1 and d_sae=128"):
            make("matryoshka", matryoshka_prefixes=bad)


# ---- relu -----------------------------------------------------------------------------------


def test_relu_l1_warms_up_with_progress_and_leaves_decoder_norms_free():
    sae = make("relu", l1_coefficient=2.0, sparsity_warmup_fraction=0.1)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((D_SAE,), DECODER_INIT_NORM))
    x = Planted().batch()
    l1 = {}
    for progress in (0.0, 0.05, 0.1, 0.7):
        sae.set_progress(progress)
        l1[progress] = sae.training_forward(x).losses["l1"].item()
    assert l1[0.0] == 0 and l1[0.1] > 0
    assert l1[0.05] == pytest.approx(l1[0.1] / 2) and l1[0.7] == pytest.approx(l1[0.1])
    # the penalty is sum_i f_i ||W_dec_i||: doubling a decoder row doubles that latent's term
    f = sae.encode(x)
    expected = 2.0 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
    assert l1[0.7] == pytest.approx(expected.item(), rel=1e-4)

    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # rows off the unit sphere: renormalising would show
    out = sae.training_forward(x)
    out.loss.backward()
    grad = sae.W_dec.grad.clone()
    sae.remove_parallel_grad()
    sae.normalise_decoder()
    assert torch.equal(sae.W_dec.grad, grad)  # no projection ...
    half = torch.full((D_SAE,), 0.5 * DECODER_INIT_NORM)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), half)  # ... and no renormalisation


# ---- configuration errors -------------------------------------------------------------------


def test_bad_architecture_settings_are_user_errors():
    with pytest.raises(UserError, match="l1_coefficient must be >= 0"):
        SAEConfig(d_in=8, d_sae=16, architecture="relu", l1_coefficient=-1.0)
    with pytest.raises(UserError, match="jumprelu_bandwidth must be > 0"):
        make("jumprelu", jumprelu_bandwidth=0.0)
    with pytest.raises(UserError, match="topk_threshold_lr must be in"):
        make("batchtopk", topk_threshold_lr=0.0)
    with pytest.raises(UserError, match="d_out must be a positive integer"):
        make("transcoder", d_out=-3)


# ---- the command line -----------------------------------------------------------------------

CLI = (
    "--hook blocks.2.hook_resid_post --dataset tinyshakespeare --tokens 4096 --batch-size 512 "
    "--buffer-tokens 2048 --context-size 64 --expansion 2 --k 8 --eval-tokens 256 --device cpu"
).split()


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "jumprelu", "gated", "matryoshka"])
def test_cli_trains_and_evaluates(arch, tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / arch
    extra = ["--matryoshka-prefixes", "16,64"] if arch == "matryoshka" else []
    assert main(["train", "--model", tiny_llama_dir, "--architecture", arch, *CLI, *extra, "--out", str(run)]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert 0 < ev["l0"] <= 128 and ev["fvu"] < 1.5
    sae = load_sae(run)
    assert sae.architecture == arch and sae.cfg.norm_scale != 1.0
    if arch == "matryoshka":
        assert sae.prefixes == [16, 64, 128]


def test_cli_help_lists_architectures_and_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"--architecture {{{','.join(sorted(ARCHITECTURES))}}}" in out
    for option in ("--l1-coefficient", "--l0-coefficient", "--matryoshka-prefixes"):
        assert option in out
