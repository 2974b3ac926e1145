"""Training-step throughput of saelab's SAEs, side by side with SAELens, sparsify and a plain dense PyTorch
step, plus peak memory, a long-run memory-growth check and an FVU check against the fp32 reference path.

A "step" is what a trainer does per batch with the activations already on the device: forward, backward,
optimiser and the loop's own bookkeeping (saelab: Trainer.train_step). Prints a table and writes it with the
device, date and versions to benchmarks/train_speed-<device>-<date>.md.

    python scripts/bench_train.py                    # issue 6's two shapes, batch 4096 (meant for a GPU)
    python scripts/bench_train.py --small            # small shapes and batch, CPU friendly (CI runs --steps 3)
    python scripts/bench_train.py --shape 4096,131072,64 --compile
    python scripts/bench_train.py --e2e              # `sae train` end to end (model + store + training)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from itertools import cycle
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from activations.models import resolve_model_path  # noqa: E402
from sae.base import SAE, fvu  # noqa: E402
from sae.cli import main as sae_main  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.registry import ARCHITECTURES, make_sae  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import Trainer, default_lr  # noqa: E402

ISSUE_SHAPES = [(768, 24576, 32), (2304, 65536, 64)]  # (d_in, d_sae, k) from issue 6
SMALL_SHAPES = [(64, 2048, 16), (128, 4096, 32)]
DEFAULT_ARCHS = ("topk", "batchtopk", "jumprelu")
IMPLEMENTATIONS = (
    "saelab",
    "saelab-reference",
    "saelab-compile",
    "dense",
    "dense-compile",
    "saelens",
    "sparsify",
    "floor",
)


@dataclass
class Shape:
    d_in: int
    d_sae: int
    k: int

    def __str__(self) -> str:
        return f"d_in {self.d_in}, d_sae {self.d_sae}, k {self.k}"


@dataclass
class Row:
    shape: Shape
    name: str
    seconds: float | None = None  # median seconds per step
    batch: int = 0
    peak_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return None if not self.seconds else self.batch / self.seconds


# ---- data: activations already on the device --------------------------------------------------------


def planted_batches(d_in: int, batch: int, n: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """n batches [batch, 1, d_in] of sparse sums of a random planted dictionary plus noise (real SAEs have
    something to learn, so latents fire spread out as in training); float32, rotated through by the timing."""
    g = torch.Generator(device=device).manual_seed(seed)
    features = torch.randn(8 * d_in, d_in, device=device, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(features), (batch, 12), device=device, generator=g)
        coef = torch.rand(batch, 12, device=device, generator=g) * 2
        x = F.embedding_bag(idx, features, per_sample_weights=coef, mode="sum")
        out.append((x + 0.05 * torch.randn(batch, d_in, device=device, generator=g)).unsqueeze(1))
    return out


class DeviceBatches:
    """A training.data.ActivationBatches serving pre-made device batches in a cycle."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.batch_size = batches, len(batches[0])
        self.hook_names, self.scales, self.contexts_consumed = ["bench"], {}, 0

    def __iter__(self):
        """The batches, round and round."""
        return cycle(self.batches)


# ---- the implementations, each exposing step(batch) and close() ------------------------------------


class SaelabStep:
    """saelab's Trainer.train_step: forward (bf16 autocast on CUDA), backward, parallel-gradient removal, clip,
    fused Adam on CUDA, decoder renormalisation, dead-latent counters, metrics logging every 10 steps."""

    def __init__(
        self,
        arch: str,
        shape: Shape,
        device: torch.device,
        batches: list[torch.Tensor],
        run_dir: Path,
        fast: bool = True,
        compile: bool = False,
        autocast: bool = True,
        dead_tokens: int | None = None,
    ):
        torch.manual_seed(0)
        sae = make_sae(SAEConfig(d_in=shape.d_in, d_sae=shape.d_sae, architecture=arch, k=shape.k), device=device)
        if not fast:
            sae.fast_path = False
        cfg = TrainConfig(tokens=10**15, device=str(device), checkpoint_every=10**15, dead_tokens=dead_tokens)
        self.trainer = Trainer(sae, DeviceBatches(batches), cfg, run_dir, compile=compile)
        self.trainer.show_progress = False
        self.trainer.begin()
        if not autocast:  # the fp32 reference: the same loop with autocast off
            self.trainer.autocast = contextlib.nullcontext()

    @property
    def sae(self) -> SAE:
        return self.trainer.sae

    def step(self, batch: torch.Tensor) -> None:
        self.trainer.train_step(batch)

    def close(self) -> None:
        self.trainer.end()


