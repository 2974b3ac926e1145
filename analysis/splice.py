"""Dictionaries spliced into the model: each SAE (or transcoder) replaces the activation at its hook by its
reconstruction plus an error term, so the forward pass is unchanged while feature activations and errors become
differentiable nodes (the replacement model of Marks et al. 2024, "Sparse Feature Circuits", and Ameisen et al.
2025, "Circuit Tracing").

At a plain SAE's hook x is replaced by  x_hat(f) + e,  f = encode(x · s), x_hat = decode(f) / s, e = x - x_hat
(s: the SAE's norm_scale), e taken through its own copy of the encoding, so a feature node reaches downstream only
through x_hat, and the upstream model reaches downstream through f and e with the clean model's gradient (the
identity: nothing is counted twice). A transcoder reads its input hook and replaces its output
hook the same way (its reconstruction divided by norm_scale_out). Options:
- freeze_attention: every attention layer's pattern is held at its value in this forward (its output is rebuilt
  from the pattern, detached, and the values, which keep their gradient), so attention is linear in its values;
- freeze_norms: every normalisation divides by its scale detached (LayerNorm centres first), so norms are linear;
- detach_errors: e is a leaf (its gradient is still read) and no gradient flows through it upstream.
Llama-family and GPT-2 blocks (analysis.component_capture.family); attention runs eager while spliced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from activations.errors import UserError
from activations.hookpoints import HookPoint, hooks_installed, parse_hook
from activations.models import LoadedModel, eager_attention
from analysis.component_capture import blocks, family, frozen_norm
from analysis.head_weights import attention, head_values, out_proj
from sae.base import SAE


@dataclass(frozen=True)
class SpliceOptions:
    """Which parts of the model are linearised while spliced."""

    freeze_attention: bool = False
    freeze_norms: bool = False
    detach_errors: bool = False


@dataclass
class Nodes:
    """What one spliced forward recorded, per SAE (keyed by the hook it writes): feature activations [B, T, d_sae]
    and error terms [B, T, d], both with their gradients retained after a backward pass."""

    features: dict[str, Tensor] = field(default_factory=dict)
    errors: dict[str, Tensor] = field(default_factory=dict)
    inputs: dict[str, Tensor] = field(default_factory=dict)  # the activation each SAE read
    heads: dict[int, HeadFlow] = field(default_factory=dict)  # per layer, with frozen attention only


@dataclass
class HeadFlow:
    """One frozen attention layer of the latest forward: the pattern [B, H, T, T] and values [B, T, H, dh]
    (detached) and the heads' outputs z [B, T, H, dh] before the output projection, a node whose gradient is kept.
    Head h moves  pattern[b, h, j, i] * values[b, i, h] · dz[b, j, h]  of a target's gradient from i to j."""

    pattern: Tensor
    values: Tensor
    z: Tensor


def _hooks(sae: SAE, model: nn.Module) -> tuple[HookPoint, HookPoint]:
    """(the hook the SAE reads, the hook it writes): the same for an SAE, in and out for a transcoder."""
    read = parse_hook(sae.cfg.hook_name, model)
    out = getattr(sae.cfg, "hook_name_out", None)
    return read, (parse_hook(out, model) if out else read)


def _splice_fns(
    saes: list[SAE],
    model: nn.Module,
    nodes: Nodes,
    opts: SpliceOptions,
    edits: dict[str, Callable[[Tensor], Tensor]],
    ablate_errors: bool,
) -> dict[HookPoint, object]:
    """One function per hook point: encode the clean activation for every SAE reading there, then replace it for
    the SAE writing there (a plain SAE does both at its hook; a transcoder reads one hook and writes another)."""
    readers: dict[HookPoint, list[SAE]] = {}
    writer: dict[HookPoint, SAE] = {}
    for sae in saes:
        read, write = _hooks(sae, model)
        readers.setdefault(read, []).append(sae)
        writer[write] = sae
    key = {id(sae): _hooks(sae, model)[1].name for sae in saes}
    scale = {  # what the reconstruction is divided by: a transcoder's output scale, else the SAE's own
        id(sae): sae.cfg.norm_scale_out if read != write else sae.cfg.norm_scale
        for sae in saes
        for read, write in [_hooks(sae, model)]
    }

    raw: dict[str, Tensor] = {}  # each dictionary's encoding, the copy its error term is taken through

    def at(hp: HookPoint):
        def fn(act: Tensor) -> Tensor | None:
            for sae in readers.get(hp, []):
                code = sae.encode(act.to(sae.dtype) * sae.cfg.norm_scale)
                raw[key[id(sae)]] = code
                nodes.features[key[id(sae)]] = _node(code.clone() if code.requires_grad else code)
                nodes.inputs[key[id(sae)]] = act
            sae = writer.get(hp)
            if sae is None:
                return None
            x_hat = (sae.decode(nodes.features[hp.name]) / scale[id(sae)]).to(act.dtype)
            # e = act - x_hat(encode(x)) through the encoding's own copy, not the feature node: downstream sees the
            # features only through x_hat, and d(x_hat + e) / d act is the identity, as in the model itself
            error = act - (sae.decode(raw[hp.name]) / scale[id(sae)]).to(act.dtype)
            error = _node(error.detach() if opts.detach_errors else error)
            nodes.errors[hp.name] = error
            if hp.name in edits:  # the edited features decode; the error stays the clean one (or is dropped)
                x_hat = (sae.decode(edits[hp.name](nodes.features[hp.name])) / scale[id(sae)]).to(act.dtype)
            return x_hat if ablate_errors else x_hat + error

        return fn

    return {hp: at(hp) for hp in {*readers, *writer}}


