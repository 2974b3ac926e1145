"""torch.distributed for training: start and stop from torchrun's environment, and the per-step
collectives of each way of splitting the work across ranks.

The Trainer talks to one strategy object. `SingleProcess` does nothing across ranks; `DataParallel`
gives each rank its share of every batch and averages gradients with DDP; `LatentSharded` (for
dictionaries too wide for one device) gives every rank the whole batch and a slice of the latents;
with a `LayerSplit` store, `LayerOwner` has each rank train the dictionaries of the hooks it owns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from activations.errors import UserError
from sae.base import SAE, TrainOutput, Variance
from sae.sharded import ShardedTopKSAE
from training.data import ActivationBatches
from training.step import Forward, clip_grad_norm

# ---- start and stop --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: its rank, the number of ranks, its rank on this machine, the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), readable before the process group starts."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def backend_for(device: str) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_distributed(device: str, timeout_s: float = 1800) -> tuple[Ranks, str]:
    """Join the process group torchrun set up; returns the ranks and this rank's device
    ("cuda" becomes "cuda:LOCAL_RANK"). Without torchrun: one rank on `device`, nothing started."""
    if not launched_by_torchrun():
        return Ranks(), device
    rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if str(device).startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU with torchrun --nproc_per_node."
            )
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    backend = backend_for(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=torch.device(device) if backend == "nccl" else None
        )
    return Ranks(rank, world, local, backend), device


def teardown() -> None:
    """Leave the process group (every rank), if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def rank_batch_size(batch_size: int, ranks: Ranks) -> int:
    """Each rank's share of a global --batch-size (which must split evenly, so every rank's step is alike)."""
    if batch_size % ranks.world_size:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly over {ranks.world_size} processes; "
            f"use a multiple of {ranks.world_size}, e.g. {batch_size - batch_size % ranks.world_size}."
        )
    return batch_size // ranks.world_size


def resume_position(state: dict, ranks: Ranks) -> int:
    """This rank's position in the text (contexts consumed) from a checkpoint's trainer state."""
    positions = state.get("data_positions", [state["contexts_consumed"]])
    if len(positions) != ranks.world_size:
        raise UserError(
            f"the checkpoint was written by a run of {len(positions)} process(es) but this one has "
            f"{ranks.world_size}; resume with the same number (torchrun --nproc_per_node "
            f"{len(positions)}, or plain 'sae train' for 1)."
        )
    return int(positions[ranks.rank])


PARALLEL_MODES = ("data", "latents", "layers")


def split_work(
    mode: str,
    ranks: Ranks,
    store: ActivationBatches,
    saes: dict[str, SAE],
    hooks: list[str],
    transcoder: bool = False,
    device: str = "cpu",
    seed: int = 0,
):
    """How this rank takes part in training one SAE per hook with `--parallel mode`: returns the store it
    reads, the (hook, index in the store's batches) pairs it trains, and a factory of their strategies.

    data: every hook, each rank its share of the batch. latents: every hook, each SAE sharded (saes is
    updated in place: an SAE on the meta device gets a fresh random slice, seeded by seed and rank, so no
    rank ever holds the whole dictionary). layers: only the hooks this rank owns (hook h: rank h % world_size).
    """
    if mode not in PARALLEL_MODES:
        raise UserError(f"unknown --parallel {mode!r}; use one of {', '.join(PARALLEL_MODES)}.")
    every = [(hook, i) for i, hook in enumerate(hooks)]
    if ranks.world_size == 1:
        return store, every, SingleProcess
    if mode == "layers":
        if transcoder:
            raise UserError(
                "--parallel layers splits SAEs on different hooks; a transcoder has one, "
                "so use --parallel data (or latents) for it."
            )
        split = LayerSplit(store)
        return split, [(hooks[h], i) for i, h in enumerate(split.owned)], lambda: LayerOwner(split)
    if mode == "latents":
        for hook in hooks:
            sae = saes[hook]
            if isinstance(sae, ShardedTopKSAE):  # resumed from a checkpoint's slice
                continue
            if sae.device.type == "meta":
                torch.manual_seed(seed * 1_000_003 + ranks.rank)
                saes[hook] = ShardedTopKSAE(sae.cfg, device=device)
            else:
                saes[hook] = ShardedTopKSAE.from_sae(sae)
        return store, every, LatentSharded
    return store, every, DataParallel


# ---- collectives the strategies share ----------------------------------------------------------


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_ints(value: int, device: torch.device | str | None = None) -> list[int]:
    """`value` from every rank, in rank order."""
    mine = torch.tensor([value], dtype=torch.long, device=device or comm_device())
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t) for t in out]


