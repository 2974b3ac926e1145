"""The head catalogue (analysis.heads) against ground truth: a 2-layer attention-only Llama built by hand
with a previous-token head in layer 0 and an induction head in layer 1 among distractor heads; and on the
tiny random GQA Llama: shapes, ranges, the cache, the JSON round trip and the `sae heads` command."""

from __future__ import annotations

import json
import math
from importlib.metadata import entry_points

import pytest
import torch
from hand_models import DH, INDUCTION_HEAD, PREV_HEAD, V, hand_model, hand_tokenizer

from activations.models import LoadedModel
from activations.options import build
from analysis.commands import heads as heads_command
from analysis.head_ablation import ablation_check, heads_ablated, nll
from analysis.head_probes import attention_patterns, prefix_ids, repeated_tokens, token_pool
from analysis.head_weights import head_out_weights, head_values, out_proj
from analysis.heads import HEAD_TYPES, HeadCatalogue, ProbeSettings, cache_path, classify_heads
from sae import cli

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the hand-built model (tests/hand_models.py) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def hand_lm() -> LoadedModel:
    return LoadedModel(model=hand_model(), tokenizer=hand_tokenizer(), name="hand-built")


HAND = ProbeSettings(rows=8, half=10)


def test_the_hand_built_heads_do_what_they_are_built_to(hand_lm):
    """The construction itself: the previous-token head attends to t-1, the induction head to the token after
    the current token's first occurrence, and the model predicts the repeated half."""
    gen = torch.Generator().manual_seed(3)
    probe = repeated_tokens(token_pool(hand_lm.tokenizer, V), prefix_ids(hand_lm.tokenizer), 4, 10, gen)
    assert probe.start == 1 and probe.tokens[0, 0] == 0  # BOS first
    A = attention_patterns(hand_lm.model, probe.tokens).attn  # [L, B, H, T, T]
    t = torch.arange(2, probe.tokens.shape[1])
    assert A[0, :, PREV_HEAD, t, t - 1].min() > 0.95
    j = torch.arange(1, 10)
    assert A[1, :, INDUCTION_HEAD, 11 + j, 2 + j].min() > 0.9
    second = torch.zeros_like(probe.tokens, dtype=torch.bool)
    second[:, 11:-1] = True
    first = torch.zeros_like(second)
    first[:, 1:10] = True
    assert nll(hand_lm.model, probe.tokens, second) < 0.1 < 2.0 < nll(hand_lm.model, probe.tokens, first)


def test_catalogue_tags_exactly_the_built_heads(hand_lm):
    cat = classify_heads(hand_lm, HAND, cache=False)
    assert cat.tagged("previous_token") == [(0, PREV_HEAD)]
    assert cat.tagged("induction") == [(1, INDUCTION_HEAD)]
    assert sorted(cat.tagged("attention_sink")) == [(0, 1), (1, 2)]  # the BOS distractors, and only them
    assert cat.tagged("duplicate_token") == [] and cat.tagged("copy_suppression") == []
    assert cat.tagged("copying") == [(1, INDUCTION_HEAD)]  # its OV copies; the previous-token head's writes no logit
    assert cat.tagged("successor") == []  # no ordinal family is in this vocabulary
    assert float(cat.evidence["induction"]["copying"][1, INDUCTION_HEAD]) == 1.0


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_ablating_the_built_heads_hurts_more_than_random_heads(hand_lm, mode):
    cat = classify_heads(hand_lm, HAND, cache=False)
    results = ablation_check(
        hand_lm, cat, draws=4, mode=mode, rows=8, half=10, kinds=("induction", "previous_token", "successor")
    )
    assert "successor" not in results  # no ordinal probe for this vocabulary: no check
    for kind, head in (("induction", (1, INDUCTION_HEAD)), ("previous_token", (0, PREV_HEAD))):
        r = results[kind]
        assert r.heads == [head] and r.tagged and len(r.random_damage) == 4
        assert r.damage > 1.0 > r.random_max + 0.5, r


def test_heads_ablated_edits_only_the_chosen_slice(hand_lm):
    o_proj = hand_lm.model.model.layers[1].self_attn.o_proj
    tokens = torch.tensor([[0, 3, 4, 5, 3, 4, 5]])
    seen: list[torch.Tensor] = []

    def forward_seen() -> None:  # a hook registered after the ablation's sees the edited input
        handle = o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
        hand_lm.model(input_ids=tokens)
        handle.remove()

    forward_seen()
    with heads_ablated(hand_lm.model, [(1, 2)]):
        forward_seen()
    forward_seen()
    clean, ablated, after = seen  # [1, T, H·dh] each
    assert clean[..., 2 * DH :].abs().sum() > 0 and (ablated[..., 2 * DH :] == 0).all()
    assert torch.equal(ablated[..., : 2 * DH], clean[..., : 2 * DH]) and torch.equal(after, clean)


