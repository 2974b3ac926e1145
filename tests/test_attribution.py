"""Node attribution (analysis.attribution): on the linear path from the last block's output to the logits,
activation x gradient over features, the error and the decoder bias adds up to the metric exactly; bad metrics and
prompts are one clear error."""

from __future__ import annotations

import pytest
import torch

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from analysis.attribution import Metric, attribute_nodes
from analysis.logits import unembedding
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(lm, hook, seed=0):
    torch.manual_seed(seed)
    return make_sae(SAEConfig(d_in=lm.d_model, d_sae=40, k=5, hook_name=hook, model_name=lm.name, norm_scale=2.0))


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
