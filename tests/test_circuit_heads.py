"""The heads a circuit names (analysis.circuit_edges), on the hand-built induction model whose mechanism is known by
construction: the token written at the first occurrence of the answer reaches the prediction through the induction
head L1H0, so that head carries the link and writes most of the output, and the catalogue names it induction."""

from __future__ import annotations

import pytest
import torch
from hand_models import INDUCTION_HEAD, PREV, TOK, V, hand_model, hand_tokenizer

from activations.models import LoadedModel
from analysis.attribution import Metric, attribute_nodes
from analysis.circuit import prune
from analysis.circuit_edges import OUTPUT, edges
from analysis.commands.circuit import _heads
from analysis.component_types import ComponentTypes
from analysis.heads import ProbeSettings, classify_heads
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def hand_lm() -> LoadedModel:
    return LoadedModel(model=hand_model(), tokenizer=hand_tokenizer(), name="hand-built")


def _slots(lm: LoadedModel):
    """An SAE between the two layers whose features are the one-hot token slots (0..V-1) and previous-token slots
    (V..2V-1) of the residual: everything else (the constant, BOS flag, junk) is left to the error term."""
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=2 * V, k=2 * V, hook_name=HOOK, model_name=lm.name))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec):
            p.zero_()
        ids = torch.arange(V)
        sae.W_enc[TOK + ids, ids] = 1.0
        sae.W_enc[PREV + ids, V + ids] = 1.0
        sae.W_dec[ids, TOK + ids] = 1.0
        sae.W_dec[V + ids, PREV + ids] = 1.0
    return sae


def test_the_induction_head_carries_the_link_to_the_prediction(hand_lm):
    lm = hand_lm
    sae = _slots(lm)
    seq = torch.randperm(V - 2, generator=torch.Generator().manual_seed(2))[:10] + 2
    tokens = torch.cat([torch.zeros(1, dtype=torch.long), seq, seq[:4]])[None]  # BOS, s, s[:4] -> predict s[4]
    answer = int(seq[4])
    metric = Metric(target=answer)
    attr = attribute_nodes(lm, [sae], tokens, metric)
    circuit = prune(attr, node_fraction=0.9, skip=(0,))
    assert circuit[0] == (HOOK, 5, answer)  # the answer's own token at its first occurrence
    found = edges(lm, [sae], tokens, attr, circuit, metric, skip=(0,))
    link = next(e for e in found.edges if e.source == (HOOK, 5, answer) and e.target[0] == OUTPUT)
    layer, head, _, share = link.heads[0]
    assert (layer, head) == (1, INDUCTION_HEAD) and share > 0.9
    output = found.heads[(OUTPUT, tokens.shape[1] - 1, -1)]
    assert output[0][:2] == (1, INDUCTION_HEAD) and output[0][3] > 0.5
    assert all(not e.heads for e in found.edges if e.source[1] == e.target[1])  # same position: no head carries it
    types = ComponentTypes(heads=classify_heads(lm, ProbeSettings(rows=8, half=10), cache=False))
    named = _heads(link.heads, types)
    assert named[0]["head"] == f"L1H{INDUCTION_HEAD}" and "induction" in named[0]["types"]
