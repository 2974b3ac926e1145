"""`sae bench` and `sae compare` end to end on a tiny trained run and on the same SAE exported as a plain SAELens
folder (what a SAELens user brings): the core numbers agree across the two, parts are written one by one and kept
across reruns, and a part given alone runs alone; bad options are one line before any model loads."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from test_dashboard import TRAIN, _one_line_error

import sae.runs
from analysis.commands.bench import FILE
from sae.cli import main

SMALL = (
    "--tokens 512 --absorption-words 200 --absorption-icl-examples 2 --absorption-batch-size 64 "
    "--probe-train-examples 40 --probe-test-examples 20 --probe-ks 1,2 --probe-tasks shakespeare_vs_wikitext,digit "
    "--probe-sequence-tokens 16 --device cpu"
).split()


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """A tiny trained run, and its SAE exported to SAELens with the saelab section dropped (a plain SAELens SAE)."""
    root = tmp_path_factory.mktemp("bench")
    run = root / "run"
    assert main(["train", "--model", tiny_llama_dir, *TRAIN, "--out", str(run)]) == 0
    plain = root / "plain"
    assert main(["export", str(run), "--out", str(plain), "--format", "saelens"]) == 0
    cfg = json.loads((plain / "cfg.json").read_text())
    cfg.pop("saelab", None)
    cfg["metadata"]["model_name"] = tiny_llama_dir
    (plain / "cfg.json").write_text(json.dumps(cfg))
    return run, plain


def _bench(folder) -> dict:
    return json.loads((folder / FILE).read_text())


def test_bench_parts_one_by_one_and_all_kept(runs, capsys):
    run, _ = runs
    assert main(["bench", str(run), "--parts", "core", *SMALL]) == 0
    core = _bench(run)["core"]
    assert set(_bench(run)) >= {"core", "seconds", "model", "hook"} and "absorption" not in _bench(run)
    assert core["explained_variance"] == pytest.approx(1 - core["fvu"])
    assert 0 < core["l0"] <= 8 + 1e-6 and 0 <= core["frac_alive"] <= 1  # a TopK SAE with k 8
    assert core["tokens"] >= 512 and math.isfinite(core["kl_div_score"]) and math.isfinite(core["ce_loss_score"])
    assert main(["bench", str(run), "--parts", "absorption,probing", *SMALL]) == 0
    out = capsys.readouterr().out
    data = _bench(run)
    assert data["core"] == core  # the finished part is kept as it was
    assert set(data["absorption"]) >= {"mean_absorption_fraction_score", "mean_num_split_features"}
    probing = data["sparse_probing"]
    assert set(probing["tasks"]) == {"shakespeare_vs_wikitext", "digit"}
    assert set(probing) >= {"llm_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy"}
    assert all(0 <= t["llm_test_accuracy"] <= 1 and t["n_test"] == 20 for t in probing["tasks"].values())
    assert set(data["seconds"]) == {"core", "absorption", "probing"}
    assert "probe top-1" in out and str(run) in out


def test_a_plain_saelens_sae_benches_as_its_saelab_original(runs):
    """The exported SAE has the scale folded into its weights and no saelab section: same numbers."""
    run, plain = runs
    assert main(["bench", str(run), "--parts", "core", *SMALL]) == 0
    assert main(["bench", str(plain), "--parts", "core", *SMALL]) == 0
    ours, theirs = _bench(run)["core"], _bench(plain)["core"]
    for key in ("l0", "fvu", "mse", "cossim", "l2_ratio", "ce_loss_score", "kl_div_score", "frac_alive"):
        assert theirs[key] == pytest.approx(ours[key], rel=1e-3, abs=1e-5), key


def test_compare_reads_both(runs, tmp_path, capsys):
    run, plain = runs
    assert main(["bench", str(plain), "--parts", "core", *SMALL]) == 0
    assert main(["compare", str(run), str(plain), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert len(rows) == 2 and (tmp_path / "cmp" / "index.html").is_file() and list((tmp_path / "cmp").glob("*.png"))
    by_folder = {r["folder"]: r for r in rows}
    for folder in (run, plain):
        row = by_folder[str(folder)]
        assert row["metrics"]["l0"] == pytest.approx(_bench(folder)["core"]["l0"])
        assert row["sources"]["l0"] == "bench.json"
    # the plain SAE was never benched for absorption: n/a, not invented (the run was, in the first test)
    assert by_folder[str(plain)]["metrics"]["absorption"] is None
    assert "n/a" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--parts", "speed"], "--parts"),
        (["--probe-ks", "0"], "probe"),
        (["--absorption-words", "3"], "absorption"),
        (["--probe-ks", "1,500"], "more than the 96 latents"),  # before the model loads or core runs
    ],
)
def test_bench_option_errors_are_one_line(runs, argv, phrase, capsys):
    run, _ = runs
    before = (run / FILE).read_text() if (run / FILE).is_file() else None
    _one_line_error(main(["bench", str(run), *argv, "--device", "cpu"]), capsys.readouterr().err, phrase)
    assert ((run / FILE).read_text() if (run / FILE).is_file() else None) == before  # nothing ran, nothing lost


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--absorption-words", "1000000"], "lower --absorption-words"),  # more than the vocabulary has
        # 19 train words and 1 test word, whose first letter (seed 4) no train word has
        (["--absorption-words", "20", "--absorption-train-fraction", "0.95", "--absorption-seed", "4"], "no letter"),
    ],
)
def test_absorption_words_are_checked_on_the_tokenizer_before_any_model_loads(
    runs, argv, phrase, tmp_path, monkeypatch, capsys
):
    run, _ = runs
    fresh = tmp_path / "run"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns(FILE))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the absorption words were checked")

    monkeypatch.setattr(sae.runs, "load_model", no_model)
    _one_line_error(main(["bench", str(fresh), *argv, "--device", "cpu"]), capsys.readouterr().err, phrase)
    assert not (fresh / FILE).exists()


def test_bench_missing_run_is_one_line(tmp_path, capsys):
    _one_line_error(main(["bench", str(tmp_path / "nothing")]), capsys.readouterr().err, "does not exist")
