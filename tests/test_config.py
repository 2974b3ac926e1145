"""The config tree is the command line, the saved run and the resume: bad values fail first, in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from activations.options import build, from_dict, leaf_fields, to_dict
from sae.cli import command_parser, load_command, main
from training.config import TrainRunConfig

# Every command is pointed at a model that does not exist: an option error must come first.
NO_MODEL = ["--model", "/nonexistent/model-folder", "--device", "cpu"]


def _one_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "/nonexistent" not in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv,phrases",
    [
        (["--k", "0"], ["--k 0", "at least 1", "--k 32"]),
        (["--batch-size", "-5"], ["--batch-size -5", "at least 2"]),
        (["--batch-size", "1"], ["--batch-size 1", "at least 2"]),
        (["--context-size", "1"], ["--context-size 1", "at least 2"]),
        (["--lr", "0"], ["--lr 0", "above 0"]),
        (["--tokens", "0"], ["--tokens 0"]),
        (["--expansion", "0"], ["--expansion 0"]),
        (["--d-sae", "16", "--k", "32"], ["--k 32", "--d-sae 16"]),
        (["--decay-fraction", "2"], ["--decay-fraction 2", "at most 1"]),
        (["--warmup-steps", "-1"], ["--warmup-steps -1"]),
        (["--checkpoint-every", "0"], ["--checkpoint-every 0"]),
        (["--log-every", "0"], ["--log-every 0"]),
        (["--eval-tokens", "0"], ["--eval-tokens 0"]),
        (["--buffer-tokens", "1"], ["--buffer-tokens 1"]),
        (["--k", "abc"], ["--k", "abc"]),
        (["--architecture", "foo"], ["--architecture", "foo", "topk"]),
        (["--parallel", "pipeline"], ["--parallel", "pipeline"]),
        (["--model-dtype", "int8"], ["--model-dtype", "int8"]),
        (["--device", "gpu"], ["--device 'gpu'", "cpu"]),
        (["--hook", "layer6"], ["--hook 'layer6'", "blocks.L.hook_KIND"]),
        (["--hooks", "blocks.1.hook_resid_post,blocks.1.hook_resid_post"], ["twice"]),
        (
            ["--hook", "blocks.1.hook_resid_post", "--hooks", "blocks.2.hook_resid_post"],
            ["--hook", "--hooks", "not both"],
        ),
        (["--architecture", "transcoder"], ["--hook-out"]),
        (["--hook-out", "blocks.1.hook_mlp_out"], ["--hook-out", "transcoder"]),
        (["--l1-coefficient", "3"], ["--l1-coefficient", "relu or gated", "topk"]),
        (["--architecture", "relu", "--l0-coefficient", "1"], ["--l0-coefficient", "jumprelu"]),
        (["--matryoshka-prefixes", "4,8"], ["--matryoshka-prefixes", "matryoshka"]),
        (["--architecture", "relu", "--parallel", "latents"], ["--parallel latents", "topk"]),
        (["--lr", "nan"], ["--lr nan", "finite"]),
        (["--lr", "-1"], ["--lr -1"]),
        (["--batch-size", "0"], ["--batch-size 0"]),
        (["--device", "meta"], ["--device 'meta'"]),
        (["--tokens", "-5"], ["--tokens -5"]),
    ],
)
def test_bad_train_options_fail_before_the_model_loads(argv, phrases, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line(capsys, ["train", *NO_MODEL, *argv])
    for phrase in phrases:
        assert phrase in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "argv,phrases",
    [
        (["eval"], ["RUN is required"]),
        (["eval", "RUN", "--tokens", "0"], ["--tokens 0"]),
        (["inspect", "RUN", "--top-k", "0"], ["--top-k 0"]),
        (["inspect", "RUN", "--left", "-1"], ["--left -1"]),
        (["inspect", "RUN", "--chunk-size", "0"], ["--chunk-size 0"]),
        (["steer", "RUN", "--feature", "1", "--strength", "2"], ["--prompt is required"]),
        (["steer", "RUN", "--feature", "1", "--strength", "x", "--prompt", "a"], ["--strength", "'x'"]),
        (
            ["steer", "RUN", "--feature", "1", "--strength", "1", "--prompt", "a", "--temperature", "-1"],
            ["--temperature"],
        ),
        (["steer", "RUN", "--feature", "1", "--strength", "nan", "--prompt", "a"], ["--strength nan", "finite"]),
        (["catalogue", "--detect"], ["--detect needs a run folder"]),
        (["catalogue", "RUN", "--tokens", "0"], ["--tokens 0"]),
        (["cache", "--tokens", "100"], ["--out is required"]),
        (["cache", "--out", "c", "--tokens", "0"], ["--tokens 0"]),
        (["cache", "--out", "c", "--dtype", "int4"], ["--dtype", "int4"]),
        (["cache", "--out", "c", "--hooks", "nonsense"], ["--hooks 'nonsense'"]),
        (["export", "RUN"], ["--out is required"]),
        (["export", "RUN", "--out", "o", "--format", "onnx"], ["--format", "onnx"]),
        (["nosuchcommand"], ["unknown command", "train"]),
    ],
)
def test_bad_options_of_every_command_are_one_line(argv, phrases, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] in ("eval", "inspect", "steer", "catalogue", "cache"):
        argv = [*argv, *NO_MODEL]
    line = _one_line(capsys, argv)
    for phrase in phrases:
        assert phrase in line, line
    assert list(tmp_path.iterdir()) == []


def test_config_file_values_are_checked_like_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text, phrase in (
        ("k: abc\n", "--k must be a whole number"),
        ("k: 0\n", "--k 0"),
        ("dictionary:\n  k: 0\n", "--k 0"),
        ("k: null\n", "--k cannot be empty"),
        ("device: 7\n", "--device '7'"),
        ("tokens: [1, 2]\n", "--tokens must be a whole number"),
        ("store: 3\n", "unknown option 'store'"),
        ("- k\n", "mapping"),
        ("k: [\n", "could not be parsed"),
    ):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        line = _one_line(capsys, ["train", "--config", str(path), "--model", "/nonexistent/model-folder"])
        assert phrase in line, (text, line)
        path.unlink()


def test_one_declaration_the_parser_and_the_dataclasses_agree():
    """Every field of the tree has an option; the defaults a plain `sae train` gets are the dataclasses' own."""
    parser = command_parser("train", load_command("train"))
    help_text = parser.format_help()
    for _, f, _ in leaf_fields(TrainRunConfig):
        flag = f.metadata.get("flag") or ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
        assert flag in help_text, flag
    assert build(TrainRunConfig, {}) == TrainRunConfig()
    assert TrainRunConfig().store.batch_size == 1024 and TrainRunConfig().training.log_every == 5


