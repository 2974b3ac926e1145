"""Probe inputs for MLP neurons, and what forwards measure of them: position moments and entropy effects.

A neuron is one input coordinate of a block's MLP output projection (`mlp.down_proj`; GPT-2 `mlp.c_proj`):
GELU(fc(x)) for GPT-2, act(gate(x)) * up(x) for gated Llama-family MLPs. A forward pre-hook on that projection
reads every neuron of every layer in one forward (position moments, streamed into per-bin sums so memory is
[layers, bins, d_mlp] whatever the probe size), or adds to one coordinate (the causal entropy check). Inputs:
random ordinary tokens after the tokenizer's own prefix (analysis.head_probes), and contexts packed from a text
source (activations.sources / activations.tokens), whose unigram counts also give the frequency vector.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from activations.errors import UserError
from activations.sources import open_text_source
from activations.tokens import pack_contexts
from analysis.component_capture import blocks, family
from analysis.head_probes import prefix_ids, token_pool
from analysis.head_weights import SUPPORTED

_DOWN = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj"}
COUNT_BATCH_DOCS = 64  # documents per tokenizer call when counting unigrams


def neuron_family(model: nn.Module) -> str:
    """'llama' (gated or not) or 'gpt2', or a UserError naming the architectures whose neurons saelab reads."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise UserError(
            f"per-neuron analysis does not support model architecture '{model_type}'; supported: "
            f"{', '.join(SUPPORTED)} (their MLP outputs enter the residual stream un-normalised)."
        )
    return family(model)


def down_proj(model: nn.Module, layer: int) -> nn.Module:
    """The MLP output projection of `layer`; its input [B, T, d_mlp] is the neuron activations."""
    return blocks(model)[layer].get_submodule(_DOWN[neuron_family(model)])


def mlp_size(model: nn.Module) -> tuple[int, int]:
    """(layers, neurons per layer)."""
    w = down_proj(model, 0).weight
    return len(blocks(model)), int(w.shape[0] if neuron_family(model) == "gpt2" else w.shape[1])


# ---- probe inputs ----------------------------------------------------------------------------------------


def random_rows(tokenizer, vocab_size: int, rows: int, context: int, gen: torch.Generator) -> Tensor:
    """[rows, context] the tokenizer's prefix (BOS where it adds one), then ordinary tokens drawn uniformly."""
    prefix = prefix_ids(tokenizer)
    pool = token_pool(tokenizer, vocab_size)
    body = pool[torch.randint(len(pool), (rows, context - len(prefix)), generator=gen)]
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(rows, len(prefix)), body], dim=1)


def text_rows(spec: str, split: str, tokenizer, rows: int, context: int, stride: int = 4) -> Tensor:
    """[rows, context] contexts packed from a text source as the model's tokenizer makes them, every `stride`-th
    one (so they span more documents); fewer rows when the text holds fewer."""
    kept, last = [], None
    for i, ctx in enumerate(pack_contexts(open_text_source(spec, split), tokenizer, context)):
        last = ctx.tokens
        if i % stride == 0:
            kept.append(ctx.tokens)
            if len(kept) == rows:
                break
    return torch.stack(kept or [last])


