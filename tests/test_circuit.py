"""Circuits (analysis.circuit): a planted feature that writes the target's unembedding direction is the top node,
the pruned circuit recovers the metric (faithfulness near 1) while a random circuit of the same size does not, the
whole node set is faithful by definition, and its complement is not."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from activations.errors import UserError
from activations.models import load_model
from analysis.attribution import LINEARISED, Metric, attribute_nodes
from analysis.circuit import (
    ablation_baseline,
    ablation_effects,
    correlation,
    faithfulness,
    faithfulness_curve,
    prune,
    ranked,
    sink_positions,
)
from analysis.circuit_edges import EMBED, ERROR, OUTPUT, edges, prune_edges
from analysis.splice import SpliceOptions, spliced
from sae.cli import main
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


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_attributions_predict_single_node_ablations(tiny_llama, ablation):
    """Each of the top nodes ablated alone on the real spliced model changes the metric by about its attribution
    ((activation - baseline) x the model's own gradient, nothing linearised, as `sae circuit` scores nodes)."""
    lm = tiny_llama
    saes = []
    for seed, hook in enumerate(("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")):
        torch.manual_seed(seed)
        saes.append(make_sae(SAEConfig(d_in=lm.d_model, d_sae=32, k=4, hook_name=hook, model_name=lm.name)))
    tokens = torch.randint(100, 5000, (1, 8), generator=torch.Generator().manual_seed(3))
    metric = Metric(target=TARGET)
    reference = torch.randint(100, 5000, (4, 8), generator=torch.Generator().manual_seed(4))
    baseline = ablation_baseline(lm, saes, ablation, reference)
    attr = attribute_nodes(lm, saes, tokens, metric, SpliceOptions(), baseline=baseline)
    top = [node for node, _ in ranked(attr, skip=(0,))][:12]
    effects = ablation_effects(lm, saes, tokens, metric, attr, top, baseline=baseline, skip=(0,))
    estimates = [float(attr.features[h][t, f]) for h, t, f in top]
    check = correlation(estimates, effects)
    assert check["pearson"] > 0.95, (check, list(zip(estimates, effects)))


def test_correlation_of_lists():
    assert correlation([1.0, 2.0, 3.0, 4.0], [2.0, 4.1, 5.9, 8.0])["pearson"] == pytest.approx(1.0, abs=1e-3)
    assert correlation([1.0, 2.0, 3.0, 4.0], [1.0, 8.0, 27.0, 64.0])["spearman"] == pytest.approx(1.0)
    assert correlation([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0])["pearson"] == pytest.approx(-1.0)
    assert all(v != v for v in correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).values())  # nan: constant
    assert all(v != v for v in correlation([1.0, 2.0], [1.0, 2.0]).values())  # nan: too short


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


def test_edges_follow_the_planted_path(tiny_llama):
    """Edges run embeddings -> upstream SAE -> last SAE -> output, never backwards in position, largest first; each
    weight is delta_u * d f_v / d u * dm / d f_v, so the batched, chunked backward passes agree with one plain
    backward, and the edges into the output are the last layer's attributions."""
    lm = tiny_llama
    sae, hook = _planted(lm)
    up_hook = "blocks.1.hook_resid_post"
    torch.manual_seed(1)
    upstream = make_sae(SAEConfig(d_in=lm.d_model, d_sae=32, k=4, hook_name=up_hook, model_name=lm.name))
    tokens = torch.randint(100, 5000, (1, 8), generator=torch.Generator().manual_seed(3))
    saes = [upstream, sae]
    metric = Metric(target=TARGET)
    attr = attribute_nodes(lm, saes, tokens, metric)
    nodes = [node for node, _ in ranked(attr)]
    found = edges(lm, saes, tokens, attr, nodes, metric, chunk=3).edges
    stages = {(u[0], v[0]) for u, v in ((e.source, e.target) for e in found)}
    assert stages == {(EMBED, up_hook), (up_hook, hook), (hook, OUTPUT)}
    assert all(e.source[1] <= e.target[1] for e in found)  # causal: no edge from a later position
    assert [abs(e.weight) for e in found] == sorted((abs(e.weight) for e in found), reverse=True)
    between = [e for e in found if e.source[0] == up_hook and e.source[2] != ERROR]
    for e in between[:3]:
        (u, v) = e.source, e.target
        with spliced(lm, saes, LINEARISED) as spliced_nodes:
            lm.model(input_ids=tokens, use_cache=False)
            (grad,) = torch.autograd.grad(spliced_nodes.features[hook][0, v[1], v[2]], spliced_nodes.features[up_hook])
        dm_dfv = float(attr.features[hook][v[1], v[2]] / attr.activations[hook][v[1], v[2]])
        expected = float(attr.activations[up_hook][u[1], u[2]] * grad[0, u[1], u[2]]) * dm_dfv
        assert e.weight == pytest.approx(expected, rel=1e-4, abs=1e-6)
    into_output = {e.source: e.weight for e in found if e.target[0] == OUTPUT}
    for (h, t, f), weight in into_output.items():
        expected = attr.errors[h][t] if f == ERROR else attr.features[h][t, f]
        assert weight == pytest.approx(float(expected), rel=1e-3, abs=1e-5)
    assert into_output[(hook, 7, PLANTED)] == max(into_output.values())
    kept = prune_edges(found, 0.9)
    assert 0 < len(kept) <= len(found) and sum(abs(e.weight) for e in kept) >= 0.9 * sum(abs(e.weight) for e in found)


