"""Exact resume: a `sae train` process SIGKILLed at random moments (one inside a checkpoint write) and resumed
each time ends with the very weights of an uninterrupted run, streaming, from a cache and under torchrun; a
kill at every point of a checkpoint swap leaves a whole checkpoint; a crafted state file runs nothing; a torn
metrics line is dropped.

Every process runs with one thread (OMP_NUM_THREADS=1), the same in the reference run and the resumed one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import free_port, kill_tree
from safetensors.torch import load_file

from activations.errors import UserError
from sae.config import SAEConfig
from sae.registry import make_sae
from training import checkpoint
from training.checkpoint import REQUIRED_STATE, load_checkpoint, save_checkpoint
from training.log import MetricsLog

HOOK = "blocks.2.hook_resid_post"
TINY = (
    f"--hook {HOOK} --batch-size 256 --buffer-tokens 1024 --expansion 2 --k 8 --tokens 16384 "
    "--checkpoint-every 2 --log-every 1 --no-eval --device cpu"
).split()
TEXT = "--dataset tinyshakespeare --context-size 64".split()
STEPS = 16384 // 256
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ---- checkpoint files -------------------------------------------------------------------------------------


def _state(step: int, **extra) -> dict:
    """A trainer state with every part a checkpoint must hold (placeholders) and `step`."""
    return {key: 0 for key in REQUIRED_STATE} | {"step": step, **extra}


def _tiny_sae():
    torch.manual_seed(0)
    return make_sae(SAEConfig(d_in=8, d_sae=16, k=2, hook_name=HOOK))


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the injected point runs (cleanup handlers included)."""


def _cut_save(monkeypatch, run: Path, sae, step: int, cut: int) -> bool:
    """save_checkpoint "killed" just before its cut-th file operation (a rename, rmtree, torch.save or save_sae);
    True when it finished first."""
    real = {"rename": Path.rename, "rmtree": shutil.rmtree, "save": torch.save, "save_sae": checkpoint.save_sae}
    ops = [0]

    def counted(name):
        def op(*args, **kwargs):
            ops[0] += 1
            if ops[0] == cut:
                raise _Killed
            return real[name](*args, **kwargs)

        return op

    for name, target in (("rename", Path), ("rmtree", shutil), ("save", torch), ("save_sae", checkpoint)):
        monkeypatch.setattr(target, name, counted(name))
    try:
        save_checkpoint(run, sae, _state(step))
        return True
    except _Killed:
        return False
    finally:
        monkeypatch.undo()


def test_a_kill_at_any_point_of_a_checkpoint_write_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    """Cut a checkpoint write short before each of its file operations, then the next one (the resumed run's)
    too: the folder always loads the last checkpoint or the new one, and later checkpoints write and load."""
    sae = _tiny_sae()
    for first in range(1, 9):
        for second in range(1, 10):
            run = tmp_path / f"{first}-{second}"
            save_checkpoint(run, sae, _state(1))
            save_checkpoint(run, sae, _state(2))
            done = _cut_save(monkeypatch, run, sae, 3, first)
            step = load_checkpoint(run)[1]["step"]
            assert step == 3 if done else step in (2, 3), (first, second)
            done = _cut_save(monkeypatch, run, sae, 4, second)
            assert load_checkpoint(run)[1]["step"] == 4 if done else load_checkpoint(run)[1]["step"] in (step, 4)
            save_checkpoint(run, sae, _state(5))
            assert load_checkpoint(run)[1]["step"] == 5 and [p.name for p in run.iterdir()] == ["checkpoint"]
    # A write makes 7 file operations (8 after a swap was cut short), so the cuts above hit every one of them.
    assert not _cut_save(monkeypatch, tmp_path / "1-1", sae, 6, 7) and _cut_save(monkeypatch, run, sae, 6, 8)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_state_file_is_refused_and_runs_nothing(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    save_checkpoint(run, _tiny_sae(), _state(1))
    torch.save({"step": 1, "optimizer": _Payload(marker)}, run / "checkpoint" / "trainer_state.pt")
    with pytest.raises(UserError) as err:
        load_checkpoint(run)
    message = str(err.value)
    assert "\n" not in message and "refusing to load" in message and "trainer_state.pt" in message
    assert not marker.exists()
    with open(run / "checkpoint" / "trainer_state.pt", "wb") as f:  # a bare pickle, not torch.save's zip
        pickle.dump(_Payload(marker), f)
    with pytest.raises(UserError, match="trainer_state.pt is corrupt"):
        load_checkpoint(run)
    assert not marker.exists()
    # What the trainer writes loads under weights_only (checked on a real run's checkpoint below as well).
    save_checkpoint(run, _tiny_sae(), _state(2, rng=torch.get_rng_state(), betas=(0.9, 0.99), x=None))
    assert load_checkpoint(run)[1]["step"] == 2


def test_a_torn_last_metrics_line_is_dropped(tmp_path):
    log = MetricsLog(tmp_path, use_wandb=False, project="", config={}, resume=True)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    with log.path.open("a") as f:
        f.write('{"step": 6, "lo')  # killed half-way through a line
    log.truncate_after(4)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3, 4]
    log.log({"step": 5})
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3, 4, 5]