def all_gather_rows(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """The ranks' `x` concatenated along dim 0 in rank order (row counts may differ; pass them if known)."""
    sizes = sizes or gather_ints(len(x), x.device)
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def any_rank(mask: Tensor) -> Tensor:
    """A BoolTensor OR-ed over ranks (as uint8 MAX, which every backend reduces)."""
    mask = mask.to(torch.uint8)
    dist.all_reduce(mask, op=dist.ReduceOp.MAX)
    return mask.bool()


def global_variance_share(x: Tensor) -> Tensor:
    """This rank's share of the global batch's variance: sum over all ranks' rows of ||x - mean||^2
    (mean of the global batch) times local rows / global rows. Dividing by it makes each rank's FVU a
    share whose average over ranks is the FVU of the whole batch (DDP averages gradients)."""
    with torch.no_grad():
        x = x.float()
        sums = torch.cat([x.sum(dim=0), x.new_tensor([len(x)])])
        dist.all_reduce(sums)
        n_global = sums[-1]
        total = (x - sums[:-1] / n_global).pow(2).sum()
        dist.all_reduce(total)
        return total * (len(x) / n_global)


# ---- strategies ----------------------------------------------------------------------------------


class SingleProcess:
    """One process: the identity for every collective. The base the distributed strategies refine.

    What the training step itself takes from a strategy is only `wrap` (the forward), `variance` (the loss
    denominator) and `clip_grad_norm_`; the rest is the trainer's bookkeeping around the step.
    """

    rank, world_size = 0, 1
    variance: Variance | None = None  # the loss denominator (sae.base.Variance); None: each batch's own

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run folder (metrics, checkpoints, the final SAE)."""
        return self.rank == 0

    def wrap(self, sae: SAE) -> Forward:
        """The function the training step calls for one training forward (SAE.training_forward's signature)."""
        return sae.training_forward

    def step_input(self, x: Tensor) -> Tensor:
        """What this rank trains on this step, from its share `x` of the global batch."""
        return x

    def global_batch(self, x: Tensor) -> Tensor:
        """The whole step's batch from the step input (used once, to initialise b_dec)."""
        return x

    def step_tokens(self, n_local: int) -> int:
        """Tokens trained on this step over all ranks; 0 when any rank has run out of data."""
        return n_local

    def mean(self, value: Tensor) -> Tensor:
        """A scalar averaged over ranks (each rank's loss is its share of the global batch's loss)."""
        return value

    def any(self, fired: Tensor) -> Tensor:
        """A BoolTensor [d_sae] OR-ed over ranks."""
        return fired

    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> Tensor:
        """Clip the gradients to total norm max_norm; returns the norm before clipping."""
        return clip_grad_norm(sae, max_norm)

    def data_positions(self, contexts_consumed: int) -> list[int]:
        """Every rank's position in the text (contexts consumed), in rank order, for checkpoints."""
        return [contexts_consumed]

    def data_states(self, store_state: dict) -> list[dict]:
        """Every rank's store state (shuffle buffer, RNG, position), in rank order, on the rank that writes."""
        return [store_state]

    def full_sae(self, sae: SAE) -> SAE | None:
        """The whole dictionary to save, on the rank that writes (every rank must call this)."""
        return sae

    def optimizer_state(self, optimizer: torch.optim.Optimizer, sae: SAE) -> dict:
        """The optimiser state to checkpoint, shaped for the whole dictionary."""
        return optimizer.state_dict()

    def local_optimizer_state(self, state: dict, sae: SAE) -> dict:
        """A checkpointed optimiser state as this rank's optimiser holds it."""
        return state

    @torch.no_grad()
    def step_stats(self, x: Tensor, out: TrainOutput) -> dict[str, float]:
        """loss, fvu, l0 and the named loss terms of this step, over the global batch."""
        x, x_hat = x.float(), out.x_hat.float()
        fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        stats = {"loss": float(out.loss), "fvu": float(fvu), "l0": float(out.l0)}
        stats.update({name: float(value) for name, value in out.losses.items()})
        return stats


class TrainingStep(nn.Module):
    """Makes SAE.training_forward a module's forward(), so DistributedDataParallel can wrap it."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(
        self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None, variance: Variance | None = None
    ) -> TrainOutput:
        """The wrapped SAE's training forward."""
        return self.sae.training_forward(x, dead_mask, target, variance)


class AcrossRanks(SingleProcess):
    """What data parallel and latent sharding share: step sizes, fired latents and data positions come
    from every rank."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def step_tokens(self, n_local: int) -> int:
        sizes = gather_ints(n_local)
        return 0 if min(sizes) == 0 else sum(sizes)

    def any(self, fired: Tensor) -> Tensor:
        return any_rank(fired)

    def data_positions(self, contexts_consumed: int) -> list[int]:
        return gather_ints(contexts_consumed)

    def data_states(self, store_state: dict) -> list[dict]:
        """Gathered to rank 0 (pickled between this run's own ranks); the other ranks get an empty list."""
        states = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(store_state, states, dst=0)
        return states or []


class DataParallel(AcrossRanks):
    """Each rank trains on its share of every global batch; DDP averages the gradients.

    FVU divides by batch statistics, so a rank's FVU on its own rows would not average to the FVU of
    the global batch. The training step passes `variance` = global_variance_share (two small all-reduces
    per denominator) into the forward, so every fvu() and penalty() divides by this rank's share of the
    global batch's variance, which makes the average of the ranks' losses, and so DDP's averaged
    gradient, exactly those of one process on the whole batch.
    """

    variance = staticmethod(global_variance_share)

    def __init__(self, find_unused_parameters: bool = False):
        super().__init__()
        self.find_unused_parameters = find_unused_parameters
        self.ddp: nn.Module | None = None

    def wrap(self, sae: SAE) -> Forward:
        """DDP around the SAE (it broadcasts rank 0's weights now, then averages gradients in backward)."""
        device = sae.device
        self.ddp = nn.parallel.DistributedDataParallel(
            TrainingStep(sae),
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
        )
        return self.ddp

    def global_batch(self, x: Tensor) -> Tensor:
        return all_gather_rows(x)

    def mean(self, value: Tensor) -> Tensor:
        value = value.detach().float().clone()
        dist.all_reduce(value)
        return value / self.world_size

    @torch.no_grad()
    def step_stats(self, x: Tensor, out: TrainOutput) -> dict[str, float]:
        x, x_hat = x.float(), out.x_hat.float()
        names = list(out.losses)
        local = torch.stack(
            [
                out.loss.detach().float(),
                *[out.losses[n].float() for n in names],
                out.l0.float() * len(x),
                x.new_tensor(float(len(x))),
                (x - x_hat).pow(2).sum(),
            ]
        )
        dist.all_reduce(local)
        n_global = local[-2]
        variance = global_variance_share(x) * (n_global / len(x))
        stats = {
            "loss": float(local[0] / self.world_size),
            "fvu": float(local[-1] / variance.clamp_min(1e-12)),
            "l0": float(local[-3] / n_global),
        }
        stats.update({name: float(local[1 + i] / self.world_size) for i, name in enumerate(names)})
        return stats


class LatentSharded(AcrossRanks):
    """Every rank trains on the whole global batch (the ranks' shares all-gathered) with its slice of the
    latents (sae.sharded.ShardedTopKSAE); the loss is the same on every rank, so no gradient is averaged.
    Checkpoints and the final SAE are gathered into one ordinary folder on rank 0 (Adam's moments too)."""

    def step_input(self, x: Tensor) -> Tensor:
        return all_gather_rows(x)

    def clip_grad_norm_(self, sae: ShardedTopKSAE, max_norm: float) -> Tensor:
        """Clip by the whole dictionary's gradient norm (the slices' norms combined across ranks)."""
        return sae.clip_grad_norm_(max_norm)

    def full_sae(self, sae) -> SAE | None:
        return sae.to_sae()

    def optimizer_state(self, optimizer: torch.optim.Optimizer, sae) -> dict:
        """Adam's per-parameter moments gathered to full width, like a one-process optimiser's state."""
        return self._map_moments(optimizer.state_dict(), sae, lambda name, t: sae.gather(name, t))

    def local_optimizer_state(self, state: dict, sae) -> dict:
        return self._map_moments(state, sae, lambda name, t: sae.slice_state({name: t})[name])

    @staticmethod
    def _map_moments(state: dict, sae, fn) -> dict:
        """A copy of an optimiser state with fn(parameter name, tensor) applied to each per-element moment
        (the live state's dicts are shared with the optimiser, so nothing is changed in place)."""
        names = dict(enumerate(name for name, _ in sae.named_parameters()))  # one group, in the module's order
        for group in state["param_groups"]:  # a state's indices run through the groups in turn
            names.update(zip(group["params"], group.get("param_names", ())))
        moments = {
            index: {
                key: fn(names[index], value) if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in per_param.items()
            }
            for index, per_param in state["state"].items()
        }
        return {**state, "state": moments}


class LayerOwner(SingleProcess):
    """The layer split's strategy: this rank trains the dictionaries of its own hooks alone, on the global
    batch a LayerSplit store delivers (so world_size stays 1 for the trainer), and writes their run folders."""

    def __init__(self, split: LayerSplit):
        self.split, self.rank = split, dist.get_rank()

    @property
    def writes(self) -> bool:
        return True

    def data_positions(self, contexts_consumed: int) -> list[int]:
        return list(self.split.positions)  # gathered with each batch: no collective here


# ---- layer split -----------------------------------------------------------------------------------


class LayerSplit:
    """A store wrapper for several hooks: every rank runs the model on its own share of the text, then
    an all-to-all sends hook h's activations to the rank that owns h. Each rank sees, for its own hooks
    only, the global batch `[world × batch, n_owned, d]`, and trains their dictionaries alone (no
    gradient traffic at all, as in sparsify's layer distribution)."""

    def __init__(self, store: ActivationBatches, owners: list[int] | None = None):
        """Wrap this rank's `store`; hook h goes to rank owners[h] (default h % world_size)."""
        self.store = store
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        n_hooks = len(store.hook_names)
        self.owners = owners if owners is not None else [h % self.world_size for h in range(n_hooks)]
        if len(self.owners) != n_hooks or not all(0 <= o < self.world_size for o in self.owners):
            raise UserError(
                f"layer split owners {self.owners} must give a rank in 0..{self.world_size - 1} "
                f"for each of the {n_hooks} hooks"
            )
        self.owned = [h for h, owner in enumerate(self.owners) if owner == self.rank]
        if not self.owned:
            raise UserError(
                f"rank {self.rank} owns none of the {n_hooks} hooks; with a layer split, start at "
                "most as many processes as hooks (torchrun --nproc_per_node)."
            )
        self.positions = [0] * self.world_size  # every rank's contexts_consumed, refreshed with each batch
        self._batches, self._stopped = iter(store), False
        self.batch_size = store.batch_size * self.world_size  # a trainer here steps on the global batch

    @property
    def hook_names(self) -> list[str]:
        """The hooks this rank owns, in the store's order."""
        return [self.store.hook_names[h] for h in self.owned]

    @property
    def scales(self) -> dict[str, float] | None:
        """The wrapped store's normalisation factors (every rank agrees on them)."""
        return self.store.scales

    @property
    def contexts_consumed(self) -> int:
        """This rank's position in the text (its own share of the model forwards)."""
        return self.store.contexts_consumed

    def __iter__(self) -> Iterator[Tensor]:
        while (batch := self._step(active=True)) is not None:
            yield batch

    def finish(self) -> None:
        """Call when this rank's dictionaries are done: keeps sending its activations to the ranks still
        training (after a resume their hooks may stand at different steps) until every rank has finished."""
        while self._step(active=False) is not None:
            pass

    def _step(self, active: bool) -> Tensor | None:
        """One exchange: every rank's batch size, position and activity, then the all-to-all; None to stop
        (decided from gathered values, so on every rank at the same step)."""
        if self._stopped:
            return None
        batch = next(self._batches, None)
        mine = torch.tensor(
            [0 if batch is None else len(batch), self.store.contexts_consumed, int(active)], device=comm_device()
        )
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        sizes, self.positions = [int(t[0]) for t in every], [int(t[1]) for t in every]
        if min(sizes) == 0 or not any(int(t[2]) for t in every):  # out of data on a rank, or all done
            self._stopped = True
            return None
        return self.exchange(batch, sizes)

    def exchange(self, batch: Tensor, sizes: list[int]) -> Tensor:
        """All-to-all: send each rank its hooks' columns of `batch`, receive this rank's hooks from all."""
        d = batch.shape[-1]
        by_rank = [[h for h, owner in enumerate(self.owners) if owner == q] for q in range(self.world_size)]
        send = torch.cat([batch[:, hooks].reshape(-1) for hooks in by_rank])
        recv = batch.new_empty(sum(sizes) * len(self.owned) * d)
        dist.all_to_all_single(
            recv,
            send.contiguous(),
            output_split_sizes=[n * len(self.owned) * d for n in sizes],
            input_split_sizes=[len(batch) * len(hooks) * d for hooks in by_rank],
        )
        return recv.view(sum(sizes), len(self.owned), d)
