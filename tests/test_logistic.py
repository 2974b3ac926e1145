"""The one logistic-regression fitter: a known generating model recovered, separable data classified, balanced
against uniform weights on an imbalanced set, batched fits equal to single ones, affine changes of input undone."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.logistic import example_weights, fit_logistic

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_balanced_fit_recovers_the_generating_model_through_an_affine_change_of_input():
    # y ~ Bernoulli(sigmoid(2 x - 1)): the slope is 2; balanced weights move the intercept by log(n_neg / n_pos).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40000, 1, generator=gen)
    y = torch.rand(40000, generator=gen) < torch.sigmoid(2 * x[:, 0] - 1)
    weight, bias = fit_logistic(x * 3 + 5, y[:, None], l2=1e-5)  # the fit must undo the change of input
    n_pos = y.sum().item()
    assert weight.item() * 3 == pytest.approx(2, abs=0.08)
    assert bias.item() + weight.item() * 5 == pytest.approx(-1 + math.log((len(y) - n_pos) / n_pos), abs=0.08)


def test_an_affine_change_of_input_gives_the_same_logits():
    """Centring and one common scale make the fit on a * x + c the same classifier as on x."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=gen)
    y = (x @ torch.randn(8, 3, generator=gen) + torch.randn(500, 3, generator=gen) > 0.3).bool()
    for balanced in (True, False):
        w, b = fit_logistic(x, y, l2=1e-2, balanced=balanced)
        w2, b2 = fit_logistic(x * 40 - 7, y, l2=1e-2, balanced=balanced)
        assert _rel(w2 * 40, w) < 1e-6
        assert _rel((x * 40 - 7).double() @ w2.T + b2, x.double() @ w.T + b) < 1e-6


def test_separable_data_is_classified_exactly_along_the_true_direction():
    gen = torch.Generator().manual_seed(2)
    w_true = torch.nn.functional.normalize(torch.randn(16, generator=gen), dim=0)
    x = torch.randn(4000, 16, generator=gen)
    margin = x @ w_true
    x, margin = x[margin.abs() > 0.3], margin[margin.abs() > 0.3]
    y = (margin > 0)[:, None]
    weight, bias = fit_logistic(x[:1000] * 2 + 1, y[:1000], l2=1e-4)
    assert ((x[1000:] * 2 + 1).double() @ weight.T + bias > 0).eq(y[1000:]).float().mean() > 0.99
    assert float(torch.nn.functional.cosine_similarity(weight[0], w_true.double(), dim=0)) > 0.99


def test_balanced_weights_get_the_rare_class_right_where_uniform_weights_do_not():
    """1000 negatives ~ N(0, 1), 100 positives ~ N(2, 1). Uniform weights fit the posterior, whose threshold
    (x = 1 + log(10) / 2 = 2.15) misses over half the positives; balanced weights put it at the midpoint x = 1,
    where each class is 84 % right."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(1000, 1, generator=gen), torch.randn(100, 1, generator=gen) + 2])
    y = torch.cat([torch.zeros(1000), torch.ones(100)]).bool()[:, None]
    recall = {}
    for balanced in (True, False):
        w, b = fit_logistic(x, y, l2=1e-4, balanced=balanced)
        pred = x.double() @ w.T + b > 0
        recall[balanced] = (float(pred[y].float().mean()), float((~pred[~y]).float().mean()))
    assert min(recall[True]) > 0.75
    assert recall[False][0] < 0.6 and recall[False][1] > 0.95


def test_a_batched_fit_equals_one_fit_per_output():
    gen = torch.Generator().manual_seed(4)
    n, d, C = 300, 5, 4
    x = torch.rand(C, n, d, generator=gen) * torch.tensor([1.0, 3.0, 0.5, 10.0])[:, None, None]
    y = x.sum(-1).T + torch.randn(n, C, generator=gen) > torch.tensor([1.0, 3.0, 0.5, 10.0]) * 2.5
    for balanced in (True, False):
        w, b = fit_logistic(x, y, l2=1e-2, balanced=balanced)
        for c in range(C):
            wc, bc = fit_logistic(x[c], y[:, c : c + 1], l2=1e-2, balanced=balanced)
            assert _rel(w[c], wc[0]) < 1e-6 and _rel(b[c : c + 1], bc) < 1e-6
    # one input shared by every output is the same as that input given to each
    shared = fit_logistic(x[0], y, l2=1e-2)
    each = fit_logistic(x[0].expand(C, n, d), y, l2=1e-2)
    assert _rel(shared[0], each[0]) < 1e-6 and _rel(shared[1], each[1]) < 1e-6


def test_example_weights_sum_to_one_per_column_and_need_both_classes():
    y = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 0]]).bool()
    balanced = example_weights(y)
    assert balanced[:, 0].tolist() == [0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]
    assert example_weights(y, balanced=False).sum(0).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="positive and negative"):
        example_weights(torch.tensor([[1], [1]]).bool())
