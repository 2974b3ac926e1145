"""Steering: the intervention is what the docs say, generation follows it, and it moves the promoted tokens."""

import pytest
import torch

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from activations.models import load_model
from analysis.steering import generate, measure_effect, steer_fn, steering
from sae.cli import main
from sae.config import SAEConfig
from sae.io import save_sae
from sae.registry import make_sae

HOOK = "blocks.1.hook_resid_post"


def _sae(lm, hook=HOOK, d_sae=32, scale=10.0, seed=0):
    torch.manual_seed(seed)
    return make_sae(SAEConfig(d_in=lm.d_model, d_sae=d_sae, k=4, hook_name=hook, model_name=lm.name, norm_scale=scale))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_adding_moves_the_hook_activation_along_the_decoder_rows(which, hook, request):
    lm = request.getfixturevalue(which)
    sae = _sae(lm, hook)
    hp = parse_hook(hook, lm.model)
    ids = torch.tensor([lm.tokenizer("Once upon a time there was a dragon")["input_ids"]])
    clean = run_with_cache(lm.model, ids, [hp])[hook]
    with steering(lm, sae, [3, 7], [2.0, -1.5]):
        steered = run_with_cache(lm.model, ids, [hp])[hook]
    after = run_with_cache(lm.model, ids, [hp])[hook]
    expected = (2.0 * sae.W_dec[3] - 1.5 * sae.W_dec[7]).detach() / sae.cfg.norm_scale
    torch.testing.assert_close(
        steered[0, 1:] - clean[0, 1:], expected.expand(ids.shape[1] - 1, -1), atol=1e-5, rtol=1e-4
    )
    assert torch.equal(steered[0, 0], clean[0, 0])  # the first position is left alone
    assert torch.equal(after, clean)  # hooks are gone after the block


def test_clamping_is_encode_set_decode_keeping_the_error(tiny_llama):
    sae = _sae(tiny_llama)
    torch.manual_seed(1)
    x = torch.randn(2, 6, tiny_llama.d_model)
    fn = steer_fn(sae, [5, 9], [4.0, 0.0], clamp=True)
    with torch.no_grad():
        out = fn(x)
        xn = x * sae.cfg.norm_scale
        f = sae.encode(xn)
        error = xn - sae.decode(f)
        f[..., 5], f[..., 9] = 4.0, 0.0
        literal = (sae.decode(f) + error) / sae.cfg.norm_scale
    torch.testing.assert_close(out[:, 1:], literal[:, 1:], atol=1e-5, rtol=1e-4)
    assert torch.equal(out[:, 0], x[:, 0])
    # clamping to the value a feature already has changes nothing
    with torch.no_grad():
        now = sae.encode_raw(x)[0, 3, 5].item()
        same = steer_fn(sae, [5], now, clamp=True)(x[:1, 3:4])
    torch.testing.assert_close(same, x[:1, 3:4], atol=1e-5, rtol=1e-5)


def test_generation_is_seeded_and_steered(tiny_llama):
    sae = _sae(tiny_llama)
    prompt = "The queen said that"
    plain = generate(tiny_llama, prompt, max_new_tokens=12, seed=3)
    assert plain == generate(tiny_llama, prompt, max_new_tokens=12, seed=3)
    with steering(tiny_llama, sae, [2], 0.0):
        assert generate(tiny_llama, prompt, max_new_tokens=12, seed=3) == plain
    with steering(tiny_llama, sae, [2], 400.0):
        pushed = generate(tiny_llama, prompt, max_new_tokens=12, seed=3)
    assert pushed != plain
    assert generate(tiny_llama, prompt, max_new_tokens=12, seed=3) == plain
    greedy = generate(tiny_llama, prompt, max_new_tokens=5, temperature=0)
    assert greedy == generate(tiny_llama, prompt, max_new_tokens=5, temperature=0, seed=99)