TRAIN = (
    "--hooks blocks.1.hook_resid_post,blocks.2.hook_resid_post --dataset tinyshakespeare --tokens 2048 "
    "--batch-size 256 --buffer-tokens 1024 --context-size 32 --d-sae 64 --k 6 --eval-tokens 128 --device cpu"
).split()


def test_sae_circuit_writes_the_graph(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_llama_dir, *TRAIN, "--out", str(run)]) == 0
    argv = ["circuit", str(run), "--prompt", "First Citizen: before we proceed", "--target", " any", "--name", "g"]
    assert main([*argv, "--device", "cpu"]) == 0
    graph = json.loads((run / "circuits" / "g.json").read_text())
    assert graph["hooks"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    features = [n for n in graph["nodes"] if n["kind"] == "feature"]
    assert features and all(n["ctx_idx"] >= 1 for n in features)  # the first position is no node
    assert {n["kind"] for n in graph["nodes"]} >= {"feature", "embedding", "output"}
    lm = load_model(tiny_llama_dir)
    ids = torch.tensor([lm.tokenizer("First Citizen: before we proceed")["input_ids"]])
    target = lm.tokenizer(" any", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logit = float(lm.model(input_ids=ids).logits[0, -1, target])
    assert graph["metric"]["value"] == pytest.approx(logit, abs=1e-4)
    assert set(graph["faithfulness"]) >= {"faithfulness", "completeness", "full", "empty"}
    assert graph["faithfulness"]["full"] == pytest.approx(logit, abs=1e-4)
    assert graph["curve"][-1][1] == pytest.approx(1.0, abs=1e-4)  # every node kept: the whole metric
    check = graph["validation"]
    assert check["nodes"] == min(16, len(features)) and len(check["pairs"]) == check["nodes"]
    assert -1 <= check["pearson"] <= 1
    ids_of = {n["node_id"] for n in graph["nodes"]}
    assert all(e["source"] in ids_of and e["target"] in ids_of for e in graph["links"])
    assert any(e["target"] == "output" for e in graph["links"])
    assert "graph:" in capsys.readouterr().out
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    if browser is not None:  # the page draws every node and link, the faithfulness panel and the check
        flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
        url = (run / "circuits" / "g.html").resolve().as_uri()
        dom = subprocess.run(
            [browser, *flags, "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert dom.count("data-node=") == len(graph["nodes"]) > 0
        assert dom.count("data-edge=") == len(graph["links"])
        assert dom.count('data-check="1"') == len(check["pairs"])
        assert 'data-stat="faithfulness"' in dom and 'id="curve-line"' in dom
    assert main([*argv, "--ablation", "mean", "--reference-tokens", "256", "--device", "cpu"]) == 0
    mean = json.loads((run / "circuits" / "g.json").read_text())["faithfulness"]
    assert mean["ablation"] == "mean" and mean["full"] == pytest.approx(logit, abs=1e-4)
    assert main([*argv, "--method", "ig", "--steps", "4", "--device", "cpu"]) == 0
    ig = json.loads((run / "circuits" / "g.json").read_text())
    assert ig["method"] == "ig" and ig["steps"] == 4 and ig["faithfulness"]["full"] == pytest.approx(logit, abs=1e-4)
    assert ig["skipped"][0] == 0
    capsys.readouterr()
    code = main([*argv[:-4], "--target", "xq zv", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert "one token" in err


def test_sink_positions_are_the_massive_ones(tiny_llama):
    """A position whose residual is made 100 x larger (as an attention sink's is) is found; ordinary ones are not."""
    lm = tiny_llama
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=32, k=4, hook_name="blocks.1.hook_resid_post"))
    tokens = torch.randint(100, 5000, (1, 10), generator=torch.Generator().manual_seed(5))
    assert sink_positions(lm, [sae], tokens) == ()

    def massive(mod, args, out):
        out = out.clone()
        out[:, 3] *= 100
        return out

    handle = lm.model.get_input_embeddings().register_forward_hook(massive)
    try:
        assert sink_positions(lm, [sae], tokens) == (3,)
    finally:
        handle.remove()
