"""Fast paths for training sparse codes, each with a plain-PyTorch fallback it is tested against.

- sparse_decode: decode (index, value) codes without building the dense [B, d_sae] activations.
- topk_select: the k largest entries of each row; a Triton kernel on CUDA for k << d_sae, torch.topk elsewhere.
- encoder_values: pre-activations at chosen latents whose gradient touches only those latents, so the
  encoder matmul runs without autograd and no [B, d_sae] tensor is saved or back-propagated.
- fired_latents: which latents fired, from the top-k indices only and without a device sync.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from activations.errors import UserError

try:  # Triton is optional (the `gpu` extra); everything here runs without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

# ---- decoder ------------------------------------------------------------------------------------


def sparse_decode(top_idx: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j top_acts[..., j] * W_dec[top_idx[..., j]]: [..., k] codes -> [..., d_in] (no b_dec).

    embedding_bag gathers only the k decoder rows each token uses; gradients flow to W_dec
    (dense grad, rows not used get zero) and to top_acts.
    """
    lead = top_idx.shape[:-1]
    k = top_idx.shape[-1]
    out = F.embedding_bag(
        top_idx.reshape(-1, k),
        W_dec,
        per_sample_weights=top_acts.reshape(-1, k).to(W_dec.dtype),
        mode="sum",
    )
    return out.reshape(*lead, W_dec.shape[-1])


# ---- dead-latent statistics ---------------------------------------------------------------------


def fired_latents(idx: Tensor, acts: Tensor, d_sae: int) -> Tensor:
    """BoolTensor [d_sae]: latents with a nonzero activation on some token, from the [B, k] code alone.

    Indices of zero activations are sent to a spare slot d_sae, so no boolean-mask indexing (which
    would wait for the device to count the mask) is needed.
    """
    hit = torch.where(acts != 0, idx, torch.full_like(idx, d_sae))
    fired = torch.zeros(d_sae + 1, dtype=torch.bool, device=idx.device)
    return fired.index_fill_(0, hit.reshape(-1), True)[:d_sae]


# ---- top-k selection ----------------------------------------------------------------------------

TRITON_MAX_K = 128  # larger k goes to torch.topk (the kernel keeps 4 * next_pow2(k) candidates per row)
_SUB = 32  # the threshold pass takes the max of each block of _SUB entries


def triton_topk_available(pre: Tensor, k: int) -> bool:
    """True when the Triton top-k kernel can run on `pre`: Triton installed, a CUDA tensor (or
    TRITON_INTERPRET=1 for testing on CPU), 2-d float32/bfloat16/float16, and k <= TRITON_MAX_K."""
    if triton is None or pre.ndim != 2 or not 1 <= k <= min(TRITON_MAX_K, pre.shape[-1]):
        return False
    if pre.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return pre.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def topk_select(pre: Tensor, k: int, use_triton: bool | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of each row of `pre` [..., n], in no particular order.

    use_triton None picks the Triton kernel where triton_topk_available says it can run, unless
    $SAELAB_TOPK=torch (for A/B timing); the result is the same set as torch.topk's (ties may pick
    different indices of equal value).
    """
    if use_triton is None:
        use_triton = os.environ.get("SAELAB_TOPK") != "torch" and triton_topk_available(pre, k)
    if not use_triton:
        top = pre.topk(k, dim=-1, sorted=False)
        return top.values, top.indices
    if torch.compiler.is_compiling():  # opaque to torch.compile: the kernel is launched by the op
        return torch.ops.saelab.topk_select(pre, k)
    return _topk_triton(pre, k)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _topk_triton(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Launch the Triton kernel: one program per row, two passes over the row (see _topk_rows)."""
    if not triton_topk_available(pre, k):
        raise RuntimeError("the Triton top-k kernel cannot run here; call topk_select, which falls back to torch.topk")
    pre = pre if pre.stride(-1) == 1 else pre.contiguous()
    rows, n = pre.shape
    kp = _next_pow2(k)
    values = torch.empty(rows, k, dtype=pre.dtype, device=pre.device)
    indices = torch.empty(rows, k, dtype=torch.int64, device=pre.device)
    if rows == 0:
        return values, indices
    scratch = torch.empty(rows, 4 * kp, dtype=torch.int64, device=pre.device)
    _topk_kernel[(rows,)](
        pre,
        values,
        indices,
        scratch,
        n,
        pre.stride(0),
        K=k,
        KP=kp,
        SUB=_SUB,
        CAP=4 * kp,
        num_warps=4 if kp <= 32 else 8,
    )
    return values, indices