def unigram_counts(spec: str, split: str, tokenizer, vocab_size: int) -> Tensor:
    """[vocab] how often each token id occurs when the text source is tokenised (no special tokens added)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            t = torch.tensor(ids, dtype=torch.long)
            counts.add_(torch.bincount(t[t < vocab_size], minlength=vocab_size).double())
        batch.clear()

    for doc in open_text_source(spec, split):
        batch.append(doc.text)
        if len(batch) == COUNT_BATCH_DOCS:
            flush()
    if batch:
        flush()
    return counts


# ---- position moments --------------------------------------------------------------------------------------


def position_bins(context: int, start: int, bins: int) -> Tensor:
    """[context] the bin of each position: log-spaced over positions start .. context-1 (single early positions,
    wide late ones, so each bin holds enough tokens); -1 for the skipped positions < start."""
    span = context - start
    if span < 2:
        raise UserError(f"a context of {context} positions leaves fewer than 2 after skipping {start}; use more.")
    inner = torch.logspace(0, math.log10(span + 1), bins + 1, dtype=torch.float64)[:-1].floor().long()
    edges = torch.cat([inner, torch.tensor([span + 1])]).unique()  # bin k holds r in [edges[k], edges[k + 1])
    r = torch.arange(1, span + 1)  # position start + r - 1
    ids = torch.searchsorted(edges, r, right=True) - 1
    return torch.cat([torch.full((start,), -1), ids])


@dataclass
class PositionMoments:
    """Per layer, per position bin: token count [K], activation sums [L, K, I] and sums of squares (float64)."""

    count: Tensor
    sum: Tensor
    sq: Tensor
    first: Tensor  # [K] the first position of each bin

    def eta_squared(self) -> Tensor:
        """[L, I] the fraction of each neuron's activation variance that its position bin explains (0 when the
        neuron does not vary)."""
        n, total = self.count[:, None], self.count.sum()
        mean = self.sum.sum(1, keepdim=True) / total  # [L, 1, I]
        between = (self.sum.pow(2) / n.clamp_min(1)).sum(1) - total * mean[:, 0].pow(2)
        spread = self.sq.sum(1) - total * mean[:, 0].pow(2)  # total sum of squares about the mean
        varies = spread > 1e-9 * self.sq.sum(1)
        return torch.where(varies, between / spread.clamp_min(1e-30), 0).clamp(0, 1).float()

    def bin_means(self) -> Tensor:
        """[L, K, I] mean activation per bin."""
        return (self.sum / self.count[:, None].clamp_min(1)).float()

    def std(self) -> Tensor:
        """[L, I] each neuron's activation standard deviation over the probe's counted tokens."""
        total = self.count.sum()
        var = self.sq.sum(1) / total - (self.sum.sum(1) / total).pow(2)
        return var.clamp_min(0).sqrt().float()


@torch.inference_mode()
def position_moments(model: nn.Module, tokens: Tensor, bins: Tensor, batch_rows: int = 4) -> PositionMoments:
    """Stream the neuron activations of every layer on `tokens` [B, T] into per-bin moments (bins [T] from
    position_bins; positions in bin -1 are left out)."""
    n_layers, d_mlp = mlp_size(model)
    K = int(bins.max()) + 1
    device = next(model.parameters()).device
    S1 = torch.zeros(n_layers, K + 1, d_mlp, dtype=torch.float64, device=device)  # slot K: the left-out positions
    S2 = torch.zeros_like(S1)
    where = torch.where(bins < 0, K, bins).to(device)

    def hook_for(layer: int):
        def pre_hook(mod, args):
            x = args[0].detach().double()  # [B, T, I]
            S1[layer].index_add_(0, where, x.sum(0))
            S2[layer].index_add_(0, where, x.pow(2).sum(0))

        return pre_hook

    handles = [down_proj(model, layer).register_forward_pre_hook(hook_for(layer)) for layer in range(n_layers)]
    try:
        for start in range(0, len(tokens), batch_rows):
            model.base_model(input_ids=tokens[start : start + batch_rows].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    count = torch.bincount(bins[bins >= 0], minlength=K).double() * len(tokens)
    first = torch.tensor([int((bins == k).nonzero()[0]) for k in range(K)])
    return PositionMoments(count, S1[:, :K].cpu(), S2[:, :K].cpu(), first)


# ---- the causal entropy check --------------------------------------------------------------------------


@contextmanager
def neuron_added(model: nn.Module, layer: int, neuron: int, delta: float):
    """Inside the block, `neuron` of `layer` carries `delta` more than the model computes, at every position."""

    def pre_hook(mod, args):
        x = args[0].clone()
        x[..., neuron] += delta
        return (x, *args[1:])

    handle = down_proj(model, layer).register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def next_token_entropy(model: nn.Module, tokens: Tensor) -> Tensor:
    """[B, T] entropy (nats) of the model's next-token distribution at every position."""
    logits = model(input_ids=tokens.to(next(model.parameters()).device), use_cache=False).logits.float()
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).cpu()


def entropy_effects(model: nn.Module, tokens: Tensor, neurons: list[tuple[int, int, float]], start: int) -> Tensor:
    """[n] mean change of next-token entropy (nats) over positions >= start of `tokens` [B, T] when each
    (layer, neuron, delta) in turn carries delta more activation."""
    clean = next_token_entropy(model, tokens)[:, start:]
    out = []
    for layer, neuron, delta in neurons:
        with neuron_added(model, layer, neuron, delta):
            out.append(float((next_token_entropy(model, tokens)[:, start:] - clean).mean()))
    return torch.tensor(out)
