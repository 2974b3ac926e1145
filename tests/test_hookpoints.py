"""Hook capture against the model's own hidden states, hook-name checking, early stopping, patching."""

import pytest
import torch

from activations.errors import UserError
from activations.hookpoints import arch_table, parse_hook, patched, run_with_cache, valid_hook_names


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def lm(request):
    return request.getfixturevalue(request.param)


def _ids(lm, text="The quick brown fox jumps over the lazy dog. It was a sunny day in Paris."):
    return lm.tokenizer(text, return_tensors="pt").input_ids


def test_resid_hooks_match_hidden_states(lm):
    ids = _ids(lm)
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    n = len(hidden) - 1
    hooks = [parse_hook(f"blocks.{L}.hook_resid_pre", lm.model) for L in range(n)]
    hooks += [parse_hook(f"blocks.{L}.hook_resid_post", lm.model) for L in range(n - 1)]
    cache = run_with_cache(lm.model, ids, hooks)
    for L in range(n):
        torch.testing.assert_close(cache[f"blocks.{L}.hook_resid_pre"], hidden[L])
    for L in range(n - 1):
        torch.testing.assert_close(cache[f"blocks.{L}.hook_resid_post"], hidden[L + 1])
    # The last hidden state has the final norm applied; the hook gives the true residual stream.
    last = run_with_cache(lm.model, ids, [parse_hook(f"blocks.{n - 1}.hook_resid_post", lm.model)])
    assert not torch.allclose(last[f"blocks.{n - 1}.hook_resid_post"], hidden[n])


def test_attn_and_mlp_outputs_sum_to_the_residual_update(lm):
    ids = _ids(lm)
    names = [f"blocks.2.{k}" for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    c = run_with_cache(lm.model, ids, [parse_hook(n, lm.model) for n in names])
    pre, attn, mlp, post = (c[n] for n in names)
    torch.testing.assert_close(pre + attn + mlp, post, atol=1e-5, rtol=1e-5)


def test_unknown_hook_lists_valid_ones(tiny_llama):
    with pytest.raises(UserError, match=r"unknown hook 'blocks\.9\.hook_resid_post'.*blocks\.\{0\.\.3\}.*hook_mlp_out"):
        parse_hook("blocks.9.hook_resid_post", tiny_llama.model)
    with pytest.raises(UserError, match="unknown hook"):
        parse_hook("layer.1.resid", tiny_llama.model)
    assert "blocks.3.hook_attn_out" in valid_hook_names(tiny_llama.model)


def test_forward_stops_after_the_deepest_hook(tiny_llama):
    table = arch_table(tiny_llama.model)
    layers = tiny_llama.model.get_submodule(table.layers)
    ran = []
    handles = [layer.register_forward_hook(lambda m, i, o, L=L: ran.append(L)) for L, layer in enumerate(layers)]
    try:
        run_with_cache(tiny_llama.model, _ids(tiny_llama), [parse_hook("blocks.1.hook_resid_post", tiny_llama.model)])
        assert ran == [0, 1]
        ran.clear()
        run_with_cache(tiny_llama.model, _ids(tiny_llama), [parse_hook("blocks.2.hook_resid_pre", tiny_llama.model)])
        assert ran == [0, 1]
    finally:
        for h in handles:
            h.remove()


def test_patching_changes_downstream_and_is_removed(tiny_gpt2):
    ids = _ids(tiny_gpt2)
    hp = parse_hook("blocks.1.hook_mlp_out", tiny_gpt2.model)
    clean = tiny_gpt2.model(ids).logits
    with patched(tiny_gpt2.model, hp, lambda a: torch.zeros_like(a)):
        zeroed = tiny_gpt2.model(ids).logits
    again = tiny_gpt2.model(ids).logits
    assert not torch.allclose(clean, zeroed)
    torch.testing.assert_close(clean, again)
