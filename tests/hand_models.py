"""Hand-built models whose mechanism is known by construction (no training): a 2-layer attention-only Llama
with a previous-token head in layer 0 and an induction head in layer 1 among distractor heads."""

from __future__ import annotations

import math

import torch

# Residual layout (D = 78): one-hot token [0, V), one-hot previous token [V, 2V), one-hot prediction
# [2V, 3V), then a constant 1, a BOS flag and two junk dimensions that nothing reads.
V, H, DH = 24, 3, 32
TOK, PREV, OUT = 0, V, 2 * V
CONST, BOS, JUNK0, JUNK1 = 3 * V, 3 * V + 1, 3 * V + 2, 3 * V + 3
D = 78
PREV_HEAD, INDUCTION_HEAD = 2, 0  # L0H2 and L1H0; L0H0, L1H1 attend uniformly, L0H1, L1H2 attend to BOS
# rope_theta 1e16 with head_dim 32 gives rotary pair i (dims i and i + 16) the frequency 10^-i rad/position:
# pair 0 turns 1 rad and pair 1 0.1 rad per position (the positional code of the previous-token head);
# pairs 3..15 turn at most 1e-3 rad/position, so over the probes' 21 positions they are static (content).
STATIC = [*range(3, 16), *range(19, 32)]


def hand_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def hand_model() -> torch.nn.Module:
    """Attention-only (MLPs zero) 2-layer Llama whose heads do what their weights say, by construction.

    RMSNorm makes every layer-0 input component sqrt(D/2) ≈ 6.2 (token + constant), every layer-1 one ≈ 4
    (five unit components). Previous-token head: q and k read the constant only, k = R(ω) q in rotary pairs 0
    and 1, so q_t·k_s ∝ 20 cos(t-s-1) + 60 cos(0.1(t-s-1)) (after the 1/sqrt(dh) scaling): the logit peaks at
    s = t-1 and every other offset up to 60 is at least 9 lower; its OV copies the token into the previous-token
    slot. Induction head (K-composition): q reads the current token, k the previous-token slot, in static
    dims, so s matches t when token(s-1) = token(t) (logit ≈ 25 against 0); its OV copies the attended token
    into the prediction slot that lm_head reads. BOS heads: q reads the constant, k the BOS flag."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=4,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=H,
        head_dim=DH,
        rope_theta=1e16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        p.zero_()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
    E = model.model.embed_tokens.weight
    E[torch.arange(V), TOK + torch.arange(V)] = 1
    E[:, CONST] = 1
    E[0, BOS] = 1
    l0, l1 = (layer.self_attn for layer in model.model.layers)
    r0, r1 = math.sqrt(D / 2), math.sqrt(D / 5)  # a unit component after each layer's input RMSNorm
    a, b = math.sqrt(60 * math.sqrt(DH)) / r0, math.sqrt(20 * math.sqrt(DH)) / r0

    p = PREV_HEAD * DH  # layer 0, previous-token head
    for dim, w, omega in ((0, b, 1.0), (1, a, 0.1)):
        l0.q_proj.weight[p + dim, CONST] = w
        l0.k_proj.weight[p + dim, CONST] = w * math.cos(omega)
        l0.k_proj.weight[p + dim + DH // 2, CONST] = w * math.sin(omega)
    l0.v_proj.weight[p + torch.arange(V), TOK + torch.arange(V)] = 1
    l0.o_proj.weight[PREV + torch.arange(V), p + torch.arange(V)] = 1 / r0

    i = INDUCTION_HEAD * DH  # layer 1, induction head
    l1.q_proj.weight[i + torch.tensor(STATIC[:V]), TOK + torch.arange(V)] = 3.0
    l1.k_proj.weight[i + torch.tensor(STATIC[:V]), PREV + torch.arange(V)] = 3.0
    l1.v_proj.weight[i + torch.arange(V), TOK + torch.arange(V)] = 1
    l1.o_proj.weight[OUT + torch.arange(V), i + torch.arange(V)] = 2 / r1
    model.lm_head.weight[torch.arange(V), OUT + torch.arange(V)] = 2.0

    for attn, uniform, bos in ((l0, 0, 1), (l1, 1, 2)):  # distractors, writing only to junk dims
        attn.v_proj.weight[uniform * DH, CONST] = 1
        attn.o_proj.weight[JUNK1, uniform * DH] = 0.15
        attn.q_proj.weight[bos * DH + 5, CONST] = 3.0
        attn.k_proj.weight[bos * DH + 5, BOS] = 3.0
        attn.v_proj.weight[bos * DH, BOS] = 1
        attn.o_proj.weight[JUNK0, bos * DH] = 0.2
    return model
