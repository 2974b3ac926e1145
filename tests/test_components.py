"""Feature sources: the components' direct contributions add up to the feature's pre-activation exactly (tiny random
Llama with grouped-query attention, tiny GPT-2, the real SmolLM2), and a feature reading one head finds that head."""

import copy
import json

import pytest
import torch

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from activations.models import LoadedModel, load_model
from activations.sources import open_text_source
from analysis.components import Detail, feature_sources, features_sources_for_run, summarise
from analysis.feature_stats import StatsConfig, feature_stats
from sae.config import SAEConfig
from sae.registry import make_sae

PROBE = "The king of France rode a horse to the old castle near the river, and the queen"
EVERYTHING = Detail(heads=None, sources=None, mlps=None, neurons=None)
POSITIONS = [(0, 1), (0, 9), (1, 5), (1, 16)]
FEATURES = [0, 7, 19, 31]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """One intra-op thread: the tensors are tiny."""


def _probe(lm) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer(PROBE)["input_ids"]])
    return torch.cat([ids, ids.flip(1)])  # [2, T]


def _sae(lm, hook, d_sae=32, seed=0):
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=d_sae, k=4, hook_name=hook, model_name=lm.name, norm_scale=3.0))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return sae


def _reference_pre(sae, lm, tokens, report) -> torch.Tensor:
    """[N] pre-activations from sae.encode_pre on the hook activation of a plain (sdpa) forward."""
    x = run_with_cache(lm.model, tokens, [parse_hook(sae.cfg.hook_name, lm.model)])[sae.cfg.hook_name]
    pre = sae.encode_pre(x * sae.cfg.norm_scale)
    return torch.stack([pre[b, t, f] for (b, t), f in zip(report.positions.tolist(), report.features.tolist())])


def _split_errors(report) -> tuple[float, float]:
    """Largest |sum of a head's per-source split - the head's total| and likewise for an MLP's neurons."""
    errors = []
    for splits in (report.head_sources, report.neurons):
        errors.append(
            max(
                abs(sum(value for _, value in pairs) - float(report.contributions[i, report.names.index(name)]))
                for i, by_name in enumerate(splits)
                for name, pairs in by_name.items()
            )
        )
    return errors[0], errors[1]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("hook", ["blocks.3.hook_resid_pre", "blocks.2.hook_resid_post"])
def test_contributions_add_up_to_the_pre_activation(model, hook, request):
    lm = request.getfixturevalue(model)
    sae, tokens = _sae(lm, hook), _probe(lm)
    report = feature_sources(sae, lm, tokens, POSITIONS, FEATURES, EVERYTHING, chunk=5)
    reference = _reference_pre(sae, lm, tokens, report)
    assert len(report.pre) == len(POSITIONS) * len(FEATURES) and report.linearisation == ""
    torch.testing.assert_close(report.pre, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(report.contributions.sum(1), reference, atol=1e-4, rtol=0)
    assert report.remainder.abs().max() < 1e-4
    heads, neurons = _split_errors(report)
    assert heads < 1e-4 and neurons < 1e-4
    expected = {"embed", "bias", "L2H3", "L2.mlp"} | ({"pos_embed"} if model == "tiny_gpt2" else set())
    assert expected <= set(report.names) and "L3H0" not in report.names  # both hooks read layers 0-2
    assert all(len(report.head_sources[i]) == 4 * 3 for i in range(len(report.pre)))  # every head of layers 0-2


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_mlp_input_is_exact_for_the_frozen_norm(model, request):
    lm = request.getfixturevalue(model)
    sae, tokens = _sae(lm, "blocks.2.hook_mlp_in"), _probe(lm)
    report = feature_sources(sae, lm, tokens, POSITIONS, FEATURES, Detail(heads=2, sources=None, mlps=1, neurons=None))
    assert "frozen" in report.linearisation and "L2H0" in report.names and "L2.mlp" not in report.names
    torch.testing.assert_close(report.contributions.sum(1), _reference_pre(sae, lm, tokens, report), atol=1e-4, rtol=0)


def _out_projection(model, layer) -> tuple[torch.nn.Module, torch.Tensor]:
    """The attention output projection of a block and its weight viewed as [H*dh, d] (a view: edits write through)."""
    llama = model.config.model_type == "llama"
    block = model.get_submodule("model.layers" if llama else "transformer.h")[layer]
    proj = block.self_attn.o_proj if llama else block.attn.c_proj
    return proj, (proj.weight.T if llama else proj.weight)


def _head_output(lm, tokens, layer, head) -> torch.Tensor:
    """[B, T, d] what one head adds to the residual stream, read with a hook of the test's own."""
    proj, W = _out_projection(lm.model, layer)
    dh = W.shape[0] // lm.model.config.num_attention_heads
    seen = {}
    handle = proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("z", args[0]))
    try:
        with torch.no_grad():
            lm.model(input_ids=tokens, use_cache=False)
    finally:
        handle.remove()
    return seen["z"][..., head * dh : (head + 1) * dh] @ W[head * dh : (head + 1) * dh]


