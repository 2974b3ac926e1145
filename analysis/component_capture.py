"""One forward that records, at chosen token positions, what every component adds to the residual stream.

Forward hooks only (no model copy): the block-0 input (embeddings), GPT-2's position embedding, each attention
layer's input to its output projection (per-head outputs before W_O), its attention pattern rows and values
(for the per-source split; attention runs in its eager implementation for the duration, which returns the
pattern), each MLP's input to its down projection (neuron activations) and its output, and the SAE's own hook
activation. The forward stops right after the SAE's hook. Supported: the Llama family (Llama, Mistral, Qwen 2/3,
Gemma; grouped-query attention included) and GPT-2, whose blocks add the raw o_proj / down_proj outputs.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from activations.errors import UserError
from activations.hookpoints import HookPoint, arch_table, hooks_installed, parse_hook
from activations.models import eager_attention

# Where each family keeps the modules read here, relative to a block.
_MODULES = {
    "llama": dict(attn="self_attn", o="self_attn.o_proj", v="self_attn.v_proj", mlp="mlp", out="mlp.down_proj"),
    "gpt2": dict(attn="attn", o="attn.c_proj", v="attn.c_attn", mlp="mlp", out="mlp.c_proj"),
}
_MLP_NORM = {"llama": "post_attention_layernorm", "gpt2": "ln_2"}
_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gpt2": "gpt2"}


@dataclass(frozen=True)
class Span:
    """Which components write into the hook's input: attention and MLP layers, and the embeddings."""

    attn_layers: range
    mlp_layers: range
    embed: bool
    frozen_norm: bool  # the hook reads the MLP's normed input: linearised with the norm's scale frozen per token


def span_of(hp: HookPoint) -> Span:
    """The components upstream of a hook point (pre-norm residual stream: x = embed + sum of outputs)."""
    L = hp.layer
    return {
        "hook_resid_pre": Span(range(L), range(L), True, False),
        "hook_resid_post": Span(range(L + 1), range(L + 1), True, False),
        "hook_mlp_in": Span(range(L + 1), range(L), True, True),
        "hook_attn_out": Span(range(L, L + 1), range(0), False, False),
        "hook_mlp_out": Span(range(0), range(L, L + 1), False, False),
    }[hp.kind]


def family(model: nn.Module) -> str:
    """'llama' or 'gpt2', or a UserError naming the supported architectures."""
    arch_table(model)  # unknown architectures get the hook table's error
    model_type = model.config.model_type
    if model_type not in _FAMILY:
        raise UserError(
            f"feature sources support {', '.join(sorted(_FAMILY))} models, not '{model_type}' (its blocks normalise "
            "sublayer outputs or differ otherwise); use one of those."
        )
    return _FAMILY[model_type]


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_table(model).layers)


@dataclass
class BlockMaps:
    """One block's linear output maps, float32: attention W_O [d, H*dh] (+ bias), MLP W_out [d, I] (+ bias)."""

    W_O: Tensor
    b_O: Tensor | None
    W_out: Tensor
    b_out: Tensor | None


def block_maps(model: nn.Module, layer: int) -> BlockMaps:
    """W_O and W_out as [d, in] matrices (nn.Linear keeps [out, in]; GPT-2's Conv1D keeps [in, out])."""
    fam = family(model)
    block = blocks(model)[layer]

    def matrix(path: str) -> tuple[Tensor, Tensor | None]:
        mod = block.get_submodule(_MODULES[fam][path])
        w = mod.weight.detach().float()
        bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().float()
        return (w.T if fam == "gpt2" else w), bias

    (W_O, b_O), (W_out, b_out) = matrix("o"), matrix("out")
    return BlockMaps(W_O, b_O, W_out, b_out)


def heads(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim)."""
    cfg = model.config
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    attn = blocks(model)[0].get_submodule(_MODULES[family(model)]["attn"])
    return H, KV, int(attn.head_dim)


@dataclass
class FrozenNorm:
    """The MLP input norm with its divisor frozen: y = gain * centre?(x) / sigma + bias, linear for fixed sigma."""

    gain: Tensor  # [d]
    bias: Tensor | None  # [d]
    center: bool
    eps: float

    def sigma(self, x: Tensor) -> Tensor:
        """[...] the divisor the norm uses on inputs [..., d] (what 'frozen' freezes)."""
        x = x.float()
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1) + self.eps).sqrt()


def mlp_norm(model: nn.Module, layer: int) -> FrozenNorm:
    """The norm in front of `layer`'s MLP."""
    return frozen_norm(blocks(model)[layer].get_submodule(_MLP_NORM[family(model)]))


