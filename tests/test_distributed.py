"""torch.distributed on CPU (gloo, 2 processes): data parallel equals one process, a latent-sharded SAE
equals the unsharded one, the layer split routes each hook to its owner, and a killed `torchrun` run resumes.

Workers are spawned with torch.multiprocessing (or torchrun as a subprocess); every wait has a deadline,
so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from processes import free_port, kill_tree

from activations.errors import UserError
from activations.sources import open_text_source
from activations.store import ActivationStore, StoreConfig
from sae.config import SAEConfig
from sae.io import load_sae
from sae.registry import make_sae
from sae.sharded import ShardedTopKSAE, load_sharded, shard_range
from training.config import TrainConfig
from training.data import ActivationBatches
from training.distributed import DataParallel, LatentSharded, LayerSplit, Ranks, rank_batch_size, resume_position
from training.trainer import Trainer

WORLD = 2
D_IN, D_SAE, K = 16, 64, 4


# ---- spawning ------------------------------------------------------------------------------------


def _entry(rank: int, fn, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args, timeout: float = 240) -> None:
    """Run fn(rank, *args) on 2 gloo ranks; a worker's exception fails the test, so does a hang."""
    ctx = mp.start_processes(_entry, args=(fn, free_port(), args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {timeout} s (a collective hung)")


# ---- data parallel -------------------------------------------------------------------------------


class ListStore:
    """A training.data.ActivationBatches over fixed batches `[n, 1, d]` (no model), counting them as contexts."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.batch_size = batches, len(batches[0])
        self.scales, self.hook_names, self.contexts_consumed = None, ["h"], 0

    def __iter__(self):
        for batch in self.batches:
            self.contexts_consumed += 1
            yield batch


def _global_batches(steps: int = 24, batch: int = 64) -> list[torch.Tensor]:
    """Activations with structure a small SAE can learn: sparse mixtures of 24 directions plus noise."""
    g = torch.Generator().manual_seed(1)
    directions = torch.randn(24, D_IN, generator=g)
    out = []
    for _ in range(steps):
        coef = torch.rand(batch, 24, generator=g) * (torch.rand(batch, 24, generator=g) < 0.15)
        out.append((coef @ directions + 0.05 * torch.randn(batch, D_IN, generator=g) + 0.5)[:, None])
    return out


def _trainer(store, run_dir, parallel=None, shard=False):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    # dead_tokens of two steps: latents die and AuxK runs, so the fired-mask OR over ranks matters
    cfg = TrainConfig(
        tokens=sum(len(b) for b in store.batches) * (WORLD if parallel else 1),
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=8,
        dead_tokens=128,
    )
    return Trainer(ShardedTopKSAE.from_sae(sae) if shard else sae, store, cfg, run_dir, parallel=parallel)


def _data_parallel_worker(rank: int, tmp: str) -> None:
    """Each rank gets every other row of each global batch; trains data parallel, then latent sharded."""
    share = [g[rank::WORLD] for g in _global_batches()]
    _trainer(ListStore(share), f"{tmp}/dp", DataParallel()).train()
    sharded = _trainer(ListStore(share), f"{tmp}/sharded", LatentSharded(), shard=True)
    sharded.train()
    # rank 0's checkpoint holds Adam's moments at full width; slicing them gives back this rank's optimiser state
    dist.barrier()
    gathered = torch.load(f"{tmp}/sharded/checkpoint/trainer_state.pt", weights_only=False)["optimizer"]
    local = sharded.parallel.local_optimizer_state(gathered, sharded.sae)
    for index, moments in sharded.optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(local["state"][index][key], value), (index, key)


@pytest.mark.parametrize("mode", ["dp", "sharded"])
def test_two_process_training_equals_one_process(tmp_path_factory, mode):
    """2 ranks × half of each batch give the weights, losses, dead latents and Adam state of 1 process on
    whole batches, data parallel (DDP) and latent sharded alike.

    The one-process run sees each global batch ordered as [rank 0's rows; rank 1's rows], the order in
    which the ranks' rows are all-gathered, so all runs see identical data."""
    tmp = tmp_path_factory.getbasetemp() / "two_process_training"
    if not (tmp / "done").exists():  # one spawn trains both modes
        _spawn(_data_parallel_worker, str(tmp))
        whole = [torch.cat([g[0::WORLD], g[1::WORLD]]) for g in _global_batches()]
        _trainer(ListStore(whole), tmp / "one").train()
        (tmp / "done").touch()

    one_sae, two_sae = load_sae(tmp / "one"), load_sae(tmp / mode)
    for name, p in one_sae.state_dict().items():
        torch.testing.assert_close(two_sae.state_dict()[name], p, atol=2e-5, rtol=1e-4, msg=name)
    one = [json.loads(line) for line in (tmp / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp / mode / "metrics.jsonl").read_text().splitlines()]
    assert [m["tokens"] for m in two] == [m["tokens"] for m in one]
    for a, b in zip(one, two):
        for key in ("loss", "fvu", "l0", "auxk", "dead_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert any(m["auxk"] > 0 for m in two), "no latent died: the AuxK / fired-OR path was not exercised"
    assert two[-1]["fvu"] < 0.9 * two[0]["fvu"]  # and it learns (from a lower start since the scaled encoder init)
    one_opt = torch.load(tmp / "one" / "checkpoint" / "trainer_state.pt", weights_only=False)["optimizer"]
    two_opt = torch.load(tmp / mode / "checkpoint" / "trainer_state.pt", weights_only=False)["optimizer"]
    for index, moments in one_opt["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(two_opt["state"][index][key], value, atol=1e-6, rtol=1e-3)


# ---- latent sharding -------------------------------------------------------------------------------


def _sharded_worker(rank: int, folder: str) -> None:
    torch.manual_seed(0)
    d_sae = 101  # odd: the two slices differ in size
    full = make_sae(SAEConfig(d_in=D_IN, d_sae=d_sae, k=K, aux_k=6))
    with torch.no_grad():
        full.b_enc.normal_(0, 0.1)
        full.b_dec.normal_(0, 0.1)
    shard = ShardedTopKSAE.from_sae(full)
    lo, hi = shard_range(d_sae, rank, WORLD)
    assert (shard.lo, shard.hi) == (lo, hi) and shard.W_enc.shape == (D_IN, hi - lo)
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(2))

    # inference: this rank's slice of the activations, the whole reconstruction
    torch.testing.assert_close(shard.encode(x), full.encode(x)[:, lo:hi])
    torch.testing.assert_close(shard(x), full(x))
    f = full.encode(x)
    torch.testing.assert_close(shard.decode(f[:, lo:hi]), full.decode(f))

    # training: same loss terms, l0, fired latents and gradients, with AuxK active
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True
    ref = full.training_forward(x, dead)
    ref.loss.backward()
    out = shard.training_forward(x, dead)
    out.loss.backward()
    assert float(ref.losses["auxk"]) > 0
    for key in ("fvu", "auxk"):
        torch.testing.assert_close(out.losses[key], ref.losses[key])
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.l0, ref.l0)
    torch.testing.assert_close(out.x_hat, ref.x_hat)
    fired = out.fired.to(torch.uint8)
    dist.all_reduce(fired, op=dist.ReduceOp.MAX)
    assert torch.equal(fired.bool(), ref.fired)
    torch.testing.assert_close(shard.W_enc.grad, full.W_enc.grad[:, lo:hi])
    torch.testing.assert_close(shard.W_dec.grad, full.W_dec.grad[lo:hi])
    torch.testing.assert_close(shard.b_enc.grad, full.b_enc.grad[lo:hi])
    torch.testing.assert_close(shard.b_dec.grad, full.b_dec.grad)
    norm = shard.clip_grad_norm_(1e9)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(full.parameters(), 1e9))

    # save gathers one ordinary folder; loading slices it back
    shard.save(folder)
    if rank == 0:
        saved = load_sae(folder)
        for name, p in full.state_dict().items():
            torch.testing.assert_close(saved.state_dict()[name], p)
    dist.barrier()
    again = load_sharded(folder)
    for name, p in shard.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], p)
    with pytest.raises(UserError, match="latent sharding supports the topk"):
        ShardedTopKSAE(SAEConfig(d_in=D_IN, d_sae=d_sae, architecture="relu"))


