"""Where each attention head's weights live, for the architectures whose heads saelab can read one by one.

Llama-family blocks (Llama, Mistral, Qwen2/3, Gemma) hold `self_attn.{q,k,v,o}_proj` as nn.Linear
(`o_proj.weight` is [d, H·dh]; with grouped-query attention query head h reads value head
h // (H / KV)); GPT-2 holds `attn.c_attn` ([d, 3d], q|k|v) and `attn.c_proj` ([H·dh, d]) as Conv1D,
whose weight is the transpose of a Linear's. A head's output is its slice of the out projection's input.
Gemma 2/3 and OLMo2 normalise the attention output before adding it, so per-head OV maps are not linear
there; they are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from activations.errors import UserError
from activations.hookpoints import arch_table

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma")
SUPPORTED = (*_LLAMA_LIKE, "gpt2")


@dataclass(frozen=True)
class HeadLayout:
    """The head geometry of a model."""

    kind: str  # "llama" (any Llama-like block) or "gpt2"
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads under grouped-query attention
    head_dim: int
    d_model: int


def head_layout(model: nn.Module) -> HeadLayout:
    """The layout of `model`'s heads, or a UserError naming the supported architectures."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise UserError(
            f"per-head analysis does not support model architecture '{cfg.model_type}'; "
            f"supported: {', '.join(SUPPORTED)}."
        )
    if cfg.model_type == "gpt2":
        return HeadLayout("gpt2", cfg.n_layer, cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd)
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    return HeadLayout("llama", cfg.num_hidden_layers, n_heads, n_kv, head_dim, cfg.hidden_size)


def block(model: nn.Module, layer: int) -> nn.Module:
    return model.get_submodule(arch_table(model).layers)[layer]


def attention(model: nn.Module, layer: int) -> nn.Module:
    """The attention module of a block (its input is the normalised residual)."""
    return block(model, layer).get_submodule("attn" if head_layout(model).kind == "gpt2" else "self_attn")


def out_proj(model: nn.Module, layer: int) -> nn.Module:
    """The attention output projection; its input [B, T, H·dh] is the heads' outputs side by side."""
    return attention(model, layer).get_submodule("c_proj" if head_layout(model).kind == "gpt2" else "o_proj")


def input_norm(model: nn.Module, layer: int) -> nn.Module:
    """The norm the attention reads the residual through."""
    return block(model, layer).get_submodule("ln_1" if head_layout(model).kind == "gpt2" else "input_layernorm")


def head_values(model: nn.Module, layer: int, x: Tensor) -> Tensor:
    """[..., H, dh] the value vector each query head reads from normalised inputs x [..., d] (GQA: repeated)."""
    lay = head_layout(model)
    attn = attention(model, layer)
    if lay.kind == "gpt2":
        v = attn.c_attn(x)[..., 2 * lay.d_model :]
        return v.unflatten(-1, (lay.n_heads, lay.head_dim))
    v = attn.v_proj(x).unflatten(-1, (lay.n_kv_heads, lay.head_dim))
    return v.repeat_interleave(lay.n_heads // lay.n_kv_heads, dim=-2)


def head_out_weights(model: nn.Module, layer: int) -> Tensor:
    """[H, dh, d] W_O of each head: what one unit of its output adds to the residual (bias left out)."""
    lay = head_layout(model)
    w = out_proj(model, layer).weight.detach()
    if lay.kind == "gpt2":  # Conv1D: [H·dh, d]
        return w.unflatten(0, (lay.n_heads, lay.head_dim))
    return w.T.unflatten(0, (lay.n_heads, lay.head_dim))  # Linear: [d, H·dh]


@torch.inference_mode()
def effective_embedding(model: nn.Module, tokens: Tensor) -> Tensor:
    """[S, d] token embeddings as later layers see them: W_E through block 0's MLP with its attention skipped
    (Gould et al. 2023, McDougall et al. 2023), since block 0's MLP acts largely as an extended embedding."""
    x = raw_embedding(model, tokens)
    first = block(model, 0)
    norm = first.ln_2 if head_layout(model).kind == "gpt2" else first.post_attention_layernorm
    return x + first.mlp(norm(x))


@torch.inference_mode()
def raw_embedding(model: nn.Module, tokens: Tensor) -> Tensor:
    """[S, d] the token embeddings block 0 reads."""
    x = model.get_input_embeddings()(tokens)
    if model.config.model_type.startswith("gemma"):  # Gemma scales its embeddings by sqrt(d)
        x = x * torch.tensor(head_layout(model).d_model ** 0.5, dtype=x.dtype)
    return x