def test_positive_steering_raises_the_promoted_tokens_on_the_embedded_default():
    """SmolLM2-135M at its default hook; feature 0's decoder row is planted along the unembedding of ' music'
    (the rest random), so its promoted tokens are known to mean something."""
    lm = load_model("smollm2-135m")
    hook = "blocks.15.hook_resid_pre"
    prompts = ["The history of the city begins in the Roman period, when", "She opened the door and saw that the"]
    ids = torch.tensor([lm.tokenizer(prompts[0])["input_ids"]])
    x = run_with_cache(lm.model, ids, [parse_hook(hook, lm.model)])[hook][0, 1:]
    sae = _sae(lm, hook, d_sae=16, scale=lm.d_model**0.5 / x.norm(dim=-1).mean().item())
    music = lm.tokenizer(" music", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        row = lm.model.get_output_embeddings().weight[music]
        sae.W_dec[0] = row / row.norm()
    up = measure_effect(lm, sae, [0], 6.0, prompts, n_tokens=8)
    down = measure_effect(lm, sae, [0], -6.0, prompts, n_tokens=8)
    assert " music" in up.promoted and up.positions == sum(len(lm.tokenizer(p)["input_ids"]) - 1 for p in prompts)
    assert up.delta > 0 and up.delta > up.delta_suppressed + 0.5
    assert sum(d > 0 for d in up.delta_per_token) >= 6
    assert up.logprob_steered > up.logprob_clean
    assert down.promoted == up.suppressed  # negative strength flips the ranking
    # clamping the planted feature high moves the same way
    clamped = measure_effect(lm, sae, [0], 6.0, prompts, n_tokens=8, clamp=True)
    assert clamped.delta > 0


def test_user_errors(tiny_llama, tiny_gpt2):
    sae = _sae(tiny_llama)
    with pytest.raises(UserError, match="2 strengths for 1 features"):
        steer_fn(sae, [1], [1.0, 2.0])
    with pytest.raises(UserError, match="feature 32 does not exist"):
        with steering(tiny_llama, sae, [32], 1.0):
            pass
    with pytest.raises(UserError, match="no feature to steer"):
        with steering(tiny_llama, sae, [], 1.0):
            pass
    with pytest.raises(UserError, match="no prompts"):
        measure_effect(tiny_llama, sae, [1], 1.0, [])
    with pytest.raises(UserError, match="single token"):
        measure_effect(tiny_llama, sae, [1], 1.0, ["The"])
    with pytest.raises(UserError, match="max new tokens"):
        generate(tiny_llama, "Hello", max_new_tokens=0)
    other = make_sae(SAEConfig(d_in=32, d_sae=8, k=2, hook_name=HOOK))
    with pytest.raises(UserError, match="d_in=32"):
        with steering(tiny_gpt2, other, [1], 1.0):
            pass


def test_steer_command_prints_both_continuations_and_the_measured_effect(tiny_llama_dir, tiny_llama, tmp_path, capsys):

    run = tmp_path / "run"
    sae = _sae(tiny_llama)
    sae.cfg.model_name, sae.cfg.dataset = tiny_llama_dir, "tinyshakespeare"
    save_sae(sae, run)
    argv = [
        "steer",
        str(run),
        "--feature",
        "3",
        "--feature",
        "5",
        "--strength",
        "300",
        "--prompt",
        "The queen said",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--measure", "--measure-prompts", "2", "--measure-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "features 3, 5 +300 × decoder direction" in out and "feature 3 promotes" in out
    header = next(line for line in out.splitlines() if line.startswith("unsteered"))
    assert "│ steered (+300 × decoder direction)" in header
    assert "measured over 3 prompts" in out and "top 4 promoted tokens: mean log-prob" in out
    plain = generate(tiny_llama, "The queen said", max_new_tokens=8, seed=0)
    assert plain.split()[0] in out  # the unsteered column is the seeded plain generation
    assert (
        main(
            [
                *argv[:2],
                "--feature",
                "3",
                "--strength",
                "2",
                "--clamp",
                "--prompt",
                "Hi there",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "clamped to 2" in capsys.readouterr().out
    assert main([*argv[:2], "--feature", "99", "--strength", "1", "--prompt", "Hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "feature 99 does not exist" in err and "Traceback" not in err
