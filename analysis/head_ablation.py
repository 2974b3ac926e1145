"""Causal check of a head catalogue: ablate a type's top heads and compare the damage with random heads.

A head is ablated by a forward pre-hook on its layer's attention output projection (`o_proj`, GPT-2
`attn.c_proj`) that overwrites the head's slice of the projection's input [B, T, H·dh]: with zeros, or
with its mean over the probe batch's tokens (position 0 keeps its own mean; mean ablation keeps the
head's average contribution, so only what it computes from its input is removed). No model copy is made. Each type's
behavioural signature is a mean next-token NLL on its own probe; damage = ablated NLL − clean NLL:

    induction, previous_token, duplicate_token   NLL of the second half of repeated random tokens
    attention_sink                               NLL of ordinary English text
    successor                                    NLL of the successor in ordinal lists (−log-prob)

The baseline ablates, per draw, one random other head from each top head's layer.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from activations.models import LoadedModel
from analysis.head_probes import ordinal_prompts, prefix_ids, repeated_tokens, text_prompt, token_pool
from analysis.head_weights import head_layout, out_proj
from analysis.heads import HeadCatalogue

ABLATION_MODES = ("mean", "zero")
SIGNATURES = {
    "induction": "repeat",
    "previous_token": "repeat",
    "duplicate_token": "repeat",
    "attention_sink": "text",
    "successor": "ordinal",
}
METRICS = {
    "repeat": "NLL on the second half of repeated random tokens",
    "text": "NLL on ordinary English text",
    "ordinal": "NLL of the successor in ordinal lists",
}


@contextmanager
def heads_ablated(
    model: nn.Module, heads: list[tuple[int, int]], means: dict[int, Tensor] | None = None
) -> Iterator[None]:
    """Inside the block, each (layer, head) outputs zero, or with `means` ({layer: [T, H·dh]}) its mean."""
    dh = head_layout(model).head_dim
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def hook_for(layer: int, chosen: list[int]):
        def pre_hook(mod, args):
            x = args[0].clone()  # [B, T, H·dh]
            for h in chosen:
                part = slice(h * dh, (h + 1) * dh)
                x[..., part] = 0 if means is None else means[layer][: x.shape[1], part].to(x.dtype)
            return (x, *args[1:])

        return pre_hook

    handles = [out_proj(model, layer).register_forward_pre_hook(hook_for(layer, hs)) for layer, hs in by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def token_means(x: Tensor) -> Tensor:
    """[T, H·dh] the mean of head outputs x [B, T, H·dh] over the batch's tokens: position 0 (where the attention
    sink forms, unlike any other position) its own mean, every later position the mean over positions >= 1."""
    x = x.float()
    later = x[:, 1:].mean((0, 1)) if x.shape[1] > 1 else x[:, 0].mean(0)
    return torch.cat([x[:, :1].mean(0), later.expand(x.shape[1] - 1, -1)])


@torch.inference_mode()
def nll(model: nn.Module, tokens: Tensor, mask: Tensor, capture: dict[int, Tensor] | None = None) -> float:
    """Mean NLL of tokens[:, p + 1] over positions p where mask [B, T] is True; with `capture`, also store each
    layer's mean head outputs [T, H·dh] (token_means) into it, for mean ablation."""
    device = next(model.parameters()).device
    handles = []
    if capture is not None:
        for layer in range(head_layout(model).n_layers):
            grab = lambda mod, args, layer=layer: capture.__setitem__(layer, token_means(args[0]))  # noqa: E731
            handles.append(out_proj(model, layer).register_forward_pre_hook(grab))
    try:
        hidden = model.base_model(input_ids=tokens.to(device)).last_hidden_state  # [B, T, d], final norm applied
    finally:
        for h in handles:
            h.remove()
    m = mask[:, :-1].to(device)
    logits = model.get_output_embeddings()(hidden[:, :-1][m]).float()  # [N, vocab]
    targets = tokens[:, 1:].to(device)[m]
    return float(torch.nn.functional.cross_entropy(logits, targets))


@dataclass
class AblationResult:
    """One type's causal check: damage of its top heads against random heads from the same layers."""

    kind: str
    metric: str
    mode: str
    heads: list[tuple[int, int]]
    tagged: bool  # the heads are tagged ones (else the top scorers, none being tagged)
    clean: float
    damage: float  # ablated top heads − clean
    random_heads: list[list[tuple[int, int]]]  # per draw, the heads ablated
    random_damage: list[float]  # per draw
    random_mean: float
    random_std: float
    random_min: float
    random_max: float

    def to_dict(self) -> dict:
        return asdict(self)