def _louder(lm, layer, head, factor):
    """A copy of the model whose head writes `factor` times louder: randomly initialised heads write ~20 times
    less than the embeddings, and the test wants a head that computes a feature by a margin."""
    model = copy.deepcopy(lm.model)
    proj, W = _out_projection(model, layer)
    dh = W.shape[0] // model.config.num_attention_heads
    with torch.no_grad():
        W[head * dh : (head + 1) * dh] *= factor
    return LoadedModel(model=model, tokenizer=lm.tokenizer, name=lm.name)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_a_feature_reading_one_head_finds_that_head(model, request):
    lm = _louder(request.getfixturevalue(model), layer=1, head=2, factor=10.0)
    sae, tokens = _sae(lm, "blocks.3.hook_resid_pre"), _probe(lm)
    out = _head_output(lm, tokens, layer=1, head=2)[0, 1:].mean(0)  # [d] L1H2's mean output on the probe
    with torch.no_grad():
        sae.W_enc[:, 5] = out / out.norm()
    report = feature_sources(sae, lm, tokens, [(0, 6), (0, 12), (1, 9)], [5])
    for i in range(3):
        assert report.names[int(report.contributions[i].argmax())] == "L1H2", report.top(i, 3)
    assert summarise(report)[5].startswith("L1H2 ")
    assert "L1H2" in report.head_sources[0]  # the top head is split over its source positions
    json.dumps(report.to_json(5))


def test_bad_inputs_are_user_errors(tiny_llama):
    sae, tokens = _sae(tiny_llama, "blocks.1.hook_resid_post"), _probe(tiny_llama)
    with pytest.raises(UserError, match="feature"):
        feature_sources(sae, tiny_llama, tokens, [(0, 1)], [99])
    with pytest.raises(UserError, match="outside the tokens"):
        feature_sources(sae, tiny_llama, tokens, [(0, 99)], [1])


STATS = StatsConfig(tokens=400, top_k=4, left=3, right=1, intervals=2, per_interval=1, context_size=32)


def test_a_run_decomposes_every_feature_in_its_context(tiny_llama, tmp_path):
    source = open_text_source("tinyshakespeare", split="test")
    sae = _sae(tiny_llama, "blocks.2.hook_resid_post", d_sae=24)
    with torch.no_grad():
        sae.b_enc.zero_()
    stats = feature_stats(sae, tiny_llama, source, STATS, meta={"run": str(tmp_path)})
    exact = features_sources_for_run(sae, tiny_llama, stats, examples_per_feature=2, source=source, chunk=7)
    written = json.loads((tmp_path / "features" / "components.json").read_text())
    assert written["mode"].startswith("exact") and written["examples"] == exact["examples"] > 0
    assert exact["max_abs_remainder"] < 1e-4
    feature, entry = next(iter(exact["features"].items()))
    example = entry["examples"][0]
    assert example["pre"] == pytest.approx(example["act"], abs=1e-4)  # TopK: the recorded activation is the pre
    window = features_sources_for_run(sae, tiny_llama, stats, examples_per_feature=1, out=tmp_path / "w")
    assert window["mode"].startswith("window") and window["max_abs_remainder"] < 1e-4
    other = open_text_source("tinyshakespeare", split="train")
    with pytest.raises(UserError, match="differs"):
        features_sources_for_run(sae, tiny_llama, stats, source=other, out=tmp_path / "x")


@pytest.mark.slow
def test_real_model_contributions_add_up():
    lm = load_model("smollm2-135m")
    sae = _sae(lm, "blocks.15.hook_resid_pre", d_sae=64)
    tokens = _probe(lm)
    report = feature_sources(sae, lm, tokens, [(0, 4), (1, 11)], [0, 17, 63], Detail(heads=2, mlps=2, neurons=None))
    reference = _reference_pre(sae, lm, tokens, report)
    assert len(report.names) == 1 + 15 * (9 + 1) + 1
    scale = max(1.0, float(reference.detach().abs().max()))  # float32 rounding grows with the residual's size
    torch.testing.assert_close(report.contributions.sum(1), reference, atol=1e-4 * scale, rtol=0)
    assert report.remainder.abs().max() < 1e-5 * scale