def _node(t: Tensor) -> Tensor:
    """t as a graph node whose gradient is kept: a leaf when nothing upstream requires a gradient."""
    if not torch.is_grad_enabled():
        return t
    if t.requires_grad:
        t.retain_grad()
        return t
    return t.detach().requires_grad_(True)


def _frozen_norm_hook(norm: nn.Module):
    """A forward hook making `norm` linear: the same output, with its divisor detached."""
    params = frozen_norm(norm)

    def hook(mod, args, out):
        x = args[0]
        xf = x.float()
        if params.center:
            xf = xf - xf.mean(-1, keepdim=True)
        y = xf / params.sigma(x).detach()[..., None] * params.gain
        if params.bias is not None:
            y = y + params.bias
        return y.to(out.dtype)

    return hook


def _frozen_attention_hooks(model: nn.Module, layer: int, nodes: Nodes):
    """(pre-hook, hook) on layer's attention: its output rebuilt from the detached pattern and the values (the
    pattern, values and head outputs recorded in nodes.heads)."""
    seen: dict[str, Tensor] = {}
    proj = out_proj(model, layer)

    def pre_hook(mod, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)

    def hook(mod, args, kwargs, out):
        pattern = out[1]  # [B, H, T, T] from the eager attention
        if pattern is None:
            raise UserError("freezing attention needs the attention weights; this model's attention returns none.")
        v = head_values(model, layer, seen.pop("x"))  # [B, T, H, dh]
        z = _node(torch.einsum("bhts,bshd->bthd", pattern.detach().to(v.dtype), v))
        nodes.heads[layer] = HeadFlow(pattern.detach(), v.detach(), z)
        return (proj(z.flatten(-2)).to(out[0].dtype), *out[1:])

    return pre_hook, hook


@contextmanager
def spliced(
    lm: LoadedModel,
    saes: list[SAE],
    options: SpliceOptions = SpliceOptions(),
    edits: dict[str, Callable[[Tensor], Tensor]] | None = None,
    ablate_errors: bool = False,
) -> Iterator[Nodes]:
    """Inside the block every forward of `lm.model` runs with the SAEs spliced in; yields the Nodes of the latest
    forward (each forward overwrites them). `edits` (hook written -> function of the features [B, T, d_sae])
    changes what a dictionary decodes, its error staying the clean one; `ablate_errors` drops every error term."""
    edits = edits or {}
    model = lm.model
    family(model)  # unsupported architectures: one clear error
    if not saes:
        raise UserError("nothing to splice: give at least one SAE or transcoder.")
    writes = [_hooks(sae, model)[1].name for sae in saes]
    if len(set(writes)) != len(writes):
        raise UserError(f"two dictionaries write the same hook ({', '.join(writes)}); splice one per hook.")
    for sae in saes:
        if sae.cfg.d_in != lm.d_model:
            raise UserError(f"{sae.cfg.hook_name}: this SAE reads d_in={sae.cfg.d_in}, the model has {lm.d_model}.")
    nodes = Nodes()
    with ExitStack() as stack:
        stack.enter_context(eager_attention(model))
        for sae in saes:  # gradients are wanted on the nodes, not on the dictionaries' weights
            flags = [(p, p.requires_grad) for p in sae.parameters()]
            sae.requires_grad_(False)
            stack.callback(lambda flags=flags: [p.requires_grad_(g) for p, g in flags])
        if options.freeze_norms:
            for module in model.modules():
                if _is_norm(module):
                    stack.callback(module.register_forward_hook(_frozen_norm_hook(module)).remove)
        if options.freeze_attention:
            for layer in range(len(blocks(model))):
                pre, post = _frozen_attention_hooks(model, layer, nodes)
                attn = attention(model, layer)
                stack.callback(attn.register_forward_pre_hook(pre, with_kwargs=True).remove)
                stack.callback(attn.register_forward_hook(post, with_kwargs=True).remove)
        unknown = sorted(set(edits) - set(writes))
        if unknown:
            raise UserError(
                f"edits name hooks no dictionary writes ({', '.join(unknown)}); spliced: {', '.join(writes)}."
            )
        stack.enter_context(hooks_installed(model, _splice_fns(saes, model, nodes, options, edits, ablate_errors)))
        yield nodes


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm or any RMSNorm-like module (Llama, Qwen, Mistral, Gemma name theirs *RMSNorm)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
