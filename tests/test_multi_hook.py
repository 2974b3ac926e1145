"""Several hooks from one forward pass: hook_mlp_in, MultiTrainer (same result as one trainer per hook,
resume with hooks at different steps), the RUN/<hook>/ layout on the command line, and the transcoder."""

import json
import shutil

import pytest
import torch

from activations.hookpoints import arch_table, parse_hook, patched, run_with_cache, valid_hook_names
from activations.sources import open_text_source
from activations.store import ActivationStore, StoreConfig
from sae.cli import main
from sae.config import SAEConfig
from sae.io import load_sae
from sae.registry import make_sae
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.multi import MultiTrainer, resume_point
from training.trainer import Trainer

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
STORE = dict(context_size=64, model_batch_size=8, batch_size=256, buffer_tokens=1024, seed=1)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_mlp_in_is_what_the_mlp_reads(name, request):
    lm = request.getfixturevalue(name)
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog again and again.", return_tensors="pt").input_ids
    hooks = [parse_hook(f"blocks.1.{kind}", lm.model) for kind in ("hook_mlp_in", "hook_mlp_out")]
    cache = run_with_cache(lm.model, ids, hooks)
    mlp = lm.model.get_submodule(arch_table(lm.model).layers)[1].get_submodule(arch_table(lm.model).mlp)
    torch.testing.assert_close(mlp(cache["blocks.1.hook_mlp_in"]), cache["blocks.1.hook_mlp_out"])
    assert "blocks.3.hook_mlp_in" in valid_hook_names(lm.model)
    clean = lm.model(ids).logits
    with patched(lm.model, hooks[0], torch.zeros_like):
        assert not torch.allclose(lm.model(ids).logits, clean)
    torch.testing.assert_close(lm.model(ids).logits, clean)


def _source():
    return open_text_source("tinyshakespeare", split="train")


def _trainer(lm, store, hook_index, run_dir, tokens=2048):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=64, d_sae=128, k=8, hook_name=store.hook_names[hook_index]))
    cfg = TrainConfig(tokens=tokens, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=2)
    return Trainer(sae, store, cfg, run_dir, hook_index=hook_index)


def test_one_forward_trains_each_hook_as_if_alone(tiny_llama, tmp_path):
    store = ActivationStore(tiny_llama, _source(), StoreConfig(hooks=HOOKS, **STORE))
    trainers = [_trainer(tiny_llama, store, i, tmp_path / "multi" / h) for i, h in enumerate(HOOKS)]
    together = MultiTrainer(trainers, store).train()
    for i, hook in enumerate(HOOKS):
        alone_store = ActivationStore(tiny_llama, _source(), StoreConfig(hooks=[hook], **STORE))
        alone = _trainer(tiny_llama, alone_store, 0, tmp_path / "alone" / hook).train()
        for (name, a), (_, b) in zip(alone.state_dict().items(), together[i].state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{hook} {name}")
        assert load_sae(tmp_path / "multi" / hook).cfg.norm_scale == pytest.approx(store.scales[hook])
        lines = (tmp_path / "multi" / hook / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))


@pytest.mark.parametrize("behind", [1, 0])
def test_resume_when_one_hook_is_behind(tiny_llama, tmp_path, behind):
    """A kill between two hooks' checkpoints leaves the last hook one checkpoint behind (they are written in
    order): the run resumes from it bit for bit. Any hook behind (here also the first, by hand) still trains
    each step once."""

    def run(dirs, resume: bool, stop_after_steps=None) -> list[Trainer]:
        """A MultiTrainer over both hooks, resumed from each folder's checkpoint (as `sae train --resume` does)."""
        loaded = [load_checkpoint(d) for d in dirs] if resume else None
        start = resume_point([state for _, state in loaded]) if resume else None
        store = ActivationStore(
            tiny_llama,
            _source(),
            StoreConfig(hooks=HOOKS, **STORE),
            scales=start and start["store_scales"],
            skip_contexts=start["contexts_consumed"] if start else 0,
        )
        trainers = [_trainer(tiny_llama, store, i, d) for i, d in enumerate(dirs)]
        for trainer, (sae, _) in zip(trainers, loaded or []):
            trainer.sae.load_state_dict(sae.state_dict())
        MultiTrainer(trainers, store).train([state for _, state in loaded] if resume else None, stop_after_steps)
        return trainers

    whole = run([tmp_path / "whole" / h for h in HOOKS], resume=False)
    dirs = [tmp_path / h for h in HOOKS]
    run(dirs, resume=False, stop_after_steps=3)  # "killed" after step 3: both checkpointed at step 2
    shutil.copytree(dirs[behind] / "checkpoint", tmp_path / "step2")
    run(dirs, resume=True, stop_after_steps=3)  # killed again: both at step 4 ...
    shutil.rmtree(dirs[behind] / "checkpoint")  # ... but one hook's step-4 checkpoint never landed
    shutil.copytree(tmp_path / "step2", dirs[behind] / "checkpoint")
    states = [load_checkpoint(d)[1] for d in dirs]
    assert [s["step"] for s in states] == [2 + 2 * (i == 1 - behind) for i in range(2)]
    assert resume_point(states) is states[behind] and ("data_states" in states[behind]) == (behind == 1)
    for trainer, reference, d in zip(run(dirs, resume=True), whole, dirs):
        assert trainer.step == trainer.total_steps == 8
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 9))  # each step logged once: the hook ahead sat out its batches
        assert (d / "sae_weights.safetensors").exists()
        if behind == 1:
            for name, value in reference.sae.state_dict().items():
                assert torch.equal(trainer.sae.state_dict()[name], value), name


