"""The `sae train` config tree: one object that is the command line, the saved run_config.json and the resume.

    TrainRunConfig
      model: ModelConfig        which model, dtype, device            (activations.config)
      text: TextConfig          which text                            (activations.config)
      data: DataConfig          which hooks, or an activation cache   (here)
      store: StoreConfig        context size, batches, shuffle buffer (activations.config)
      dictionary: DictionaryConfig  architecture, width, sparsity     (sae.dictionary)
      training: TrainConfig     budget, optimiser, schedule, logging  (here)
      run: RunConfig            run folder, resume, evaluation after  (here)

Every field is declared once with its help, default and range (activations.options); `resume=True`
marks the few a resumed run may change. Everything is checked when the tree is built, before any
model or text is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from activations.config import DEFAULT_HOOK, ModelConfig, StoreConfig, TextConfig, check_hook_name
from activations.errors import UserError
from activations.options import check_fields, option
from sae.dictionary import DictionaryConfig

PARALLEL_MODES = ("data", "latents", "layers")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


@dataclass
class TrainConfig:
    """How long and how to optimise, and how often to log and checkpoint (the Trainer's options)."""

    tokens: int = option(250_000, "training budget in tokens", low=1, resume=True)
    lr: float | None = option(None, "learning rate (default 2e-3/sqrt(d_sae/4096))", above=0, resume=True)
    warmup_steps: int = option(50, "linear warm-up steps, at most a tenth of the run", low=0)
    decay_fraction: float = option(0.2, "linear decay to 0 over this last fraction of the steps", low=0, high=1)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "Adam's betas", cli=False)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)", low=0)
    b_dec_init: str = option("geometric_median", "initial decoder bias from the first batch", choices=B_DEC_INITS)
    dead_tokens: int | None = option(
        None, "a latent is dead after this many tokens without firing (default min(10M, tokens/5))", low=1
    )
    log_every: int = option(5, "steps between metrics.jsonl lines", low=1, resume=True)
    checkpoint_every: int = option(20, "steps between checkpoints", low=1, resume=True)
    wandb: bool = option(False, "log to Weights & Biases (WANDB_MODE=offline works without network)", resume=True)
    wandb_project: str = option("saelab", "Weights & Biases project")
    seed: int = option(0, "random seed of the initialisation and the shuffle")
    compile: bool = option(
        False, "torch.compile the training step (faster on GPU once compiled; the first steps compile)", resume=True
    )
    parallel: str = option(
        "data",
        "under torchrun, how the processes share the work: data (each its share of every "
        "batch, DDP), latents (each a slice of every dictionary's latents, TopK only), layers "
        "(each the SAEs of its own --hooks)",
        choices=PARALLEL_MODES,
    )
    device: str = option("cpu", "the device training runs on (from --device)", cli=False)

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        check_fields(self)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class DataConfig:
    """Which hooks to train on (one SAE each), a transcoder's output hook, or an activation cache to read."""

    hook: str | None = option(
        None,
        f"hook point, e.g. blocks.6.hook_resid_post (default {DEFAULT_HOOK}; with "
        "--activations: every hook of the cache)",
    )
    hooks: list[str] | None = option(
        None,
        "several hook points, comma-separated: one SAE each, all from the same "
        "model forward (run folder: RUN/<hook>/ per hook)",
    )
    hook_out: str | None = option(
        None,
        "transcoder: the hook it reconstructs from --hook, e.g. --hook "
        "blocks.3.hook_mlp_in --hook-out blocks.3.hook_mlp_out",
    )
    activations: str | None = option(
        None, "train from an activation cache written by `sae cache` instead of running the model", metavar="DIR"
    )

    def __post_init__(self) -> None:
        if self.hook and self.hooks:
            raise UserError("give either --hook (one SAE) or --hooks (one SAE per hook), not both.")
        if self.hooks is not None and not self.hooks:
            raise UserError("--hooks is empty; give one or more hook points, e.g. --hooks blocks.6.hook_resid_post")
        if self.hooks and len(set(self.hooks)) != len(self.hooks):
            raise UserError(f"--hooks lists a hook twice ({','.join(self.hooks)}); give each hook once.")
        for flag, names in (("--hook", [self.hook]), ("--hooks", self.hooks or []), ("--hook-out", [self.hook_out])):
            for name in names:
                if name is not None:
                    check_hook_name(name, flag)

    def hook_list(self, cached: list[str] | None = None) -> list[str]:
        """The hooks to train one SAE each on (an activation cache's own hooks when none is named)."""
        if self.hooks:
            return list(self.hooks)
        if self.hook:
            return [self.hook]
        if cached:
            return [h for h in cached if h != self.hook_out]
        return [DEFAULT_HOOK]


