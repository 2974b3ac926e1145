"""The `sae` command line: help, config files, and one clear line (no traceback) for each user error."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from sae.cli import main
from sae.config import SAEConfig
from sae.io import save_sae
from sae.registry import make_sae

SMALL = (
    "--hook blocks.2.hook_resid_post --dataset tinyshakespeare --tokens 8192 --batch-size 512 "
    "--buffer-tokens 2048 --context-size 64 --expansion 2 --k 8 --checkpoint-every 4 --eval-tokens 512 "
    "--device cpu"
).split()


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, err, *phrases):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_help_lists_commands_and_options(capsys):
    assert main(["--help"]) == 0
    for argv in (["train", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "train",
        "eval",
        "--model",
        "--hook",
        "--dataset",
        "--tokens",
        "--k",
        "--expansion",
        "--d-sae",
        "--batch-size",
        "--lr",
        "--device",
        "--seed",
        "--resume",
        "--wandb",
        "--config",
    ):
        assert word in out


def test_train_and_eval_on_a_local_model_folder(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _run(["train", "--model", tiny_llama_dir, *SMALL, "--out", str(run)], capsys)
    assert code == 0, err
    for name in ("cfg.json", "sae_weights.safetensors", "metrics.jsonl", "run_config.json", "eval.json", "checkpoint"):
        assert (run / name).exists(), name
    ev = json.loads((run / "eval.json").read_text())
    for key in (
        "fvu",
        "explained_variance",
        "l0",
        "dead_fraction",
        "ce_loss_clean",
        "ce_loss_sae",
        "ce_loss_zero",
        "ce_recovered",
        "kl_sae",
        "tokens",
    ):
        assert key in ev
    assert ev["l0"] == pytest.approx(8.0) and ev["tokens"] >= 512
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["d_sae"] == 128 and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"

    code, out, err = _run(["eval", str(run), "--model", tiny_llama_dir, "--tokens", "256", "--device", "cpu"], capsys)
    assert code == 0, err and "ce_recovered" in out

    # Training into a folder that already holds a run is refused, and the run is untouched.
    before = (run / "sae_weights.safetensors").read_bytes()
    code, _, err = _run(["train", "--model", tiny_llama_dir, *SMALL, "--out", str(run)], capsys)
    _one_line_error(code, err, "already holds a run", "--resume")
    assert (run / "sae_weights.safetensors").read_bytes() == before


def test_config_file_sets_options_and_command_line_wins(tiny_llama_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\nk: 4\nexpansion: 2\ntokens: 4096\nhook: blocks.1.hook_mlp_out\n")
    run = tmp_path / "r"
    code, _, err = _run(
        [
            "train",
            "--config",
            str(cfg),
            "--k",
            "6",
            *SMALL[2:4],
            "--tokens",
            "2048",
            "--batch-size",
            "512",
            "--context-size",
            "64",
            "--buffer-tokens",
            "2048",
            "--no-eval",
            "--device",
            "cpu",
            "--out",
            str(run),
        ],
        capsys,
    )
    assert code == 0, err
    saved = json.loads((run / "cfg.json").read_text())
    assert saved["k"] == 6 and saved["metadata"]["hook_name"] == "blocks.1.hook_mlp_out"
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\n")
    code, _, err = _run(["train", "--config", str(bad)], capsys)
    _one_line_error(code, err, "unknown option", "modle")


@pytest.mark.parametrize(
    "argv,phrases",
    [
        (["train", "--model", "/nonexistent/model", "--no-eval"], ["does not exist"]),
        (["train", "--model", "missing.gguf"], ["GGUF file", "does not exist"]),
        (["train", "--model", "no-such-org/no-such-model-xyz"], ["could not load model", "smollm2-135m"]),
        (["train", "--dataset", "/nonexistent/text.txt"], ["no such file"]),
    ],
)
def test_bad_model_or_dataset_is_one_clear_line(argv, phrases, capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(argv + ["--device", "cpu"], capsys)
    _one_line_error(code, err, *phrases)


def test_unknown_hook_and_empty_dataset(tiny_llama_dir, tmp_path, capsys):
    code, _, err = _run(
        ["train", "--model", tiny_llama_dir, "--hook", "blocks.99.hook_resid_post", "--out", str(tmp_path / "a")],
        capsys,
    )
    _one_line_error(code, err, "unknown hook", "blocks.{0..3}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = _run(
        [
            "train",
            "--model",
            tiny_llama_dir,
            "--hook",
            "blocks.1.hook_resid_post",
            "--dataset",
            str(empty),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "b"),
        ],
        capsys,
    )
    _one_line_error(code, err, "empty")


def test_eval_errors_missing_corrupt_and_mismatched_sae(tiny_llama_dir, tmp_path, capsys):
    code, _, err = _run(["eval", str(tmp_path / "nothing-here"), "--model", tiny_llama_dir], capsys)
    _one_line_error(code, err, "nothing-here")
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=32, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post"))
    save_sae(sae, tmp_path / "wrong-width")
    code, _, err = _run(
        [
            "eval",
            str(tmp_path / "wrong-width"),
            "--model",
            tiny_llama_dir,
            "--tokens",
            "256",
            "--dataset",
            "tinyshakespeare",
            "--device",
            "cpu",
        ],
        capsys,
    )
    _one_line_error(code, err, "d_in=32", "last dimension 64")
    save_sae(sae, tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = _run(["eval", str(tmp_path / "corrupt"), "--model", tiny_llama_dir], capsys)
    _one_line_error(code, err, "sae_weights.safetensors")
    save_sae(sae, tmp_path / "shape")
    tensors = {
        "W_enc": torch.zeros(32, 64),
        "W_dec": torch.zeros(64, 31),
        "b_enc": torch.zeros(64),
        "b_dec": torch.zeros(32),
    }
    save_file(tensors, str(tmp_path / "shape" / "sae_weights.safetensors"))
    code, _, err = _run(["eval", str(tmp_path / "shape"), "--model", tiny_llama_dir], capsys)
    _one_line_error(code, err, "W_dec")


def test_killed_training_process_resumes(tiny_llama_dir, tmp_path):
    """A real `sae train` process is SIGKILLed after its first checkpoint; --resume finishes the run."""
    run = tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "sae",
        "train",
        "--model",
        tiny_llama_dir,
        *SMALL,
        "--tokens",
        "122880",
        "--checkpoint-every",
        "5",
        "--no-eval",
        "--out",
        str(run),
    ]  # 240 steps: still running when killed
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    state = run / "checkpoint" / "trainer_state.pt"
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed; raise --tokens"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "sae_weights.safetensors").exists()
    done = torch.load(state, weights_only=False)["step"]
    assert done >= 5

    result = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {run} from step {done}" in result.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 240
    assert (run / "sae_weights.safetensors").exists()