SMALL = (
    "--dataset tinyshakespeare --batch-size 256 --buffer-tokens 1024 --context-size 64 --expansion 2 --k "
    "8 --checkpoint-every 4 --device cpu --no-eval"
).split()


def test_hooks_on_the_command_line_write_a_folder_per_hook_and_resume(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", tiny_llama_dir, *SMALL, "--hooks", ",".join(HOOKS), "--out", str(run)]
    assert main([*argv, "--tokens", "1024"]) == 0
    assert (run / "run_config.json").is_file() and not (run / "cfg.json").exists()
    for hook in HOOKS:
        for name in ("cfg.json", "sae_weights.safetensors", "metrics.jsonl", "checkpoint"):
            assert (run / hook / name).exists(), (hook, name)
        assert load_sae(run / hook).cfg.hook_name == hook
    assert main([*argv, "--tokens", "2048", "--resume"]) == 0  # continue both to a larger budget
    for hook in HOOKS:
        steps = [json.loads(line)["step"] for line in (run / hook / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 8 and len(steps) == len(set(steps))
    assert (
        main(
            [
                "eval",
                str(run),
                "--model",
                tiny_llama_dir,
                "--dataset",
                "tinyshakespeare",
                "--tokens",
                "256",
                "--device",
                "cpu",
            ]
        )
        == 0
    )  # the run's root evaluates every hook's SAE
    for hook in HOOKS:
        ev = json.loads((run / hook / "eval.json").read_text())
        assert ev["hook"] == hook and 0 < ev["fvu"] < 1.5 and ev["tokens"] >= 256
    assert (
        main(
            [
                "train",
                "--model",
                tiny_llama_dir,
                *SMALL,
                "--hooks",
                "blocks.1.hook_resid_post,blocks.9.hook_resid_post",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "unknown hook 'blocks.9.hook_resid_post'" in capsys.readouterr().err
    assert main(["train", "--model", tiny_llama_dir, *SMALL, "--hooks", HOOKS[0], "--hook", HOOKS[1]]) == 2
    assert "either --hook (one SAE) or --hooks" in capsys.readouterr().err


def test_transcoder_trains_from_mlp_in_to_mlp_out(tiny_llama, tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "tc"
    assert (
        main(
            [
                "train",
                "--model",
                tiny_llama_dir,
                *SMALL,
                "--architecture",
                "transcoder",
                "--tokens",
                "8192",
                "--hook",
                "blocks.2.hook_mlp_in",
                "--hook-out",
                "blocks.2.hook_mlp_out",
                "--lr",
                "2e-2",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    sae = load_sae(run)
    assert (sae.cfg.hook_name, sae.cfg.hook_name_out, sae.cfg.hook_layer_out) == (
        "blocks.2.hook_mlp_in",
        "blocks.2.hook_mlp_out",
        2,
    )
    assert sae.cfg.norm_scale != 1.0 and sae.cfg.norm_scale_out != 1.0 and sae.cfg.norm_scale != sae.cfg.norm_scale_out
    # It predicts the real MLP output from the real MLP input (raw activations, each side's own scale).
    store = ActivationStore(
        tiny_llama, open_text_source("tinyshakespeare", split="test"), StoreConfig(hooks=[], context_size=64)
    )
    ids = next(store.context_batches()).tokens[:4]
    cache = run_with_cache(
        tiny_llama.model,
        ids,
        [parse_hook(h, tiny_llama.model) for h in ("blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out")],
    )
    x, y = cache["blocks.2.hook_mlp_in"][:, 1:].reshape(-1, 64), cache["blocks.2.hook_mlp_out"][:, 1:].reshape(-1, 64)
    with torch.no_grad():
        err = (sae.reconstruct_raw(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    logged = [json.loads(line)["fvu"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] < 0.85 * logged[0]
    assert err < 0.95 and abs(err - logged[-1]) < 0.25  # the raw-space error matches training's: scales are right
    # `sae eval` splices the transcoder's prediction in at the MLP output and scores it against the real output.
    assert (
        main(
            [
                "eval",
                str(run),
                "--model",
                tiny_llama_dir,
                "--dataset",
                "tinyshakespeare",
                "--tokens",
                "512",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ev = json.loads((run / "eval.json").read_text())
    assert ev["hook"] == "blocks.2.hook_mlp_in -> blocks.2.hook_mlp_out" and 6 < ev["l0"] <= 8
    assert abs(ev["fvu"] - float(err)) < 0.2 and ev["tokens"] >= 512
    for argv, message in (
        (["--architecture", "transcoder", "--hook", "blocks.2.hook_mlp_in"], "needs --hook-out"),
        (["--hook-out", "blocks.2.hook_mlp_out"], "needs --hook-out"),
    ):
        assert main(["train", "--model", tiny_llama_dir, *SMALL, *argv, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
