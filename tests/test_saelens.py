"""SAELens interoperability and folding: folders written by the real sae-lens load and encode identically,
what saelab exports loads in sae-lens, and folding the scale keeps every architecture's outputs.

The fixtures in tests/fixtures/saelens were written by sae-lens 6.x (scripts/make_saelens_fixtures.py),
with sae-lens's own encode/decode outputs beside them, so these tests need no sae-lens install; the
last ones run only where `sae_lens` is importable.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from activations.errors import UserError
from sae.cli import main
from sae.config import SAEConfig
from sae.fold import fold_norm_scale
from sae.io import load_sae, save_sae
from sae.registry import ARCHITECTURES, make_sae
from sae.saelens import export_saelens

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
# fixture folder -> the saelab architecture it must load as
EXPECTED_ARCH = {
    "standard": "relu",
    "standard_no_b_dec_in": "relu",
    "topk": "topk",
    "topk_rescaled": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "jumprelu",
    "batchtopk_training": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
    "matryoshka_batchtopk_training": "jumprelu",
}
EXPORTABLE = ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]


def test_every_fixture_is_covered():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(EXPECTED_ARCH)


@pytest.mark.parametrize("name", sorted(EXPECTED_ARCH))
def test_saelens_folder_loads_and_encodes_identically(name):
    expected = load_file(FIXTURES / name / "expected.safetensors")
    sae = load_sae(FIXTURES / name)
    assert sae.cfg.architecture == EXPECTED_ARCH[name]
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (16, 32)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.model_name == "tiny-random"
    with torch.no_grad():
        acts = sae.encode(expected["x"])
        torch.testing.assert_close(acts, expected["feature_acts"])
        torch.testing.assert_close(sae.decode(acts), expected["reconstruction"])
    assert ((acts != 0) == (expected["feature_acts"] != 0)).all()  # the same latents fire, not just close values
    assert sae.cfg.norm_scale == 1.0  # normalize_activations "none": SAELens folded any scale in


# ---- the normalisation scale is never guessed --------------------------------------------------------------------


def _checkpoint(tmp_path: Path, scaler: str | None) -> Path:
    """The standard fixture as a SAELens training checkpoint: normalize_activations expected_average_only_in,
    with activation_scaler.json holding `scaler` (None: no file)."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURES / "standard", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    if scaler is not None:
        (folder / "activation_scaler.json").write_text(scaler)
    return folder


def test_a_saelens_checkpoint_reads_its_stored_scaling_factor(tmp_path):
    expected = load_file(FIXTURES / "standard" / "expected.safetensors")
    sae = load_sae(_checkpoint(tmp_path, '{"scaling_factor": 2.5}'))
    assert sae.cfg.norm_scale == 2.5
    with torch.no_grad():  # SAELens trains on acts * scaling_factor: encode_raw applies it
        torch.testing.assert_close(sae.encode_raw(expected["x"] / 2.5), expected["feature_acts"])
        torch.testing.assert_close(sae.reconstruct_raw(expected["x"] / 2.5), expected["reconstruction"] / 2.5)


@pytest.mark.parametrize(
    "scaler, message",
    [
        (None, r"expected_average_only_in' but no scaling factor is stored.*activation_scaler\.json beside cfg\.json"),
        ('{"scaling_factor": null}', "no scaling factor is stored"),
        ('{"scaling_factor": -1}', r"activation_scaler\.json must hold \{\"scaling_factor\": a positive number\}"),
        ('{"scaling_factor": "2"}', r"activation_scaler\.json must hold"),
        ("[2.5]", r"activation_scaler\.json must hold"),
        ("{oops", r"activation_scaler\.json must hold"),
    ],
)
def test_a_saelens_checkpoint_without_a_usable_scale_is_refused(tmp_path, scaler, message):
    with pytest.raises(UserError, match=message) as err:
        load_sae(_checkpoint(tmp_path, scaler))
    assert "\n" not in str(err.value)


