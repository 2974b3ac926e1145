"""The neuron catalogue (analysis.neurons) against ground truth: a 2-layer MLP-only GPT-2 built by hand with one
position, token-frequency, entropy, promoting and suppression neuron among random small distractors; the gated
tiny Llama's activations as the probes read them; the cache and JSON round trip; and the `sae neurons` command."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib.metadata import entry_points

import pytest
import torch

from activations.models import LoadedModel
from activations.options import build
from analysis.commands import neurons as neurons_command
from analysis.neuron_probes import down_proj, entropy_effects, position_bins, position_moments, unigram_counts
from analysis.neurons import NEURON_TYPES, NeuronCatalogue, NeuronSettings, cache_path, classify_neurons
from sae import cli

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the hand-built model ----------------------------------------------------------------------------
# Residual layout (D = 64): token content [0, 40), a position ramp in 40 and its negative in 41 (so positions
# add no mean), a dimension W_U does not read (NULL), one W_U reads as log frequency (FREQ), two that only the
# promoted (PROMO) and the suppressed (SUP) tokens read, and spare dimensions W_U reads at random.
V, D, N, T = 256, 64, 32, 256  # vocabulary, d_model, neurons per layer, positions
CONTENT, RAMP, NULL, FREQ, PROMO, SUP = range(40), 40, 48, 49, 50, 51
PROMOTED, SUPPRESSED = [10, 11, 12], [20, 21, 22]
POSITION, FREQUENCY, ENTROPY, PROMOTING, SUPPRESSION = (0, 3), (1, 5), (1, 7), (1, 9), (1, 11)
FAINT_NULL = (1, 13)  # writes into NULL too, with a tiny norm: no entropy neuron
PLANTED = {
    "position": POSITION,
    "token_frequency": FREQUENCY,
    "entropy": ENTROPY,
    "promoting": PROMOTING,
    "suppression": SUPPRESSION,
}


def hand_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="<unk>")


def zipf_counts(gen: torch.Generator) -> torch.Tensor:
    """Unigram counts 1000 / rank in a random order; a fifth of the tokens never seen."""
    counts = 1000 / torch.arange(1, V + 1, dtype=torch.float64)
    counts = counts[torch.randperm(V, generator=gen)]
    counts[torch.randperm(V, generator=gen)[: V // 5]] = 0
    return counts


def hand_model(counts: torch.Tensor) -> torch.nn.Module:
    """MLP-only GPT-2 (every attention weight and bias zero) whose neurons are what their weights say.

    Every token embedding lies in the content dimensions with mean 0 and norm 4, the position embedding in
    RAMP (and -RAMP next to it), so block 0's LayerNorm output at RAMP is a function of the position alone: the
    position neuron L0N3 reads only it. W_U (untied) is random in the content and spare dimensions, zero at NULL,
    the centred log frequency at FREQ, 4 at PROMO for the promoted tokens and at SUP for the suppressed ones.
    Layer 1: w_out of the frequency neuron is FREQ, of the entropy neuron 8·NULL (large norm, invisible to W_U),
    of the promoting neuron the promoted tokens' unembedding rows summed, of the suppression neuron minus the
    suppressed ones', of L1N13 0.05·NULL (null but faint). Distractors read everything at random and write small
    random content vectors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen)
    cfg = GPT2Config(
        vocab_size=V,
        n_embd=D,
        n_layer=2,
        n_head=2,
        n_inner=N,
        n_positions=T,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if ".attn." in name or "mlp" in name:
            p.zero_()
    tokens = torch.zeros(V, D)
    tokens[:, CONTENT] = randn(V, len(CONTENT))
    tokens[:, CONTENT] -= tokens[:, CONTENT].mean(1, keepdim=True)
    model.transformer.wte.weight.copy_(4 * tokens / tokens.norm(dim=1, keepdim=True))
    ramp = torch.linspace(0.5, 4, T)
    model.transformer.wpe.weight.zero_()
    model.transformer.wpe.weight[:, RAMP] = ramp
    model.transformer.wpe.weight[:, RAMP + 1] = -ramp

    W_U = 0.3 * randn(V, D)
    W_U[:, NULL] = 0
    f = torch.where(counts > 0, counts, 0.5).log()
    W_U[:, FREQ] = 5 * (f - f.mean()) / (f - f.mean()).norm()
    W_U[:, PROMO] = 0
    W_U[:, SUP] = 0
    W_U[PROMOTED, PROMO] = 4.0
    W_U[SUPPRESSED, SUP] = 4.0
    model.lm_head.weight.copy_(W_U)

    for layer, mlp in enumerate(block.mlp for block in model.transformer.h):  # Conv1D: c_fc [D, N], c_proj [N, D]
        mlp.c_fc.weight.copy_(0.3 * randn(D, N))
        mlp.c_fc.bias.fill_(1.0)
        mlp.c_proj.weight[:, CONTENT] = 0.1 * randn(N, len(CONTENT))
        if layer == 0:
            mlp.c_fc.weight[:, POSITION[1]] = 0
            mlp.c_fc.weight[RAMP, POSITION[1]] = 1.0
            mlp.c_fc.bias[POSITION[1]] = 0
    mlp = model.transformer.h[1].mlp
    for _, j in (FREQUENCY, ENTROPY, PROMOTING, SUPPRESSION, FAINT_NULL):
        mlp.c_fc.weight[:, j] = 0.05 * randn(D)  # activation 1.5 ± 0.4: positive, varying
        mlp.c_fc.bias[j] = 1.5
        mlp.c_proj.weight[j] = 0
    mlp.c_proj.weight[FREQUENCY[1], FREQ] = 3.0
    mlp.c_proj.weight[ENTROPY[1], NULL] = 8.0
    mlp.c_proj.weight[FAINT_NULL[1], NULL] = 0.05
    mlp.c_proj.weight[PROMOTING[1]] = W_U[PROMOTED].sum(0)
    mlp.c_proj.weight[SUPPRESSION[1]] = -W_U[SUPPRESSED].sum(0)
    return model


@pytest.fixture(scope="module")
def counts() -> torch.Tensor:
    return zipf_counts(torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hand_lm(counts) -> LoadedModel:
    return LoadedModel(model=hand_model(counts), tokenizer=hand_tokenizer(), name="hand-built-neurons")


@pytest.fixture(scope="module")
def hand_text(tmp_path_factory) -> str:
    """A text file of random words w2 … w255 (the hand tokenizer's vocabulary)."""
    gen = torch.Generator().manual_seed(2)
    words = torch.randint(2, V, (6000,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text("\n".join(" ".join(f"w{w}" for w in words[i : i + 12]) for i in range(0, len(words), 12)))
    return str(path)


def hand_settings(text: str) -> NeuronSettings:
    return NeuronSettings(rows=6, context=96, text=text, effect_neurons=4)


def test_the_hand_built_position_neuron_reads_the_position_only(hand_lm):
    """The construction itself: L0N3's activation is the same at a position whatever the tokens are."""
    seen = []
    handle = down_proj(hand_lm.model, 0).register_forward_pre_hook(lambda mod, args: seen.append(args[0][..., 3]))
    hand_lm.model(input_ids=torch.randint(2, V, (4, 40), generator=torch.Generator().manual_seed(0)))
    handle.remove()
    acts = seen[0]  # [B, T]
    assert (acts - acts[:1]).abs().max() < 1e-4 and acts.std(1).min() > 0.1


def test_catalogue_tags_exactly_the_built_neurons(hand_lm, hand_text, counts):
    cat = classify_neurons(hand_lm, hand_settings(hand_text), cache=False, counts=counts)
    assert (cat.n_layers, cat.d_mlp) == (2, N) and set(cat.scores) == set(NEURON_TYPES)
    for kind, neuron in PLANTED.items():
        assert cat.tagged(kind) == [neuron], (kind, cat.top(kind, 3))
    ev = cat.evidence
    assert ev["token_frequency"]["cosine"][FREQUENCY] > 0.9  # it pushes toward the unigram distribution
    assert ev["entropy"]["null_fraction"][ENTROPY] > 0.9
    assert ev["entropy"]["norm_ratio"][ENTROPY] > 2 * NeuronSettings().norm_scale
    assert ev["entropy"]["null_fraction"][FAINT_NULL] > 0.9 > 0.2 > ev["entropy"]["norm_ratio"][FAINT_NULL]
    assert ev["entropy"]["entropy_effect"][ENTROPY] > 0  # raising it spreads the next-token distribution
    assert ev["entropy"]["entropy_effect"].isfinite().sum() == 4  # only the top effect_neurons are measured
    assert sorted(ev["promoting"]["tokens"][PROMOTING][:3].tolist()) == PROMOTED
    assert sorted(ev["suppression"]["tokens"][SUPPRESSION][:3].tolist()) == SUPPRESSED
    assert ev["promoting"]["skew"][PROMOTING] > 3 > -3 > ev["suppression"]["skew"][SUPPRESSION]
    for neuron in (PROMOTING, SUPPRESSION, (1, 0), (0, 1)):  # against the moments of lm_head(ln_f-centred w_out)
        w = hand_lm.model.transformer.h[neuron[0]].mlp.c_proj.weight[neuron[1]]
        z = hand_lm.model.lm_head.weight @ (w - w.mean())
        z = (z - z.mean()) / z.std(correction=0)
        assert math.isclose(ev["promoting"]["kurtosis"][neuron], z.pow(4).mean() - 3, rel_tol=1e-3, abs_tol=1e-3)
        assert math.isclose(ev["promoting"]["skew"][neuron], z.pow(3).mean(), rel_tol=1e-3, abs_tol=1e-3)
    assert ev["position"]["eta_random"][POSITION] > 0.8 and ev["position"]["eta_text"][POSITION] > 0.8
    assert ev["position"]["peak_position"][POSITION] > 48  # the ramp rises: the last bins hold the peak


def test_a_token_driven_neuron_is_no_position_neuron_on_text(hand_lm, counts, tmp_path):
    """On a text of one repeated word every neuron varies with the position only; on random tokens only the
    position neuron does, and the score is the smaller of the two."""
    (tmp_path / "one-word.txt").write_text(" ".join(["w7"] * 3000))
    cat = classify_neurons(hand_lm, hand_settings(str(tmp_path / "one-word.txt")), cache=False, counts=counts)
    eta_text = cat.evidence["position"]["eta_text"]
    assert eta_text.median() > 0.9  # every neuron is a function of the position on this text
    assert cat.tagged("position") == [POSITION]


def test_entropy_effect_is_measured_through_the_down_projection(hand_lm):
    """Doubling the entropy neuron's (positive) activation lengthens the final residual along NULL, so the final
    LayerNorm shrinks every logit and the entropy rises; taking it away does the opposite; zero changes nothing."""
    tokens = torch.randint(2, V, (2, 24), generator=torch.Generator().manual_seed(4))
    seen = []
    handle = down_proj(hand_lm.model, 1).register_forward_pre_hook(lambda mod, args: seen.append(args[0][..., 7]))
    hand_lm.model(input_ids=tokens)
    handle.remove()
    a = float(seen[0].mean())
    assert seen[0].min() > 0
    pushes = [(*ENTROPY, a), (*ENTROPY, -a), (*ENTROPY, 0.0)]
    up, down, none = entropy_effects(hand_lm.model, tokens, pushes, start=2).tolist()
    assert up > 0.05 and down < -0.05 and none == 0


def test_position_moments_read_the_gated_activations(tiny_llama):
    """On the gated Llama the hooked activation is act(gate(h)) * up(h), h the MLP's normed input: the streamed
    per-bin sums equal those computed from the MLP input directly."""
    model = tiny_llama.model
    tokens = torch.randint(100, 5000, (3, 20), generator=torch.Generator().manual_seed(0))
    bins = position_bins(20, 1, 5)
    moments = position_moments(model, tokens, bins, batch_rows=2)
    mlp = model.model.layers[2].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model(input_ids=tokens)
    handle.remove()
    acts = (mlp.act_fn(mlp.gate_proj(seen[0])) * mlp.up_proj(seen[0])).double()  # [B, T, N]
    assert bins[0] == -1 and bins[1] == 0 and bins.max() == len(moments.count) - 1
    for k in range(len(moments.count)):
        expected = acts[:, bins == k].sum((0, 1))
        assert torch.allclose(moments.sum[2, k], expected, atol=1e-6 * (1 + expected.abs().max()))
    assert moments.count.sum() == 3 * 19  # position 0 left out


SMALL_TEXT = NeuronSettings(rows=2, context=32, effect_neurons=2, effect_rows=1)
ENGLISH = "The cat sat on the mat. The dog ran to the park, and the cat slept in the sun all day long.\n" * 40


def test_scores_shapes_ranges_cache_and_json(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    (tmp_path / "english.txt").write_text(ENGLISH)
    small = dataclasses.replace(SMALL_TEXT, frequency_text=str(tmp_path / "english.txt"))
    cat = classify_neurons(tiny_llama, small)  # counts from a text file through the real tokenizer
    assert (cat.n_layers, cat.d_mlp) == (4, 128)
    for kind, s in cat.scores.items():
        assert s.shape == (4, 128) and s.min() >= 0 and s.max() <= 1, kind
    assert cat.evidence["promoting"]["tokens"].shape == (4, 128, 5)
    assert cat.settings["frequency_source"].endswith("english.txt:validation")
    assert len(cat.rows()) == 512 and set(cat.rows()[0]) == {"layer", "neuron", *NEURON_TYPES}

    path = cache_path(tiny_llama, small)
    assert path.is_file() and path.parent == tmp_path / "neurons"
    data = json.loads(path.read_text())
    data["settings"]["marker"] = "read from the cache"
    path.write_text(json.dumps(data))
    assert classify_neurons(tiny_llama, small).settings["marker"] == "read from the cache"
    assert "marker" not in classify_neurons(tiny_llama, small, refresh=True).settings
    path.write_text("{ truncated")
    assert classify_neurons(tiny_llama, small).model == cat.model  # a damaged cache file is recomputed
    assert NeuronCatalogue.from_json(path.read_text()).model == cat.model  # ... and replaced
    assert cache_path(tiny_llama, NeuronSettings(rows=3, context=32)) != path
    assert cache_path(tiny_llama, small, counts=torch.ones(10)) != path

    back = NeuronCatalogue.from_json(cat.to_json())
    assert back.thresholds == cat.thresholds and back.settings == cat.settings
    for kind in cat.scores:
        assert torch.allclose(back.scores[kind], cat.scores[kind], atol=1e-5)
        assert back.tagged(kind) == cat.tagged(kind)
    effect = cat.evidence["entropy"]["entropy_effect"]
    assert effect.isfinite().sum() == 2
    assert torch.equal(back.evidence["entropy"]["entropy_effect"].isnan(), effect.isnan())
    assert torch.equal(back.evidence["suppression"]["tokens"], cat.evidence["suppression"]["tokens"])


def test_unigram_counts(tokenizer, tmp_path):
    """Counted as the tokenizer cuts the text: ' cat' twice a line, no special tokens added."""
    (tmp_path / "english.txt").write_text(ENGLISH)
    counts = unigram_counts(str(tmp_path / "english.txt"), "validation", tokenizer, len(tokenizer))
    (cat,) = tokenizer(" cat", add_special_tokens=False)["input_ids"]
    assert counts[cat] == 80 and counts.sum() == len(tokenizer(ENGLISH, add_special_tokens=False)["input_ids"])
    assert counts[tokenizer.bos_token_id] == 0


def test_gpt2_catalogue(tiny_gpt2):
    cat = classify_neurons(tiny_gpt2, SMALL_TEXT, cache=False, counts=torch.ones(len(tiny_gpt2.tokenizer)))
    assert (cat.n_layers, cat.d_mlp) == (4, 256)  # GPT-2's MLP is 4 · d_model
    assert all(s.shape == (4, 256) and 0 <= s.min() and s.max() <= 1 for s in cat.scores.values())
    assert cat.scores["token_frequency"].max() == 0  # a flat frequency vector has no direction


def _command_config(**values) -> neurons_command.Config:
    return build(neurons_command.Config, values)


@pytest.fixture(scope="module")
def hand_dir(hand_lm, tmp_path_factory) -> str:
    """The hand-built model saved as a local HF model folder."""
    folder = tmp_path_factory.mktemp("hand-model")
    hand_lm.model.save_pretrained(folder)
    hand_lm.tokenizer.save_pretrained(folder)
    return str(folder)


def test_command_json_and_tables(hand_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    neurons_command.run(_command_config(model=hand_dir, device="cpu", as_json=True, top=3, every=True))
    data = json.loads(capsys.readouterr().out)
    assert set(data["tagged"]) == set(data["top"]) == set(NEURON_TYPES)
    assert all(len(v) == 3 for v in data["top"].values()) and len(data["neurons"]) == 2 * N
    first = data["top"]["promoting"][0]
    assert {"layer", "neuron", "score", "kurtosis", "skew", "tokens", "token_text"} <= set(first)

    out = tmp_path / "plots"
    neurons_command.run(_command_config(model=hand_dir, device="cpu", out=str(out)))
    text = capsys.readouterr().out
    assert "entropy:" in text and "tagged when score >=" in text and "entropy_effect" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.png" for k in NEURON_TYPES)


def test_cli_neurons_json(hand_dir, tmp_path, monkeypatch, capsys):
    """Through `sae.cli.main` and the installed `neurons` entry point."""
    assert "neurons" in {ep.name for ep in entry_points(group="saelab.commands")}
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    assert cli.main(["neurons", "--model", hand_dir, "--device", "cpu", "--json", "--top", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layout"] == {"n_layers": 2, "d_mlp": N} and all(len(v) == 2 for v in data["top"].values())
    assert cli.main(["neurons", "--model", hand_dir, "--top", "0"]) == 2
    assert "--top" in capsys.readouterr().err


def test_unsupported_architecture_is_one_line(tmp_path, tokenizer, monkeypatch, capsys):
    """A model whose blocks saelab cannot read neuron by neuron (GPT-NeoX) ends as one line and exit code 2."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    capsys.readouterr()  # the saving's progress bars
    table = cli.commands()  # as test_cli_neurons_json: the command, installed or not
    monkeypatch.setattr(cli, "commands", lambda: {**table, "neurons": "analysis.commands.neurons"})
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    assert cli.main(["neurons", "--model", str(tmp_path / "neox"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err  # after the loader's progress bars
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0]), err
    assert "'gpt_neox'" in lines[0] and "llama" in lines[0] and "gpt2" in lines[0]
