"""Distributed training: measured tokens/s for 1 vs N processes, and the communication volume per step of
data parallel, latent sharding and the layer split, computed on paper for issue 6's two shapes.

Two measured workloads, each on `--world` process counts (gloo on CPU, NCCL on CUDA, one GPU per rank):
  sae    the training step alone on synthetic activations (each rank its share of the batch; DDP
         all-reduces the gradients; --parallel latents shards the dictionary instead);
  model  the whole pipeline: each rank runs SmolLM2-135M on its own share of WikiText-2 through the
         ActivationStore, then the data-parallel training step (what `torchrun -m sae train` does).
Prints the tables and writes them with the device, date and versions to benchmarks/distributed.md.

    python scripts/bench_distributed.py                          # CPU: sae + model workloads, 1 and 2 processes
    python scripts/bench_distributed.py --workloads sae --steps 5
    python scripts/bench_distributed.py --paper-only             # just the communication volumes
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from activations.models import load_model  # noqa: E402
from activations.sources import open_text_source  # noqa: E402
from activations.store import ActivationStore, StoreConfig  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.registry import make_sae  # noqa: E402
from sae.sharded import ShardedTopKSAE  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.distributed import DataParallel, LatentSharded, SingleProcess  # noqa: E402
from training.trainer import Trainer  # noqa: E402

ISSUE_SHAPES = [(768, 24576, 32), (2304, 65536, 64)]  # (d_in, d_sae, k) from issue 6
BATCH = 4096
FP32, INT64, UINT8 = 4, 8, 1


# ---- communication volume on paper -----------------------------------------------------------------------
#
# Bytes each rank sends per training step, with N ranks and a global batch of B tokens (fp32 activations and
# gradients): a ring all-reduce of S bytes sends 2 (N-1)/N · S per rank; an all-gather of S bytes from every
# rank sends (N-1) · S per rank (each rank forwards every other rank's part once); an all-to-all sends all but
# the rank's own part. A rank receives as much as it sends in all three.


def ring_allreduce(nbytes: float, n: int) -> float:
    return 2 * (n - 1) / n * nbytes


def all_gather(nbytes_per_rank: float, n: int) -> float:
    return (n - 1) * nbytes_per_rank


def data_parallel_bytes(d_in: int, d_sae: int, k: int, batch: int, n: int) -> dict[str, float]:
    """DDP: every parameter's gradient is all-reduced; plus the dead-latent OR and the global FVU statistics."""
    params = 2 * d_in * d_sae + d_sae + d_in
    return {
        "gradients (all-reduce 2·d_in·d_sae + d_sae + d_in fp32)": ring_allreduce(params * FP32, n),
        "fired mask (all-reduce d_sae uint8)": ring_allreduce(d_sae * UINT8, n),
        "FVU denominator (2 all-reduces, d_in + 2 fp32; twice with AuxK)": 2 * ring_allreduce((d_in + 2) * FP32, n),
        "loss mean + step sizes (scalars)": ring_allreduce(FP32, n) + all_gather(INT64, n),
    }


def latent_sharded_bytes(
    d_in: int, d_sae: int, k: int, batch: int, n: int, aux_k: int | None = None
) -> dict[str, float]:
    """Every rank holds d_sae/N latents and the whole batch: the shares are gathered, the top-k candidates
    (fp32 value + int64 index) gathered, the partial reconstructions all-reduced, and in backward the input
    gradient all-reduced. AuxK (only while latents are dead) repeats the candidates + reconstruction."""
    aux_k = aux_k or d_in // 2
    act = batch * d_in * FP32
    return {
        "input batch (all-gather B/N·d_in fp32)": all_gather(act / n, n),
        "top-k candidates (all-gather B·k fp32+int64)": all_gather(batch * k * (FP32 + INT64), n),
        "reconstruction (all-reduce B·d_in fp32)": ring_allreduce(act, n),
        "input gradient in backward (all-reduce B·d_in fp32)": ring_allreduce(act, n),
        "fired mask (all-reduce d_sae uint8)": ring_allreduce(d_sae * UINT8, n),
        "AuxK when latents are dead (candidates B·aux_k + all-reduce B·d_in)": all_gather(
            batch * aux_k * (FP32 + INT64), n
        )
        + ring_allreduce(act, n),
    }


def layer_split_bytes(d_in: int, n_hooks: int, batch: int, n: int) -> dict[str, float]:
    """Each rank runs the model on B/N tokens and sends each hook's activations to its owner (all-to-all)."""
    return {
        "activations (all-to-all B/N·n_hooks·d_in fp32, (N-1)/N leaves the rank)": batch
        / n
        * n_hooks
        * d_in
        * FP32
        * (n - 1)
        / n
    }


