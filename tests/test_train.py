"""Trainer: learns on a real (tiny) model's activations, logs, checkpoints, resumes, stops on NaN."""

import json

import pytest
import torch

from activations.errors import UserError
from activations.sources import open_text_source
from activations.store import ActivationStore, StoreConfig
from sae.config import SAEConfig
from sae.io import load_sae
from sae.registry import make_sae
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.init import geometric_median
from training.schedule import lr_factor
from training.trainer import Trainer

HOOK = "blocks.2.hook_resid_post"


def _setup(lm, run_dir, tokens=24_576, lr=3e-3, seed=0, **train_kw):
    source = open_text_source("tinyshakespeare", split="train")
    store = ActivationStore(
        lm,
        source,
        StoreConfig(hooks=[HOOK], context_size=64, model_batch_size=16, batch_size=512, buffer_tokens=4096, seed=seed),
    )
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=256, k=8, hook_name=HOOK, model_name=lm.name))
    cfg = TrainConfig(tokens=tokens, lr=lr, warmup_steps=5, log_every=1, checkpoint_every=8, seed=seed, **train_kw)
    return Trainer(sae, store, cfg, run_dir)


def test_lr_schedule_warms_up_and_decays():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    x = torch.randn(200, 4) * 0.1 + 1.0
    x[:20] = 1000.0
    median = geometric_median(x)
    assert (median - 1.0).abs().max() < 0.1
    assert (x.mean(0) - 1.0).abs().max() > 50


def test_trainer_learns_logs_and_saves(tiny_llama, tmp_path):
    trainer = _setup(tiny_llama, tmp_path)
    sae = trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, trainer.total_steps + 1))
    assert lines[-1]["fvu"] < 0.7 * lines[0]["fvu"]
    assert lines[-1]["l0"] == pytest.approx(8.0)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)
    loaded = load_sae(tmp_path)
    assert loaded.cfg.norm_scale == pytest.approx(trainer.store.scales[HOOK])
    x = torch.randn(5, tiny_llama.d_model)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_resume_continues_from_the_checkpoint(tiny_llama, tmp_path):
    """Stopped after step 20 and resumed from its step-16 checkpoint (shuffle buffer included), the run ends
    bit for bit where an uninterrupted one does."""
    whole = _setup(tiny_llama, tmp_path / "whole").train()
    first = _setup(tiny_llama, tmp_path)
    first.train(stop_after_steps=20)  # "killed" after step 20; last checkpoint at step 16
    ckpt_sae, state = load_checkpoint(tmp_path)
    assert state["step"] == 16 and state["tokens"] == 16 * 512
    assert not (tmp_path / "sae_weights.safetensors").exists()  # no final SAE from an unfinished run

    second = _setup(tiny_llama, tmp_path)
    second.sae.load_state_dict(ckpt_sae.state_dict())
    second.store = ActivationStore(
        tiny_llama,
        second.store.source,
        second.store.cfg,
        scales=state["store_scales"],
        skip_contexts=state["contexts_consumed"],
    )
    assert state["contexts_consumed"] > 0
    second.train(resume_state=state)
    assert second.step == second.total_steps
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, second.total_steps + 1))  # each step logged once, none lost
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["fvu"] < 0.55
    for name, value in whole.state_dict().items():
        assert torch.equal(second.sae.state_dict()[name], value), name
    assert load_sae(tmp_path).cfg.norm_scale == pytest.approx(state["store_scales"][HOOK])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    _setup(tiny_llama, tmp_path).train(stop_after_steps=8)  # healthy until its step-8 checkpoint
    _, good = load_checkpoint(tmp_path)
    trainer = _setup(tiny_llama, tmp_path, lr=1e30, grad_clip=0.0)  # resumed with a learning rate that blows up
    trainer.sae.load_state_dict(_.state_dict())
    with pytest.raises(UserError, match=r"training loss became (nan|inf).*last good checkpoint \(step 8\).*--lr"):
        trainer.train(resume_state=good)
    sae, state = load_checkpoint(tmp_path)  # still loads, finite
    assert state["step"] == 8
    assert all(torch.isfinite(p).all() for p in sae.parameters())