class DenseStep:
    """Plain PyTorch TopK SAE: dense [B, d_sae] activations and matmuls, MSE loss, bf16 autocast and fused Adam
    on CUDA (fp32 on CPU), optionally torch.compile'd. No decoder renormalisation or dead-latent work."""

    def __init__(self, shape: Shape, device: torch.device, compile: bool = False):
        g = torch.Generator(device=device).manual_seed(0)
        W_dec = torch.randn(shape.d_sae, shape.d_in, device=device, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = W_dec.T.clone().requires_grad_()
        self.W_dec = W_dec.requires_grad_()
        self.b_enc = torch.zeros(shape.d_sae, device=device, requires_grad=True)
        self.b_dec = torch.zeros(shape.d_in, device=device, requires_grad=True)
        self.k = shape.k
        params = [self.W_enc, self.W_dec, self.b_enc, self.b_dec]
        self.opt = torch.optim.Adam(params, lr=default_lr(shape.d_sae), fused=device.type == "cuda")
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.loss = torch.compile(self._loss) if compile else self._loss

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        x_hat = acts @ self.W_dec + self.b_dec
        return (x_hat.float() - x).pow(2).sum(-1).mean()

    def step(self, batch: torch.Tensor) -> None:
        with self.autocast:
            loss = self.loss(batch[:, 0])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None: ...


class SaeLensStep:
    """SAELens's own SAETrainer step (as its fit() loop runs it): training_forward_pass under bf16 autocast on
    CUDA, dead-neuron and sparsity statistics, backward, clip, Adam, LR and coefficient schedulers."""

    CLASSES = {
        "topk": ("TopKTrainingSAE", "TopKTrainingSAEConfig"),
        "batchtopk": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig"),
        "jumprelu": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig"),
    }

    def __init__(self, arch: str, shape: Shape, device: torch.device, batch: int):
        import sae_lens
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        sae_cls, cfg_cls = (getattr(sae_lens, name) for name in self.CLASSES[arch])
        kw = {"k": shape.k} if arch != "jumprelu" else {}
        torch.manual_seed(0)
        sae = sae_cls(cfg_cls(d_in=shape.d_in, d_sae=shape.d_sae, device=str(device), dtype="float32", **kw))
        lr = default_lr(shape.d_sae)
        cfg = SAETrainerConfig(
            total_training_samples=10**15,
            train_batch_size_samples=batch,
            lr=lr,
            lr_end=lr / 10,
            device=str(device),
            autocast=device.type == "cuda",
        )
        self.trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step(self, batch: torch.Tensor) -> None:
        self.trainer.maybe_reset_sparsity()
        self.trainer.step(batch[:, 0])
        self.trainer.n_training_steps += 1

    def close(self) -> None: ...


class SparsifyStep:
    """EleutherAI sparsify's SparseCoder with its trainer's per-step work: decoder renorm, forward (its own bf16
    autocast, fused encoder, Triton decoder on CUDA), did-fire mask, FVU read-back, backward, parallel-gradient
    removal, Adam, dead-latent counters."""

    def __init__(self, shape: Shape, device: torch.device):
        if device.type != "cuda":
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA tensors
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        self.sae = SparseCoder(
            shape.d_in, SparseCoderConfig(num_latents=shape.d_sae, k=shape.k), device=device, dtype=torch.float32
        )
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=2e-4 / (shape.d_sae / 2**14) ** 0.5)
        self.since_fired = torch.zeros(shape.d_sae, dtype=torch.long, device=device)
        self.did_fire = torch.zeros(shape.d_sae, dtype=torch.bool, device=device)

    def step(self, batch: torch.Tensor) -> None:
        x = batch[:, 0]
        self.sae.set_decoder_norm_to_unit_norm()
        out = self.sae(x, dead_mask=self.since_fired > 10_000_000)
        self.did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # sparsify accumulates the FVU as a float every step
        (out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.since_fired += len(x)
        self.since_fired[self.did_fire] = 0
        self.did_fire.zero_()

    def close(self) -> None: ...


class MatmulFloor:
    """The issue's "dense-matmul floor": the six [B x d_in x d_sae] matmuls of a dense SAE step (two forward,
    four backward) and nothing else, in bf16 on CUDA (float32 on CPU)."""

    def __init__(self, shape: Shape, device: torch.device, batch: int):
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        g = torch.Generator(device=device).manual_seed(0)
        r = lambda *s: torch.randn(*s, device=device, generator=g).to(dt)  # noqa: E731
        self.x, self.W_enc, self.acts, self.W_dec = (
            r(batch, shape.d_in),
            r(shape.d_in, shape.d_sae),
            r(batch, shape.d_sae),
            r(shape.d_sae, shape.d_in),
        )

    def step(self, batch: torch.Tensor) -> None:
        x, W_enc, acts, W_dec = self.x, self.W_enc, self.acts, self.W_dec
        x @ W_enc, acts @ W_dec, x @ W_dec.T, acts.T @ x, x.T @ acts, acts @ W_enc.T  # noqa: B018

    def close(self) -> None: ...


# ---- measuring -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Resident memory of this process (CPU runs have no allocator statistics to read)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_steps(
    runner, batches: list[torch.Tensor], device: torch.device, warmup: int, steps: int, repeats: int
) -> float:
    """Median over `repeats` of the mean seconds per step over `steps` steps, after `warmup` steps."""
    feed = cycle(batches)
    for _ in range(warmup):
        runner.step(next(feed))
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            runner.step(next(feed))
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def measure(name: str, make, shape: Shape, batches, device, args) -> Row:
    """Build one implementation, time it, record its peak memory above the (shared) input batches."""
    row = Row(shape, name, batch=len(batches[0]))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    runner = None
    try:
        runner = make()
        row.seconds = time_steps(runner, batches, device, args.warmup, args.steps, args.repeats)
        if device.type == "cuda":
            row.peak_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    except ImportError as e:
        row.note = f"not installed ({e.name})"
    except Exception as e:  # one failing implementation must not hide the others' numbers
        row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        if runner is not None:
            runner.close()
        del runner
    print(
        f"  {name:<44} {fmt_rate(row.tokens_per_s):>10} tokens/s  {fmt_ms(row.seconds):>9} ms/step  {row.note}",
        flush=True,
    )
    return row