# ---- the tiny random GQA Llama --------------------------------------------------------------------------
SMALL = ProbeSettings(rows=4, half=12, ov_tokens=128)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_head_weights_rebuild_the_attention_output(name, request):
    """Per-head values (GQA: each query head's kv head; GPT-2: the Conv1D c_attn slice) and W_O slices, mixed by
    the eager patterns, sum to what the attention output projection really returns."""
    lm = request.getfixturevalue(name)
    tokens = torch.randint(100, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    p = attention_patterns(lm.model, tokens)
    proj = out_proj(lm.model, 1)
    seen = {}
    handle = proj.register_forward_hook(lambda mod, args, out: seen.__setitem__("y", out))
    lm.model(input_ids=tokens)
    handle.remove()
    v = head_values(lm.model, 1, p.inputs[1])  # [B, T, H, dh]
    z = torch.einsum("bhts,bshk->bthk", p.attn[1], v)
    rebuilt = torch.einsum("bthk,hkd->btd", z, head_out_weights(lm.model, 1))
    if proj.bias is not None:
        rebuilt = rebuilt + proj.bias
    assert torch.allclose(rebuilt, seen["y"], atol=1e-4)


def test_gpt2_catalogue(tiny_gpt2):
    cat = classify_heads(tiny_gpt2, SMALL, cache=False)
    assert (cat.n_layers, cat.n_heads) == (4, 4)
    assert all(s.shape == (4, 4) and 0 <= s.min() and s.max() <= 1 for s in cat.scores.values())


def test_scores_shapes_ranges_cache_and_json(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    cat = classify_heads(tiny_llama, SMALL)
    assert (cat.n_layers, cat.n_heads, cat.n_kv_heads) == (4, 4, 2)
    assert set(cat.scores) == set(HEAD_TYPES) == set(cat.thresholds)
    for kind, s in cat.scores.items():
        assert s.shape == (4, 4) and s.min() >= 0 and s.max() <= 1, kind
    assert cat.evidence["attention_sink"]["first_value_norm"].shape == (4, 4)
    assert len(cat.rows()) == 16 and set(cat.rows()[0]) == {"layer", "head", *HEAD_TYPES}

    path = cache_path(tiny_llama, SMALL)
    assert path.is_file() and path.parent == tmp_path / "heads"
    data = json.loads(path.read_text())
    data["settings"]["marker"] = "read from the cache"
    path.write_text(json.dumps(data))
    assert classify_heads(tiny_llama, SMALL).settings["marker"] == "read from the cache"
    assert "marker" not in classify_heads(tiny_llama, SMALL, refresh=True).settings
    path.write_text("{ truncated")
    assert classify_heads(tiny_llama, SMALL).model == cat.model  # a damaged cache file is recomputed
    assert HeadCatalogue.from_json(path.read_text()).model == cat.model  # ... and replaced
    assert cache_path(tiny_llama, ProbeSettings(rows=5, half=12, ov_tokens=128)) != path

    back = HeadCatalogue.from_json(cat.to_json())
    assert back.model == cat.model and back.thresholds == cat.thresholds and back.settings == cat.settings
    for kind in cat.scores:
        assert torch.allclose(back.scores[kind], cat.scores[kind], atol=1e-5)
        assert back.tagged(kind) == cat.tagged(kind)
    assert torch.allclose(
        back.evidence["copy_suppression"]["earlier_copy_attention"],
        cat.evidence["copy_suppression"]["earlier_copy_attention"],
        atol=1e-5,
    )


def test_ablation_check_reports_spread_on_gqa(tiny_llama):
    cat = classify_heads(tiny_llama, SMALL, cache=False)
    results = ablation_check(tiny_llama, cat, n=2, draws=3, rows=2, half=8)
    assert set(results) == {"induction", "previous_token", "duplicate_token", "attention_sink", "successor"}
    for r in results.values():
        assert len(r.heads) == 2 and len(r.random_damage) == 3
        assert r.random_min <= r.random_mean <= r.random_max and r.random_std >= 0
        assert all(math.isfinite(x) for x in (r.clean, r.damage, *r.random_damage))
        for drawn in r.random_heads:  # one other head from each top head's layer
            assert sorted(layer for layer, _ in drawn) == sorted(layer for layer, _ in r.heads)
            assert not set(drawn) & set(r.heads)


def _command_config(**values) -> heads_command.Config:
    return build(heads_command.Config, values)


def test_command_json_and_tables(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    heads_command.run(_command_config(model=tiny_llama_dir, device="cpu", as_json=True))
    data = json.loads(capsys.readouterr().out)
    assert len(data["heads"]) == 16 and set(data["heads"][0]) == {"layer", "head", *HEAD_TYPES}
    assert set(data["tagged"]) == set(HEAD_TYPES)

    out = tmp_path / "maps"
    heads_command.run(_command_config(model=tiny_llama_dir, device="cpu", out=str(out)))
    text = capsys.readouterr().out
    assert "induction:" in text and "tagged when score >=" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.png" for k in HEAD_TYPES)


def test_cli_heads_json(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Through `sae.cli.main`: the installed `heads` entry point, or (until pyproject.toml lists it) the same
    table of commands with it added, so the command line is parsed exactly as `sae heads` parses it."""
    table = cli.commands()
    if "heads" not in {ep.name for ep in entry_points(group="saelab.commands")}:
        monkeypatch.setattr(cli, "commands", lambda: {**table, "heads": "analysis.commands.heads"})
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    assert cli.main(["heads", "--model", tiny_llama_dir, "--device", "cpu", "--json", "--refresh"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["layer"], r["head"]) for r in data["heads"]] == [(a, b) for a in range(4) for b in range(4)]
    assert cli.main(["heads", "--model", tiny_llama_dir, "--ablation", "half"]) == 2
    assert "--ablation" in capsys.readouterr().err