def test_saved_config_round_trips():
    cfg = build(
        TrainRunConfig,
        {
            "k": 8,
            "hooks": ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
            "normalise": False,
            "evaluate": False,
            "lr": 1e-3,
            "matryoshka_prefixes": None,
        },
    )
    saved = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(TrainRunConfig, saved, "test") == cfg
    resumable = {f.name for _, f, _ in leaf_fields(TrainRunConfig) if f.metadata.get("resume")}
    assert {"tokens", "lr", "device", "eval_tokens", "log_every", "checkpoint_every"} <= resumable
    assert not {"k", "architecture", "batch_size", "hook", "model", "dataset", "seed"} & resumable
    assert all(dataclasses.is_dataclass(getattr(cfg, f.name)) for f in dataclasses.fields(cfg))


SMALL = (
    "--hook blocks.2.hook_resid_post --dataset tinyshakespeare --batch-size 512 --buffer-tokens 2048 "
    "--context-size 64 --expansion 2 --k 8 --checkpoint-every 2 --no-eval --device cpu"
).split()


def test_resume_keeps_the_run_and_refuses_changes_it_cannot_make(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", tiny_llama_dir, *SMALL, "--out", str(run)]
    assert main([*argv, "--tokens", "2048"]) == 0
    weights = (run / "sae_weights.safetensors").read_bytes()
    capsys.readouterr()
    line = _one_line(capsys, ["train", "--out", str(run), "--resume", "--k", "16"])
    assert "--k 16" in line and "resumed run keeps it" in line and "--tokens" in line
    assert (run / "sae_weights.safetensors").read_bytes() == weights
    # Allowed changes apply; everything else comes from run_config.json (no need to repeat it).
    assert main(["train", "--out", str(run), "--resume", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "from step 4" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8
    saved = json.loads((run / "run_config.json").read_text())["config"]
    assert saved["training"]["tokens"] == 4096 and saved["dictionary"]["k"] == 8


def test_a_run_folder_of_the_earlier_format_still_resumes(tiny_llama_dir, tmp_path, capsys):
    """run_config.json as saelab wrote it before the config tree (one flat "options" mapping)."""
    run = tmp_path / "old"
    assert main(["train", "--model", tiny_llama_dir, *SMALL, "--tokens", "2048", "--out", str(run)]) == 0
    cfg = json.loads((run / "run_config.json").read_text())["config"]
    flat = {
        k: v
        for name in ("store", "model", "text", "dictionary", "training", "run", "data")
        for k, v in cfg[name].items()
    }
    legacy = {
        k: flat[k]
        for k in (
            "model",
            "hook",
            "hooks",
            "hook_out",
            "activations",
            "dataset",
            "dataset_config",
            "split",
            "text_field",
            "data_dir",
            "context_size",
            "model_batch_size",
            "buffer_tokens",
            "model_dtype",
            "architecture",
            "k",
            "l1_coefficient",
            "l0_coefficient",
            "expansion",
            "d_sae",
            "tokens",
            "batch_size",
            "lr",
            "warmup_steps",
            "device",
            "seed",
            "compile",
            "parallel",
            "checkpoint_every",
            "log_every",
            "wandb",
            "wandb_project",
            "eval_tokens",
        )
    }
    legacy.update(no_normalise=False, no_eval=True, matryoshka_prefixes=None)
    (run / "run_config.json").write_text(json.dumps({"options": legacy, "saelab_version": "0.1.0"}))
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--tokens", "3072"]) == 0
    assert "from step 4" in capsys.readouterr().out
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
    (run / "run_config.json").write_text('{"options": {"k": 8')  # torn
    line = _one_line(capsys, ["train", "--out", str(run), "--resume"])
    assert "run_config.json" in line and "not valid JSON" in line
