"""The real embedded default (SmolLM2-135M on WikiText-2) end to end through the CLI: the SAE learns."""

import json

import pytest

from sae.cli import main


@pytest.mark.slow
def test_default_model_trains_a_useful_sae(tmp_path, capsys):
    run = tmp_path / "default"
    code = main(["train", "--tokens", "40960", "--eval-tokens", "2048", "--device", "cpu", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["model"] == "smollm2-135m" and ev["hook"] == "blocks.15.hook_resid_pre"
    assert ev["fvu"] < 0.5  # far better than predicting the mean (FVU 1)
    assert ev["ce_recovered"] > 0.5  # splicing the SAE in keeps most of the model's loss
    assert ev["ce_loss_clean"] < ev["ce_loss_sae"] < ev["ce_loss_zero"]
    assert ev["l0"] == pytest.approx(32.0, abs=0.5)
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["saelab"]["norm_scale"] != 1.0 and cfg["metadata"]["model_name"] == "smollm2-135m"