def _topk_rows(
    pre_ptr,
    val_ptr,
    idx_ptr,
    scratch_ptr,
    n_cols,
    stride_row,
    K: tl.constexpr,
    KP: tl.constexpr,
    SUB: tl.constexpr,
    CAP: tl.constexpr,
):
    """Top-K of one row in two reads, for K << n_cols (KP = next power of two >= K).

    1. t = the K-th largest of the maxima of SUB-wide blocks; K blocks reach t, so >= K entries are >= t,
       and for K << n_cols only about K are.
    2. Entries >= t are packed into int64 keys (order-preserving float bits << 32 | column) and
       written to this row's scratch (at most CAP); a bitonic top-K of those keys is the answer.
    If more than CAP entries reach t, a streaming top-K over the whole row gives it instead.
    """
    BLOCK: tl.constexpr = KP * SUB
    MIN_KEY: tl.constexpr = -0x7FFFFFFFFFFFFFFF
    row = tl.program_id(0).to(tl.int64)
    src = pre_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)

    best = tl.full([KP], float("-inf"), tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        v = tl.load(src + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        block_max = tl.max(tl.reshape(v, [KP, SUB]), axis=1)
        best = tl.topk(tl.reshape(tl.join(best, block_max), [2 * KP]), KP)
    t = tl.max(tl.where(tl.arange(0, KP) == K - 1, best, float("-inf")), axis=0)

    dst = scratch_ptr + row * CAP
    count = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        v = tl.load(src + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        keep = (v >= t) & (cols < n_cols)
        pos = count + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        bits = v.to(tl.int32, bitcast=True)
        key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32) | cols.to(tl.int64)
        tl.store(dst + pos, key, mask=keep & (pos < CAP))
        count += tl.sum(keep.to(tl.int32), axis=0)
    tl.debug_barrier()

    if count <= CAP:
        c = tl.arange(0, CAP)
        top = tl.topk(tl.load(dst + c, mask=c < count, other=MIN_KEY), KP)
    else:  # too many ties with t: stream the row, KP entries at a time
        top = tl.full([KP], MIN_KEY, tl.int64)
        step = tl.arange(0, KP)
        for start in range(0, n_cols, KP):
            cols = start + step
            v = tl.load(src + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            bits = v.to(tl.int32, bitcast=True)
            key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32) | cols.to(tl.int64)
            key = tl.where(cols < n_cols, key, MIN_KEY)
            top = tl.topk(tl.reshape(tl.join(top, key), [2 * KP]), KP)

    s = (top >> 32).to(tl.int32)
    value = tl.where(s >= 0, s, s ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    out = tl.arange(0, KP)
    tl.store(val_ptr + row * K + out, value.to(val_ptr.dtype.element_ty), mask=out < K)
    tl.store(idx_ptr + row * K + out, top & 0xFFFFFFFF, mask=out < K)


# TRITON_INTERPRET=1 (the kernel on CPU, for tests) must be set before triton is first imported.
_topk_kernel = triton.jit(_topk_rows) if triton is not None else None


@torch.library.custom_op("saelab::topk_select", mutates_args=())
def _topk_select_op(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """topk_select as an opaque op, so torch.compile neither traces nor breaks on the Triton launch."""
    return topk_select(pre, k)


@_topk_select_op.register_fake
def _(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    shape = (*pre.shape[:-1], k)
    return pre.new_empty(shape), pre.new_empty(shape, dtype=torch.int64)


# ---- encoder with a sparse backward -------------------------------------------------------------

ENCODER_BACKWARDS = ("dense", "sparse")
# On CPU the sparse backward measured faster from d_sae / k = 32 up (whole TopK steps, 2-core box: 0.90x at
# 1024/32, 0.70x at 4608/32 and 0.60x at 8192/8 of the dense backward's step time); below that, untested.
CPU_SPARSE_MIN_RATIO = 16


def encoder_backward_mode(device: torch.device | str, d_sae: int, k: int) -> str:
    """How encoder_values computes grad W_enc: "sparse" (CSR product over the chosen latents) or
    "dense" (scatter into [B, d_sae] and one matmul). $SAELAB_ENCODER_BACKWARD overrides the choice."""
    forced = os.environ.get("SAELAB_ENCODER_BACKWARD")
    if forced:
        if forced not in ENCODER_BACKWARDS:
            raise UserError(
                f"SAELAB_ENCODER_BACKWARD={forced!r} is not one of {', '.join(ENCODER_BACKWARDS)}; "
                "set it to one of them or unset it"
            )
        return forced
    if torch.device(device).type == "cuda":
        return "sparse"
    return "sparse" if d_sae >= CPU_SPARSE_MIN_RATIO * k else "dense"


def encoder_values(
    pre: Tensor, idx: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, mode: str | None = None
) -> Tensor:
    """pre[b, idx[b, j]] as [B, m] values (in W_enc's dtype), differentiable in x, W_enc, b_enc, b_dec.

    `pre` = (x - b_dec) @ W_enc + b_enc computed without autograd (b_dec None: no centring); each row
    of idx holds distinct latents. Only the chosen latents get gradient, as if pre had been computed
    with autograd and gathered, but the backward never forms a [B, d_sae] gradient in "sparse" mode.
    """
    if mode is None:
        mode = encoder_backward_mode(W_enc.device, W_enc.shape[1], idx.shape[-1])
    if mode not in ENCODER_BACKWARDS:
        raise ValueError(f"encoder backward mode must be one of {ENCODER_BACKWARDS}, got {mode!r}")
    return _EncoderValues.apply(pre, idx, x, W_enc, b_enc, b_dec, mode)


class _EncoderValues(torch.autograd.Function):
    """Forward: gather the chosen pre-activations. Backward: grads of x, W_enc, b_enc, b_dec from the
    [B, m] gradient of those values (see encoder_grads)."""

    @staticmethod
    def forward(
        ctx: Any, pre: Tensor, idx: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, mode: str
    ) -> Tensor:
        ctx.save_for_backward(idx, x, W_enc, b_dec)
        ctx.mode, ctx.compute_dtype = mode, pre.dtype
        return pre.gather(-1, idx).to(W_enc.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        idx, x, W_enc, b_dec = ctx.saved_tensors
        _, _, need_x, need_W, need_b_enc, need_b_dec, _ = ctx.needs_input_grad
        grad_W, grad_b_enc, grad_xc = encoder_grads(
            grad, idx, x, W_enc, b_dec, need_x=need_x, need_W=need_W, mode=ctx.mode, compute_dtype=ctx.compute_dtype
        )
        grad_b_dec = None
        if need_b_dec:  # x_c = x - b_dec, so grad b_dec = -sum_b grad x_c[b] = -W_enc @ grad b_enc
            grad_b_dec = -grad_xc.sum(0) if need_x else -(W_enc @ grad_b_enc)
            grad_b_dec = grad_b_dec.to(b_dec.dtype)
        return (
            None,
            None,
            grad_xc.to(x.dtype) if need_x else None,
            grad_W if need_W else None,
            grad_b_enc.to(W_enc.dtype) if need_b_enc else None,
            grad_b_dec,
            None,
        )


def encoder_grads(
    grad: Tensor,
    idx: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor | None,
    *,
    need_x: bool,
    need_W: bool,
    mode: str,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad W_enc [d_in, d_sae], grad b_enc [d_sae], grad x_c [B, d_in]) for G = grad scattered at idx.

    "sparse": grad W_enc = x_c^T G as a CSR product over (latent, token) pairs sorted by latent, and
    grad x_c = G W_enc^T as a CSR product over tokens: work and memory in B * m, not B * d_sae.
    "dense": G materialised [B, d_sae] in compute_dtype (bf16 under autocast) and two matmuls.
    Unneeded results come back as empty tensors. Opaque to torch.compile (sparse tensors do not trace).
    """
    if torch.compiler.is_compiling():
        return torch.ops.saelab.encoder_grads(grad, idx, x, W_enc, b_dec, need_x, need_W, mode, compute_dtype)
    return _encoder_grads(grad, idx, x, W_enc, b_dec, need_x, need_W, mode, compute_dtype)


def _encoder_grads(
    grad: Tensor,
    idx: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor | None,
    need_x: bool,
    need_W: bool,
    mode: str,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    rows, m = idx.shape
    d_sae = W_enc.shape[1]
    grad = grad.to(W_enc.dtype)
    flat_idx, flat_grad = idx.reshape(-1), grad.reshape(-1)
    grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, flat_idx, flat_grad)
    grad_W, grad_xc = grad.new_empty(0), grad.new_empty(0)
    if mode == "dense":
        G = torch.zeros(rows, d_sae, dtype=compute_dtype, device=grad.device).scatter_add_(
            1, idx, grad.to(compute_dtype)
        )
        if need_W:
            x_c = x.to(W_enc.dtype) - b_dec if b_dec is not None else x.to(W_enc.dtype)
            grad_W = (x_c.to(compute_dtype).T @ G).to(W_enc.dtype)
        if need_x:
            grad_xc = (G @ W_enc.to(compute_dtype).T).to(W_enc.dtype)
        return grad_W, grad_b_enc, grad_xc
    acc = torch.float32 if W_enc.dtype in (torch.bfloat16, torch.float16) else W_enc.dtype  # sparse products' dtype
    with warnings.catch_warnings():  # "sparse CSR support is in beta" is printed once per process otherwise
        warnings.simplefilter("ignore", UserWarning)
        if need_W:  # rows of G^T are latents: sort the (latent, token) pairs by latent (stable: tokens ascend)
            x_c = x.to(acc) - b_dec.to(acc) if b_dec is not None else x.to(acc)
            latents, order = torch.sort(flat_idx, stable=True)
            crow = torch.searchsorted(latents, torch.arange(d_sae + 1, device=idx.device))
            Gt = torch.sparse_csr_tensor(
                crow, order // m, flat_grad[order].to(acc), (d_sae, rows), check_invariants=False
            )
            grad_W = (Gt @ x_c).t().contiguous().to(W_enc.dtype)
        if need_x:  # rows of G are tokens, m entries each (columns sorted within a row)
            cols, order = idx.sort(dim=1)
            crow = torch.arange(0, rows * m + 1, m, device=idx.device)
            G = torch.sparse_csr_tensor(
                crow, cols.reshape(-1), grad.gather(1, order).reshape(-1).to(acc), (rows, d_sae), check_invariants=False
            )
            grad_xc = (G @ W_enc.t().to(acc)).to(W_enc.dtype)
    return grad_W, grad_b_enc, grad_xc


@torch.library.custom_op("saelab::encoder_grads", mutates_args=())
def _encoder_grads_op(
    grad: Tensor,
    idx: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor | None,
    need_x: bool,
    need_W: bool,
    mode: str,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    return _encoder_grads(grad, idx, x, W_enc, b_dec, need_x, need_W, mode, compute_dtype)


@_encoder_grads_op.register_fake
def _(grad, idx, x, W_enc, b_dec, need_x, need_W, mode, compute_dtype):
    grad_W = W_enc.new_empty(W_enc.shape) if need_W else W_enc.new_empty(0)
    grad_xc = W_enc.new_empty((idx.shape[0], W_enc.shape[0])) if need_x else W_enc.new_empty(0)
    return grad_W, W_enc.new_empty(W_enc.shape[1]), grad_xc
