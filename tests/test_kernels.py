"""Tests for sae/kernels.py and TopK's sparse training path: every fast path against its plain-PyTorch
fallback or a float64 dense reference, on fresh random inputs. GPU tests skip without CUDA; the Triton
kernel also runs on CPU under TRITON_INTERPRET=1 when Triton is installed (the `gpu` extra)."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from activations.errors import UserError
from sae.base import Code
from sae.config import SAEConfig
from sae.kernels import (
    _SUB,
    _next_pow2,
    encoder_backward_mode,
    encoder_values,
    fired_latents,
    topk_select,
    triton_topk_available,
)
from sae.registry import make_sae
from sae.topk import TopKSAE
from training import trainer as trainer_module
from training.config import TrainConfig
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[gpu]')")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def random_sae(d_in: int, d_sae: int, k: int, seed: int, dtype: str = "float32", aux_k: int | None = 8) -> TopKSAE:
    """A TopK SAE with random biases and a random (not tied) encoder, so every gradient term is exercised."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, aux_k=aux_k, dtype=dtype))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


# ---- encoder_values: the sparse encoder backward ------------------------------------------------


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("centred", [True, False])
def test_encoder_values_gradients_match_float64_dense(mode, centred):
    g = torch.Generator().manual_seed(10 * (mode == "dense") + centred)  # different inputs for each case
    B, d_in, d_sae, k = 48, 24, 400, 7
    x = torch.randn(B, d_in, generator=g).requires_grad_()
    W = torch.randn(d_in, d_sae, generator=g).requires_grad_()
    b_enc = torch.randn(d_sae, generator=g).requires_grad_()
    b_dec = torch.randn(d_in, generator=g).requires_grad_() if centred else None
    with torch.no_grad():
        pre = torch.addmm(b_enc, x - b_dec if centred else x, W)
    _, idx = topk_select(pre, k)
    weights = torch.randn(B, k, generator=g)
    values = encoder_values(pre, idx, x, W, b_enc, b_dec, mode)
    (values * weights).sum().backward()

    ref = [t.detach().double().requires_grad_() for t in (x, W, b_enc) + ((b_dec,) if centred else ())]
    xc = ref[0] - ref[3] if centred else ref[0]
    ref_values = (xc @ ref[1] + ref[2]).gather(1, idx)
    (ref_values * weights.double()).sum().backward()
    assert rel_err(values.detach(), ref_values.detach()) < 1e-5
    for got, want in zip((x, W, b_enc) + ((b_dec,) if centred else ()), ref):
        assert got.grad.dtype == torch.float32
        assert rel_err(got.grad, want.grad) < 1e-5


