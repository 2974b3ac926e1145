"""OV-circuit scores of every head, read from the weights (Elhage et al. 2021's copying view).

A head that attends to token s adds `norm(e_s) W_V^h W_O^h` to the residual; through the final norm's gain
(frozen scale) and the unembedding that is a row of logits. Source rows e_s are the raw embeddings for
layer 0 and the effective embeddings (W_E through block 0's MLP) for later layers. Ranks are taken among
a sample of candidate tokens (the same sample as the sources), which keeps the cost at S × S per head
instead of S × vocab: top-k of 512 sampled candidates stands in for the top 1% of the vocabulary.
Ties count against the head (a head whose logits are all equal copies nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from analysis.head_weights import (
    effective_embedding,
    head_layout,
    head_out_weights,
    head_values,
    input_norm,
    raw_embedding,
)
from analysis.logits import Unembed


def unembed_matrix(unembed: Unembed, ids: Tensor) -> Tensor:
    """[d, C] the final norm (frozen scale) and unembedding read at candidate tokens `ids` as one matrix:
    logits = direction @ M, with the norm's gain folded in and, for LayerNorm, its centring."""
    M = unembed.gain[:, None] * unembed.W_U[ids.to(unembed.W_U.device)].T  # [d, C]
    return M - M.mean(0, keepdim=True) if unembed.center else M


@torch.inference_mode()
def head_ov_logits(model: nn.Module, M: Tensor, layer: int, x: Tensor) -> Tensor:
    """[S, H, C] candidate logits each head writes per source row x [S, d] it attends to, for M [d, C]."""
    v = head_values(model, layer, input_norm(model, layer)(x)).float()  # [S, H, dh]
    W_OU = head_out_weights(model, layer).float().to(M.device) @ M  # [H, dh, C]
    return torch.einsum("shk,hkc->shc", v.to(M.device), W_OU)


def layer_sources(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """([S, d] raw, [S, d] effective) embeddings of token ids, on the model's device."""
    ids = ids.to(next(model.parameters()).device)
    return raw_embedding(model, ids), effective_embedding(model, ids)


def copying_scores(model: nn.Module, unembed: Unembed, ids: Tensor, top_k: int = 5) -> tuple[Tensor, Tensor]:
    """([L, H] copying, [L, H] suppression): the fraction of sampled tokens [S] whose own logit ranks in the
    top (bottom) `top_k` of the sampled candidates when the head attends to them."""
    lay = head_layout(model)
    M = unembed_matrix(unembed, ids)
    raw, eff = layer_sources(model, ids)
    copy, suppress = torch.zeros(lay.n_layers, lay.n_heads), torch.zeros(lay.n_layers, lay.n_heads)
    diag = torch.arange(len(ids))
    for layer in range(lay.n_layers):
        logits = head_ov_logits(model, M, layer, raw if layer == 0 else eff)  # [S, H, S]
        own = logits[diag, :, diag]  # [S, H]
        higher = (logits >= own[..., None]).sum(-1) - 1  # other candidates at least as high, [S, H]
        lower = (logits <= own[..., None]).sum(-1) - 1
        copy[layer] = (higher < top_k).float().mean(0).cpu()
        suppress[layer] = (lower < top_k).float().mean(0).cpu()
    return copy, suppress


def successor_scores(model: nn.Module, unembed: Unembed, families: dict[str, list[int]]) -> Tensor:
    """[L, H] the fraction of ordinal elements n (all but each family's last) whose successor n+1 gets a higher
    logit than every other member of the family (n itself included) when the head attends to n."""
    lay = head_layout(model)
    score = torch.zeros(lay.n_layers, lay.n_heads)
    if not families:
        return score
    ids = torch.tensor([i for fam in families.values() for i in fam])
    M = unembed_matrix(unembed, ids)
    raw, eff = layer_sources(model, ids)
    blocks, start = [], 0
    for fam in families.values():
        blocks.append((start, len(fam)))
        start += len(fam)
    n_rows = sum(size - 1 for _, size in blocks)
    for layer in range(lay.n_layers):
        logits = head_ov_logits(model, M, layer, raw if layer == 0 else eff)  # [N, H, N]
        wins = torch.zeros(lay.n_heads)
        for first, size in blocks:
            block = logits[first : first + size - 1, :, first : first + size]  # [size-1, H, size]
            k = torch.arange(size - 1)
            succ = block[k, :, k + 1]  # [size-1, H]
            others = block.clone()
            others[k, :, k + 1] = -torch.inf
            wins += (succ > others.amax(-1)).float().sum(0).cpu()
        score[layer] = wins / n_rows
    return score
