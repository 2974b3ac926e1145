"""First-letter absorption: the maths on planted ground truth (a hand-built SAE whose latents are a clean letter
feature, two split features and an absorbed one), the word list and prompt on the real tokenizer, the cached-prefix
activations against full prompts, and one small end-to-end run on the real model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from activations.models import load_model
from analysis.absorption import (
    AbsorptionConfig,
    absorption,
    encode_all,
    f1_scores,
    first_letter_probe,
    letter_scores,
    one_hot,
    split_features,
    summary,
    word_absorption,
)
from analysis.absorption_words import LETTERS, Word, prompt_prefix, split_words, vocabulary_words, word_activations
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def relu_sae(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, norm_scale: float = 1.0):
    """A ReLU SAE with the given weights and zero b_dec."""
    d_in, d_sae = W_enc.shape
    sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu", norm_scale=norm_scale))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.zero_()
    return sae


# ---- small pieces, by hand ---------------------------------------------------------------------------------


def test_f1_by_hand():
    pred = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    truth = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=torch.bool)
    assert f1_scores(pred, truth).tolist() == [0.5, 0.0]  # TP 1, FP 1, FN 1; a column with nothing is 0


def test_word_absorption_formulas_by_hand():
    # p = e0. Latent 0 (main) reads x2, decoder e0; latent 1 reads x1, decoder (e0 + e1) / sqrt 2 (cos 0.707).
    # norm_scale 2 doubles the activations and halves each raw contribution: projections are unchanged.
    r = 1 / math.sqrt(2)
    sae = relu_sae(
        torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        torch.zeros(2),
        torch.tensor([[1.0, 0.0, 0.0], [r, r, 0.0]]),
        norm_scale=2.0,
    )
    x = torch.tensor([[1.0, 0.8, 0.4], [1.0, 0.8, 0.0], [1.0, 0.3, 0.0], [1.0, 0.8, 1.5]])
    w = word_absorption(sae, x, [0], torch.tensor([3.0, 0.0, 0.0]), AbsorptionConfig())
    absorbed = 0.8 * r  # latent 1's projection; the word's projection P is 1
    assert w.fraction.tolist() == pytest.approx([absorbed / (absorbed + 0.4), 1.0, 0.0, 0.0])
    # word 0: partial (main carries 0.4); word 1: main silent, latent 1 carries 0.57 >= 0.4 P: full absorption;
    # word 2: latent 1 carries 0.21 < 0.4 P: none; word 3: the main latent carries more than P: none.
    assert w.full.tolist() == [False, True, False, False]
    assert w.main_silent.tolist() == [False, True, True, False]
    assert w.top_latent.tolist() == [1, 1, 1, 0]


# ---- planted ground truth ----------------------------------------------------------------------------------

ALPHA, S, SIGMA = 4.0, 4.0, 0.25  # letter signal, token-specific signal of absorbed words, noise per dimension
PER_LETTER, ABSORBED = 40, 10  # words per letter (half train, half test); C words absorbed (5 train, 5 test)


@pytest.fixture(scope="module")
def planted():
    """Words of letters a, b, c, d in d = 64 with orthonormal letter directions u_a..u_d, a B-group direction g,
    one direction v_w per absorbed C word, and noise in the remaining dimensions. The SAE's latents:
    0 = A (fires on every A word), 1/2 = B's two halves (u_b + g, u_b - g), 3 = C, silent on the absorbed words
    (its encoder subtracts their v_w), 4.. = one token latent per absorbed word, whose decoder is
    (S v_w + ALPHA u_c) normalised: C's direction absorbed. Nothing encodes D."""
    gen = torch.Generator().manual_seed(0)
    d = 64
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].T.float()  # rows orthonormal
    u = {letter: basis[i] for i, letter in enumerate("abcd")}
    g = basis[4]
    v = basis[5 : 5 + ABSORBED]
    noise_basis = basis[5 + ABSORBED :]
    xs, labels, split = [], [], []
    for letter in "abcd":
        for j in range(PER_LETTER):
            x = ALPHA * u[letter] + SIGMA * torch.randn(len(noise_basis), generator=gen) @ noise_basis
            if letter == "b":  # B's halves, each half in both splits
                x = x + (ALPHA if (j // 2) % 2 else -ALPHA) * g
            if letter == "c" and j < ABSORBED:  # the first ABSORBED C words are absorbed, half of them train
                x = x + S * v[j]
            xs.append(x)
            labels.append(LETTERS.index(letter))
            split.append(j % 2 == 0)
    x, labels, train = torch.stack(xs), torch.tensor(labels), torch.tensor(split)
    n_lat = 4 + ABSORBED
    W_enc = torch.zeros(d, n_lat)
    b_enc = torch.zeros(n_lat)
    W_dec = torch.zeros(n_lat, d)
    W_enc[:, 0], b_enc[0], W_dec[0] = u["a"], -ALPHA / 2, u["a"]
    W_enc[:, 1], b_enc[1], W_dec[1] = u["b"] + g, -ALPHA, (u["b"] + g) / math.sqrt(2)
    W_enc[:, 2], b_enc[2], W_dec[2] = u["b"] - g, -ALPHA, (u["b"] - g) / math.sqrt(2)
    W_enc[:, 3], b_enc[3], W_dec[3] = u["c"] - (ALPHA / S) * v.sum(0), -ALPHA / 2, u["c"]
    for t in range(ABSORBED):
        dec = S * v[t] + ALPHA * u["c"]
        W_enc[:, 4 + t], b_enc[4 + t], W_dec[4 + t] = v[t], -0.1 * S, dec / dec.norm()
    sae = relu_sae(W_enc, b_enc, W_dec)
    return dict(sae=sae, x=x, labels=labels, train=train, u=u)


@pytest.fixture(scope="module")
def planted_scores(planted):
    x, labels, train, sae = planted["x"], planted["labels"], planted["train"], planted["sae"]
    x_train, y_train, x_test, y_test = x[train], labels[train], x[~train], labels[~train]
    probe = first_letter_probe(x_train, y_train, x_test, y_test)
    codes_train, codes_test = encode_all(sae, x_train), encode_all(sae, x_test)
    cfg = AbsorptionConfig()
    splits = split_features(
        codes_train,
        one_hot(y_train, probe.letters),
        codes_test,
        one_hot(y_test, probe.letters),
        cfg.absorption_max_k,
        cfg.absorption_tau,
    )
    return probe, letter_scores(sae, x_test, y_test, probe, splits, cfg, y_train=y_train)


def test_planted_data_is_as_constructed(planted):
    codes = encode_all(planted["sae"], planted["x"])
    labels = planted["labels"]
    fires = codes > 0
    assert fires[:, 0].equal(labels == 0)  # the A latent fires on exactly the A words
    assert (fires[:, 1] ^ fires[:, 2]).equal(labels == 1)  # each B word has exactly one of the two B latents
    c_words = labels == 2
    assert fires[c_words, 3].sum() == PER_LETTER - ABSORBED and not fires[~c_words, 3].any()
    assert (fires[:, 4:].sum(1) == (c_words & ~fires[:, 3]).long()).all()  # one token latent per absorbed word
    assert planted["train"][c_words].sum() == PER_LETTER // 2 and planted["train"][~c_words].sum() == 60


def test_probe_finds_the_planted_letter_directions(planted, planted_scores):
    probe, _ = planted_scores
    assert [LETTERS[c] for c in probe.letters] == ["a", "b", "c", "d"]
    assert probe.f1 == [1.0, 1.0, 1.0, 1.0]
    for c, letter in enumerate("abcd"):
        along = {other: float(probe.direction(c) @ planted["u"][other]) for other in "abcd"}
        assert along[letter] > 0.8 and all(along[o] < 0 for o in "abcd" if o != letter)


def test_planted_scores_come_out_as_constructed(planted_scores):
    _, letters = planted_scores
    a, b, c, d = (letters[k] for k in "abcd")
    # A: one clean feature, nothing absorbed.
    assert a["main_latents"] == [0] and a["num_split_features"] == 1
    assert a["full_absorption_rate"] == 0 and a["mean_absorption_fraction"] == 0 and a["n_main_silent"] == 0
    # B: split into the two latents, each covering half; together they detect every B word.
    assert sorted(b["main_latents"]) == [1, 2] and b["num_split_features"] == 2
    assert b["k_sparse_f1"][0] == pytest.approx(2 / 3) and b["split_f1"] == 1.0
    assert b["full_absorption_rate"] == 0 and b["mean_absorption_fraction"] == 0
    # C: the C latent is its feature; on the planted 25% of test words it is silent and the word's token
    # latent carries C's direction: exactly those are absorbed, fully.
    planted_fraction = (ABSORBED // 2) / (PER_LETTER // 2)
    assert c["main_latents"] == [3] and c["n_probe_true_positives"] == PER_LETTER // 2
    assert c["full_absorption_rate"] == planted_fraction and c["mean_absorption_fraction"] == planted_fraction
    assert c["n_full_absorption"] == c["n_main_silent"] == ABSORBED // 2
    assert all(4 <= latent < 4 + ABSORBED and count == 1 for latent, count in c["top_absorbing_latents"])
    # D: no latent knows it, so it has no feature, and with nothing carrying its direction nothing is absorbed.
    assert d["main_latents"] == [] and d["num_split_features"] == 0 and d["n_main_silent"] == PER_LETTER // 2
    assert d["full_absorption_rate"] == 0 and d["mean_absorption_fraction"] == 0
    totals = summary(letters)
    assert totals["n_letters_scored"] == 4
    assert totals["mean_full_absorption_score"] == pytest.approx(planted_fraction / 4)
    assert totals["mean_num_split_features"] == pytest.approx((1 + 2 + 1 + 0) / 4)


def test_nothing_scored_gives_none_not_a_crash():
    letters = {"a": dict(scored=False, mean_absorption_fraction=0.0, full_absorption_rate=0.0, num_split_features=1)}
    assert summary(letters) == {
        "n_letters_scored": 0,
        **{
            f"{stat}_{name}": None
            for name in ("absorption_fraction_score", "full_absorption_score", "num_split_features")
            for stat in ("mean", "std_dev")
        },
    }


# ---- words, prompt and activations -------------------------------------------------------------------------


def test_vocabulary_words_are_single_lower_case_tokens(tokenizer):
    words = vocabulary_words(tokenizer)
    assert len(words) > 10000
    texts = {w.text for w in words}
    assert {"the", "cat", "house"} <= texts and "a" not in texts  # two letters at least
    for w in words[::97]:
        assert tokenizer.decode([w.token_id]) == " " + w.text
        assert w.text.isascii() and w.text.isalpha() and w.text.islower() and len(w.text) >= 2
        assert tokenizer(" " + w.text, add_special_tokens=False)["input_ids"] == [w.token_id]
        assert LETTERS[w.letter] == w.text[0]


def test_word_split_is_seeded_and_disjoint(tokenizer):
    split = split_words(tokenizer, 200, 5, 0.75, seed=3)
    again = split_words(tokenizer, 200, 5, 0.75, seed=3)
    other = split_words(tokenizer, 200, 5, 0.75, seed=4)
    assert (split.train, split.test, split.examples) == (again.train, again.test, again.examples)
    assert split.train != other.train
    assert len(split.train) == 150 and len(split.test) == 50 and len(split.examples) == 5
    ids = [w.token_id for w in split.train + split.test + split.examples]
    assert len(set(ids)) == len(ids)


def test_prompt_prefix_is_the_answered_template(tokenizer):
    examples = [Word(tokenizer(" dog", add_special_tokens=False)["input_ids"][0], "dog")]
    text = tokenizer.decode(prompt_prefix(tokenizer, examples, bos=False))
    assert text == "\n dog has the first letter: D\n"
    with_bos = prompt_prefix(tokenizer, examples, bos=True)
    assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:] == prompt_prefix(tokenizer, examples, bos=False)


def test_too_many_words_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="--absorption-words"):
        split_words(tokenizer, 10**6, 10, 0.8, seed=0)
    with pytest.raises(UserError, match="--absorption-words 5 is too small"):
        AbsorptionConfig(absorption_words=5)
    with pytest.raises(UserError, match="--absorption-train-fraction 0.999 leaves no train or no test"):
        AbsorptionConfig(absorption_words=100, absorption_train_fraction=0.999)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("hook", ["blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out"])
def test_cached_prefix_activations_equal_full_prompts(request, model, hook, tokenizer):
    lm = request.getfixturevalue(model)
    split = split_words(tokenizer, 20, 3, 0.5, seed=0)
    prefix = prompt_prefix(tokenizer, split.examples, bos=True)
    hp = parse_hook(hook, lm.model)
    words = split.train + split.test
    cached = word_activations(lm, hp, prefix, words, batch_size=7)
    full = torch.tensor([prefix + [w.token_id] for w in words])
    expected = run_with_cache(lm.model, full, [hp])[hp.name][:, -1]
    assert cached.shape == (20, lm.d_model)
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)


