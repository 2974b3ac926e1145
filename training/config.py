"""The trainer's options, one dataclass, saved with the run so `--resume` continues identically."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainConfig:
    """How long and how to optimise; architecture sizes live in SAEConfig, data in StoreConfig."""

    tokens: int = 250_000                 # training budget in activation tokens
    lr: float | None = None               # None: 2e-3 / sqrt(d_sae / 4096) (1/sqrt(width) as Gao et al. 2024)
    warmup_steps: int = 50
    decay_fraction: float = 0.2           # linear decay to 0 over the last fraction of steps
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    b_dec_init: str = "geometric_median"  # or "mean" or "zeros"
    dead_tokens: int | None = None        # a latent is dead after this many tokens without firing (None: min(10M, tokens/5))
    log_every: int = 10                   # steps between metrics.jsonl lines
    checkpoint_every: int = 100           # steps between checkpoints
    wandb: bool = False
    wandb_project: str = "saelab"
    device: str = "cpu"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
