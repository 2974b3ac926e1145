"""Per-parameter learning-rate scales (SAE.lr_scales, decoder_lr_scale): the optimiser's groups, the option's checks,
and a checkpoint whose groups differ from this saelab's (one written before the scales) refused with one line."""

from __future__ import annotations

import pytest
import torch

from activations.errors import UserError
from sae.config import SAEConfig
from sae.dictionary import DictionaryConfig
from sae.registry import ARCHITECTURES, make_sae
from tests.test_frontier import BATCH, D_IN, PlantedBatches
from training.config import TrainConfig
from training.step import set_lr
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_parameter_is_in_one_group_and_the_decoder_scale_falls_to_one(arch):
    """Each parameter in exactly one group, named in order; the decoder at decoder_lr_scale x the schedule at the
    start, (1 + 3) / 2 half-way and 1 x at the end, every other parameter (but JumpReLU's thresholds) at 1 x."""
    extra = {"d_out": 6} if arch == "transcoder" else {}
    sae = make_sae(SAEConfig(d_in=4, d_sae=8, k=2, architecture=arch, decoder_lr_scale=3.0, **extra))
    groups = sae.optimizer_groups()
    params = dict(sae.named_parameters())
    assert sorted(n for g in groups for n in g["param_names"]) == sorted(params)
    for group in groups:
        assert [id(params[n]) for n in group["param_names"]] == [id(p) for p in group["params"]]
    opt = torch.optim.Adam(groups, lr=1.0)
    for progress, decoder in ((0.0, 3e-3), (0.5, 2e-3), (1.0, 1e-3)):
        sae.set_progress(progress)
        set_lr(opt, 1e-3, sae.lr_scales())
        lr_of = {name: g["lr"] for g in opt.param_groups for name in g["param_names"]}
        assert lr_of.pop("W_dec") == pytest.approx(decoder)
        lr_of.pop("threshold", None)  # jumprelu: its own scale (tests/test_l0_target.py)
        assert set(lr_of.values()) == {1e-3}


def test_decoder_lr_scale_must_be_positive_and_reaches_the_sae_config():
    """0 or less is refused naming the option; `sae train --decoder-lr-scale` lands in cfg.json's SAEConfig."""
    with pytest.raises(UserError, match="decoder_lr_scale must be > 0"):
        SAEConfig(d_in=4, d_sae=8, decoder_lr_scale=0.0)
    with pytest.raises(UserError, match="decoder.lr.scale"):
        DictionaryConfig(decoder_lr_scale=-1.0)
    assert DictionaryConfig(decoder_lr_scale=2.5).sae_config(8).decoder_lr_scale == 2.5
    assert DictionaryConfig().sae_config(8).decoder_lr_scale == SAEConfig.decoder_lr_scale


def _trainer(tmp_path, scale: float) -> Trainer:
    """A TopK trainer on planted data with the given decoder scale."""
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=D_IN, d_sae=2 * D_IN, k=4, decoder_lr_scale=scale))
    cfg = TrainConfig(tokens=4 * BATCH, log_every=10**6, checkpoint_every=10**6)
    return Trainer(sae, PlantedBatches(seed=1), cfg, tmp_path / f"run{scale}")


def test_a_checkpoint_with_other_groups_is_refused_with_the_way_out(tmp_path):
    """A trainer's own state resumes; one whose optimiser groups lack the names (as before the scales) or differ is
    refused before any step, saying to resume with the version that wrote it or to start again."""
    trainer = _trainer(tmp_path, 3.0)
    trainer.train(stop_after_steps=2)
    state = trainer.state_dict()
    fresh = _trainer(tmp_path, 3.0)
    fresh.load_state_dict(state)
    assert fresh.step == 2
    groups = state["optimizer"]["param_groups"]
    merged = {**groups[0], "params": [i for g in groups for i in g["params"]]}
    merged["param_names"] = [n for g in groups for n in g["param_names"]]  # one group for every parameter
    unnamed = {key: value for key, value in merged.items() if key != "param_names"}  # as saelab wrote it before
    for saved in (merged, unnamed):
        other = _trainer(tmp_path, 3.0)
        with pytest.raises(UserError, match="resume it with the saelab version that wrote it, or start a new run"):
            other.load_state_dict({**state, "optimizer": {**state["optimizer"], "param_groups": [saved]}})
        assert other.step == 0