def memory_growth(shape: Shape, batches, device, run_dir: Path, steps: int) -> dict:
    """saelab TopK for `steps` steps: allocated (CUDA) or resident (CPU) memory after warm-up and at the end."""
    runner = SaelabStep("topk", shape, device, batches, run_dir)
    feed = cycle(batches)
    read = (lambda: torch.cuda.memory_allocated(device)) if device.type == "cuda" else rss_bytes
    for _ in range(min(20, steps)):
        runner.step(next(feed))
    sync(device)
    start = read()
    for _ in range(steps):
        runner.step(next(feed))
    sync(device)
    end = read()
    runner.close()
    growth = end - start
    ok = growth <= 2**20 if device.type == "cuda" else growth <= 0.05 * start
    return {
        "steps": steps,
        "start_mib": start / 2**20,
        "end_mib": end / 2**20,
        "growth_mib": growth / 2**20,
        "what": "torch.cuda.memory_allocated" if device.type == "cuda" else "process RSS",
        "ok": ok,
    }


def profile_step(shape: Shape, batches, device, run_dir: Path, steps: int = 5) -> tuple[str, list[str]]:
    """torch.profiler over saelab TopK steps: the op table, and every op given a dense [B, d_sae] tensor (the
    full-matrix passes issue 6 wants gone; the encoder matmul and the top-k read are the ones that stay). The
    sparse backward's CSR matrix is [d_sae, B] with B * k entries, so it is not listed."""
    from torch.profiler import ProfilerActivity, profile

    runner = SaelabStep("topk", shape, device, batches, run_dir)
    for i in range(3):
        runner.step(batches[i % len(batches)])
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            runner.step(batches[i % len(batches)])
        sync(device)
    runner.close()
    events = prof.key_averages(group_by_input_shape=True)
    table = events.table(
        sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
        row_limit=30,
        max_name_column_width=40,
        max_shapes_column_width=70,
    )
    full = [len(batches[0]), shape.d_sae]
    template_only = {
        "aten::new_empty",
        "aten::new_zeros",
        "aten::resolve_conj",
        "aten::detach",
        "aten::alias",
        "aten::view",
        "detach",
        "aten::empty_like",
    }  # take pre for its shape/dtype, no pass over it
    big = sorted({f"{e.key} {e.input_shapes}" for e in events if full in e.input_shapes and e.key not in template_only})
    return table, big


