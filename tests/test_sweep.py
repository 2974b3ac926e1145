"""`sae sweep`: a grid of runs from one activation cache, bad grid values refused before training, a killed sweep
resumed (finished points skipped, the stopped one continued from its checkpoint, bit for bit), then read by compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import analysis.commands.compare as compare_command
import training.commands.sweep as sweep_command
import training.commands.train as train_command
from activations.errors import UserError
from sae.cli import main, make_config
from training.trainer import Trainer

HOOK = "blocks.1.hook_resid_post"
# 2048 tokens in batches of 256: 8 steps, a checkpoint every 2.
TRAIN = ["--tokens", "2048", "--batch-size", "256", "--buffer-tokens", "1024", "--checkpoint-every", "2"]
TRAIN += ["--log-every", "1", "--d-sae", "32", "--eval-tokens", "256", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache(tiny_llama_dir, tmp_path_factory) -> Path:
    """A 3000-token activation cache of one hook of the tiny Llama over tinyshakespeare."""
    folder = tmp_path_factory.mktemp("sweep") / "cache"
    argv = ["cache", "--out", str(folder), "--model", tiny_llama_dir, "--dataset", "tinyshakespeare"]
    argv += ["--hooks", HOOK, "--tokens", "3000", "--shard-tokens", "1500", "--context-size", "64", "--device", "cpu"]
    assert main(argv) == 0
    return folder


def _sweep(argv: list[str]) -> list[Path]:
    return sweep_command.run(make_config("sweep", sweep_command, argv))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--architectures", "topk,nope"], r"--architectures 'nope' is not an SAE architecture; use .*topk"),
        (["--architectures", ""], r"--architectures is empty"),
        (["--k", "8,8"], r"--k lists a value twice \(8,8\)"),
        (["--k", "0,8"], r"--k 0 is too small"),
        (["--k", "8,x"], r"--k must be a whole number, got 'x'"),
        (["--architectures", "relu"], r"relu is swept over sparsity coefficients; give them, e.g. --coefficients"),
        (["--architectures", "relu", "--coefficients", "1,-2"], r"--coefficients -2.0 is not a finite number >= 0"),
        (["--architectures", "relu", "--coefficients", "1", "--k", "8"], r"--k is for .*drop --k or add one"),
        (["--coefficients", "1"], r"--coefficients is for relu, gated and jumprelu.*drop --coefficients"),
        (["--architectures", "transcoder", "--k", "8"], r"a transcoder needs --hook-out"),
        (["--k", "64", "--d-sae", "32"], r"--k 64 is larger than --d-sae 32"),
        (["--k", "600", "--expansion", "8"], r"--k 600 is larger than the dictionary \(512 latents"),
        (["--hook", "blocks.3.hook_resid_post"], r"has no hook blocks.3.hook_resid_post \(it holds blocks.1"),
    ],
)
def test_bad_grid_values_are_one_line_errors_before_training(cache, tmp_path, argv, message):
    out = tmp_path / "sweep"
    with pytest.raises(UserError, match=message) as e:
        _sweep(["--activations", str(cache), "--out", str(out), "--device", "cpu", *argv])
    assert "\n" not in str(e.value)
    assert not out.exists()  # nothing was started


def test_a_cache_is_required(tmp_path):
    with pytest.raises(UserError, match=r"give --activations DIR \(write one with `sae cache --out DIR`\)"):
        make_config("sweep", sweep_command, ["--out", str(tmp_path / "s")])
    with pytest.raises(UserError, match=r"is not an activation cache \(manifest.json missing\)"):
        _sweep(["--activations", str(tmp_path), "--out", str(tmp_path / "s")])


def test_grid_points_and_their_folders():
    cfg = make_config(
        "sweep",
        sweep_command,
        ["--activations", "c", "--architectures", "jumprelu,topk,relu", "--coefficients", "0.5,2", "--k", "4,16"],
    )
    assert cfg.grid.points() == [
        ("jumprelu-c0.5", {"architecture": "jumprelu", "l0_coefficient": 0.5}),
        ("jumprelu-c2", {"architecture": "jumprelu", "l0_coefficient": 2.0}),
        ("topk-k4", {"architecture": "topk", "k": 4}),
        ("topk-k16", {"architecture": "topk", "k": 16}),
        ("relu-c0.5", {"architecture": "relu", "l1_coefficient": 0.5}),
        ("relu-c2", {"architecture": "relu", "l1_coefficient": 2.0}),
    ]
    default = make_config("sweep", sweep_command, ["--activations", "c"])
    expected = [f"{a}-k{k}" for a in ("topk", "batchtopk") for k in (16, 32, 64)]
    assert [name for name, _ in default.grid.points()] == expected


def _steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_killed_sweep_resumes_and_compare_reads_it(cache, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "sweep"
    argv = ["--activations", str(cache), "--out", str(out), "--architectures", "topk,batchtopk", "--k", "4,8", *TRAIN]
    names = ["topk-k4", "topk-k8", "batchtopk-k4", "batchtopk-k8"]
    real_train = Trainer.train

    def killed_at_step_3(self, resume_state=None, stop_after_steps=None):
        if self.run_dir.name == "batchtopk-k4":  # the third point: stopped after 3 steps, as by Ctrl-C
            real_train(self, resume_state, stop_after_steps=3)
            raise KeyboardInterrupt
        return real_train(self, resume_state, stop_after_steps)

    monkeypatch.setattr(Trainer, "train", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _sweep(argv)
    assert "sweep stopped at batchtopk-k4; run the same sae sweep command again" in capsys.readouterr().out
    for name in names[:2]:
        assert (out / name / "cfg.json").is_file() and (out / name / "eval.json").is_file()
    assert not (out / "batchtopk-k4" / "cfg.json").exists() and (out / "batchtopk-k4" / "checkpoint").is_dir()
    assert not (out / "batchtopk-k8").exists()
    before = {name: (out / name / "sae_weights.safetensors").stat().st_mtime_ns for name in names[:2]}
    monkeypatch.setattr(Trainer, "train", real_train)

    # a rerun that changes what the points train is refused before anything runs
    changed = [*argv, "--tokens", "4096"]  # the later --tokens wins
    with pytest.raises(UserError, match=r"topk-k4 was started with --tokens 2048 but this sweep gives 4096"):
        _sweep(changed)

    folders = _sweep(argv)
    printed = capsys.readouterr().out
    assert folders == [out / name for name in names]
    assert printed.count("trained already, skipped") == 2
    assert "[3/4] batchtopk-k4: resuming" in printed and "from step 2 (512 tokens)" in printed
    assert f"next: sae compare {out} --out {out / 'compare'}" in printed
    assert {name: (out / name / "sae_weights.safetensors").stat().st_mtime_ns for name in names[:2]} == before
    assert _steps(out / "batchtopk-k4") == list(range(1, 9))  # each step logged once, across the kill
    for name in names:
        assert json.loads((out / name / "eval.json").read_text())["tokens"] >= 256

    # the resumed point is the point trained without a stop, bit for bit
    whole = tmp_path / "whole"
    values = sweep_command.shared_values(make_config("sweep", sweep_command, argv))
    train_command.run(train_command.make_config({**values, "architecture": "batchtopk", "k": 4, "out": str(whole)}))
    resumed, straight = (load_file(f / "sae_weights.safetensors") for f in (out / "batchtopk-k4", whole))
    assert resumed.keys() == straight.keys() and all((resumed[n] == straight[n]).all() for n in resumed)

    _sweep(argv)  # everything done: nothing trains or evaluates again
    assert capsys.readouterr().out.count("trained already, skipped") == 4
    assert {name: (out / name / "sae_weights.safetensors").stat().st_mtime_ns for name in names[:2]} == before

    page = compare_command.run(make_config("compare", compare_command, [str(out), "--out", str(out / "compare")]))
    data = json.loads((page.parent / "compare.json").read_text())
    assert [(r["run"], r["architecture"], r["k"], r["d_sae"], r["tokens"]) for r in data["rows"]] == [
        (name, name.split("-")[0], int(name.split("-k")[1]), 32, 2048) for name in sorted(names)
    ]
    for row in data["rows"]:
        evaluated = json.loads((out / row["run"] / "eval.json").read_text())
        assert row["metrics"]["l0"] == evaluated["l0"] and row["metrics"]["fvu"] == evaluated["fvu"]
        assert row["metrics"]["absorption"] is None and row["hook"] == HOOK
    assert list(data["fronts"]) == [HOOK]
