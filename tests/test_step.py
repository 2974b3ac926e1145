"""training.step.train_step, the one optimiser step the Trainer, tests and benchmarks share, and the explicit
loss denominator (variance) every architecture's training forward passes to fvu() and penalty()."""

from __future__ import annotations

import copy

import pytest
import torch

from sae.base import SAE, fvu, local_variance, penalty
from sae.config import SAEConfig
from sae.registry import make_sae
from training.data import ActivationBatches
from training.step import StepResult, train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

D_IN, D_SAE = 16, 64


def planted(n: int, gen: torch.Generator, true: torch.Tensor) -> torch.Tensor:
    """n sparse positive combinations (3 active) of the rows of `true`."""
    which = torch.rand(n, len(true), generator=gen).argsort(dim=1)[:, :3]
    coef = torch.rand(n, 3, generator=gen) + 0.5
    return (coef[..., None] * true[which]).sum(1)


def topk(seed: int = 0, **kw) -> SAE:
    torch.manual_seed(seed)
    return make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **kw))


def test_train_step_on_a_planted_dictionary_lowers_the_loss():
    gen = torch.Generator().manual_seed(0)
    true = torch.randn(32, D_IN, generator=gen)
    true /= true.norm(dim=1, keepdim=True)
    sae = topk(seed=7)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    since_fired = torch.zeros(D_SAE, dtype=torch.long)
    losses = []
    for _ in range(150):
        result = train_step(sae, opt, planted(128, gen, true), dead_mask=since_fired > 10, grad_clip=1.0)
        since_fired += 1
        since_fired[result.out.fired] = 0
        losses.append(float(result.loss))
    assert isinstance(result, StepResult) and result.grad_norm is not None and result.lr is None
    assert sum(losses[-10:]) / 10 < 0.2  # FVU of the last steps: the planted dictionary is learned (1.0 = the mean)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))  # renormalised after every step


def test_train_step_sets_the_lr_clips_and_steps_once():
    sae = topk()
    opt = torch.optim.SGD(sae.parameters(), lr=123.0)
    before = copy.deepcopy(sae)
    x = torch.randn(32, D_IN)
    clipped = []

    def clip(s: SAE, max_norm: float) -> torch.Tensor:
        clipped.append((s, max_norm))
        return torch.nn.utils.clip_grad_norm_(s.parameters(), max_norm)

    result = train_step(sae, opt, x, lr=1e-3, grad_clip=0.5, clip=clip)
    assert clipped == [(sae, 0.5)] and result.lr == 1e-3
    assert all(group["lr"] == 1e-3 for group in opt.param_groups)
    grads = torch.cat([p.grad.flatten() for p in sae.parameters()])
    assert grads.norm() == pytest.approx(min(0.5, float(result.grad_norm)), rel=1e-4)  # clipped to 0.5
    # plain SGD: b_enc moved by exactly -lr * (clipped) grad, and W_dec rows are back on the unit sphere
    torch.testing.assert_close(sae.b_enc, before.b_enc - 1e-3 * sae.b_enc.grad)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_a_failing_loss_check_leaves_weights_and_gradients_alone():
    sae = topk()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    before = copy.deepcopy(sae.state_dict())
    seen = []

    def check(loss: torch.Tensor) -> None:
        seen.append(loss)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_step(sae, opt, torch.randn(32, D_IN), check_loss=check)
    assert len(seen) == 1 and not seen[0].requires_grad
    assert all(p.grad is None for p in sae.parameters())
    for name, p in sae.state_dict().items():
        assert torch.equal(p, before[name]), name


def test_dense_and_sparse_topk_paths_give_the_same_step():
    """The sparse fast path and SAE.training_forward (AuxK on): same loss terms, gradients and update."""
    sparse, dense = topk(seed=3, aux_k=6), topk(seed=3, aux_k=6)
    dense.fast_path = False
    assert sparse.uses_fast_path() and not dense.uses_fast_path()
    x = torch.randn(48, D_IN, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    results = []
    for sae in (sparse, dense):
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        results.append(train_step(sae, opt, x, dead_mask=dead, grad_clip=1.0))
    a, b = results
    assert float(a.out.losses["auxk"]) > 0
    for name in ("fvu", "auxk"):
        torch.testing.assert_close(a.out.losses[name], b.out.losses[name])
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.out.fired, b.out.fired)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
        torch.testing.assert_close(p, q, msg=name)


def test_fvu_and_penalty_take_an_explicit_denominator():
    x, x_hat = torch.randn(20, D_IN), torch.randn(20, D_IN)
    assert torch.equal(fvu(x, x_hat, local_variance(x)), fvu(x, x_hat))
    torch.testing.assert_close(fvu(x, x_hat, 4 * local_variance(x)), fvu(x, x_hat) / 4)
    per_token = torch.rand(20)
    assert torch.equal(penalty(per_token, x, local_variance(x)), penalty(per_token, x))
    torch.testing.assert_close(penalty(per_token, x, 2 * local_variance(x)), penalty(per_token, x) / 2)


@pytest.mark.parametrize("arch", ["topk", "relu", "gated", "jumprelu", "batchtopk", "matryoshka"])
def test_every_loss_term_divides_by_the_given_variance(arch):
    """variance=local_variance is the default exactly; doubling it halves every term (FVU, AuxK, penalties)."""
    kw = {"pre_act_loss_coefficient": 0.5} if arch == "jumprelu" else {}
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, architecture=arch, jumprelu_init_threshold=0.01, **kw))
    x = torch.randn(32, D_IN) + 0.2
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[1::2] = True
    default = sae.training_forward(x, dead)
    own = sae.training_forward(x, dead, variance=local_variance)
    doubled = sae.training_forward(x, dead, variance=lambda v: 2 * local_variance(v))
    assert set(default.losses) == set(own.losses) == set(doubled.losses)
    for name, value in default.losses.items():
        assert torch.equal(own.losses[name], value), name
        torch.testing.assert_close(doubled.losses[name], value / 2, msg=name)
    assert any(float(v) > 0 for n, v in default.losses.items() if n != "fvu")  # a second term is exercised


class ListBatches:
    """The smallest ActivationBatches: fixed batches `[B, 1, d]`."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.batch_size = batches, len(batches[0])
        self.scales, self.contexts_consumed, self.hook_names = None, 0, ["h"]

    def __iter__(self):
        return iter(self.batches)


def test_the_store_protocol_lists_what_the_trainer_reads():
    assert isinstance(ListBatches([torch.zeros(4, 1, 2)]), ActivationBatches)

    class NoBatchSize(ListBatches):
        def __init__(self, batches):
            super().__init__(batches)
            del self.batch_size

    assert not isinstance(NoBatchSize([torch.zeros(4, 1, 2)]), ActivationBatches)
