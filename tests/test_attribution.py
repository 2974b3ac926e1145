"""Node attribution (analysis.attribution): on the linear path from the last block's output to the logits,
activation x gradient over features, the error and the decoder bias adds up to the metric exactly; against a
baseline a feature's attribution is (a - b) x its gradient; integrated gradients are complete per hook (each hook's
attributions add up to the metric's change when its features are set to the baseline) and average the gradient at
the path's midpoints; bad metrics, prompts, baselines and step counts are one clear error."""

from __future__ import annotations

import pytest
import torch

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from analysis.attribution import Metric, attribute_nodes, integrated_gradients
from analysis.logits import unembedding
from analysis.splice import spliced
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(lm, hook, seed=0):
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=40, k=5, hook_name=hook, model_name=lm.name, norm_scale=2.0))
    with torch.no_grad():  # the plain tied encoder these tests' magnitudes were sized for (not TopK's scaled init)
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("metric", [Metric(target=42), Metric(target=42, contrast=7)], ids=["logit", "difference"])
def test_the_last_layer_split_is_exact(model, metric, request):
    lm = request.getfixturevalue(model)
    hook = f"blocks.{lm.model.config.num_hidden_layers - 1}.hook_resid_post"
    sae = _sae(lm, hook)
    up = _sae(lm, "blocks.1.hook_resid_post", seed=1)
    tokens = torch.randint(100, 5000, (1, 10), generator=torch.Generator().manual_seed(4))
    result = attribute_nodes(lm, [up, sae], tokens, metric)
    with torch.no_grad():
        clean = metric(lm.model(input_ids=tokens, use_cache=False).logits)
    assert result.metric == pytest.approx(float(clean), abs=1e-4)
    un = unembedding(lm)
    resid = run_with_cache(lm.model, tokens, [parse_hook(hook, lm.model)])[hook][0, -1]
    with torch.no_grad():
        direction = un.logits(sae.b_dec / sae.cfg.norm_scale) / un.scale(resid) + un.bias
    constant = direction[metric.target] - (0 if metric.contrast is None else direction[metric.contrast])
    total = result.features[hook][-1].sum() + result.errors[hook][-1] + constant
    assert float(total) == pytest.approx(result.metric, abs=1e-4)
    assert result.features[hook][:-1].abs().max() == 0  # no attention after the last block
    assert result.features["blocks.1.hook_resid_post"].abs().max() > 0 and result.embeddings.abs().max() > 0
    hook_top, position, feature, value = result.top(1)[0]
    assert value == pytest.approx(float(result.features[hook_top][position, feature]))


def test_bad_metrics_and_prompts_are_user_errors(tiny_llama):
    sae = _sae(tiny_llama, "blocks.1.hook_resid_post")
    tokens = torch.randint(100, 5000, (1, 6))
    with pytest.raises(UserError, match="metric kind"):
        Metric(target=1, kind="probability")
    with pytest.raises(UserError, match="outside the vocabulary"):
        attribute_nodes(tiny_llama, [sae], tokens, Metric(target=10**9))
    with pytest.raises(UserError, match="one prompt"):
        attribute_nodes(tiny_llama, [sae], torch.randint(100, 5000, (2, 6)), Metric(target=1))
    with pytest.raises(UserError, match="steps >= 1"):
        integrated_gradients(tiny_llama, [sae], tokens, Metric(target=1), steps=0)
    with pytest.raises(UserError, match="chunk"):
        integrated_gradients(tiny_llama, [sae], tokens, Metric(target=1), chunk=0)
    with pytest.raises(UserError, match="no dictionary writes"):
        attribute_nodes(tiny_llama, [sae], tokens, Metric(target=1), baseline={"blocks.2.hook_resid_post": 0})
    with pytest.raises(UserError, match="one value per feature"):
        integrated_gradients(tiny_llama, [sae], tokens, Metric(target=1), baseline={sae.cfg.hook_name: torch.ones(3)})