# ---- real processes, killed -------------------------------------------------------------------------------


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, deadline: float) -> None:
    while _last_step(run) < step:
        assert proc.poll() is None, f"training ended (exit {proc.returncode}) before step {step}; raise --tokens"
        assert time.time() < deadline, f"step {step} not reached in time"
        time.sleep(0.002)


def _stopped(pid: int) -> None:
    """Wait until a SIGSTOPped process has really stopped (the signal is delivered asynchronously)."""
    for _ in range(2000):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.0005)


def _kill_inside_a_checkpoint_write(proc: subprocess.Popen, run: Path, deadline: float) -> None:
    """SIGSTOP the process the moment a checkpoint is being written (RUN/.checkpoint-tmp exists) and SIGKILL it
    there; when the write had finished by the time it stopped, let it go on and catch the next one."""
    tmp = run / ".checkpoint-tmp"
    while True:
        assert proc.poll() is None and time.time() < deadline, "no checkpoint write was caught"
        if tmp.exists():
            os.killpg(proc.pid, signal.SIGSTOP)
            _stopped(proc.pid)
            if tmp.exists():
                os.killpg(proc.pid, signal.SIGKILL)
                return
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.0005)


def _train_with_kills(argv: list[str], run: Path, seed: int, kills: int) -> None:
    """Run `argv` (a `sae train` command line), SIGKILL it `kills` times at seeded random steps (the first time
    inside a checkpoint write), `--resume` after each kill with a torn line appended to metrics.jsonl once, and
    let the last resume finish: it exits 0 with each step logged once."""
    rng = random.Random(seed)
    span = STEPS // (kills + 1)
    targets = [i * span + rng.randint(3, span - 3) for i in range(kills)]
    deadline = time.time() + 240
    for i, target in enumerate(targets):
        cmd = argv + (["--resume"] if i else [])
        proc = subprocess.Popen(
            cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            _wait_for_step(proc, run, target, deadline)
            if i == 0:
                _kill_inside_a_checkpoint_write(proc, run, deadline)
            else:
                time.sleep(rng.uniform(0, 0.03))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        assert not (run / "sae_weights.safetensors").exists(), "the run finished before it was killed"
        if i == 0:
            assert (run / ".checkpoint-tmp").exists(), "the first kill landed outside a checkpoint write"
        if i == 1:
            with (run / "metrics.jsonl").open("a") as f:
                f.write('{"step": 999, "loss": 0.')  # torn tail
    result = subprocess.run(argv + ["--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step exactly once
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == STEPS and "data_states" in state


def _assert_same_weights(run: Path, reference: Path) -> None:
    got, want = load_file(run / "sae_weights.safetensors"), load_file(reference / "sae_weights.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        diff = (got[name] - want[name]).abs().max().item()
        assert torch.equal(got[name], want[name]), f"{name} differs by up to {diff}"


def _train(argv: list[str]) -> None:
    result = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


SAE_TRAIN = [sys.executable, "-m", "sae", "train"]


def test_streaming_run_killed_three_times_ends_bit_identical(tiny_llama_dir, tmp_path):
    argv = [*SAE_TRAIN, "--model", tiny_llama_dir, *TINY, *TEXT]
    _train([*argv, "--out", str(tmp_path / "whole")])
    _train_with_kills([*argv, "--out", str(tmp_path / "run")], tmp_path / "run", seed=0, kills=3)
    _assert_same_weights(tmp_path / "run", tmp_path / "whole")


def test_cached_run_killed_three_times_ends_bit_identical(tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    _train(
        [sys.executable, "-m", "sae", "cache", "--out", str(cache), "--model", tiny_llama_dir, "--hooks", HOOK]
        + "--dataset tinyshakespeare --context-size 64 --tokens 12000 --shard-tokens 4096 --device cpu".split()
    )  # fewer tokens than the run reads: it also starts over past the cache's end
    argv = [*SAE_TRAIN, "--activations", str(cache), *TINY]
    _train([*argv, "--out", str(tmp_path / "whole")])
    _train_with_kills([*argv, "--out", str(tmp_path / "run")], tmp_path / "run", seed=1, kills=3)
    _assert_same_weights(tmp_path / "run", tmp_path / "whole")


def test_torchrun_data_parallel_run_killed_once_ends_bit_identical(tiny_llama_dir, tmp_path):
    def torchrun(out: Path) -> list[str]:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr"]
        launch += ["127.0.0.1", "--master_port", str(free_port()), "-m", "sae", "train"]
        return [*launch, "--model", tiny_llama_dir, *TINY, *TEXT, "--out", str(out)]

    _train(torchrun(tmp_path / "whole"))
    # Each launch needs its own port, so resume by hand: one kill, then --resume.
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun(run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for_step(proc, run, random.Random(2).randint(10, STEPS - 20), time.time() + 240)
        time.sleep(random.Random(3).uniform(0, 0.03))
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=60)
    assert not (run / "sae_weights.safetensors").exists(), "the run finished before it was killed"
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert len(state["data_states"]) == 2 and state["data_positions"][0] != state["data_positions"][1]
    _train(torchrun(run) + ["--resume"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    _assert_same_weights(run, tmp_path / "whole")
