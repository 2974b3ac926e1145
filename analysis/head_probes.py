"""Probe inputs for attention heads, and the attention patterns a model puts on them.

Repeated random tokens [prefix, x_0 … x_{n-1}, x_0 … x_{n-1}] (Olsson et al. 2022) carry every
pattern probe: the first half is random text (previous-token, sink), and a second-half x_j has its
first occurrence at x_j and the token after it at x_{j+1} (duplicate-token, induction). Ordinal lists
(digits, weekdays, months, number words; analysis/detectors/probe_texts.yaml) probe successor heads.
Patterns come from the HF forward with `output_attentions=True` under the eager attention kernel (the
fused kernels return no weights); the model's own implementation is restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from activations.models import eager_attention
from activations.tokens import model_wants_bos, special_token_mask
from analysis.detectors.probes import probe_texts
from analysis.head_weights import attention, head_layout


def prefix_ids(tokenizer) -> list[int]:
    """What the tokenizer puts before any text: [BOS] where it adds one (Llama-2, Gemma), else nothing."""
    return [tokenizer.bos_token_id] if model_wants_bos(tokenizer) else []


def token_pool(tokenizer, vocab_size: int) -> Tensor:
    """Ordinary token ids (no special tokens, none past the model's vocabulary) to draw random tokens from."""
    ids = torch.arange(min(len(tokenizer), vocab_size))
    return ids[~special_token_mask(ids, tokenizer)]


@dataclass
class RepeatProbe:
    """[B, P + 2n] token ids: the prefix (P tokens), n distinct random tokens, then the same n again."""

    tokens: Tensor
    start: int  # P: the position of x_0
    half: int  # n


def repeated_tokens(pool: Tensor, prefix: list[int], rows: int, half: int, gen: torch.Generator) -> RepeatProbe:
    """Repeated random sequences, the tokens of a row distinct so the only repeats are the planted ones."""
    if half > len(pool):
        half = len(pool)
    first = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:half]] for _ in range(rows)])
    head = torch.tensor(prefix, dtype=torch.long).expand(rows, len(prefix))
    return RepeatProbe(torch.cat([head, first, first], dim=1), len(prefix), half)


def ordinal_families(tokenizer) -> dict[str, list[int]]:
    """Each ordinal family of the probe material whose elements are distinct single ordinary tokens."""
    special = set(tokenizer.all_special_ids) | {tokenizer.unk_token_id}
    families = {}
    for name, fam in probe_texts()["ordinal"].items():
        ids = [tokenizer(e, add_special_tokens=False)["input_ids"] for e in fam["elements"]]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids):
            if not special & {i[0] for i in ids}:
                families[name] = [i[0] for i in ids]
    return families


def ordinal_prompts(tokenizer, gen: torch.Generator, per_family: int = 3, run: int = 5) -> tuple[Tensor, Tensor]:
    """Runs of consecutive elements ("Tuesday, Wednesday, Thursday, ...") from random starts: tokens [B, T] and
    mask [B, T], True at each position whose next token is an element with its predecessor earlier in the row."""
    rows: list[tuple[list[int], list[bool]]] = []
    for name, ids in ordinal_families(tokenizer).items():
        sep = tokenizer(probe_texts()["ordinal"][name]["separator"], add_special_tokens=False)["input_ids"]
        n = min(run, len(ids))
        for _ in range(per_family):
            first = int(torch.randint(0, len(ids) - n + 1, (1,), generator=gen))
            toks, targets = list(prefix_ids(tokenizer)), []
            for k in range(first, first + n):
                targets += [len(toks)] if k > first else []
                toks += [ids[k], *sep]
            toks = toks[: len(toks) - len(sep)]  # no separator after the last element
            rows.append((toks, [p + 1 in targets for p in range(len(toks))]))
    if not rows:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool)
    width = max(len(t) for t, _ in rows)
    pad = rows[0][0][-1]
    tokens = torch.tensor([t + [pad] * (width - len(t)) for t, _ in rows])
    mask = torch.tensor([m + [False] * (width - len(m)) for _, m in rows])
    return tokens, mask


def text_prompt(tokenizer, max_tokens: int = 256) -> Tensor:
    """[1, T] ordinary English text (the probe material's English sentences, joined)."""
    text = " ".join(probe_texts()["scripts"]["latin"]["english"])
    ids = prefix_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:max_tokens]])


@dataclass
class Patterns:
    """One forward's attention weights [L, B, H, T, T] (float32) and each layer's attention input [L, B, T, d]."""

    attn: Tensor
    inputs: Tensor


@torch.inference_mode()
def attention_patterns(model: nn.Module, tokens: Tensor) -> Patterns:
    """The attention pattern of every head on `tokens` [B, T], and what each attention module read."""
    inputs: list[Tensor] = []

    def grab(mod, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach().float())

    lay = head_layout(model)
    handles = [attention(model, i).register_forward_pre_hook(grab, with_kwargs=True) for i in range(lay.n_layers)]
    try:
        with eager_attention(model):
            device = next(model.parameters()).device
            out = model(input_ids=tokens.to(device), use_cache=False, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return Patterns(torch.stack([a.float() for a in out.attentions]), torch.stack(inputs))