def _two_hooks(lm):
    """An SAE at layer 1 and one at the last block's output, a prompt, and each feature's mean over other text."""
    last = f"blocks.{lm.model.config.num_hidden_layers - 1}.hook_resid_post"
    saes = [_sae(lm, "blocks.1.hook_resid_post", seed=1), _sae(lm, last)]
    tokens = torch.randint(100, 5000, (1, 8), generator=torch.Generator().manual_seed(4))
    reference = torch.randint(100, 5000, (4, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), spliced(lm, saes) as nodes:
        lm.model(input_ids=reference, use_cache=False)
        mean = {hook: f.mean((0, 1)) for hook, f in nodes.features.items()}
    assert all(b.abs().max() > 0 for b in mean.values())
    return saes, tokens, mean, last


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_integrated_gradients_are_complete_per_hook(model, kind, request):
    """Per hook, the attributions add up to metric(clean) - metric(that hook's features at the baseline), the
    latter from an ablation of the spliced model, the upstream hook's with the downstream SAE spliced too."""
    lm, metric = request.getfixturevalue(model), Metric(target=42, contrast=7)
    saes, tokens, mean, _ = _two_hooks(lm)
    baseline = mean if kind == "mean" else None
    ig = integrated_gradients(lm, saes, tokens, metric, steps=32, baseline=baseline)
    assert ig.method == "integrated_gradients" and (ig.baseline is None) == (kind == "zero")
    for hook, a in ig.features.items():
        b = torch.zeros(a.shape[1]) if baseline is None else baseline[hook]
        with torch.no_grad(), spliced(lm, saes, edits={hook: lambda f, b=b: b.expand_as(f)}):
            at_baseline = float(metric(lm.model(input_ids=tokens, use_cache=False).logits)[0])
        change = ig.metric - at_baseline
        assert abs(change) > 1e-2, hook  # something to add up to
        assert float(a.sum()) == pytest.approx(change, rel=2e-3), hook  # one midpoint step misses by 1-4 %
        if kind == "zero":
            assert (a[ig.activations[hook] == 0] == 0).all()  # nothing to move
        else:
            assert (a[ig.activations[hook] == 0] != 0).any()  # moved from the mean down to 0


def test_integrated_gradients_average_the_gradient_at_the_midpoints(tiny_llama):
    """At the last block's output logit_t = W_U[t] . (g * x / rms(x)), so d logit / d f has a closed form: with
    3 steps in chunks of 2 each feature's attribution is (f - b) times its mean at a = 1/6, 1/2, 5/6, and the error's
    is e . d logit / d x at the clean x; positions before the last carry nothing."""
    lm, metric = tiny_llama, Metric(target=42)
    saes, tokens, mean, last = _two_hooks(lm)
    sae = saes[1]
    ig = integrated_gradients(lm, saes, tokens, metric, steps=3, baseline=mean, chunk=2)
    x = run_with_cache(lm.model, tokens, [parse_hook(last, lm.model)])[last][0, -1]
    un = unembedding(lm)
    v, d = un.gain * un.W_U[metric.target], x.shape[-1]

    def grad_x(r):
        rms = un.scale(r)
        return v / rms - r * (r @ v) / (d * rms**3)

    f, b = ig.activations[last][-1], mean[last]
    with torch.no_grad():
        W = sae.W_dec / sae.cfg.norm_scale
        grads = [W @ grad_x(x + (alpha - 1) * (f - b) @ W) for alpha in (1 / 6, 1 / 2, 5 / 6)]
        error = x - sae.decode(f) / sae.cfg.norm_scale
    torch.testing.assert_close(ig.features[last][-1], (f - b) * torch.stack(grads).mean(0), atol=1e-5, rtol=1e-4)
    assert ig.features[last][:-1].abs().max() == 0
    assert float(ig.errors[last][-1]) == pytest.approx(float(error @ grad_x(x)), rel=1e-4, abs=1e-6)
    assert (ig.features[last][-1] != 0).sum() > sae.cfg.k  # inactive features move from their mean too


def test_a_baseline_attributes_the_difference_to_it(tiny_llama):
    """Linearised, the last hook's gradient is its direct logit attribution (the frozen final norm's divisor), so
    against a baseline b every feature there, active or not, gets (a - b) x that; errors and embeddings keep
    activation x gradient, and without a baseline nothing changes."""
    lm, metric = tiny_llama, Metric(target=42, contrast=7)
    saes, tokens, mean, last = _two_hooks(lm)
    plain = attribute_nodes(lm, saes, tokens, metric)
    based = attribute_nodes(lm, saes, tokens, metric, baseline=mean)
    assert plain.method == based.method == "gradient" and plain.baseline is None
    torch.testing.assert_close(based.baseline[last], mean[last])
    x = run_with_cache(lm.model, tokens, [parse_hook(last, lm.model)])[last][0, -1]
    un = unembedding(lm)
    with torch.no_grad():
        weights = un.logits(saes[1].W_dec / saes[1].cfg.norm_scale)
        grad = (weights[:, metric.target] - weights[:, metric.contrast]) / un.scale(x)
    a = based.activations[last][-1]
    torch.testing.assert_close(based.features[last][-1], (a - mean[last]) * grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain.features[last][-1], a * grad, atol=1e-5, rtol=1e-4)
    inactive = (a == 0) & (mean[last] != 0)  # inactive here, active on the reference text
    assert inactive.sum() > 10 and (based.features[last][-1][inactive] != 0).all()
    up = "blocks.1.hook_resid_post"
    active = plain.activations[up] > 0
    grad_up = plain.features[up][active] / plain.activations[up][active]
    torch.testing.assert_close(based.features[up][active], (plain.activations[up] - mean[up])[active] * grad_up)
    for hook in plain.errors:
        torch.testing.assert_close(based.errors[hook], plain.errors[hook], atol=0, rtol=0)
    torch.testing.assert_close(based.embeddings, plain.embeddings, atol=0, rtol=0)
