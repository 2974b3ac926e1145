"""The config blocks of the data side: which model on which device, which text, how the store batches it.

Every command shares ModelConfig ("which model, which device") and TextConfig or HeldOutText ("which
text"); `sae train` and `sae cache` add StoreConfig. Each field is declared once, with its help,
range and default (activations.options), and is checked when the config is made: before any model
or text is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from activations.errors import UserError
from activations.hookpoints import HOOK_KINDS
from activations.models import DEFAULT_MODEL
from activations.options import check_fields, option

DEFAULT_HOOK = "blocks.15.hook_resid_pre"  # the residual stream half-way through SmolLM2-135M's 30 blocks
MODEL_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HOOK = re.compile(r"^blocks\.\d+\.(hook_[a-z_]+)$")


def check_hook_name(name: str, flag: str) -> None:
    """A hook point's spelling (blocks.L.hook_KIND, a known kind); the layer is checked against the model later."""
    match = _HOOK.match(name)
    if not match or match.group(1) not in HOOK_KINDS:
        raise UserError(
            f"{flag} {name!r} is not a hook point name; use blocks.L.hook_KIND, e.g. {DEFAULT_HOOK} "
            f"(kinds: {', '.join(HOOK_KINDS)})."
        )


@dataclass
class ModelConfig:
    """Which model to run, in which dtype, on which device."""

    model: str = option(
        DEFAULT_MODEL, "HF hub id, local model folder, .gguf file, or 'smollm2-135m' (embedded default, offline)"
    )
    model_dtype: str | None = option(
        None, "dtype of the model forward (default: float32 on CPU, bfloat16 on CUDA)", choices=MODEL_DTYPES
    )
    device: str = option("auto", "cpu, cuda, cuda:1 … (default: cuda when available)", resume=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.model == "":
            raise UserError("--model is empty; give a hub id, a model folder, a .gguf file or smollm2-135m.")
        if not _DEVICE.match(self.device):
            raise UserError(f"--device {self.device!r} is not a device; use auto, cpu, cuda or cuda:N.")


@dataclass
class SAEModelConfig(ModelConfig):
    """ModelConfig for commands that open a trained SAE: the model defaults to the one it was trained on."""

    model: str | None = option(None, "model to run (default: the one the SAE was trained on)")


@dataclass
class TextConfig:
    """Which text: a named corpus, local files or an HF dataset, and which split and field of it."""

    dataset: str = option(
        "wikitext-2",
        "'wikitext-2', 'tinyshakespeare', a local .txt/.jsonl/.parquet file or folder, or an HF dataset id",
    )
    dataset_config: str | None = option(None, "HF dataset config name (e.g. wikitext-2-raw-v1)")
    split: str = option("train", "dataset split to read")
    text_field: str | None = option(None, "text column/field of jsonl, parquet or HF datasets (default 'text')")
    data_dir: str | None = option(None, "folder holding local copies of the named corpora", resume=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.split:
            raise UserError("--split is empty; name a split such as train or test.")


@dataclass
class HeldOutText(TextConfig):
    """TextConfig for analysis: held-out text, by default the test split of the SAE's training corpus."""

    dataset: str | None = option(None, "held-out text (default: the corpus the SAE was trained on)")
    split: str = option("test", "held-out split to read")


@dataclass
class StoreConfig:
    """How activations are produced, mixed and scaled (activations.store.ActivationStore)."""

    hooks: list[str] = option(default_factory=list, help="hook points, in the order of a batch's hook axis", cli=False)
    context_size: int = option(128, "tokens per packed context", low=2)
    model_batch_size: int = option(8, "contexts per model forward", low=1)
    batch_size: int = option(1024, "tokens per training step (under torchrun: the global batch)", low=2)
    buffer_tokens: int = option(
        65536, "shuffle buffer size in tokens; memory = buffer × hooks × d_model × 4 bytes", low=2
    )
    normalise: bool = option(True, "train on raw activations (no mean-norm scaling)", flag="--no-normalise")
    skip_special: bool = option(True, "drop BOS/EOS/pad positions", cli=False)
    skip_first: bool = option(
        True, "drop each context's first position (an attention sink, norm ~100× the rest)", cli=False
    )
    prepend_bos: bool | None = option(None, "None: as the tokenizer expects", cli=False)
    seed: int = option(0, "seed of the shuffle", cli=False)
    device: str = option("cpu", "where batches are delivered (and the buffer lives)", cli=False)
    epochs: int | None = option(None, "passes over the text; None loops until the consumer stops", cli=False)
    # data-parallel ranks: this one runs model batches rank, rank + world_size, ... of the shared stream
    rank: int = option(0, "this process's rank", cli=False)
    world_size: int = option(1, "how many ranks share the stream", cli=False)
    extra: dict = option(default_factory=dict, help="anything else, kept", cli=False)

    def __post_init__(self) -> None:
        check_fields(self)


def pick_device(name: str) -> str:
    """'auto' means CUDA when available, else CPU; CUDA asked for on a machine without it is a UserError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is available; use --device cpu.")
    return name


def model_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a --model-dtype name (None: the loader's default)."""
    return None if name is None else getattr(torch, name)