def paper_table(n: int) -> list[str]:
    lines = [
        f"| shape (d_in, d_sae, k), batch {BATCH}, {n} ranks | scheme | part | MB sent per rank per step |",
        "| --- | --- | --- | ---: |",
    ]
    for d_in, d_sae, k in ISSUE_SHAPES:
        shape = f"{d_in}, {d_sae}, {k}"
        for scheme, parts in (
            ("data parallel", data_parallel_bytes(d_in, d_sae, k, BATCH, n)),
            ("latent sharding", latent_sharded_bytes(d_in, d_sae, k, BATCH, n)),
        ):
            base = {p: v for p, v in parts.items() if not p.startswith("AuxK")}
            for part, value in parts.items():
                lines.append(f"| {shape} | {scheme} | {part} | {value / 1e6:.2f} |")
            lines.append(f"| {shape} | **{scheme}** | **total (no AuxK)** | **{sum(base.values()) / 1e6:.1f}** |")
        for part, value in layer_split_bytes(d_in, n, BATCH, n).items():
            lines.append(f"| {shape} | layer split ({n} hooks) | {part} | {value / 1e6:.2f} |")
    return lines


# ---- measured throughput ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Synthetic:
    """A training.data.ActivationBatches of random activations `[B/N, 1, d_in]` (each rank its own), counted
    like contexts."""

    def __init__(self, batch: int, d_in: int, rank: int, device: str):
        self.batch_size = batch
        self.scales, self.hook_names, self.contexts_consumed = None, ["synthetic"], 0
        self.g = torch.Generator(device=device).manual_seed(rank)
        self.batch, self.d_in, self.device = batch, d_in, device

    def __iter__(self):
        while True:
            self.contexts_consumed += 1
            yield torch.randn(self.batch, 1, self.d_in, generator=self.g, device=self.device)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, workload: str, result_file: str) -> None:
    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=600),
        )
    try:
        local_batch = args.batch_size // world
        if workload == "sae":
            d_in, d_sae, k = args.shape
            store = _Synthetic(local_batch, d_in, rank, device)
        else:
            lm = load_model(args.model, device=device)
            store = ActivationStore(
                lm,
                open_text_source("wikitext-2", split="train"),
                StoreConfig(
                    hooks=[args.hook],
                    context_size=128,
                    model_batch_size=8,
                    batch_size=local_batch,
                    buffer_tokens=2 * local_batch,
                    device=device,
                    rank=rank,
                    world_size=world,
                ),
            )
            d_in, d_sae, k = lm.d_model, 8 * lm.d_model, 32
        torch.manual_seed(0)
        sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, k=k)).to(device)
        if world == 1:
            parallel = SingleProcess()
        elif args.parallel == "latents" and workload == "sae":
            sae, parallel = ShardedTopKSAE.from_sae(sae), LatentSharded()
        else:
            parallel = DataParallel()
        steps = args.warmup + args.steps
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(
                sae,
                store,
                TrainConfig(tokens=steps * args.batch_size, device=device, checkpoint_every=10**9, log_every=10**9),
                tmp,
                parallel=parallel,
            )
            trainer.show_progress = False
            trainer.begin()
            batches = iter(store)
            for step in range(steps):
                if step == args.warmup:
                    if cuda:
                        torch.cuda.synchronize()
                    if world > 1:
                        dist.barrier()
                    started = time.perf_counter()
                trainer.train_step(next(batches))
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            trainer._bar.close()
        if rank == 0:
            Path(result_file).write_text(f"{args.steps * args.batch_size / elapsed}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(args: argparse.Namespace, workload: str, world: int) -> float:
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
        result = f.name
    mp.start_processes(_worker, args=(world, _free_port(), args, workload, result), nprocs=world, start_method="spawn")
    tokens_per_s = float(Path(result).read_text())
    os.unlink(result)
    return tokens_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="1,2", help="process counts to measure (default 1,2)")
    p.add_argument("--workloads", default="sae,model", help="sae and/or model (default both)")
    p.add_argument("--shape", default="576,4608,32", help="d_in,d_sae,k of the sae workload (default 576,4608,32)")
    p.add_argument("--batch-size", type=int, default=4096, help="global batch in tokens (default 4096)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--parallel", default="data", choices=["data", "latents"], help="scheme for the sae workload")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.15.hook_resid_pre")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--paper-only", action="store_true", help="print the communication volumes only")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "distributed.md"))
    args = p.parse_args()
    args.shape = tuple(int(v) for v in args.shape.split(","))

    lines = [
        f"# Distributed training ({date.today()})",
        "",
        f"torch {torch.__version__}, {platform.platform()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "",
        "## Communication volume per step, on paper",
        "",
    ]
    for n in (2, 8):
        lines += paper_table(n) + [""]
    if not args.paper_only:
        worlds = [int(w) for w in args.world.split(",")]
        lines += [
            f"## Measured throughput ({args.device}, global batch {args.batch_size}, {args.steps} timed steps "
            f"after {args.warmup})",
            "",
            "| workload | processes | tokens/s | vs 1 process |",
            "| --- | ---: | ---: | ---: |",
        ]
        for workload in args.workloads.split(","):
            base = None
            for world in worlds:
                rate = measure(args, workload, world)
                base = base or rate
                what = (
                    f"sae step {args.shape} ({args.parallel if world > 1 else 'one process'})"
                    if workload == "sae"
                    else f"{args.model} {args.hook} forward + sae step (data parallel)"
                )
                lines.append(f"| {what} | {world} | {rate:,.0f} | {rate / base:.2f}× |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
