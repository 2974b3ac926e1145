"""Spliced dictionaries (analysis.splice): the forward is unchanged under every linearisation option, features and
errors carry gradients, a detached error cuts the upstream path exactly, and with the final norm frozen a feature's
gradient on a logit is its direct logit attribution."""

from __future__ import annotations

import itertools

import pytest
import torch

from activations.errors import UserError
from activations.hookpoints import parse_hook, run_with_cache
from analysis.component_capture import frozen_norm
from analysis.head_probes import attention_patterns
from analysis.head_weights import head_out_weights
from analysis.logits import unembedding
from analysis.splice import SpliceOptions, spliced
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = [SpliceOptions(*flags) for flags in itertools.product([False, True], repeat=3)]


def _sae(lm, hook, d_sae=48, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=lm.d_model, d_sae=d_sae, k=6, hook_name=hook, model_name=lm.name, norm_scale=2.0, **kw)
    return make_sae(cfg)


def _tokens(lm):
    return torch.randint(100, 5000, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_the_spliced_forward_is_the_clean_forward(model, opts, request):
    lm = request.getfixturevalue(model)
    saes = [
        _sae(lm, "blocks.0.hook_resid_post"),
        _sae(lm, "blocks.2.hook_mlp_out", seed=1),
        _sae(lm, "blocks.1.hook_mlp_in", seed=2, architecture="transcoder", hook_name_out="blocks.1.hook_mlp_out"),
    ]
    tokens = _tokens(lm)
    with torch.no_grad():
        clean = lm.model(input_ids=tokens, use_cache=False).logits
    with spliced(lm, saes, opts) as nodes:
        logits = lm.model(input_ids=tokens, use_cache=False).logits
        logits[:, -1].logsumexp(-1).sum().backward()
    torch.testing.assert_close(logits.detach(), clean, atol=2e-5, rtol=1e-5)
    assert set(nodes.features) == {"blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.1.hook_mlp_out"}
    for hook, f in nodes.features.items():
        assert f.shape == (2, 12, 48) and f.grad is not None, hook
        assert nodes.errors[hook].grad is not None and nodes.errors[hook].shape == (2, 12, lm.d_model), hook
    with torch.no_grad():  # outside the block the model is itself again
        torch.testing.assert_close(lm.model(input_ids=tokens, use_cache=False).logits, clean, atol=0, rtol=0)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_splicing_leaves_the_gradients_of_the_model_unchanged(model, request):
    """Without linearisation or detached errors the spliced model is the model, gradients included: the gradient
    at the token embeddings is the clean one, however many SAEs and transcoders sit between them and the logits."""
    lm = request.getfixturevalue(model)
    saes = [
        _sae(lm, "blocks.0.hook_resid_post"),
        _sae(lm, "blocks.1.hook_mlp_in", seed=2, architecture="transcoder", hook_name_out="blocks.1.hook_mlp_out"),
        _sae(lm, "blocks.2.hook_resid_post", seed=1),
    ]
    tokens = _tokens(lm)[:1]
    embed = lm.model.get_input_embeddings()(tokens).detach()

    def gradient() -> torch.Tensor:
        x = embed.clone().requires_grad_(True)
        lm.model(inputs_embeds=x, use_cache=False).logits[0, -1].log_softmax(-1)[7].backward()
        return x.grad

    clean = gradient()
    with spliced(lm, saes, SpliceOptions()):
        spliced_grad = gradient()
    torch.testing.assert_close(spliced_grad, clean, atol=1e-5, rtol=1e-4)
    assert clean.abs().max() > 1e-3


def test_a_detached_error_cuts_the_path_through_it(tiny_llama):
    """Downstream SAE with a zero encoder: its reconstruction is the constant b_dec, so everything downstream runs
    through its error. Detached, no gradient reaches the upstream features; attached, it does."""
    up, down = _sae(tiny_llama, "blocks.0.hook_resid_post"), _sae(tiny_llama, "blocks.2.hook_resid_post", seed=1)
    with torch.no_grad():
        down.W_enc.zero_()
        down.b_enc.fill_(-1.0)
    tokens = _tokens(tiny_llama)
    grads = {}
    for detach in (False, True):
        with spliced(tiny_llama, [up, down], SpliceOptions(detach_errors=detach)) as nodes:
            tiny_llama.model(input_ids=tokens, use_cache=False).logits[:, -1, 7].sum().backward()
            grads[detach] = nodes.features["blocks.0.hook_resid_post"].grad.clone()
            assert nodes.features["blocks.2.hook_resid_post"].abs().sum() == 0
    assert grads[False].abs().max() > 1e-4
    assert grads[True].abs().max() == 0


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_frozen_final_norm_gives_direct_logit_attribution(model, request):
    """An SAE on the last block's output: with the norms frozen the path to the logits is linear, so d logit_t /
    d f_j = (W_dec[j] / s) through the final norm's gain and W_U, divided by the frozen scale."""
    lm = request.getfixturevalue(model)
    last = lm.model.config.num_hidden_layers - 1
    hook = f"blocks.{last}.hook_resid_post"
    sae, tokens, t = _sae(lm, hook), _tokens(lm), 11
    with spliced(lm, [sae], SpliceOptions(freeze_norms=True)) as nodes:
        lm.model(input_ids=tokens, use_cache=False).logits[0, t, 42].backward()
        grad = nodes.features[hook].grad[0, t]
    resid = run_with_cache(lm.model, tokens, [parse_hook(hook, lm.model)])[hook][0, t]
    un = unembedding(lm)
    expected = un.logits(sae.W_dec / sae.cfg.norm_scale)[:, 42] / un.scale(resid)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_bad_splices_are_user_errors(tiny_llama):
    sae = _sae(tiny_llama, "blocks.1.hook_resid_post")
    with pytest.raises(UserError, match="nothing to splice"):
        with spliced(tiny_llama, []):
            pass
    with pytest.raises(UserError, match="same hook"):
        with spliced(tiny_llama, [sae, _sae(tiny_llama, "blocks.1.hook_resid_post", seed=3)]):
            pass


def test_frozen_attention_is_linear_in_its_values(tiny_llama):
    """With attention and norms frozen, layer 1's attention output at t depends on the residual at s only through
    sum_h A_h[t, s] W_O_h W_V_h diag(gain) / sigma_s (grouped-query heads read their kv head)."""
    lm, t = tiny_llama, 9
    tokens = _tokens(lm)
    saes = [_sae(lm, "blocks.1.hook_resid_pre"), _sae(lm, "blocks.1.hook_attn_out", seed=1)]
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    grads = {}
    for frozen in (True, False):
        with spliced(lm, saes, SpliceOptions(freeze_attention=frozen, freeze_norms=True)) as nodes:
            lm.model(input_ids=tokens, use_cache=False)
            (nodes.inputs["blocks.1.hook_attn_out"][0, t] @ r).backward()
            grads[frozen] = nodes.errors["blocks.1.hook_resid_pre"].grad[0]  # [T, d]: d(out_t . r) / d x_s
    H, KV = lm.model.config.num_attention_heads, lm.model.config.num_key_value_heads
    A = attention_patterns(lm.model, tokens).attn[1, 0]  # [H, T, T]
    W_O, attn = head_out_weights(lm.model, 1), lm.model.model.layers[1].self_attn  # [H, dh, d]
    W_V = attn.v_proj.weight.unflatten(0, (KV, -1))  # [KV, dh, d]
    norm = frozen_norm(lm.model.model.layers[1].input_layernorm)
    x = run_with_cache(lm.model, tokens, [parse_hook("blocks.1.hook_resid_pre", lm.model)])
    sigma = norm.sigma(x["blocks.1.hook_resid_pre"][0])  # [T]
    expected = torch.zeros_like(grads[True])
    for h in range(H):
        back = W_V[h // (H // KV)].T @ (W_O[h] @ r)  # [d]
        expected += A[h, t][:, None] * back[None] * norm.gain / sigma[:, None]
    torch.testing.assert_close(grads[True], expected, atol=1e-5, rtol=1e-4)
    assert (grads[False] - expected).abs().max() > 1e-4  # unfrozen, the pattern's own gradient adds to it
