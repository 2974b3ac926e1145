"""Sparse probing: the logistic probe against hand-solved and separable cases, latent selection on planted latents,
chance level on independent labels, the token tasks' labels on the real tokenizer, seeded balanced sampling, and a
small end-to-end run on the embedded SmolLM2 with a random SAE."""

from __future__ import annotations

import math

import pytest
import torch

from activations.errors import UserError
from activations.models import load_model
from activations.sources import open_text_source
from activations.tokens import pack_contexts
from analysis.probing_tasks import (
    NEGATIVE,
    POSITIVE,
    TASKS,
    ProbeSplit,
    ProbeTask,
    balanced_positions,
    build_tasks,
    probe_text_shortfall,
    task_generator,
    token_labels,
)
from analysis.sparse_probing import ProbingConfig, fit_probe, probe_task, sparse_probing, top_latents
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the probe ---------------------------------------------------------------------------------


def test_one_dimensional_fit_matches_the_hand_solved_optimum():
    """x = +-1 (labels 1 / 0, balanced): centred and scaled z = x, b = 0 by symmetry, and the optimum w solves
    l2 * w = sigmoid(-w) (the derivative of mean log(1 + exp(-w)) + l2 / 2 * w^2); found here by bisection."""
    l2 = 0.1
    lo, hi = 0.0, 20.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if l2 * mid < 1 / (1 + math.exp(mid)) else (lo, mid)
    x = torch.tensor([[1.0], [-1.0]] * 5)
    y = torch.tensor([1, 0] * 5)
    probe = fit_probe(x, y, l2=l2)
    assert float(probe.weight[0]) == pytest.approx(lo, abs=1e-6)
    assert float(probe.bias) == pytest.approx(0.0, abs=1e-6)
    assert probe.accuracy(x, y) == 1.0


def test_raw_probe_on_linearly_separable_data_is_exact_and_optimal():
    gen = torch.Generator().manual_seed(0)
    w_true = torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0)
    x = torch.randn(3000, 32, generator=gen) * torch.linspace(0.5, 5, 32)  # dimensions of different scales
    margin = (x / torch.linspace(0.5, 5, 32)) @ w_true
    x, margin = x[margin.abs() > 0.5], margin[margin.abs() > 0.5]
    y = (margin > 0).long()
    probe = fit_probe(x[:800], y[:800], l2=1e-3)
    assert probe.accuracy(x[800:], y[800:]) >= 0.98
    # the gradient of the objective, written out independently, vanishes at the returned probe: on the features
    # centred and divided by the root mean variance of the columns, the probe's weight is w * scale
    train = x[:800].double()
    mean, scale = train.mean(0), train.var(0, correction=0).mean().sqrt()
    z, w = (train - mean) / scale, probe.weight * scale
    p = torch.sigmoid(z @ w + probe.bias + probe.weight @ mean)
    grad_w = z.T @ (p - y[:800].double()) / 800 + 1e-3 * w
    grad_b = (p - y[:800].double()).mean()
    assert grad_w.abs().max() < 1e-6 and abs(float(grad_b)) < 1e-6


def test_the_fit_is_deterministic_and_a_constant_column_gets_no_weight():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=gen)
    x[:, 2] = 3.0  # a dead latent: constant
    y = (x[:, 0] + 0.3 * torch.randn(200, generator=gen) > 0).long()
    a, b = fit_probe(x, y), fit_probe(x.clone(), y.clone())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert float(a.weight[2]) == 0.0 and torch.isfinite(a.weight).all()


def test_top_latents_orders_by_absolute_mean_difference_ties_to_lower_index():
    latents = torch.tensor([[0.0, 1.0, 5.0, 0.0, 2.0], [0.0, 1.0, 5.0, 0.0, 0.0], [4.0, 0.0, 1.0, 3.0, 2.0]])
    labels = torch.tensor([1, 1, 0])
    # differences: |0-4|=4, |1-0|=1, |5-1|=4, |0-3|=3, |1-2|=1
    assert top_latents(latents, labels, 5).tolist() == [0, 2, 3, 1, 4]
    assert top_latents(latents, labels, 2).tolist() == [0, 2]


def _task(latents: torch.Tensor, labels: torch.Tensor, acts: torch.Tensor, n_train: int) -> ProbeTask:
    split = lambda s: ProbeSplit(acts[s], latents[s], labels[s])  # noqa: E731
    return ProbeTask("planted", "token", "planted", split(slice(0, n_train)), split(slice(n_train, None)))