def signature_probes(lm: LoadedModel, rows: int, half: int, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """(tokens [B, T], mask [B, T]) of each behavioural signature."""
    gen = torch.Generator().manual_seed(seed + 1)
    probe = repeated_tokens(
        token_pool(lm.tokenizer, lm.model.config.vocab_size), prefix_ids(lm.tokenizer), rows, half, gen
    )
    repeat_mask = torch.zeros_like(probe.tokens, dtype=torch.bool)
    repeat_mask[:, probe.start + probe.half : -1] = True  # predicts second-half x_1 … x_{n-1}
    text = text_prompt(lm.tokenizer)
    probes = {"repeat": (probe.tokens, repeat_mask), "text": (text, torch.ones_like(text, dtype=torch.bool))}
    ordinal, mask = ordinal_prompts(lm.tokenizer, gen, per_family=2)
    if mask.any():
        probes["ordinal"] = (ordinal, mask)
    return probes


def random_heads(top: list[tuple[int, int]], n_heads: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """For each top head, a random head of the same layer that is not among the top heads."""
    out = []
    for layer, _ in top:
        others = [h for h in range(n_heads) if (layer, h) not in top]
        if others:
            out.append((layer, others[int(torch.randint(len(others), (1,), generator=gen))]))
    return out


def ablation_check(
    lm: LoadedModel,
    catalogue: HeadCatalogue,
    n: int = 3,
    draws: int = 10,
    mode: str = "mean",
    seed: int = 0,
    rows: int = 4,
    half: int = 16,
    kinds: tuple[str, ...] = tuple(SIGNATURES),
) -> dict[str, AblationResult]:
    """For each type with a signature: ablate its tagged heads (at most n; the top n when none is tagged)
    and `draws` random same-layer sets of as many heads; report the damage of each."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode must be one of {ABLATION_MODES}, got {mode!r}")
    probes = signature_probes(lm, rows, half, seed)
    clean: dict[str, float] = {}
    means: dict[str, dict[int, Tensor]] = {}
    for name, (tokens, mask) in probes.items():
        means[name] = {}
        clean[name] = nll(lm.model, tokens, mask, capture=means[name])
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for kind in kinds:
        probe = SIGNATURES[kind]
        if probe not in probes:
            continue
        tokens, mask = probes[probe]
        tagged = catalogue.tagged(kind)[:n]
        top = tagged or [(a, b) for a, b, _ in catalogue.top(kind, n)]

        def damage(heads: list[tuple[int, int]]) -> float:
            with heads_ablated(lm.model, heads, means[probe] if mode == "mean" else None):
                return nll(lm.model, tokens, mask) - clean[probe]

        drawn = [random_heads(top, catalogue.n_heads, gen) for _ in range(draws)]
        randoms = [damage(heads) for heads in drawn]
        results[kind] = AblationResult(
            kind=kind,
            metric=METRICS[probe],
            mode=mode,
            heads=top,
            tagged=bool(tagged),
            clean=clean[probe],
            damage=damage(top),
            random_heads=drawn,
            random_damage=randoms,
            random_mean=statistics.fmean(randoms),
            random_std=statistics.pstdev(randoms),
            random_min=min(randoms),
            random_max=max(randoms),
        )
    return results


def ablation_table(results: dict[str, AblationResult]) -> str:
    """One line per type: the top heads' damage against the random heads' mean ± std [min, max]."""
    lines = [f"{'type':<16} {'heads':<24} {'clean':>7} {'top':>8} {'random mean ± std [min, max]':>34}  metric"]
    for r in results.values():
        heads = " ".join(f"L{a}H{b}" for a, b in r.heads) + ("" if r.tagged else " (untagged)")
        spread = f"{r.random_mean:+.3f} ± {r.random_std:.3f} [{r.random_min:+.3f}, {r.random_max:+.3f}]"
        lines.append(f"{r.kind:<16} {heads:<24} {r.clean:>7.3f} {r.damage:>+8.3f} {spread:>34}  {r.metric}")
    return "\n".join(lines)