def test_a_saelab_run_stripped_of_its_saelab_section_is_refused_not_read_at_scale_1(tmp_path, capsys):
    """The plain SAELens keys of an un-exported run cannot carry its scale (sae eval would report FVU 60, not 0.2)."""
    run = tmp_path / "run"
    save_sae(_random_sae("topk", norm_scale=1.7), run)
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "expected_average_only_in"
    del cfg["saelab"]
    (run / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"cfg\.json: normalize_activations .*restore its \"saelab\" section"):
        load_sae(run)
    assert main(["export", str(run), "--format", "saelens", "--out", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no scaling factor is stored" in errors[0]
    cfg["normalize_activations"] = "none"  # what a user who knows it is unscaled may write
    (run / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(run).cfg.norm_scale == 1.0


def test_a_wrongly_typed_cfg_value_is_one_error_line(tmp_path, capsys):
    run = tmp_path / "run"
    save_sae(_random_sae("topk"), run)
    cfg = json.loads((run / "cfg.json").read_text())
    cfg["saelab"]["k"] = "many"
    (run / "cfg.json").write_text(json.dumps(cfg))
    assert main(["export", str(run), "--format", "saelens", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "cfg.json: SAE config field 'k' must be an integer, got 'many'" in errors[0]


def _random_sae(arch: str, norm_scale: float = 1.0, seed: int = 0):
    """An SAE of `arch` with random weights, biases and thresholds (d_in 16, d_sae 32)."""
    torch.manual_seed(seed)
    extra = dict(d_out=12, norm_scale_out=0.7) if arch == "transcoder" else {}
    sae = make_sae(
        SAEConfig(
            d_in=16,
            d_sae=32,
            architecture=arch,
            k=4,
            norm_scale=norm_scale,
            model_name="tiny",
            hook_name="blocks.1.hook_resid_post",
            **extra,
        )
    )
    with torch.no_grad():
        for name, t in [*sae.named_parameters(), *sae.named_buffers()]:
            if name == "threshold":
                t.copy_(torch.rand_like(t) * 0.5)
            elif name.startswith("W_"):
                t.copy_(torch.randn_like(t) / 4)
            else:
                t.copy_(torch.randn_like(t) * 0.2)
    return sae


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fold_norm_scale_reads_raw_activations(arch):
    sae = _random_sae(arch, norm_scale=2.5)
    folded = fold_norm_scale(sae)
    x_raw = torch.randn(40, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(folded.encode(x_raw), sae.encode_raw(x_raw))
        torch.testing.assert_close(folded.forward(x_raw), sae.reconstruct_raw(x_raw))
    assert folded.cfg.norm_scale == 1.0 and sae.cfg.norm_scale == 2.5  # the original is untouched
    assert folded.cfg.extra["folded_norm_scale"] == 2.5
    if arch == "transcoder":
        assert folded.cfg.norm_scale_out == 1.0
        assert folded.forward(x_raw).shape == (40, 12)


def test_folding_an_unscaled_sae_changes_nothing():
    sae = _random_sae("topk")
    folded = fold_norm_scale(sae)
    for (name, a), (_, b) in zip(sae.state_dict().items(), folded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", EXPORTABLE)
def test_export_round_trip_through_saelab_and_as_plain_saelens(arch, tmp_path):
    sae = _random_sae(arch, norm_scale=1.7)
    out = export_saelens(sae, tmp_path / "export")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}.get(
        arch, arch
    )
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    x_raw = torch.randn(30, 16) * 2
    with torch.no_grad():
        want = sae.encode_raw(x_raw)
        torch.testing.assert_close(load_sae(out).encode(x_raw), want)
        # What a tool reading only the SAELens keys sees: drop our section and load again.
        del cfg["saelab"]
        (out / "cfg.json").write_text(json.dumps(cfg))
        plain = load_sae(out)
        assert plain.cfg.norm_scale == 1.0  # folded in
        torch.testing.assert_close(plain.encode(x_raw), want)
        torch.testing.assert_close(plain.forward(x_raw), sae.reconstruct_raw(x_raw))


def test_unsupported_saelens_folders_say_why(tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(FIXTURES / "standard", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "abstopk"}))
    with pytest.raises(UserError, match=r"SAELens architecture 'abstopk' has no saelab equivalent.*standard, topk"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(UserError, match=r"normalize_activations 'layer_norm'.*fold it into the weights"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match=r"sae_weights.safetensors is corrupt or truncated"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(UserError, match=r"sae_weights.safetensors is missing"):
        load_sae(folder)


def test_transcoder_cannot_be_exported_to_saelens(tmp_path):
    with pytest.raises(UserError, match=r"SAELens has no TopK transcoder"):
        export_saelens(_random_sae("transcoder"), tmp_path / "x")


def test_export_command_folds_and_writes_each_hook(tmp_path, capsys):
    run = tmp_path / "run"
    saes = {
        h: _random_sae("topk", norm_scale=s, seed=i)
        for i, (h, s) in enumerate([("blocks.1.hook_resid_post", 2.0), ("blocks.3.hook_resid_post", 0.5)])
    }
    for hook, sae in saes.items():
        save_sae(sae, run / hook)
    assert main(["export", str(run), "--format", "saelens", "--out", str(tmp_path / "lens")]) == 0
    assert (
        main(["export", str(run / "blocks.1.hook_resid_post"), "--fold-scale", "--out", str(tmp_path / "folded")]) == 0
    )
    x_raw = torch.randn(10, 16)
    with torch.no_grad():
        for hook, sae in saes.items():
            torch.testing.assert_close(load_sae(tmp_path / "lens" / hook).encode(x_raw), sae.encode_raw(x_raw))
        folded = load_sae(tmp_path / "folded")
        assert folded.cfg.norm_scale == 1.0
        torch.testing.assert_close(folded.encode(x_raw), saes["blocks.1.hook_resid_post"].encode_raw(x_raw))
    assert "folded in" in capsys.readouterr().out


def test_export_command_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "unfinished" / "checkpoint").mkdir(parents=True)
    assert main(["export", str(tmp_path / "unfinished"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds no finished SAE" in err and "--resume" in err and "Traceback" not in err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- with the real sae-lens (run where it is installed) ------------------------------------------------------------


@pytest.mark.parametrize("arch", EXPORTABLE)
def test_saelens_loads_what_saelab_exports(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae(arch, norm_scale=1.7)
    out = export_saelens(sae, tmp_path / "export")
    theirs = sae_lens.SAE.load_from_disk(str(out))
    x_raw = torch.randn(30, 16) * 2
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x_raw), sae.encode_raw(x_raw))
        torch.testing.assert_close(theirs(x_raw), sae.reconstruct_raw(x_raw))
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