# ---- end to end on the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def test_end_to_end_on_the_real_model(smol):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=smol.d_model, d_sae=512, k=16, hook_name="blocks.8.hook_resid_pre"))
    cfg = AbsorptionConfig(absorption_words=600, absorption_max_k=3)
    result = absorption(sae, smol, cfg)
    json.dumps(result, allow_nan=False)  # JSON-ready
    assert result["train_words"] == 480 and result["test_words"] == 120 and len(result["prompt_examples"]) == 10
    common = {k: v for k, v in result["letters"].items() if v["n_test_words"] >= 5}
    assert len(common) >= 8
    # Chance for a letter with a share s of the words is F1 <= 2s / (1 + s) (about 0.15 here): the model knows
    # first letters far better than that.
    assert sum(v["probe_f1"] for v in common.values()) / len(common) > 0.5
    for key in ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features"):
        assert result[key] is None or result[key] >= 0
    for v in result["letters"].values():
        assert 0 <= v["full_absorption_rate"] <= 1 and 0 <= v["mean_absorption_fraction"] <= 1
        assert v["n_full_absorption"] <= v["n_main_silent"] <= v["n_probe_true_positives"] <= v["n_test_words"]


def test_transcoder_is_refused_before_any_model_work(smol):
    cfg = SAEConfig(
        d_in=smol.d_model,
        d_sae=64,
        architecture="transcoder",
        hook_name="blocks.2.hook_mlp_in",
        hook_name_out="blocks.2.hook_mlp_out",
    )
    with pytest.raises(UserError, match="transcoder"):
        absorption(make_sae(cfg), smol, AbsorptionConfig(absorption_words=50))