def _sparse_latents(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, d, generator=gen) * 3 * (torch.rand(n, d, generator=gen) < 0.2)


def test_a_planted_latent_is_selected_and_classifies_alone():
    """The label is whether latent 7 fires (values bounded away from 0): top-1 finds it, at accuracy 1."""
    gen = torch.Generator().manual_seed(2)
    latents = _sparse_latents(3000, 64, gen)
    fires = torch.rand(3000, generator=gen) < 0.5
    latents[:, 7] = fires * (0.5 + 1.5 * torch.rand(3000, generator=gen))
    acts = torch.randn(3000, 16, generator=gen)
    cfg = ProbingConfig(probe_ks=[1, 2, 5])
    result = probe_task(_task(latents, fires.long(), acts, 1000), cfg)
    assert result["top_latents"][0] == 7
    assert result["sae_top_1_test_accuracy"] == 1.0
    assert min(result[f"sae_top_{k}_test_accuracy"] for k in (2, 5)) >= 0.99
    assert abs(result["llm_test_accuracy"] - 0.5) < 0.06  # the activations know nothing of the label
    assert result["n_train"] == 1000 and result["n_test"] == 2000


def test_independent_labels_give_chance_accuracy_at_every_k():
    gen = torch.Generator().manual_seed(3)
    latents = _sparse_latents(2400, 64, gen)
    labels = (torch.rand(2400, generator=gen) < 0.5).long()
    acts = torch.randn(2400, 24, generator=gen)
    cfg = ProbingConfig(probe_ks=[1, 2, 5, 10, 20, 50])
    result = probe_task(_task(latents, labels, acts, 400), cfg)
    accuracies = {k: v for k, v in result.items() if k.endswith("test_accuracy")}
    assert len(accuracies) == 14
    for key, value in accuracies.items():  # 2000 test examples: one standard deviation is 0.011
        assert abs(value - 0.5) < 0.06, (key, value)


def test_config_errors_name_the_fix():
    with pytest.raises(UserError, match="probe-ks"):
        ProbingConfig(probe_ks=[1, 0])
    with pytest.raises(UserError, match="unknown probing task.*choose from"):
        ProbingConfig(probe_tasks=["digit", "sentiment"])
    with pytest.raises(UserError, match="probe-train-examples"):
        ProbingConfig(probe_train_examples=1)


# ---- the tasks ----------------------------------------------------------------------------------