@dataclass
class RunConfig:
    """The run folder, resuming it, and the evaluation that follows training."""

    out: str | None = option(None, "run folder (default runs/<model>-<hook>-<architecture>)")
    resume: bool = option(False, "continue the run in --out from its last checkpoint")
    evaluate: bool = option(True, "skip the evaluation that follows training", flag="--no-eval", resume=True)
    eval_tokens: int = option(16384, "held-out tokens for the final evaluation", low=1, resume=True)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class TrainRunConfig:
    """Everything `sae train` needs, as the command line, run_config.json and --resume see it."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata=dict(help="model"))
    text: TextConfig = field(default_factory=TextConfig, metadata=dict(help="text"))
    data: DataConfig = field(default_factory=DataConfig, metadata=dict(help="hooks"))
    store: StoreConfig = field(default_factory=StoreConfig, metadata=dict(help="activation store"))
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig, metadata=dict(help="dictionary"))
    training: TrainConfig = field(default_factory=TrainConfig, metadata=dict(help="optimisation and logging"))
    run: RunConfig = field(default_factory=RunConfig, metadata=dict(help="run folder"))

    def __post_init__(self) -> None:
        """Checks that span sections."""
        transcoder = self.dictionary.architecture == "transcoder"
        if transcoder != bool(self.data.hook_out):
            raise UserError(
                "a transcoder needs --hook-out (the hook it reconstructs), e.g. --hook blocks.3.hook_mlp_in "
                "--hook-out blocks.3.hook_mlp_out; --hook-out is for --architecture transcoder only."
            )
        if self.data.hook_out and self.data.hooks and len(self.data.hooks) != 1:
            raise UserError(
                f"a transcoder reads one hook (--hook) and reconstructs --hook-out; got "
                f"{len(self.data.hooks)} input hooks. Train one transcoder per run."
            )
        if self.training.parallel == "latents" and self.dictionary.architecture != "topk":
            raise UserError(
                f"--parallel latents shards TopK dictionaries, not {self.dictionary.architecture}; use "
                "--architecture topk or --parallel data."
            )

    def out_dir(self) -> Path:
        """The run folder: --out, or runs/<model>-<hooks>-<architecture>."""
        if self.run.out:
            return Path(self.run.out)
        model = Path(self.data.activations).name if self.data.activations else Path(self.model.model).stem
        hooks = self.data.hooks or [self.data.hook or (DEFAULT_HOOK if not self.data.activations else "cache")]
        name = f"{model}-{','.join(hooks)}-{self.dictionary.architecture}"
        return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# Options of run_config.json files written before the config tree (saved as one flat "options" mapping)
# that are spelled differently now: old name -> (new name, whether the value is negated).
LEGACY_NAMES = {"no_normalise": ("normalise", True), "no_eval": ("evaluate", True)}


def from_legacy_options(options: dict) -> dict:
    """A flat options mapping of an old run_config.json in today's field names."""
    out = {}
    for key, value in options.items():
        name, negate = LEGACY_NAMES.get(key, (key, False))
        out[name] = (not value) if negate else value
    return out
