"""The training loop: ActivationStore batches → SAE updates, with logging, checkpoints and resume.

Each step: forward (bf16 autocast on CUDA), backward, drop the decoder-gradient component parallel
to each row, clip, Adam, re-normalise decoder rows, count which latents fired (for AuxK's dead set).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from activations.errors import UserError
from sae.base import SAE
from sae.io import save_sae
from training.checkpoint import checkpoint_dir, save_checkpoint
from training.config import TrainConfig
from training.init import initial_b_dec
from training.log import MetricsLog
from training.schedule import lr_factor


def default_lr(d_sae: int) -> float:
    """Gao et al. 2024: learning rate scaled as 1/sqrt(width), 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(d_sae / 16384)


class Trainer:
    """Trains one SAE on one hook of a store (index `hook_index` of the store's hooks)."""

    def __init__(self, sae: SAE, store: Iterable[torch.Tensor], cfg: TrainConfig, run_dir: str | Path,
                 hook_index: int = 0, run_config: dict | None = None):
        self.sae, self.store, self.cfg, self.hook_index = sae, store, cfg, hook_index
        self.run_dir = Path(run_dir)
        self.run_config = run_config or {}
        self.device = torch.device(cfg.device)
        self.batch_size = store.cfg.batch_size
        self.total_steps = max(1, math.ceil(cfg.tokens / self.batch_size))
        self.lr = cfg.lr if cfg.lr is not None else default_lr(sae.cfg.d_sae)
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=self.lr, betas=cfg.adam_betas,
                                          fused=self.device.type == "cuda")
        self.dead_tokens = cfg.dead_tokens or max(self.batch_size, min(10_000_000, cfg.tokens // 5))
        self.step, self.tokens = 0, 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)

    # ---- state for checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, "tokens": self.tokens, "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired, "store_scales": self.store.scales,
            "contexts_consumed": self.store.contexts_consumed, "torch_rng": torch.get_rng_state(),
            "train_config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a resumed run may be given a new --lr
            group["initial_lr"] = self.lr
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        torch.set_rng_state(state["torch_rng"])

    # ---- the loop -----------------------------------------------------------------------
    def train(self, resume_state: dict | None = None, stop_after_steps: int | None = None) -> SAE:
        """Run to the token budget (or `stop_after_steps` more steps); returns the trained SAE."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.run_dir, self.cfg.wandb, self.cfg.wandb_project, self.run_config, resume_state is not None)
        if resume_state is not None:
            self.load_state_dict(resume_state)
            log.truncate_after(self.step)
        last_good = self.step if resume_state is not None else None
        sae, cfg = self.sae, self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        started, tokens_at_start, steps_run = time.time(), self.tokens, 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        batches = iter(self.store)
        try:
            while self.step < self.total_steps:
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    break
                batch = next(batches, None)
                if batch is None:
                    break
                x = batch[:, self.hook_index].to(self.device)
                if self.step == 0 and cfg.b_dec_init != "zeros":
                    sae.b_dec.data.copy_(initial_b_dec(x, cfg.b_dec_init))

                dead_mask = self.tokens_since_fired >= self.dead_tokens
                sae.set_progress(self.step / self.total_steps)
                with autocast:
                    out = sae.training_forward(x, dead_mask)
                if not torch.isfinite(out.loss):
                    where = f"the last good checkpoint (step {last_good}) is in {checkpoint_dir(self.run_dir)}" \
                        if last_good is not None else "no checkpoint was written yet"
                    raise UserError(
                        f"training loss became {out.loss.item()} at step {self.step}; {where}. "
                        f"Lower the learning rate (now {self.lr:g}, e.g. --lr {self.lr / 10:g}) and "
                        "resume with --resume, or check the activations for extreme values."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                sae.remove_parallel_grad()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
                factor = lr_factor(self.step, self.total_steps, cfg.warmup_steps, cfg.decay_fraction)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr * factor
                self.optimizer.step()
                sae.normalise_decoder()
                self._count_fired(out.fired, len(x))

                self.step += 1
                steps_run += 1
                self.tokens += len(x)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    metrics = self._metrics(x, out, factor, (self.tokens - tokens_at_start) / max(time.time() - started, 1e-9))
                    log.log(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", l0=f"{metrics['l0']:.1f}", fvu=f"{metrics['fvu']:.3f}",
                                    dead=f"{metrics['dead_fraction']:.2f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self._record_scale()
                    save_checkpoint(self.run_dir, sae, self.state_dict())
                    last_good = self.step
        finally:
            bar.close()
            log.close()
        if self.step >= self.total_steps:
            self._record_scale()
            save_sae(sae, self.run_dir)
        return sae

    def _record_scale(self) -> None:
        """Store the normalisation factor with the SAE so analysis can map raw activations in."""
        scales = getattr(self.store, "scales", None)
        if scales:
            self.sae.cfg.norm_scale = float(scales[self.store.hook_names[self.hook_index]])

    def _count_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        if fired.dtype == torch.bool:
            self.tokens_since_fired[fired] = 0
        else:
            self.tokens_since_fired[fired.flatten()] = 0

    @torch.no_grad()
    def _metrics(self, x: torch.Tensor, out, lr_factor_now: float, tokens_per_s: float) -> dict:
        x_hat = out.x_hat.float()
        fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12)
        metrics = {
            "step": self.step, "tokens": self.tokens, "loss": out.loss.item(), "fvu": fvu.item(),
            "l0": float(out.l0), "dead_fraction": (self.tokens_since_fired >= self.dead_tokens).float().mean().item(),
            "lr": self.lr * lr_factor_now, "tokens_per_s": tokens_per_s,
        }
        metrics.update({k: float(v) for k, v in out.losses.items()})
        return metrics
