"""Logit attribution: the direct effects add up to the model's own logits (tied, untied, LayerNorm, RMSNorm,
Gemma norm)."""

import pytest
import torch

from activations.errors import UserError
from activations.models import LoadedModel
from analysis.logits import attribute, decoder_directions, direct_effect, feature_logit_weights, top_logits, unembedding
from sae.config import SAEConfig
from sae.registry import make_sae

PROMPT = "The king of France rode a horse to the old castle"


def _sae(lm, hook="blocks.1.hook_resid_post", d_sae=40, seed=0):
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=d_sae, k=8, hook_name=hook, model_name=lm.name, norm_scale=20.0))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae


def _variant(kind, tokenizer):
    """Tiny random models the shared fixtures do not cover: untied Llama and Gemma 2 (RMSNorm with 1 + weight)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    if kind == "untied":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = Gemma2ForCausalLM(
            Gemma2Config(**common, head_dim=16, final_logit_softcapping=None, tie_word_embeddings=True)
        )
    with torch.no_grad():  # random norm weights, so the gain matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.3 if kind == "gemma" else 1.0, 0.2)
    return LoadedModel(model=model.eval().requires_grad_(False), tokenizer=tokenizer, name=f"tiny-{kind}")


@pytest.fixture(scope="module", params=["llama", "gpt2", "untied", "gemma"])
def lm(request, tiny_llama, tiny_gpt2, tokenizer):
    if request.param == "llama":
        return tiny_llama
    if request.param == "gpt2":
        return tiny_gpt2
    return _variant(request.param, tokenizer)


def test_direct_effects_add_up_to_the_logit(lm):
    sae = _sae(lm)
    for target in (" horse", " the", 42):
        result = attribute(sae, lm, PROMPT, target, position=-2, n=5)
        total = result.features + result.other + result.constant
        assert total == pytest.approx(result.logit, rel=1e-4, abs=1e-4)
        assert result.features != 0 and result.top and result.bottom
        assert [c.contribution for c in result.top] == sorted((c.contribution for c in result.top), reverse=True)
        assert all(
            c.contribution == pytest.approx(c.activation * c.effect, rel=1e-5) for c in result.top + result.bottom
        )


def test_unembedding_is_lm_head_tied_or_not(lm):
    W_U = unembedding(lm).W_U
    head = lm.model.get_output_embeddings().weight
    assert torch.equal(W_U, head.float())
    tied = head.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
    assert tied == (lm.name != "tiny-untied")


def test_direct_effect_matches_the_attribution(tiny_llama):
    sae = _sae(tiny_llama)
    result = attribute(sae, tiny_llama, PROMPT, " castle", position=5)
    best = result.top[0]
    effect = direct_effect(sae, tiny_llama, PROMPT, best.feature)
    assert effect.shape == (len(result.tokens), len(tiny_llama.tokenizer))
    assert effect[5, result.target].item() == pytest.approx(best.contribution, rel=1e-4)
    assert (effect[0] == 0).all()  # the first position is never encoded


def test_top_logits_rank_the_logit_weights(tiny_gpt2):
    sae = _sae(tiny_gpt2)
    top = top_logits(sae, tiny_gpt2, n=6, chunk=7)  # chunks that do not divide d_sae
    weights = feature_logit_weights(sae, tiny_gpt2, list(range(sae.cfg.d_sae)))
    assert top.promoted_ids.shape == (sae.cfg.d_sae, 6)
    torch.testing.assert_close(top.promoted, weights.topk(6, dim=-1).values)
    torch.testing.assert_close(top.suppressed, weights.topk(6, dim=-1, largest=False).values)
    torch.testing.assert_close(weights.gather(1, top.promoted_ids), top.promoted)
    # LayerNorm centres: a direction along all-ones changes no logit
    ones = torch.ones(1, tiny_gpt2.d_model)
    assert unembedding(tiny_gpt2).logits(ones).abs().max() < 1e-4
    torch.testing.assert_close(decoder_directions(sae, [3])[0], sae.W_dec[3] / 20.0)


def test_user_errors(tiny_llama):
    sae = _sae(tiny_llama)
    with pytest.raises(UserError, match="not one; give a single token"):
        attribute(sae, tiny_llama, PROMPT, " horse riding")
    with pytest.raises(UserError, match="position 0 is not one the SAE reads"):
        attribute(sae, tiny_llama, PROMPT, " horse", position=0)
    with pytest.raises(UserError, match="outside the vocabulary"):
        attribute(sae, tiny_llama, PROMPT, 10**7)
    with pytest.raises(UserError, match="feature 40 does not exist"):
        feature_logit_weights(sae, tiny_llama, [40])
    with pytest.raises(UserError, match="prompt is empty"):
        direct_effect(sae, tiny_llama, "", 0)