def _labelled(tokenizer, text: str, name: str) -> tuple[list[str], list[str]]:
    """(positive pieces, negative pieces) of `text` under task `name`, stripped."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    labels = token_labels(ids, tokenizer, [name])[name][0].tolist()
    pieces = [tokenizer.decode([i]).strip() for i in ids[0].tolist()]
    pick = lambda v: [p for p, y in zip(pieces, labels) if y == v]  # noqa: E731
    return pick(POSITIVE), pick(NEGATIVE)


def test_digit_positives_are_digits_only(tokenizer):
    pos, neg = _labelled(tokenizer, "In 2019 the 3 cats ate 45 fish, not 1st.", "digit")
    assert pos == ["2", "0", "1", "9", "3", "4", "5", "1"]
    assert "st" in neg and "cats" in neg and not any(c.isdigit() for p in neg for c in p)


def test_parentheses_nest_and_a_stray_close_does_nothing(tokenizer):
    pos, neg = _labelled(tokenizer, "Then a (b (c) d) e ) f (g", "inside_parentheses")
    assert pos == ["b", "c", "d", "g"]
    assert neg == ["a", "e", "f"]  # "Then" is the context's first position: never an example


def test_sentence_starts_follow_end_punctuation_and_line_starts_are_left_out(tokenizer):
    pos, neg = _labelled(tokenizer, "He ran. She sat! Was it? yes\nThe end.", "sentence_start")
    assert pos == ["She", "Was", "yes"]
    assert neg == ["ran", "sat", "it", "end"]


def test_capitalised_words_against_lower_case_words(tokenizer):
    pos, neg = _labelled(tokenizer, "so The cat met Bob and alice, É and 中.", "capitalised_word")
    assert pos == ["The", "Bob", "É"]
    assert neg == ["cat", "met", "and", "al", "and"]  # "ice" continues a word; 中 has no case


def test_real_wikitext_positives_hold_their_property(tokenizer):
    contexts = []
    for c in pack_contexts(open_text_source("wikitext-2", split="test"), tokenizer, 128, False):
        contexts.append(c.tokens)
        if len(contexts) == 40:
            break
    tokens = torch.stack(contexts)
    labels = token_labels(tokens, tokenizer, ["digit", "capitalised_word"])
    pieces = [[tokenizer.decode([i]) for i in row] for row in tokens.tolist()]
    digits = [pieces[r][t] for r, t in (labels["digit"] == POSITIVE).nonzero().tolist()]
    assert len(digits) > 50 and all(p.strip().isdecimal() and p.strip().isascii() for p in digits)
    caps = [pieces[r][t] for r, t in (labels["capitalised_word"] == POSITIVE).nonzero().tolist()]
    assert len(caps) > 50 and all(p.lstrip()[0].isupper() for p in caps)
    assert (labels["digit"][:, 0] == -1).all()


def test_balanced_positions_are_balanced_and_fixed_by_the_seed():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 2, (30, 50), generator=gen).to(torch.int8)
    a_pos, a_y = balanced_positions(labels, 40, task_generator(5, "digit", "train"))
    b_pos, b_y = balanced_positions(labels, 40, task_generator(5, "digit", "train"))
    c_pos, _ = balanced_positions(labels, 40, task_generator(6, "digit", "train"))
    assert torch.equal(a_pos, b_pos) and torch.equal(a_y, b_y) and not torch.equal(a_pos, c_pos)
    assert int(a_y.sum()) == 40 and len(a_y) == 80
    assert (labels[a_pos[:, 0], a_pos[:, 1]].long() == a_y).all()  # each example carries its position's label
    assert len({tuple(p) for p in a_pos.tolist()}) == 80  # no position drawn twice


def test_probe_text_tasks_are_left_out_when_the_file_is_too_small():
    reason = probe_text_shortfall("latin_script", 400, 200)
    assert "12 positive and 18 negative" in reason and "600 per class" in reason
    assert probe_text_shortfall("english_language", 2, 1) is None  # 3 English texts: 2 train + 1 test
    assert "3 positive" in probe_text_shortfall("english_language", 2, 2)


# ---- end to end on the embedded model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


def _random_sae(lm):
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_in=lm.d_model, d_sae=96, k=8, hook_name="blocks.2.hook_resid_pre", model_name=lm.name, context_size=32
    )
    return make_sae(cfg)


def test_end_to_end_on_smollm2(smol):
    sae = _random_sae(smol)
    cfg = ProbingConfig(probe_ks=[1, 2, 5], probe_train_examples=8, probe_test_examples=4, probe_sequence_tokens=16)
    result = sparse_probing(sae, smol, cfg)
    assert set(result["tasks"]) == set(TASKS) - {"english_language"}  # 3 English texts, 4 + 2 needed
    assert "3 positive" in result["skipped_tasks"]["english_language"]
    for name, task in result["tasks"].items():
        assert (task["n_train"], task["n_test"]) == (8, 4), name
        assert len(set(task["top_latents"])) == 5 and all(0 <= i < 96 for i in task["top_latents"])
        assert all(0 <= task[k] <= 1 for k in task if k.endswith("accuracy"))
    means = [result[f"sae_top_{k}_test_accuracy"] for k in (1, 2, 5)]
    assert means == [
        pytest.approx(sum(t[f"sae_top_{k}_test_accuracy"] for t in result["tasks"].values()) / 6) for k in (1, 2, 5)
    ]
    # Shakespeare and Wikipedia are far apart in the model's mean activations, even at layer 2
    assert result["tasks"]["shakespeare_vs_wikitext"]["llm_test_accuracy"] == 1.0


def test_the_same_seed_gives_the_same_examples(smol):
    sae = _random_sae(smol)
    names = ["shakespeare_vs_wikitext", "digit", "english_language"]
    one, skipped = build_tasks(sae, smol, names, 4, 2, 8, 8, seed=3)
    two, _ = build_tasks(sae, smol, names, 4, 2, 8, 8, seed=3)
    other, _ = build_tasks(sae, smol, ["digit"], 4, 2, 8, 8, seed=4)
    assert not skipped and [t.name for t in one] == names
    for a, b in zip(one, two):
        for s in ("train", "test"):
            x, y = getattr(a, s), getattr(b, s)
            assert torch.equal(x.acts, y.acts) and torch.equal(x.latents, y.latents) and torch.equal(x.labels, y.labels)
            assert int(x.labels.sum()) * 2 == len(x.labels)  # balanced
    assert not torch.equal(one[1].train.acts, other[0].train.acts)
