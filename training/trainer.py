"""The training loop: ActivationStore batches → SAE updates, with logging, checkpoints and resume.

Each step is training.step.train_step (forward under bf16 autocast on CUDA, backward, drop the decoder-
gradient component parallel to each row, clip, Adam, re-normalise decoder rows); around it the trainer
stops on a non-finite loss, counts which latents fired (for AuxK's dead set), logs and checkpoints.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from activations.errors import UserError
from activations.shuffle import ShuffledActivations
from sae.base import SAE
from sae.io import save_sae
from training.checkpoint import checkpoint_dir, save_checkpoint
from training.config import TrainConfig
from training.data import ActivationBatches
from training.distributed import SingleProcess
from training.init import initial_b_dec
from training.l0_target import coefficient_name, steer
from training.log import MetricsLog, NoLog
from training.schedule import lr_factor
from training.step import StepResult, train_step

COMPILE_BACKEND = "inductor"  # torch.compile backend for Trainer(compile=True); tests use "aot_eager"


def default_lr(d_sae: int) -> float:
    """Learning rate scaled as 1/sqrt(width) (Gao et al. 2024), 2e-3 at 4096 latents: tuned for short runs
    (benchmarks/defaults.md); long runs on large batches do better nearer Gao et al.'s 2e-4 at 16k latents."""
    return 2e-3 / math.sqrt(d_sae / 4096)


