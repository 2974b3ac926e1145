"""Bad inputs and faults a user meets: one clear line, exit 2, nothing finished lost, and advice that works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from sae.cli import main
from sae.config import SAEConfig
from sae.io import save_sae
from sae.registry import make_sae

SMALL = (
    "--hook blocks.2.hook_resid_post --dataset tinyshakespeare --batch-size 512 --buffer-tokens 2048 "
    "--context-size 64 --expansion 2 --k 8 --device cpu"
).split()


def _one_line(capsys, argv: list[str], *phrases: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(tiny_llama_dir, tmp_path, capsys):
    """Killed after run_config.json, before any checkpoint: --resume says to start again, and that works."""
    run = tmp_path / "early"
    argv = ["train", "--model", tiny_llama_dir, *SMALL, "--no-eval", "--out", str(run)]
    cmd = [sys.executable, "-m", "sae", *argv, "--tokens", "4096000", "--checkpoint-every", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "run_config.json").is_file() and not (run / "checkpoint").exists()

    _one_line(capsys, [*argv, "--resume"], "no checkpoint", "without --resume")
    assert main([*argv, "--tokens", "2048", "--log-every", "1"]) == 0  # the advice, followed
    assert "stopped before its first checkpoint" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # Now it holds finished work: a fresh start is refused and the SAE is untouched.
    weights = (run / "sae_weights.safetensors").read_bytes()
    _one_line(capsys, [*argv, "--tokens", "2048"], "already holds a run", "--resume")
    assert (run / "sae_weights.safetensors").read_bytes() == weights


def test_context_longer_than_the_model_allows(tiny_llama_dir, tmp_path, capsys):
    line = _one_line(
        capsys,
        ["train", "--model", tiny_llama_dir, *SMALL, "--context-size", "1024", "--out", str(tmp_path / "r")],
        "--context-size 1024",
        "512",
    )
    assert "--context-size 512 or less" in line
    assert not (tmp_path / "r").exists()


def test_steer_with_an_sae_of_another_width(tiny_llama_dir, tmp_path, capsys):
    torch.manual_seed(0)
    save_sae(make_sae(SAEConfig(d_in=32, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post")), tmp_path / "wide")
    for argv in (
        ["steer", str(tmp_path / "wide"), "--feature", "1", "--strength", "2", "--prompt", "hi"],
        ["inspect", str(tmp_path / "wide"), "--tokens", "256"],
    ):
        _one_line(capsys, [*argv, "--model", tiny_llama_dir, "--device", "cpu"], "d_in=32", "d_model=64")


def test_unwritable_outputs_are_one_line_and_eval_still_prints_its_result(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_llama_dir, *SMALL, "--tokens", "1024", "--no-eval", "--out", str(run)]) == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    capsys.readouterr()
    _one_line(capsys, ["export", str(run), "--out", str(blocker / "x")], "a-file", "is a file, not a folder")
    train = ["train", "--model", tiny_llama_dir, *SMALL, "--tokens", "1024", "--out", str(blocker / "r")]
    _one_line(capsys, train, "a-file", "is a file, not a folder")
    cache = f"cache --model {tiny_llama_dir} --dataset tinyshakespeare --hooks blocks.1.hook_resid_post --device cpu"
    _one_line(capsys, [*cache.split(), "--out", str(blocker / "c")], "a-file", "is a file, not a folder")
    # The same for a second writer while a live process holds the run folder's lock.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from activations.lock import run_lock\n"
            f"with run_lock({str(run)!r}):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        _one_line(capsys, ["train", "--out", str(run), "--resume", "--tokens", "2048"], f"process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # eval.json cannot be written (a folder stands in its place): the result is printed all the same.
    (run / "eval.json").mkdir()
    code = main(
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
    captured = capsys.readouterr()
    assert code == 2 and "FVU" in captured.out and "eval.json" in captured.err


def test_checkpoint_states_and_unfinished_runs(tiny_llama_dir, tmp_path, capsys):
    """A trainer state missing a part, and a run that never finished handed to eval/export: one line each,
    nothing written into the checkpoint, and the advice (a new --out) works."""
    run = tmp_path / "run"
    argv = ["train", "--model", tiny_llama_dir, *SMALL, "--no-eval", "--checkpoint-every", "2"]
    assert main([*argv, "--tokens", "2048", "--out", str(run)]) == 0
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run / "checkpoint", unfinished / "checkpoint")
    shutil.copy(run / "run_config.json", unfinished / "run_config.json")
    capsys.readouterr()
    _one_line(
        capsys, ["eval", str(unfinished), "--model", tiny_llama_dir, "--device", "cpu"], "no finished SAE", "--resume"
    )
    _one_line(capsys, ["export", str(unfinished), "--out", str(tmp_path / "exported")], "no finished SAE")
    assert sorted(p.name for p in (unfinished / "checkpoint").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
        "trainer_state.pt",
    ]
    state_file = run / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["optimizer"]
    torch.save(state, state_file)
    line = _one_line(capsys, [*argv, "--out", str(run), "--resume", "--tokens", "4096"], "lacks optimizer")
    assert "new --out" in line
    assert main([*argv, "--tokens", "2048", "--out", str(tmp_path / "new")]) == 0
    # inspect into a --out that cannot be made fails before the model is loaded
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_line(
        capsys,
        ["inspect", str(run), "--out", str(blocker / "i"), "--model", "/nonexistent", "--device", "cpu"],
        "is a file, not a folder",
    )


def test_multi_hook_run_killed_between_its_first_checkpoints_resumes(tiny_llama_dir, tmp_path, capsys):
    """One hook had checkpointed, the other not yet: --resume trains both again and each step is logged once."""
    run = tmp_path / "two"
    hooks = "blocks.0.hook_resid_post,blocks.2.hook_resid_post"
    argv = ["train", "--model", tiny_llama_dir, *SMALL[2:], "--hooks", hooks, "--no-eval", "--out", str(run)]
    assert main([*argv, "--tokens", "2048", "--checkpoint-every", "2", "--log-every", "1"]) == 0
    first, second = (run / hook for hook in hooks.split(","))
    for name in ("cfg.json", "sae_weights.safetensors"):  # as if killed before the end ...
        (first / name).unlink()
        (second / name).unlink()
    shutil.rmtree(second / "checkpoint")  # ... and before the second hook's first checkpoint
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "not every hook" in capsys.readouterr().out
    for folder in (first, second):
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4] and (folder / "sae_weights.safetensors").is_file()
