"""scripts/bench_train.py stays runnable: a few small steps on CPU produce the table, the memory and FVU checks,
the profile and the report file; --e2e runs `sae train` on a tiny local model. No times are asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_train.py"


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--device", "cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_bench_small_steps_write_a_report(tmp_path):
    out = tmp_path / "train_speed-cpu-test.md"
    done = run_bench(
        "--small",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--shape",
        "32,1024,8",
        "--archs",
        "topk,batchtopk",
        "--impl",
        "saelab,saelab-reference,dense,floor",
        "--long-steps",
        "3",
        "--fvu-steps",
        "3",
        "--profile",
        "--out",
        str(out),
    )
    text = out.read_text()
    assert text.strip() in done.stdout
    assert "**CPU run**" in text and "torch " in text and "saelab " in text and "triton " in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| d_in 32, d_sae 1024, k 8 |")}
    for name in (
        "saelab topk",
        "saelab batchtopk",
        "saelab topk, reference path (dense autograd)",
        "plain PyTorch dense fp32",
        "dense-matmul floor (6 matmuls, measured)",
    ):
        tokens_per_s = rows[name].split(" | ")[2]
        assert float(tokens_per_s.split()[0]) > 0, rows[name]
    assert "## Memory over a long run" in text and "## What is learned" in text
    fvu_row = next(line for line in text.splitlines() if line.startswith("| d_in 32") and "%" in line)
    assert fvu_row.rstrip(" |").endswith("yes")  # three steps: the fast path and the fp32 reference agree
    assert "aten::topk" in text.split("## Profile")[1]


def test_bench_e2e_runs_sae_train(tmp_path, tiny_llama_dir):
    out = tmp_path / "e2e.md"
    done = run_bench(
        "--e2e",
        "--e2e-model",
        tiny_llama_dir,
        "--e2e-dataset",
        "tinyshakespeare",
        "--e2e-tokens",
        "2048",
        "--e2e-hook",
        "blocks.2.hook_resid_post",
        "--batch",
        "512",
        "--out",
        str(out),
    )
    text = out.read_text()
    assert "## End to end: `sae train`" in text and "--tokens 2048" in text
    assert "e2e:" in done.stdout and "tokens/s" in done.stdout
