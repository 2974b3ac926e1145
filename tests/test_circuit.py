"""Circuits (analysis.circuit): a planted feature that writes the target's unembedding direction is the top node,
the pruned circuit recovers the metric (faithfulness near 1) while a random circuit of the same size does not, the
whole node set is faithful by definition, and its complement is not."""

from __future__ import annotations

import pytest
import torch

from activations.errors import UserError
from analysis.attribution import Metric, attribute_nodes
from analysis.circuit import faithfulness, faithfulness_curve, prune, ranked
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET, PLANTED = 42, 5


def _planted(lm):
    """An SAE on the last block's output whose feature 5 fires everywhere and decodes along the target's unembedding
    row, strongly: by construction it is the node that makes the model predict the target."""
    hook = f"blocks.{lm.model.config.num_hidden_layers - 1}.hook_resid_post"
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=32, k=4, hook_name=hook, model_name=lm.name))
    with torch.no_grad():
        sae.b_enc[PLANTED] = 50.0
        row = lm.model.get_output_embeddings().weight[TARGET].float()
        sae.W_dec[PLANTED] = 20 * row / row.norm()
    return sae, hook


def test_the_planted_node_is_the_circuit(tiny_llama):
    lm = tiny_llama
    sae, hook = _planted(lm)
    upstream = make_sae(SAEConfig(d_in=lm.d_model, d_sae=32, k=4, hook_name="blocks.1.hook_resid_post"))
    tokens = torch.randint(100, 5000, (1, 8), generator=torch.Generator().manual_seed(3))
    metric = Metric(target=TARGET)
    saes = [upstream, sae]
    attr = attribute_nodes(lm, saes, tokens, metric)
    assert ranked(attr)[0][0] == (hook, 7, PLANTED)
    circuit = prune(attr, node_fraction=0.5)
    assert circuit[0] == (hook, 7, PLANTED)
    good = faithfulness(lm, saes, tokens, metric, attr, circuit)
    assert good.full == pytest.approx(attr.metric, abs=1e-4) and good.faithfulness > 0.9
    assert abs(good.completeness) < 0.2  # without it, little of the metric is left
    others = [node for node, _ in ranked(attr) if node[2] != PLANTED]
    gen = torch.Generator().manual_seed(0)
    random = [others[i] for i in torch.randperm(len(others), generator=gen)[: len(circuit)].tolist()]
    assert faithfulness(lm, saes, tokens, metric, attr, random).faithfulness < 0.2
    every = [node for node, _ in ranked(attr)]
    assert faithfulness(lm, saes, tokens, metric, attr, every).faithfulness == pytest.approx(1.0, abs=1e-5)
    mean = faithfulness(lm, saes, tokens, metric, attr, circuit, ablation="mean", reference=tokens.repeat(2, 1))
    assert mean.ablation == "mean" and mean.size == len(circuit)
    curve = faithfulness_curve(lm, saes, tokens, metric, attr, [1, len(every)])
    assert curve[0][1] > 0.9 and curve[1][1] == pytest.approx(1.0, abs=1e-5)


def test_bad_circuit_options_are_user_errors(tiny_llama):
    sae, _ = _planted(tiny_llama)
    tokens = torch.randint(100, 5000, (1, 5))
    attr = attribute_nodes(tiny_llama, [sae], tokens, Metric(target=TARGET))
    with pytest.raises(UserError, match="node_fraction"):
        prune(attr, node_fraction=1.5)
    with pytest.raises(UserError, match="ablation"):
        faithfulness(tiny_llama, [sae], tokens, Metric(target=TARGET), attr, [], ablation="resample")
    with pytest.raises(UserError, match="reference tokens"):
        faithfulness(tiny_llama, [sae], tokens, Metric(target=TARGET), attr, [], ablation="mean")