def test_encoder_values_without_input_gradient_still_trains_b_dec():
    """The training case (x needs no gradient): grad b_dec comes from W_enc @ grad b_enc."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 16, generator=g)
    W = torch.randn(16, 256, generator=g).requires_grad_()
    b_enc = torch.randn(256, generator=g).requires_grad_()
    b_dec = torch.randn(16, generator=g).requires_grad_()
    with torch.no_grad():
        pre = torch.addmm(b_enc, x - b_dec, W)
    _, idx = topk_select(pre, 5)
    encoder_values(pre, idx, x, W, b_enc, b_dec, "sparse").pow(2).sum().backward()
    ref_b_dec = b_dec.detach().double().requires_grad_()
    ((x.double() - ref_b_dec) @ W.detach().double() + b_enc.detach().double()).gather(1, idx).pow(2).sum().backward()
    assert rel_err(b_dec.grad, ref_b_dec.grad) < 1e-5


def test_encoder_backward_mode_choice_and_override(monkeypatch):
    monkeypatch.delenv("SAELAB_ENCODER_BACKWARD", raising=False)
    assert encoder_backward_mode("cuda", 24576, 32) == "sparse"
    assert encoder_backward_mode("cpu", 24576, 32) == "sparse"
    assert encoder_backward_mode("cpu", 4608, 32) == "sparse"
    assert encoder_backward_mode("cpu", 64, 8) == "dense"
    monkeypatch.setenv("SAELAB_ENCODER_BACKWARD", "dense")
    assert encoder_backward_mode("cuda", 24576, 32) == "dense"
    monkeypatch.setenv("SAELAB_ENCODER_BACKWARD", "fast")
    with pytest.raises(UserError, match="SAELAB_ENCODER_BACKWARD='fast' is not one of dense, sparse"):
        encoder_backward_mode("cpu", 64, 4)


# ---- TopK training: fast path against the reference path ------------------------------------------


def float64_reference(sae: TopKSAE) -> TopKSAE:
    ref = copy.deepcopy(sae).double()
    ref.fast_path = False
    return ref


@pytest.mark.parametrize("dead_fraction", [0.0, 0.1, 0.6])  # none, few (gathered columns), many (masked)
def test_topk_fast_training_forward_matches_float64_dense_reference(dead_fraction):
    seed = int(dead_fraction * 10) + 3
    sae = random_sae(d_in=20, d_sae=320, k=6, seed=seed)
    ref = float64_reference(sae)
    assert sae.uses_fast_path() and not ref.uses_fast_path()
    x = torch.randn(40, 20)
    dead = torch.rand(320) < dead_fraction
    x_fast = x.clone().requires_grad_()
    x_ref = x.double().requires_grad_()

    out = sae.training_forward(x_fast, dead)
    out.loss.backward()
    want = ref.training_forward(x_ref, dead)
    want.loss.backward()

    assert set(out.losses) == set(want.losses) == {"fvu", "auxk"}
    for name in out.losses:
        assert abs(out.losses[name].item() - want.losses[name].item()) <= 1e-5 * max(
            abs(want.losses[name].item()), 1e-3
        )
    assert (out.losses["auxk"] > 0) == (dead_fraction > 0)
    assert rel_err(out.x_hat.detach(), want.x_hat.detach()) < 1e-5
    assert torch.equal(out.fired, want.fired) and out.fired.shape == (320,)
    assert out.l0.item() == pytest.approx(want.l0.item())
    for name, p in sae.named_parameters():
        assert rel_err(p.grad, dict(ref.named_parameters())[name].grad) < 1e-5, name
    assert rel_err(x_fast.grad, x_ref.grad) < 1e-5


def test_topk_fast_path_rejects_bad_batches_like_the_reference():
    sae = random_sae(d_in=8, d_sae=32, k=2, seed=0)
    with pytest.raises(UserError, match="batch >= 2"):
        sae.training_forward(torch.randn(1, 8))
    with pytest.raises(UserError, match="expects d_in=8"):
        sae.training_forward(torch.randn(4, 9))


def test_subclasses_that_change_the_code_keep_their_own_path():
    class Shifted(TopKSAE):  # a subclass with its own training code must not be sent down TopK's fast path
        def train_code(self, pre):
            return super().train_code(pre + 1.0)

    torch.manual_seed(0)
    sub = Shifted(SAEConfig(d_in=8, d_sae=64, k=3))
    assert not sub.uses_fast_path()
    x = torch.randn(16, 8)
    expected = sub.decode_code(sub.train_code(sub.encode_pre(x)))
    torch.testing.assert_close(sub.training_forward(x).x_hat, expected)


def test_fired_latents_matches_code_fired():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50, (30, 4), generator=g)
    acts = torch.randn(30, 4, generator=g).relu()  # about half zero: those latents do not count as fired
    assert torch.equal(fired_latents(idx, acts, 50), Code(acts, idx).fired(50))


class ListStore:
    """A training.data.ActivationBatches over fixed [B, 1, d] batches."""

    def __init__(self, batches):
        self.batches, self.batch_size = batches, len(batches[0])
        self.hook_names, self.scales, self.contexts_consumed = ["h"], {}, 0

    def __iter__(self):
        return iter(self.batches)


def test_trainer_compile_flag_trains_like_eager(tmp_path, monkeypatch):
    """Trainer(compile=True) (sae train --compile) runs the same steps as eager; aot_eager keeps the test fast."""
    monkeypatch.setattr(trainer_module, "COMPILE_BACKEND", "aot_eager")
    batches = [torch.randn(64, 1, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    saes = []
    for compile in (False, True):
        sae = random_sae(d_in=16, d_sae=128, k=4, seed=0)
        cfg = TrainConfig(tokens=4 * 64, lr=1e-3, warmup_steps=1, checkpoint_every=1000, dead_tokens=64)
        Trainer(sae, ListStore(batches), cfg, tmp_path / str(compile), compile=compile).train()
        saes.append(sae)
    for (name, eager), compiled in zip(saes[0].named_parameters(), saes[1].parameters()):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6, msg=name)


# ---- top-k selection ------------------------------------------------------------------------------


def two_pass_topk_emulation(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel's algorithm in PyTorch: threshold from block maxima, candidates packed as int64
    (order-preserving float bits << 32 | column), top-k of the candidates or of the whole row on overflow."""
    kp = _next_pow2(k)
    rows, n = pre.shape
    v = pre.float()
    padded = torch.full((rows, -(-n // _SUB) * _SUB), float("-inf"))
    padded[:, :n] = v
    maxima = torch.cat([padded.view(rows, -1, _SUB).amax(-1), torch.full((rows, k), float("-inf"))], dim=1)
    t = maxima.topk(k, dim=1).values[:, -1:]  # the k-th largest block maximum (-inf with fewer than k blocks)
    bits = v.view(torch.int32)
    keys = (torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long() << 32) | torch.arange(n)
    candidates = torch.where(v >= t, keys, torch.iinfo(torch.int64).min + 1)
    overflow = (v >= t).sum(1, keepdim=True) > 4 * kp
    top = torch.where(overflow, keys, candidates).topk(k, dim=1).values
    s = (top >> 32).int()
    return torch.where(s >= 0, s, s ^ 0x7FFFFFFF).view(torch.float32).to(pre.dtype), top & 0xFFFFFFFF


def assert_same_topk(values, indices, pre, k):
    """Same multiset of values as torch.topk, and each value sits at its index (ties may pick other columns)."""
    assert values.shape == indices.shape == (pre.shape[0], k) and indices.dtype == torch.int64
    want = pre.float().topk(k, dim=1).values
    assert torch.equal(values.float().sort(dim=1, descending=True).values, want)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)


@pytest.mark.parametrize("n,k", [(300, 5), (1000, 32), (37, 37)])
def test_two_pass_algorithm_emulation_equals_torch_topk(n, k):
    g = torch.Generator().manual_seed(n + k)
    pre = torch.randn(6, n, generator=g)
    pre[0] = 0.0  # every entry ties with the threshold: the overflow path
    pre[1, : n // 2] = float("-inf")
    assert_same_topk(*two_pass_topk_emulation(pre, k), pre, k)


def test_topk_select_falls_back_to_torch_topk_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pre = torch.randn(5, 100)
    assert not triton_topk_available(pre, 4)
    assert_same_topk(*topk_select(pre, 4), pre, 4)


INTERPRETER_CHECK = """
import torch
from sae.kernels import _topk_triton, topk_select, triton_topk_available
g = torch.Generator().manual_seed(0)
for n, k, dtype in [(300, 5, torch.float32), (700, 8, torch.bfloat16), (20, 20, torch.float32)]:
    pre = torch.randn(4, n, generator=g).to(dtype)
    pre[0] = 0.0                      # every entry ties with the threshold: the overflow path
    pre[1, ::3] = float("-inf")
    assert triton_topk_available(pre, k)
    checks = [(*_topk_triton(pre, k), pre)]
    if n == 300:  # rows with a stride (copied before the launch), once
        strided = torch.randn(2, 2 * n, generator=g).to(dtype)[:, ::2]
        checks.append((*topk_select(strided, k), strided))
    for values, indices, x in checks:
        assert values.dtype == dtype and indices.dtype == torch.int64 and values.shape == (x.shape[0], k)
        assert torch.equal(values.float().sort(1, descending=True).values, x.float().topk(k, 1).values)
        assert torch.equal(x.gather(1, indices), values)
        assert all(len(set(row.tolist())) == k for row in indices)
print("interpreter ok")
"""


@needs_triton
def test_triton_topk_kernel_under_the_interpreter():
    """The real kernel on CPU: TRITON_INTERPRET=1 must be set before triton is imported, so in a subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETER_CHECK], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "interpreter ok" in done.stdout, done.stderr[-3000:]


# ---- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("d_sae,k", [(24576, 32), (65536, 64), (5000, 100)])
def test_triton_topk_on_cuda_matches_torch_topk(d_sae, k):
    pre = torch.randn(512, d_sae, device="cuda").to(torch.bfloat16)
    assert triton_topk_available(pre, k)
    assert_same_topk(*topk_select(pre, k), pre, k)
    pre = torch.randn(256, d_sae, device="cuda")
    assert_same_topk(*topk_select(pre, k), pre, k)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_cuda_encoder_backward_matches_float64(mode):
    g = torch.Generator(device="cuda").manual_seed(1)
    B, d_in, d_sae, k = 1024, 256, 8192, 32
    x = torch.randn(B, d_in, device="cuda", generator=g)
    W = torch.randn(d_in, d_sae, device="cuda", generator=g).requires_grad_()
    b_enc = torch.randn(d_sae, device="cuda", generator=g).requires_grad_()
    b_dec = torch.randn(d_in, device="cuda", generator=g).requires_grad_()
    with torch.no_grad():
        pre = torch.addmm(b_enc, x - b_dec, W)
    _, idx = topk_select(pre, k)
    weights = torch.randn(B, k, device="cuda", generator=g)
    (encoder_values(pre, idx, x, W, b_enc, b_dec, mode) * weights).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (W, b_enc, b_dec)]
    (((x.double() - ref[2]) @ ref[0] + ref[1]).gather(1, idx) * weights.double()).sum().backward()
    for got, want in zip((W, b_enc, b_dec), ref):
        assert rel_err(got.grad, want.grad) < 1e-5


@pytest.mark.gpu
def test_cuda_fast_training_step_under_autocast_tracks_the_fp32_reference():
    """bf16 autocast (as the trainer runs it) against the fp32 reference path: bf16-sized differences."""
    sae = random_sae(d_in=256, d_sae=8192, k=32, seed=5).cuda()
    ref = copy.deepcopy(sae)
    ref.fast_path = False
    x = torch.randn(2048, 256, device="cuda")
    dead = torch.rand(8192, device="cuda") < 0.05
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sae.training_forward(x, dead)
    out.loss.backward()
    want = ref.training_forward(x, dead)
    want.loss.backward()
    assert abs(out.losses["fvu"].item() - want.losses["fvu"].item()) < 2e-2 * want.losses["fvu"].item()
    for name, p in sae.named_parameters():
        assert rel_err(p.grad, dict(ref.named_parameters())[name].grad) < 5e-2, name