def frozen_norm(norm: nn.Module) -> FrozenNorm:
    """A norm module's parameters (RMSNorm or LayerNorm; Gemma's RMSNorm multiplies by 1 + weight)."""
    name = type(norm).__name__
    weight = norm.weight.detach().float()
    gain = 1 + weight if name.startswith("Gemma") else weight
    center = isinstance(norm, nn.LayerNorm)
    eps = next((float(getattr(norm, a)) for a in ("eps", "variance_epsilon") if hasattr(norm, a)), 1e-6)
    bias = None if getattr(norm, "bias", None) is None else norm.bias.detach().float()
    return FrozenNorm(gain, bias, center, eps)


@dataclass
class Capture:
    """What one forward recorded at P positions (float32); per-layer dicts are keyed by layer index."""

    x: Tensor  # [P, d] the SAE hook's raw activation
    embed: Tensor | None  # [P, d] token embedding (block-0 input less the position embedding)
    pos_embed: Tensor | None  # [P, d] GPT-2's position embedding
    z: dict[int, Tensor]  # [P, H*dh] attention output before W_O
    pattern: dict[int, Tensor]  # [P, H, T] attention rows of the positions
    values: dict[int, Tensor]  # [B, T, KV, dh] values of every context in the batch
    neurons: dict[int, Tensor]  # [P, I] MLP activations entering W_out
    mlp_out: dict[int, Tensor]  # [P, d] MLP outputs (bias included)
    norm_in: Tensor | None  # [P, d] input of the frozen MLP norm (hook_mlp_in)


class _Stop(Exception):
    """Raised once the SAE's hook has fired: later layers are not needed."""


@torch.inference_mode()
def capture(model: nn.Module, hook: str, tokens: Tensor, rows: Tensor, cols: Tensor) -> Capture:
    """Run `model` on tokens [B, T] and record every component at positions (rows[p], cols[p]), P of them."""
    fam, hp = family(model), parse_hook(hook, model)
    span, H, KV, dh = span_of(hp), *heads(model)
    mods = _MODULES[fam]
    at = lambda t: t.detach()[rows, cols].float()  # noqa: E731  [B, T, ...] -> [P, ...]
    got: dict = {"z": {}, "pattern": {}, "values": {}, "neurons": {}, "mlp_out": {}}

    def forward_hook(key: str, layer: int, fn):
        return lambda mod, args, out: got[key].__setitem__(layer, fn(out))

    def pre_hook(key: str, layer: int):
        return lambda mod, args: got[key].__setitem__(layer, at(args[0]))

    def values(out: Tensor) -> Tensor:
        v = out[..., 2 * H * dh :] if fam == "gpt2" else out
        return v.detach().float().reshape(*v.shape[:2], KV, dh)

    with ExitStack() as stack:
        for layer in span.attn_layers:
            block = blocks(model)[layer]
            for key, path, fn in (
                ("pattern", mods["attn"], lambda out: out[1].detach()[rows, :, cols].float()),
                ("values", mods["v"], values),
            ):
                handle = block.get_submodule(path).register_forward_hook(forward_hook(key, layer, fn))
                stack.callback(handle.remove)
            stack.callback(block.get_submodule(mods["o"]).register_forward_pre_hook(pre_hook("z", layer)).remove)
        for layer in span.mlp_layers:
            block = blocks(model)[layer]
            stack.callback(
                block.get_submodule(mods["out"]).register_forward_pre_hook(pre_hook("neurons", layer)).remove
            )
            handle = block.get_submodule(mods["mlp"]).register_forward_hook(forward_hook("mlp_out", layer, at))
            stack.callback(handle.remove)
        if span.frozen_norm:
            norm = blocks(model)[hp.layer].get_submodule(_MLP_NORM[fam])
            handle = norm.register_forward_pre_hook(lambda mod, args: got.__setitem__("norm_in", at(args[0])))
            stack.callback(handle.remove)
        if fam == "gpt2" and span.embed:
            wpe = model.get_submodule("transformer.wpe")
            stack.callback(
                wpe.register_forward_hook(
                    lambda mod, args, out: got.__setitem__("pos", out.detach().expand(len(tokens), -1, -1))
                ).remove
            )
        first = parse_hook("blocks.0.hook_resid_pre", model)
        stack.enter_context(hooks_installed(model, {first: lambda act: got.__setitem__("resid0", at(act))}))

        def at_hook(act: Tensor):
            got["x"] = at(act)
            raise _Stop

        stack.enter_context(hooks_installed(model, {hp: at_hook}))
        stack.enter_context(eager_attention(model))
        try:
            model(input_ids=tokens, use_cache=False)
        except _Stop:
            pass
    pos = at(got["pos"]) if "pos" in got else None
    embed = got["resid0"] - (0 if pos is None else pos) if span.embed else None
    return Capture(
        x=got["x"],
        embed=embed,
        pos_embed=pos,
        z=got["z"],
        pattern=got["pattern"],
        values=got["values"],
        neurons=got["neurons"],
        mlp_out=got["mlp_out"],
        norm_in=got.get("norm_in"),
    )