class Trainer:
    """Trains one SAE on one hook of a store (index `hook_index` of the store's hooks; a transcoder
    reconstructs hook `target_index`). train() runs the loop; begin/train_step/end let training.multi
    step several trainers on the same batches.

    `parallel` (training.distributed) says how ranks share the work; the default is one process.
    """

    def __init__(
        self,
        sae: SAE,
        store: ActivationBatches,
        cfg: TrainConfig,
        run_dir: str | Path,
        hook_index: int = 0,
        run_config: dict | None = None,
        parallel: SingleProcess | None = None,
        target_index: int | None = None,
        compile: bool = False,
    ):
        """Build the optimiser and dead-latent counters; `parallel` supplies the forward (DDP), clip and variance."""
        self.sae, self.store, self.cfg, self.hook_index = sae, store, cfg, hook_index
        self.target_index = target_index  # a transcoder reconstructs this hook of the store's batches
        self.show_progress = True  # False when a MultiTrainer shows one bar for all its trainers
        self.saves_data = True  # checkpoints carry the store's state; a MultiTrainer leaves that to one trainer
        self.last_metrics: dict = {}
        self.parallel = parallel or SingleProcess()
        self.run_dir = Path(run_dir)
        self.run_config = run_config or {}
        self.device = torch.device(cfg.device)
        self.batch_size = store.batch_size * self.parallel.world_size  # a data-parallel step: every rank's share
        self.total_steps = max(1, math.ceil(cfg.tokens / self.batch_size))
        self.lr = cfg.lr if cfg.lr is not None else default_lr(sae.cfg.d_sae)
        self.optimizer = torch.optim.Adam(
            sae.optimizer_groups(), lr=self.lr, betas=cfg.adam_betas, fused=self.device.type == "cuda"
        )
        self.dead_tokens = cfg.dead_tokens or max(self.batch_size, min(10_000_000, cfg.tokens // 5))
        self.step, self.tokens = 0, 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        # bf16 autocast on CUDA around the training forward; benchmarks set nullcontext() for the fp32 reference
        self.autocast: AbstractContextManager = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        )
        self.forward = self.parallel.wrap(sae)
        if compile:  # --compile: torch.compile the training forward (the backward follows it); first steps are slow
            self.forward = torch.compile(self.forward, backend=COMPILE_BACKEND)

    # ---- state for checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a checkpoint needs to resume exactly: step, optimiser, dead counters, RNGs, and the store's
        state (every rank's shuffle buffer, RNG and stream position; plain values and tensors only)."""
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer": self.parallel.optimizer_state(self.optimizer, self.sae),
            "tokens_since_fired": self.tokens_since_fired,
            "store_scales": self.store.scales,
            "contexts_consumed": self.store.contexts_consumed,
            "torch_rng": torch.get_rng_state(),
            "data_positions": self.parallel.data_positions(self.store.contexts_consumed),  # one per rank
            "train_config": self.cfg.to_dict(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.saves_data and isinstance(self.store, ShuffledActivations):  # (a layer split resumes by position)
            state["data_states"] = self.parallel.data_states(self.store.state_dict())  # one per rank
        return state

    def load_state_dict(self, state: dict, restore_data: bool = True) -> None:
        """Restore a checkpoint's trainer state (the SAE's weights are loaded separately) and, with
        `restore_data`, put the store back where the checkpoint left it (older checkpoints: by position only)."""
        saved = [group.get("param_names") for group in state["optimizer"]["param_groups"]]
        built = [group["param_names"] for group in self.optimizer.param_groups]
        if saved != built:  # e.g. written before the decoder had its own learning rate
            raise UserError(
                f"the checkpoint's optimiser groups its parameters as {saved}, this saelab as {built} (the "
                "learning-rate scales of sae.base.SAE.lr_scales changed since it was written); resume it with the "
                "saelab version that wrote it, or start a new run: its weights still load for sae eval / inspect."
            )
        self.step, self.tokens = state["step"], state["tokens"]
        self.sae.resume_at(self.step)
        self.optimizer.load_state_dict(self.parallel.local_optimizer_state(state["optimizer"], self.sae))
        for group in self.optimizer.param_groups:  # a resumed run may be given a new --lr
            group["initial_lr"] = self.lr
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        data = state.get("data_states")
        if restore_data and data and isinstance(self.store, ShuffledActivations):
            self.store.load_state_dict(data[self.parallel.rank])

    # ---- the loop -----------------------------------------------------------------------
    def train(self, resume_state: dict | None = None, stop_after_steps: int | None = None) -> SAE:
        """Run to the token budget (or `stop_after_steps` more steps); returns the trained SAE."""
        self.begin(resume_state)
        batches = iter(self.store)
        steps_run = 0
        try:
            while not self.done:
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    break
                if not self.train_step(next(batches, None)):
                    break
                steps_run += 1
        finally:
            self.end()
        return self.sae

    @property
    def done(self) -> bool:
        """Whether the token budget has been trained."""
        return self.step >= self.total_steps

    def begin(self, resume_state: dict | None = None, restore_data: bool = True) -> None:
        """Open the log (and the progress bar), and load `resume_state` when resuming (the store's state too, with
        `restore_data`); call before train_step. The log keeps only the steps trained so far, each once."""
        writes = self.parallel.writes  # only one rank writes the run folder
        if writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = (
            MetricsLog(self.run_dir, self.cfg.wandb, self.cfg.wandb_project, self.run_config, resume_state is not None)
            if writes
            else NoLog()
        )
        if resume_state is not None:
            self.load_state_dict(resume_state, restore_data)
        self._log.truncate_after(self.step)  # lines past the checkpoint (or of a start that never checkpointed)
        self._last_good = self.step if resume_state is not None else None
        self._bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not writes or not self.show_progress,
        )
        self._started, self._tokens_at_start = time.time(), self.tokens

    def train_step(self, batch: torch.Tensor | None) -> bool:
        """One optimiser step on a store batch `[B, n_hooks, d]` (None: the data ran out); False when out of data."""
        sae, cfg, writes = self.sae, self.cfg, self.parallel.writes
        step_tokens = self.parallel.step_tokens(0 if batch is None else len(batch))
        if step_tokens == 0:  # out of data (on any rank)
            return False
        x = self.parallel.step_input(batch[:, self.hook_index].to(self.device))
        target = (
            None if self.target_index is None else self.parallel.step_input(batch[:, self.target_index].to(self.device))
        )  # a transcoder's output hook
        if self.step == 0 and cfg.b_dec_init != "zeros":  # b_dec lives in the space the SAE reconstructs
            first = self.parallel.global_batch(x if target is None else target)
            sae.b_dec.data.copy_(initial_b_dec(first, cfg.b_dec_init))
        if self.step == 0 and sae.cfg.target_l0 is not None:  # start at the target sparsity (penalty architectures)
            sae.calibrate_sparsity(self.parallel.global_batch(x), sae.cfg.target_l0)

        factor = lr_factor(self.step, self.total_steps, cfg.warmup_steps, cfg.decay_fraction)
        sae.set_progress(self.step / self.total_steps)
        result = train_step(
            sae,
            self.optimizer,
            x,
            target=target,
            dead_mask=self.tokens_since_fired >= self.dead_tokens,
            lr=self.lr * factor,
            grad_clip=cfg.grad_clip,
            autocast=self.autocast,
            check_loss=self._check_loss,
            forward=self.forward,
            variance=self.parallel.variance,
            clip=self.parallel.clip_grad_norm_,
        )
        self._count_fired(self.parallel.any(result.out.fired), step_tokens)
        if sae.cfg.target_l0 is not None:  # --target-l0: the coefficient follows this step's L0 (every rank's)
            steer(sae, self.parallel.mean(result.out.l0).item(), sae.cfg.target_l0)

        self.step += 1
        self.tokens += step_tokens
        self._bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            tokens_per_s = (self.tokens - self._tokens_at_start) / max(time.time() - self._started, 1e-9)
            self.last_metrics = self._metrics(x if target is None else target, result, tokens_per_s)
            self._log.log(self.last_metrics)
            m = self.last_metrics
            self._bar.set_postfix(
                loss=f"{m['loss']:.4f}", l0=f"{m['l0']:.1f}", fvu=f"{m['fvu']:.3f}", dead=f"{m['dead_fraction']:.2f}"
            )
        if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
            self._record_scale()
            state, full = self.state_dict(), self.parallel.full_sae(sae)  # latent shards are gathered to rank 0
            if writes:
                save_checkpoint(self.run_dir, full, state)
            self._last_good = self.step
        return True

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Stop with a UserError (before the weights change) when the step's loss, over all ranks, is not finite."""
        loss = self.parallel.mean(loss)
        if torch.isfinite(loss):
            return
        where = (
            f"the last good checkpoint (step {self._last_good}) is in {checkpoint_dir(self.run_dir)}"
            if self._last_good is not None
            else "no checkpoint was written yet"
        )
        raise UserError(
            f"training loss became {loss.item()} at step {self.step}; {where}. "
            f"Lower the learning rate (now {self.lr:g}, e.g. --lr {self.lr / 10:g}) and "
            "resume with --resume, or check the activations for extreme values."
        )

    def end(self) -> None:
        """Close the bar and log; a finished run also writes the final SAE into the run folder."""
        self._bar.close()
        self._log.close()
        if self.done:
            self._record_scale()
            full = self.parallel.full_sae(self.sae)
            if self.parallel.writes:
                save_sae(full, self.run_dir)

    def _record_scale(self) -> None:
        """Store the normalisation factor with the SAE so analysis can map raw activations in."""
        scales = self.store.scales
        if scales:
            self.sae.cfg.norm_scale = float(scales[self.store.hook_names[self.hook_index]])
            if self.target_index is not None:
                self.sae.cfg.norm_scale_out = float(scales[self.store.hook_names[self.target_index]])

    def _count_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Add this step's tokens to every latent's counter and reset those that fired (mask or indices)."""
        # masked_fill_/index_fill_: no host sync (a boolean index waits for the GPU)
        self.tokens_since_fired += n_tokens
        if fired.dtype == torch.bool:
            self.tokens_since_fired.masked_fill_(fired, 0)
        else:
            self.tokens_since_fired.index_fill_(0, fired.flatten(), 0)

    @torch.no_grad()
    def _metrics(self, x: torch.Tensor, result: StepResult, tokens_per_s: float) -> dict:
        """One metrics line for this step: loss terms, FVU, L0 over the global batch, dead fraction, lr, speed."""
        stats = self.parallel.step_stats(x, result.out)  # over the global batch when ranks share it
        metrics = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": stats.pop("loss"),
            "fvu": stats.pop("fvu"),
            "l0": stats.pop("l0"),
            "dead_fraction": (self.tokens_since_fired >= self.dead_tokens).float().mean().item(),
            "lr": result.lr,
            "tokens_per_s": tokens_per_s,
        }
        metrics.update(stats)
        if self.sae.cfg.target_l0 is not None:  # the coefficient --target-l0 has steered to
            metrics["coefficient"] = getattr(self.sae.cfg, coefficient_name(self.sae.cfg.architecture))
        return metrics