def test_latent_sharded_sae_equals_the_unsharded_one(tmp_path):
    _spawn(_sharded_worker, str(tmp_path / "sharded"))
    assert load_sae(tmp_path / "sharded").cfg.d_sae == 101


# ---- layer split -----------------------------------------------------------------------------------


def _layer_split_worker(rank: int) -> None:
    # three hooks, rank r's rows hold value 100*r + 10*step + hook in every coordinate
    batches = [
        torch.full((4 + rank, 3, 2), 0.0) + torch.tensor([0.0, 1.0, 2.0])[None, :, None] + 100 * rank + 10 * step
        for step in range(3)
    ]
    store = ListStore(batches)
    store.hook_names = ["a", "b", "c"]
    split = LayerSplit(store)
    assert isinstance(split, ActivationBatches)
    assert split.hook_names == (["a", "c"] if rank == 0 else ["b"])
    assert split.batch_size == WORLD * (4 + rank)
    if rank == 0:  # rank 0 is done after 2 batches (as after a resume), rank 1 after 3: finish() keeps serving it
        got = [batch for _, batch in zip(range(2), split)]
        split.finish()
    else:
        got = list(split)
        assert len(got) == 3
    split.finish()  # a second finish (or one after the data ran out) returns at once, on every rank
    assert split.positions == [3, 3]
    for step, batch in enumerate(got):
        want = torch.cat(
            [
                torch.full((4 + r, 1, 2), 0.0)
                + torch.tensor([float(h) for h in split.owned])[None, :, None]
                + 100 * r
                + 10 * step
                for r in range(WORLD)
            ]
        )
        assert torch.equal(batch, want), (rank, step)
    with pytest.raises(UserError, match="must give a rank"):
        LayerSplit(store, owners=[0, 5, 1])