def fvu_check(shape: Shape, batches, heldout: torch.Tensor, device, run_dir: Path, steps: int) -> dict:
    """Train TopK `steps` steps twice from the same init on the same batches: the fast path as the trainer runs
    it (bf16 autocast on CUDA) and the fp32 reference path (no autocast, dense autograd); compare held-out FVU."""
    result = {"steps": steps}
    for label, fast, autocast in (("fast", True, True), ("reference", False, False)):
        runner = SaelabStep("topk", shape, device, batches, run_dir / label, fast=fast, autocast=autocast)
        for i in range(steps):
            runner.step(batches[i % len(batches)])
        with torch.no_grad():
            result[label] = float(fvu(heldout, runner.sae(heldout)))
        runner.close()
        del runner
        gc.collect()
    result["rel_diff"] = abs(result["fast"] - result["reference"]) / result["reference"]
    result["ok"] = result["rel_diff"] < 0.01
    return result


# ---- end to end: `sae train` with the model in the loop -------------------------------------------


def random_weights_copy(model: str, folder: Path) -> str:
    """A model folder with `model`'s config and tokenizer but random weights: the same compute as the real
    model, for machines where the weights cannot be carried."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = resolve_model_path(model)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(where)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(where).save_pretrained(folder)
    return str(folder)


def run_e2e(args, device: torch.device, work: Path) -> dict:
    """`sae train` in this process on the given model and text; tokens/s as the trainer measured it (activation
    generation included) and over the whole command (model loading included)."""
    model = random_weights_copy(args.e2e_model, work / "model") if args.e2e_random_weights else args.e2e_model
    out = work / "e2e-run"
    argv = (
        [
            "train",
            "--model",
            model,
            "--dataset",
            args.e2e_dataset,
            "--tokens",
            str(args.e2e_tokens),
            "--no-eval",
            "--out",
            str(out),
            "--device",
            str(device),
            "--batch-size",
            str(args.batch),
            "--log-every",
            "1",
            "--checkpoint-every",
            str(10**9),
        ]
        + (["--hook", args.e2e_hook] if args.e2e_hook else [])
        + (["--compile"] if args.compile else [])
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    code = sae_main(argv)
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"sae train failed (exit {code}); see the error above")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "argv": " ".join(["sae"] + argv),
        "tokens": lines[-1]["tokens"],
        "trainer_tokens_per_s": lines[-1]["tokens_per_s"],
        "wall_s": wall,
        "wall_tokens_per_s": lines[-1]["tokens"] / wall,
        "final_fvu": lines[-1]["fvu"],
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


# ---- report --------------------------------------------------------------------------------------


def fmt_rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None:
        return "—"
    if tokens_per_s >= 1e5:
        return f"{tokens_per_s / 1e6:.3f} M"
    return f"{tokens_per_s / 1e3:.1f} k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f}"


def version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(name)
    except PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip("-")


def report(args, device, rows: list[Row], growth: dict, fvus: dict, e2e: dict | None, profiles: dict) -> str:
    lines = [f"# Training-step throughput — {device_name(device)}", ""]
    if device.type != "cuda":
        lines += [
            "**CPU run**: these are CPU numbers for checking the benchmark and comparing implementations on this "
            "machine, not the GPU figures issue 6 asks for.",
            "",
        ]
    lines += [
        f"- date: {date.today().isoformat()}",
        f"- device: {device_name(device)}",
        f"- versions: torch {torch.__version__}, triton {version('triton')}, saelab {version('saelab')}, "
        f"sae-lens {version('sae-lens')}, eai-sparsify {version('eai-sparsify')}, python {platform.python_version()}",
        f"- command: `python scripts/bench_train.py {' '.join(sys.argv[1:])}`",
        f"- load average when done: {', '.join(f'{v:.1f}' for v in os.getloadavg())} ({os.cpu_count()} cores)",
    ]
    if not e2e:
        lines += [
            f"- batch {args.batch} tokens; activations already on the device (planted-dictionary data, "
            f"{args.n_batches} batches rotated); median of {args.repeats} × {args.steps} steps after {args.warmup} "
            "warm-up steps",
            "- a step = forward + backward + optimiser + the loop's bookkeeping; peak = max allocated above the "
            "input batches",
        ]
    lines.append("")
    if rows:
        lines += [
            "| shape | implementation | tokens/s | ms/step | × saelab topk | peak GiB | note |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            ref = next((r.seconds for r in rows if r.shape == row.shape and r.name == "saelab topk"), None)
            ratio = f"{row.seconds / ref:.2f}" if row.seconds and ref else "—"
            peak = "—" if row.peak_gib is None else f"{row.peak_gib:.2f}"
            lines.append(
                f"| {row.shape} | {row.name} | {fmt_rate(row.tokens_per_s)} | {fmt_ms(row.seconds)} | {ratio} | "
                f"{peak} | {row.note} |"
            )
        lines.append("")
    if growth:
        lines += [
            "## Memory over a long run (saelab topk)",
            "",
            "| shape | steps | measured | after warm-up MiB | at the end MiB | growth MiB | no growth |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {s} | {g['steps']} | {g['what']} | {g['start_mib']:.1f} | {g['end_mib']:.1f} | "
            f"{g['growth_mib']:+.1f} | "
            f"{'yes' if g['ok'] else 'NO'} |"
            for s, g in growth.items()
        ]
        lines.append("")
    if fvus:
        lines += [
            "## What is learned: held-out FVU after N steps, fast path vs fp32 reference (saelab topk)",
            "",
            "| shape | steps | FVU fast path | FVU fp32 reference | relative difference | within 1% |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {s} | {r['steps']} | {r['fast']:.5f} | {r['reference']:.5f} | {r['rel_diff'] * 100:.3f}% | "
            f"{'yes' if r['ok'] else 'NO'} |"
            for s, r in fvus.items()
        ]
        lines.append("")
    for s, (table, big) in profiles.items():
        lines += [
            f"## Profile of one saelab topk step, {s} (torch.profiler)",
            "",
            "Ops given a dense [batch, d_sae] tensor (the encoder matmul and the top-k read are expected; "
            "_EncoderValues/gather only read the chosen entries):",
            "",
        ]
        lines += [f"- `{b}`" for b in big] or ["- none"]
        lines += ["", "```", table.strip(), "```", ""]
    if e2e:
        lines += [
            "## End to end: `sae train` (model forward + store + training)",
            "",
            f"- command: `{e2e['argv']}`" + (" (random weights, same architecture)" if args.e2e_random_weights else ""),
            f"- {e2e['tokens']} tokens; trainer-measured {fmt_rate(e2e['trainer_tokens_per_s'])} tokens/s; "
            f"whole command {e2e['wall_s']:.1f} s = {fmt_rate(e2e['wall_tokens_per_s'])} tokens/s "
            "(model load included); "
            f"final training FVU {e2e['final_fvu']:.3f}"
            + ("" if e2e["peak_gib"] is None else f"; peak GPU memory {e2e['peak_gib']:.2f} GiB"),
            "",
        ]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--small", action="store_true", help=f"small shapes {SMALL_SHAPES} and batch 1024 (CPU, CI)")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="D_IN,D_SAE,K",
        help="a shape to measure (repeatable); replaces the default shapes",
    )
    p.add_argument("--batch", type=int, default=None, help="tokens per step (default 4096; 1024 with --small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 50; 5 with --small)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats, the median is kept (default 3; 1 with --small)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; 2 with --small)")
    p.add_argument("--n-batches", type=int, default=8, help="distinct input batches rotated through (default 8)")
    p.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="saelab architectures (those registered are run)")
    p.add_argument(
        "--impl",
        default=",".join(i for i in IMPLEMENTATIONS if "compile" not in i),
        help=f"implementations to run, from {','.join(IMPLEMENTATIONS)}",
    )
    p.add_argument(
        "--compile", action="store_true", help="also run the torch.compile variants (saelab-compile, dense-compile)"
    )
    p.add_argument(
        "--dead-tokens", type=int, default=None, help="saelab's dead-latent window (small values exercise AuxK)"
    )
    p.add_argument(
        "--long-steps",
        type=int,
        default=None,
        help="steps of the memory-growth check (default 1000; 20 with --small; 0 skips)",
    )
    p.add_argument(
        "--fvu-steps", type=int, default=None, help="steps of the FVU check (default 300; 30 with --small; 0 skips)"
    )
    p.add_argument("--profile", action="store_true", help="profile saelab topk steps (op table, full-matrix ops)")
    p.add_argument("--device", default="auto", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--out", default=None, help="report path (default benchmarks/train_speed-<device>-<date>.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    g = p.add_argument_group("end to end (--e2e): `sae train` with the model in the loop, instead of the step table")
    g.add_argument("--e2e", action="store_true")
    g.add_argument("--e2e-model", default="smollm2-135m", help="model for --e2e (default the embedded SmolLM2-135M)")
    g.add_argument(
        "--e2e-random-weights", action="store_true", help="same architecture with random weights (no weights to carry)"
    )
    g.add_argument("--e2e-dataset", default="wikitext-2", help="text for --e2e (default wikitext-2)")
    g.add_argument("--e2e-tokens", type=int, default=250_000, help="training tokens for --e2e (default 250000)")
    g.add_argument("--e2e-hook", default=None, help="hook for --e2e (default: sae train's)")
    args = p.parse_args(argv)
    small = args.small
    args.batch = args.batch or (1024 if small else 4096)
    args.steps = args.steps or (5 if small else 50)
    args.repeats = args.repeats or (1 if small else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if small else 10)
    args.long_steps = args.long_steps if args.long_steps is not None else (20 if small else 1000)
    args.fvu_steps = args.fvu_steps if args.fvu_steps is not None else (30 if small else 300)
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
    except ValueError:
        p.error(f"--shape takes D_IN,D_SAE,K integers, got {args.shape}")
    if any(len(s) != 3 for s in shapes):
        p.error(f"--shape takes three integers D_IN,D_SAE,K, got {args.shape}")
    args.shapes = [Shape(*s) for s in (shapes or (SMALL_SHAPES if small else ISSUE_SHAPES))]
    args.impl = [i for i in args.impl.split(",") if i]
    if args.compile:
        args.impl += [i for i in ("saelab-compile", "dense-compile") if i not in args.impl]
    unknown = sorted(set(args.impl) - set(IMPLEMENTATIONS))
    if unknown:
        p.error(f"unknown --impl {unknown}; choose from {','.join(IMPLEMENTATIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    print(f"device: {device_name(device)}; torch {torch.__version__}", flush=True)
    rows, growth, fvus, e2e, profiles = [], {}, {}, None, {}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work = Path(tmp)
        if args.e2e:
            e2e = run_e2e(args, device, work)
            print(
                f"e2e: {fmt_rate(e2e['trainer_tokens_per_s'])} tokens/s (trainer), "
                f"{fmt_rate(e2e['wall_tokens_per_s'])} "
                f"tokens/s (whole command, {e2e['wall_s']:.1f} s)"
            )
        for shape in [] if args.e2e else args.shapes:
            print(f"shape {shape}, batch {args.batch}", flush=True)
            batches = planted_batches(shape.d_in, args.batch, args.n_batches, device)
            archs = [a for a in args.archs.split(",") if a in ARCHITECTURES]
            run = lambda name, make: rows.append(measure(name, make, shape, batches, device, args))  # noqa: E731
            for arch in archs:
                if "saelab" in args.impl:
                    run(
                        f"saelab {arch}",
                        lambda: SaelabStep(arch, shape, device, batches, work / arch, dead_tokens=args.dead_tokens),
                    )
                if "saelab-compile" in args.impl:
                    run(
                        f"saelab {arch} + torch.compile",
                        lambda: SaelabStep(
                            arch, shape, device, batches, work / arch, compile=True, dead_tokens=args.dead_tokens
                        ),
                    )
                if arch == "topk" and "saelab-reference" in args.impl:
                    run(
                        "saelab topk, reference path (dense autograd)",
                        lambda: SaelabStep(
                            arch, shape, device, batches, work / arch, fast=False, dead_tokens=args.dead_tokens
                        ),
                    )
            dense = "plain PyTorch dense " + ("bf16 autocast + fused Adam" if device.type == "cuda" else "fp32")
            if "dense" in args.impl:
                run(dense, lambda: DenseStep(shape, device))
            if "dense-compile" in args.impl:
                run(dense + " + torch.compile", lambda: DenseStep(shape, device, compile=True))
            if "saelens" in args.impl:
                for arch in archs:
                    run(
                        f"SAELens {version('sae-lens').replace('not installed', '')} {arch}",
                        lambda: SaeLensStep(arch, shape, device, args.batch),
                    )
            if "sparsify" in args.impl:
                run(
                    f"sparsify {version('eai-sparsify').replace('not installed', '')} topk",
                    lambda: SparsifyStep(shape, device),
                )
            if "floor" in args.impl:
                run("dense-matmul floor (6 matmuls, measured)", lambda: MatmulFloor(shape, device, args.batch))
            if args.long_steps:
                growth[str(shape)] = memory_growth(shape, batches, device, work / "long", args.long_steps)
                print(
                    f"  memory growth over {args.long_steps} steps: {growth[str(shape)]['growth_mib']:+.1f} MiB "
                    f"({growth[str(shape)]['what']})",
                    flush=True,
                )
            if args.fvu_steps:
                heldout = planted_batches(shape.d_in, args.batch, 1, device, seed=1)[0][:, 0]
                fvus[str(shape)] = fvu_check(shape, batches, heldout, device, work / "fvu", args.fvu_steps)
                r = fvus[str(shape)]
                print(
                    f"  FVU after {args.fvu_steps} steps: fast {r['fast']:.5f}, fp32 reference {r['reference']:.5f} "
                    f"({r['rel_diff'] * 100:.3f}%)",
                    flush=True,
                )
            if args.profile:
                profiles[str(shape)] = profile_step(shape, batches, device, work / "profile")
                print(f"  ops with a [batch, d_sae]-sized input: {profiles[str(shape)][1]}", flush=True)
            batches = None  # free the device memory before the next shape
    text = report(args, device, rows, growth, fvus, e2e, profiles)
    print("\n" + text)
    if not args.no_write:
        path = (
            Path(args.out)
            if args.out
            else REPO / "benchmarks" / f"train_speed-{device_slug(device)}-{date.today().isoformat()}.md"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
