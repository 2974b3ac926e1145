"""Shared fixtures: the real embedded tokenizer, and tiny randomly initialised HF models built here.

The tiny models use the real SmolLM2 tokenizer (vocabulary 49152) so text flows through exactly as it
does for the embedded default, only the transformer is small and random.
"""

from __future__ import annotations

import pytest
import torch

from activations.models import LoadedModel, resolve_model_path


def pytest_collection_modifyitems(config, items):
    """GPU tests skip without CUDA (with a reason)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; runs on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    """Folder of the embedded default converted to float safetensors (converted once, then cached)."""
    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def _tiny(kind: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(cfg)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> LoadedModel:
    return LoadedModel(model=_tiny("llama", tokenizer), tokenizer=tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer) -> LoadedModel:
    return LoadedModel(model=_tiny("gpt2", tokenizer), tokenizer=tokenizer, name="tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama) -> str:
    """The tiny Llama saved as a local HF model folder, for CLI tests that load models by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.model.save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a busy 2-core box: one intra-op thread is faster and stable (opt in per module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