def test_layer_split_sends_each_hook_to_its_owner():
    _spawn(_layer_split_worker)


# ---- the store's split, and the CLI's checks ---------------------------------------------------------


def test_store_ranks_take_turns_over_the_shared_stream_and_resume_in_place(tiny_llama):
    """Rank r runs model batches r, r+2, ... of the one-process stream; a restarted rank continues at its own
    next batch (contexts_consumed is its position in the shared stream)."""

    def store(rank=0, world=1, skip=0):
        cfg = StoreConfig(
            hooks=["blocks.1.hook_resid_post"],
            context_size=32,
            model_batch_size=4,
            rank=rank,
            world_size=world,
            epochs=1,
        )
        return ActivationStore(tiny_llama, open_text_source("tinyshakespeare", split="test"), cfg, skip_contexts=skip)

    def first(s, n):
        out = []
        for _acts, batch, _ in s.raw_batches():
            out.append(batch.tokens)
            if len(out) == n:
                return out
        return out

    whole = first(store(), 6)
    ranks = [store(r, 2) for r in range(2)]
    parts = [first(s, 3) for s in ranks]
    for i, tokens in enumerate(whole):
        assert torch.equal(parts[i % 2][i // 2], tokens)
    assert [s.contexts_consumed for s in ranks] == [20, 24]  # end of batches 4 and 5 of the shared stream

    resumed = store(1, 2, skip=ranks[1].contexts_consumed)
    assert torch.equal(first(resumed, 1)[0], first(store(), 8)[7])  # rank 1's next batch: 7


def test_batch_size_must_split_evenly_and_resume_needs_the_same_ranks():
    assert rank_batch_size(4096, Ranks(0, 4)) == 1024
    with pytest.raises(UserError, match=r"--batch-size 4097 does not split evenly over 2 processes.*4096"):
        rank_batch_size(4097, Ranks(0, 2))
    state = {"contexts_consumed": 16, "data_positions": [16, 24]}
    assert resume_position(state, Ranks(1, 2)) == 24
    assert resume_position({"contexts_consumed": 16}, Ranks()) == 16  # a checkpoint from before data_positions
    with pytest.raises(UserError, match=r"written by a run of 2 process\(es\) but this one has 1.*--nproc_per_node 2"):
        resume_position(state, Ranks())


# ---- the real command line under torchrun ---------------------------------------------------------------

SMALL = (
    "--hook blocks.2.hook_resid_post --dataset tinyshakespeare --batch-size 512 --buffer-tokens 2048 "
    "--context-size 64 --expansion 2 --k 8 --device cpu"
).split()


def _torchrun(*argv: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "sae",
        "train",
        *argv,
    ]


def test_torchrun_training_killed_then_resumed_end_to_end(tiny_llama_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m sae train` on the tiny model is SIGKILLed (agent and workers) after its
    first checkpoint; `--resume` under torchrun finishes it and evaluates, with one run folder from rank 0."""
    run = tmp_path / "run"
    argv = [
        "--model",
        tiny_llama_dir,
        *SMALL,
        "--tokens",
        "81920",
        "--checkpoint-every",
        "5",
        "--log-every",
        "1",
        "--eval-tokens",
        "512",
        "--out",
        str(run),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _torchrun(*argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        state = run / "checkpoint" / "trainer_state.pt"
        deadline = time.time() + 240
        while not state.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.3)
        assert proc.poll() is None, "training ended before it could be killed; raise --tokens"
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=60)
    assert not (run / "sae_weights.safetensors").exists()
    saved = torch.load(state, weights_only=False)
    done, positions = saved["step"], saved["data_positions"]
    assert done >= 5 and len(positions) == WORLD and positions[0] != positions[1]

    result = subprocess.run(_torchrun(*argv, "--resume"), env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"resuming {run} from step {done}") == 1  # printed by rank 0 only
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 161))  # each step once, none lost
    assert metrics[-1]["tokens"] == 81920 and metrics[-1]["fvu"] < metrics[0]["fvu"]
    sae = load_sae(run)
    assert sae.cfg.norm_scale == pytest.approx(saved["store_scales"]["blocks.2.hook_resid_post"])
    assert json.loads((run / "eval.json").read_text())["fvu"] < 1.0


def test_torchrun_layer_split_trains_each_hook_on_its_own_rank(tiny_llama_dir, tmp_path):
    """`--hooks a,b --parallel layers`: rank 0 trains a, rank 1 trains b, each on the global batch of its hook
    (activations exchanged all-to-all); each SAE has its own folder under the run folder."""
    run = tmp_path / "layers"
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    argv = [
        "--model",
        tiny_llama_dir,
        *SMALL[2:],
        "--hooks",
        ",".join(hooks),
        "--parallel",
        "layers",
        "--tokens",
        "4096",
        "--checkpoint-every",
        "4",
        "--log-every",
        "1",
        "--no-eval",
        "--out",
        str(run),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(_torchrun(*argv), env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    for hook in hooks:
        sae = load_sae(run / hook)
        assert sae.cfg.hook_name == hook and sae.cfg.norm_scale != 1.0
        metrics = [json.loads(line) for line in (run / hook / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, 9)) and metrics[-1]["tokens"] == 4096
        state = torch.load(run / hook / "checkpoint" / "trainer_state.pt", weights_only=False)
        assert len(state["data_positions"]) == WORLD
