"""A TopK dictionary split by latents across ranks, for widths one device cannot hold (Gao et al. 2024).

Rank r holds latents [lo, hi): columns of W_enc, rows of W_dec, a slice of b_enc; b_dec is replicated
and every rank sees the same input batch. The top-k is global: each rank takes its local top-k, the
candidates (values + global indices) are all-gathered, every rank picks the same global top-k, decodes
the chosen latents it holds, and the partial reconstructions are summed with an all-reduce.
Saved, it is one ordinary SAE folder (gathered to rank 0); loading slices an ordinary SAE folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from activations.errors import UserError
from sae.base import SAE, TrainOutput, Variance, denominator, fvu
from sae.config import SAEConfig
from sae.folder import own_memory
from sae.io import WEIGHTS_FILENAME, read_cfg, save_sae
from sae.kernels import sparse_decode
from sae.registry import make_sae
from sae.topk import ENCODER_INIT_SCALE, TopKSAE, auxk_loss

# Which dimension of each parameter is split by latents (b_dec, absent here, is replicated).
SHARD_DIM = {"W_enc": 1, "W_dec": 0, "b_enc": 0}


def shard_range(d_sae: int, rank: int, world_size: int) -> tuple[int, int]:
    """Latents [lo, hi) held by `rank`: contiguous, sizes differing by at most one."""
    return rank * d_sae // world_size, (rank + 1) * d_sae // world_size


class _SumFromShards(torch.autograd.Function):
    """Forward: all-reduce(sum) of the ranks' partial results. Backward: the identity, because every
    rank computes the same loss from the summed result (Megatron's reduce-from-model-parallel)."""

    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Forward: the identity (every rank holds the same input). Backward: all-reduce(sum) of the
    gradients, since each rank's slice of latents contributes part of the input's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedTopKSAE(SAE):
    """This rank's slice of a TopK SAE; encode/decode/training_forward match the unsharded SAE.

    `cfg` is the whole dictionary's config (d_sae is the global width); the parameters hold only
    latents [lo, hi). encode() returns this rank's latents' activations `[..., hi - lo]`.
    """

    architecture = "topk"

    def __init__(
        self,
        cfg: SAEConfig,
        rank: int | None = None,
        world_size: int | None = None,
        device: torch.device | str | None = None,
        group=None,
    ):
        """Tied random init of this rank's slice (seed per rank for different slices)."""
        if cfg.architecture != "topk":
            raise UserError(
                f"latent sharding supports the topk architecture, not {cfg.architecture!r}; "
                "train a topk SAE or drop the latent sharding"
            )
        nn.Module.__init__(self)
        self.cfg, self.group = cfg, group
        self.rank = dist.get_rank(group) if rank is None else rank
        self.world_size = dist.get_world_size(group) if world_size is None else world_size
        self.lo, self.hi = shard_range(cfg.d_sae, self.rank, self.world_size)
        if not 1 <= cfg.k <= cfg.d_sae or self.hi - self.lo < 1:
            raise UserError(
                f"cannot shard d_sae={cfg.d_sae} latents with k={cfg.k} over {self.world_size} ranks; "
                "need 1 <= k <= d_sae and at least one latent per rank"
            )
        dtype = cfg.torch_dtype
        W_dec = torch.randn(self.hi - self.lo, cfg.d_in, device=device, dtype=torch.float32)
        W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(dtype)
        self.W_enc = nn.Parameter((W_dec.T * ENCODER_INIT_SCALE).contiguous())  # as TopKSAE's init
        self.W_dec = nn.Parameter(W_dec)
        self.b_enc = nn.Parameter(torch.zeros(self.hi - self.lo, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))

    @property
    def d_local(self) -> int:
        """How many latents this rank holds."""
        return self.hi - self.lo

    aux_k = TopKSAE.aux_k  # the whole dictionary's AuxK width, as the unsharded SAE

    # ---- from / to ordinary SAEs --------------------------------------------------------------

    @classmethod
    def from_sae(cls, sae: SAE, group=None) -> ShardedTopKSAE:
        """This rank's slice of an (unsharded) SAE that every rank holds."""
        shard = cls(sae.cfg, device="meta", group=group)
        shard.load_state_dict(shard.slice_state(sae.state_dict()), assign=True)
        return shard.to(sae.device)

    def slice_state(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's slices of full-width tensors named like the SAE's parameters."""
        return {
            name: (t.narrow(SHARD_DIM[name], self.lo, self.d_local) if name in SHARD_DIM else t).clone()
            for name, t in full.items()
        }

    def gather(self, name: str, t: Tensor, dst: int = 0) -> Tensor | None:
        """The full-width tensor of parameter `name` (or a tensor shaped like it) on rank dst, in CPU memory
        (one tensor at a time passes through dst's device, so the whole dictionary never sits there)."""
        if name not in SHARD_DIM:
            return t.detach().cpu().clone() if self.rank == dst else None
        dim, ranges = SHARD_DIM[name], [shard_range(self.cfg.d_sae, r, self.world_size) for r in range(self.world_size)]
        shape = list(t.shape)
        shape[dim] = max(hi - lo for lo, hi in ranges)  # dist.gather wants equal shapes: pad the smaller slices
        padded = t.new_zeros(shape)
        padded.narrow(dim, 0, t.shape[dim]).copy_(t.detach())
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, dst) if self.group else dst, group=self.group)
        if self.rank != dst:
            return None
        return torch.cat([part.narrow(dim, 0, hi - lo).cpu() for part, (lo, hi) in zip(parts, ranges)], dim=dim)

    def to_sae(self, dst: int = 0) -> SAE | None:
        """The whole dictionary as an ordinary SAE in rank dst's CPU memory (None on the other ranks)."""
        tensors = {name: self.gather(name, t, dst) for name, t in self.state_dict().items()}
        if self.rank != dst:
            return None
        sae = make_sae(self.cfg, device="meta")
        sae.load_state_dict(tensors, assign=True)
        return sae

    def save(self, folder: str | os.PathLike) -> Path:
        """Write one ordinary SAE folder from rank 0 (every rank must call this)."""
        sae = self.to_sae()
        if sae is not None:
            save_sae(sae, folder)
        dist.barrier(group=self.group)
        return Path(folder)

    # ---- inference -------------------------------------------------------------------------------

    def encode_pre(self, x: Tensor) -> Tensor:
        """This rank's pre-activations [..., d_local]."""
        x = _CopyToShards.apply(self._check_input(x) - self.b_dec, self.group)
        return x @ self.W_enc + self.b_enc

    def _global_topk(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k largest of the global pre-activations per row: (values, global indices), no gradient."""
        with torch.no_grad():
            local = pre.detach().topk(min(k, self.d_local), dim=-1, sorted=False)
            values = [torch.empty_like(local.values) for _ in range(self.world_size)]
            indices = [torch.empty_like(local.indices) for _ in range(self.world_size)]
            dist.all_gather(values, local.values.contiguous(), group=self.group)
            dist.all_gather(indices, (local.indices + self.lo).contiguous(), group=self.group)
            values, indices = torch.cat(values, dim=-1), torch.cat(indices, dim=-1)
            best = values.topk(k, dim=-1, sorted=False)
            return best.values, indices.gather(-1, best.indices)

    def _local_code(self, pre: Tensor, global_idx: Tensor) -> tuple[Tensor, Tensor]:
        """(local indices, ReLU'd activations with gradient) of the chosen latents this rank holds;
        latents held elsewhere get activation 0 (and index 0, which they then do not touch)."""
        mine = (global_idx >= self.lo) & (global_idx < self.hi)
        local_idx = torch.where(mine, global_idx - self.lo, torch.zeros_like(global_idx))
        acts = pre.gather(-1, local_idx).relu() * mine
        return local_idx, acts

    def activation(self, pre: Tensor) -> Tensor:
        """This rank's dense activations [..., d_local] under the global top-k."""
        flat = pre.reshape(-1, self.d_local)
        _, global_idx = self._global_topk(flat, self.cfg.k)
        local_idx, acts = self._local_code(flat, global_idx)
        dense = torch.zeros_like(flat).scatter_add(-1, local_idx, acts)
        return dense.reshape(pre.shape)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction [..., d_in] from this rank's activations [..., d_local] (summed over ranks)."""
        return _SumFromShards.apply(f.to(self.dtype) @ self.W_dec, self.group) + self.b_dec

    # ---- training --------------------------------------------------------------------------------

    def _sparse_decode(self, local_idx: Tensor, acts: Tensor) -> Tensor:
        """The whole reconstruction (no b_dec) from this rank's chosen latents, summed over ranks."""
        return _SumFromShards.apply(sparse_decode(local_idx, acts, self.W_dec), self.group)

    def training_forward(
        self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None, variance: Variance | None = None
    ) -> TrainOutput:
        """As TopKSAE.training_forward on the batch every rank holds; fired is the full [d_sae] mask
        with this rank's latents filled in (OR it over ranks for the whole dictionary)."""
        self.check_train_input(x)
        target = x if target is None else target.to(self.dtype)
        pre = self.encode_pre(x)
        values, global_idx = self._global_topk(pre, self.cfg.k)
        local_idx, acts = self._local_code(pre, global_idx)
        x_hat = self._sparse_decode(local_idx, acts) + self.b_dec

        def decode_top_dead(k_aux: int, n_dead: int) -> Tensor:
            """The dead latents' top-k taken globally (dead_mask is the full [d_sae]; n_dead is the same on
            every rank, as the trainer ORs `fired` over ranks); the chosen latents are all dead."""
            local_dead = dead_mask[self.lo : self.hi].to(pre.device)
            _, dead_idx = self._global_topk(pre.masked_fill(~local_dead, float("-inf")), k_aux)
            return self._sparse_decode(*self._local_code(pre, dead_idx))

        auxk = auxk_loss(
            target, x_hat, dead_mask, decode_top_dead, aux_k=self.aux_k, coef=self.cfg.aux_k_coef, variance=variance
        )
        terms = {"fvu": fvu(target, x_hat, denominator(target, variance)), "auxk": auxk}
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[global_idx[values > 0]] = True
        fired[: self.lo] = False
        fired[self.hi :] = False
        return TrainOutput.from_terms(x_hat, terms, fired, (values > 0).sum(dim=-1).float().mean())

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the norm of the whole dictionary's gradient (slices summed over ranks, b_dec once)."""
        sharded = [p.grad for name, p in self.named_parameters() if name in SHARD_DIM and p.grad is not None]
        sq = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=self.device))
        dist.all_reduce(sq, group=self.group)
        if self.b_dec.grad is not None:
            sq = sq + self.b_dec.grad.float().pow(2).sum()
        norm = sq.sqrt()
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(factor.to(p.grad.dtype))
        return norm


def load_sharded(folder: str | os.PathLike, device: str | torch.device = "cpu", group=None) -> ShardedTopKSAE:
    """This rank's slice of an ordinary SAE folder, read without loading the other ranks' latents."""
    folder = Path(folder)
    cfg = read_cfg(folder)
    shard = ShardedTopKSAE(cfg, device="meta", group=group)
    path = folder / WEIGHTS_FILENAME
    if not path.is_file():
        raise UserError(f"{path} is missing; point to a folder written by save_sae or re-run training")
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for name, param in shard.state_dict().items():
            if name not in names:
                raise UserError(f"{path} is missing tensor {name}; re-save the SAE")
            part = f.get_slice(name)
            full_shape = tuple(part.get_shape())
            want = list(param.shape)
            if name in SHARD_DIM:
                want[SHARD_DIM[name]] = cfg.d_sae
            if full_shape != tuple(want):
                raise UserError(
                    f"{path}: tensor {name} has shape {full_shape} but cfg.json expects {tuple(want)}; "
                    "fix d_in/d_sae in cfg.json or re-save the SAE"
                )
            if name == "W_enc":
                tensors[name] = part[:, shard.lo : shard.hi]
            elif name in SHARD_DIM:
                tensors[name] = part[shard.lo : shard.hi]
            else:
                tensors[name] = part[:]
    shard.load_state_dict(own_memory({n: t.to(cfg.torch_dtype) for n, t in tensors.items()}), assign=True)
    return shard.to(device)
