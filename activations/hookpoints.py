"""TransformerLens-style hook points on Hugging Face models: names, capture and intervention.

One `ArchTable` per architecture says where the blocks, attention, MLP, final norm and unembedding
live; everything else is generic. Activations are read with forward hooks on the blocks (never from
`output_hidden_states`, whose last entry has the final norm applied).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from activations.errors import UserError

HOOK_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "hook_mlp_in")
# Kinds read from a module's input (forward pre-hook) rather than its output.
_INPUT_KINDS = ("hook_resid_pre", "hook_mlp_in")


@dataclass(frozen=True)
class ArchTable:
    """Where one architecture keeps its parts, as attribute paths from the *ForCausalLM module."""

    layers: str  # the ModuleList of blocks
    attn: str  # submodule of a block whose output (or output[0]) is added to the residual
    mlp: str  # likewise for the MLP
    final_norm: str  # norm applied before the unembedding
    unembed: str  # the output projection to the vocabulary
    mlp_in: str = "mlp"  # submodule of a block whose input is the MLP's input (after its norm): hook_mlp_in


_LLAMA = ArchTable("model.layers", "self_attn", "mlp", "model.norm", "lm_head")
# Gemma 2/3 normalise each sublayer's output before adding it: the added value is the post-norm's.
_GEMMA2 = ArchTable("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "model.norm", "lm_head")

ARCH_TABLES: dict[str, ArchTable] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "olmo2": ArchTable(
        "model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "model.norm", "lm_head"
    ),
    "gpt2": ArchTable("transformer.h", "attn", "mlp", "transformer.ln_f", "lm_head"),
    "gpt_neox": ArchTable("gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm", "embed_out"),
}


def arch_table(model: nn.Module) -> ArchTable:
    """The table for `model`'s architecture, or a UserError naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCH_TABLES:
        raise UserError(
            f"model architecture '{model_type}' has no hook table; supported: {', '.join(sorted(ARCH_TABLES))}. "
            "Use one of those models, or add an ArchTable for it in activations/hookpoints.py."
        )
    return ARCH_TABLES[model_type]


def n_layers(model: nn.Module) -> int:
    return len(model.get_submodule(arch_table(model).layers))


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook name such as `blocks.6.hook_resid_post`."""

    name: str
    layer: int
    kind: str


def valid_hook_names(model: nn.Module) -> list[str]:
    return [f"blocks.{layer}.{kind}" for layer in range(n_layers(model)) for kind in HOOK_KINDS]


def parse_hook(name: str, model: nn.Module) -> HookPoint:
    """Parse and check a hook name against `model`; a bad one lists what is valid."""
    n = n_layers(model)
    match = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", name.strip())
    if match and match.group(2) in HOOK_KINDS and int(match.group(1)) < n:
        return HookPoint(name.strip(), int(match.group(1)), match.group(2))
    raise UserError(
        f"unknown hook '{name}'. Valid hooks for this model ({n} layers): "
        f"blocks.{{0..{n - 1}}}.{{{','.join(HOOK_KINDS)}}}, e.g. blocks.{n // 2}.hook_resid_post"
    )


def _module_for(model: nn.Module, hp: HookPoint) -> nn.Module:
    table = arch_table(model)
    block = model.get_submodule(table.layers)[hp.layer]
    if hp.kind in ("hook_resid_pre", "hook_resid_post"):
        return block
    if hp.kind == "hook_mlp_in":
        return block.get_submodule(table.mlp_in)
    return block.get_submodule(table.attn if hp.kind == "hook_attn_out" else table.mlp)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured, to skip the rest of the model."""


def _register(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register `fn(activation) -> replacement or None` at hook point `hp`; returns the handle."""
    module = _module_for(model, hp)
    if hp.kind in _INPUT_KINDS:

        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            new = fn(kwargs[key])
            return None if new is None else (args, {**kwargs, key: new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod, args, output):
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)

    return module.register_forward_hook(hook)


@contextmanager
def hooks_installed(
    model: nn.Module, fns: dict[HookPoint, Callable[[torch.Tensor], torch.Tensor | None]]
) -> Iterator[None]:
    """Install several hook functions for the duration of a `with` block."""
    handles = [_register(model, hp, fn) for hp, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_with_cache(
    model: nn.Module,
    input_ids: torch.Tensor,
    hooks: list[HookPoint],
    attention_mask: torch.Tensor | None = None,
    stop_early: bool = True,
) -> dict[str, torch.Tensor]:
    """Run `model` on a batch and return the activation at each hook point, `[B, T, d]`.

    With `stop_early` the forward stops right after the deepest requested hook fires, so later
    layers, the final norm and the unembedding are never computed.
    """
    cache: dict[str, torch.Tensor] = {}

    def capture(hp: HookPoint):
        def fn(act: torch.Tensor):
            cache[hp.name] = act.detach()
            if stop_early and len(cache) == len(hooks):
                raise _StopForward
            return None

        return fn

    with hooks_installed(model, {hp: capture(hp) for hp in hooks}):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return cache


@contextmanager
def patched(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the activation at `hp` with `fn(activation)` for every forward inside the block."""
    with hooks_installed(model, {hp: fn}):
        yield
