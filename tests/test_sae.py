"""Tests for sae/: shapes, TopK semantics, sparse decoding, AuxK, a planted-dictionary training run,
and the cfg.json/safetensors format with every load error a user can hit."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from activations.errors import UserError
from sae.base import SAE, fvu
from sae.config import SAEConfig
from sae.io import load_sae, save_sae
from sae.kernels import sparse_decode
from sae.registry import ARCHITECTURES, make_sae
from sae.topk import ENCODER_INIT_SCALE, TopKSAE
from training.step import train_step

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def small_sae(d_in: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0, **kw) -> SAE:
    """A TopK SAE with random (non-zero) biases so bias handling is exercised."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


# ---- shapes and inference ----------------------------------------------------------------------


def test_param_shapes_and_leading_dims():
    sae = small_sae(d_in=16, d_sae=64)
    assert isinstance(sae, TopKSAE) and ARCHITECTURES["topk"] is TopKSAE
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16)
    assert sae.b_enc.shape == (64,) and sae.b_dec.shape == (16,)
    assert sae.dtype == torch.float32 and sae.device.type == "cpu"
    x = torch.randn(2, 3, 5, 16)
    f = sae.encode(x)
    assert f.shape == (2, 3, 5, 64)
    assert sae.decode(f).shape == (2, 3, 5, 16)
    assert sae(x).shape == (2, 3, 5, 16)
    # per-token: encoding a batch equals encoding each token alone
    torch.testing.assert_close(f[1, 2, 3], sae.encode(x[1, 2, 3]))


def test_init_is_tied_with_unit_decoder_rows_and_seeded():
    torch.manual_seed(3)
    a = make_sae(SAEConfig(d_in=8, d_sae=32, k=2))
    torch.manual_seed(3)
    b = make_sae(SAEConfig(d_in=8, d_sae=32, k=2))
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(a.W_enc, a.W_dec.T * ENCODER_INIT_SCALE)  # tied, the encoder scaled (sae/topk.py)
    assert a.W_enc.data_ptr() != a.W_dec.data_ptr()  # a clone, not the same storage
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, make_sae(a.cfg).W_dec)
    assert not a.b_enc.any() and not a.b_dec.any()


def test_topk_keeps_exactly_the_top_k_of_relu_pre():
    sae = small_sae(d_in=16, d_sae=64, k=5)
    with torch.no_grad():  # push most latents negative so some tokens have fewer than k positives
        sae.b_enc[:60] = -3.0 * ENCODER_INIT_SCALE  # 3 below the encoder's scale of x . W_dec[i]
    x = torch.randn(200, 16)
    pre = sae.encode_pre(x)
    f = sae.encode(x)
    nnz = (f != 0).sum(-1)
    assert (nnz <= 5).all() and (nnz < 5).any() and (nnz == 5).any()
    assert (f >= 0).all()
    kth = pre.sort(dim=-1, descending=True).values[:, 4:5]  # 5th largest pre-activation per token
    expected = torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))
    torch.testing.assert_close(f, expected)


def test_wrong_input_width_is_a_user_error():
    sae = small_sae(d_in=16)
    with pytest.raises(UserError, match="expects d_in=16"):
        sae.encode(torch.randn(4, 15))


def test_raw_helpers_apply_norm_scale_in_and_out():
    sae = small_sae(norm_scale=0.25)
    x_raw = torch.randn(8, 16) * 4
    torch.testing.assert_close(sae.encode_raw(x_raw), sae.encode(x_raw * 0.25))
    torch.testing.assert_close(sae.reconstruct_raw(x_raw), sae(x_raw * 0.25) / 0.25)


# ---- training path -------------------------------------------------------------------------------


def test_training_forward_sparse_decode_equals_dense_forward():
    sae = small_sae(d_in=16, d_sae=64, k=4)
    x = torch.randn(32, 16)
    out = sae.training_forward(x)
    torch.testing.assert_close(out.x_hat, sae(x), atol=1e-5, rtol=1e-5)
    f = sae.encode(x)
    assert out.fired.dtype == torch.bool and out.fired.shape == (64,)
    assert torch.equal(out.fired, (f != 0).any(0))
    torch.testing.assert_close(out.l0, (f != 0).sum(-1).float().mean())
    torch.testing.assert_close(out.losses["fvu"], fvu(x, sae(x)))
    torch.testing.assert_close(out.loss.detach(), sum(out.losses.values()))
    assert out.loss.requires_grad


def test_training_forward_rejects_unbatched_input():
    with pytest.raises(UserError, match="batch >= 2"):
        small_sae().training_forward(torch.randn(1, 16))


def test_fvu_is_one_for_the_batch_mean_and_zero_for_perfect():
    x = torch.randn(50, 8)
    torch.testing.assert_close(fvu(x, x.mean(0).expand_as(x)), torch.tensor(1.0))
    assert fvu(x, x) == 0


def test_sparse_decode_values_and_gradients_match_dense_reference():
    torch.manual_seed(0)
    W = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    idx = torch.randn(3, 7, 40).topk(5, dim=-1).indices  # unique per token, leading dims [3, 7]
    acts = torch.rand(3, 7, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 7, 12, dtype=torch.float64)

    out = sparse_decode(idx, acts, W)
    (out * upstream).sum().backward()
    W_grad, acts_grad = W.grad.clone(), acts.grad.clone()
    W.grad = acts.grad = None

    dense = torch.zeros(3, 7, 40, dtype=torch.float64).scatter(-1, idx, acts)
    ref = dense @ W
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(W_grad, W.grad)
    torch.testing.assert_close(acts_grad, acts.grad)
    assert W_grad.abs().sum() > 0 and acts_grad.abs().sum() > 0


def test_normalise_decoder_gives_unit_rows():
    sae = small_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) * 5 + 0.1)
    sae.normalise_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_remove_parallel_grad_leaves_only_the_orthogonal_part():
    sae = small_sae()
    g = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grad()
    rows = sae.W_dec.detach()
    dots = (sae.W_dec.grad * rows).sum(1)
    torch.testing.assert_close(dots, torch.zeros(64), atol=1e-5, rtol=0)
    expected = g - (g * rows).sum(1, keepdim=True) * rows  # rows are unit norm
    torch.testing.assert_close(sae.W_dec.grad, expected, atol=1e-5, rtol=1e-5)


def test_auxk_is_zero_without_dead_latents():
    sae = small_sae()
    x = torch.randn(32, 16)
    assert sae.training_forward(x).losses["auxk"] == 0
    assert sae.training_forward(x, dead_mask=torch.zeros(64, dtype=torch.bool)).losses["auxk"] == 0


def test_auxk_is_positive_and_trains_the_dead_latents():
    sae = small_sae(d_in=16, d_sae=64, k=4)
    x = torch.randn(16, 16)
    dead = ~sae.training_forward(x).fired  # latents that did not fire on this batch
    assert dead.sum() > 10

    sae.zero_grad()
    sae.training_forward(x).loss.backward()
    assert sae.W_enc.grad[:, dead].abs().sum() == 0  # main loss never reaches non-firing latents
    plain_grad = sae.W_enc.grad.clone()

    sae.zero_grad()
    out = sae.training_forward(x, dead_mask=dead)
    assert out.losses["auxk"] > 0
    out.loss.backward()
    dead_cols = sae.W_enc.grad[:, dead].abs().sum(0)
    assert (dead_cols > 0).sum() >= 4  # AuxK gradient flows into dead latents' encoder columns
    assert sae.W_dec.grad[dead].abs().sum() > 0
    torch.testing.assert_close(sae.W_enc.grad[:, ~dead], plain_grad[:, ~dead])  # AuxK only uses dead latents


def test_planted_dictionary_is_recovered():
    """x = sparse positive combinations of 64 known unit directions in 32 dims; TopK + Adam finds them."""
    d_in, n_true, n_active, batch = 32, 64, 3, 256
    gen = torch.Generator().manual_seed(0)
    true = torch.randn(n_true, d_in, generator=gen)
    true /= true.norm(dim=1, keepdim=True)

    def batch_of_data() -> torch.Tensor:
        which = torch.rand(batch, n_true, generator=gen).argsort(dim=1)[:, :n_active]
        coef = torch.rand(batch, n_active, generator=gen) + 0.5
        return (coef[..., None] * true[which]).sum(1)

    torch.manual_seed(1234)  # not the data seed: the init must not start on the true directions
    sae = make_sae(SAEConfig(d_in=d_in, d_sae=128, k=4))

    def mean_max_cos() -> float:
        return (true @ sae.W_dec.detach().T).max(dim=1).values.mean().item()

    assert mean_max_cos() < 0.6  # random init is far from the answer
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    steps_since_fired = torch.zeros(128, dtype=torch.long)
    for _ in range(300):
        out = train_step(sae, opt, batch_of_data(), dead_mask=steps_since_fired > 20).out
        steps_since_fired += 1
        steps_since_fired[out.fired] = 0
    assert mean_max_cos() > 0.9
    assert out.losses["fvu"] < 0.1


# ---- config and registry -------------------------------------------------------------------------


def provenance_cfg(**kw) -> SAEConfig:
    """A config with every provenance field and an extra key set to non-defaults."""
    return SAEConfig(
        d_in=16,
        d_sae=64,
        k=4,
        aux_k=6,
        aux_k_coef=0.05,
        model_name="HuggingFaceTB/SmolLM2-135M",
        hook_name="blocks.3.hook_resid_post",
        hook_layer=3,
        context_size=128,
        prepend_bos=True,
        dataset="shared/data/tiny.txt",
        norm_scale=0.5,
        extra={"seed": 7, "notes": {"a": [1, 2]}},
        **kw,
    )


def test_config_dict_round_trip_keeps_unknown_keys_in_extra():
    cfg = provenance_cfg()
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict() | {"from_the_future": 1}
    assert SAEConfig.from_dict(d).extra == {"seed": 7, "notes": {"a": [1, 2]}, "from_the_future": 1}
    with pytest.raises(UserError, match="d_sae"):
        SAEConfig.from_dict({"d_in": 4})
    with pytest.raises(UserError, match="unknown SAE dtype"):
        SAEConfig(d_in=4, d_sae=8, dtype="int8")


WRONG_TYPES = {
    "d_in": ("16", "an integer"),
    "d_sae": (64.0, "an integer"),
    "k": (True, "an integer"),
    "aux_k": ("6", "an integer or null"),
    "aux_k_coef": ([1], "a finite number"),
    "norm_scale": (float("nan"), "a finite number"),
    "l1_coefficient": (float("inf"), "a finite number"),
    "matryoshka_prefixes": ([8, "16"], "a list of integers or null"),
    "architecture": (3, "a string"),
    "dtype": (None, "a string"),
    "prepend_bos": (1, "true or false"),
    "hook_layer": (1.5, "an integer"),
    "extra": ([], "an object"),
}


def test_every_config_field_refuses_a_value_of_the_wrong_kind():
    for name, f in SAEConfig.__dataclass_fields__.items():
        bad = 7 if f.type == "str" else "text"
        with pytest.raises(UserError, match=f"field '{name}' must be"):
            SAEConfig.from_dict({"d_in": 16, "d_sae": 64, name: bad})


@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_wrong_field_types_name_the_field(name):
    value, expected = WRONG_TYPES[name]
    with pytest.raises(UserError, match=f"SAE config field '{name}' must be {expected}, got ") as err:
        SAEConfig.from_dict({"d_in": 16, "d_sae": 64, name: value})
    assert "\n" not in str(err.value)


def test_right_field_types_pass_and_ints_read_as_floats():
    cfg = SAEConfig.from_dict({"d_in": 16, "d_sae": 64, "norm_scale": 2, "aux_k": None, "matryoshka_prefixes": [8, 64]})
    assert cfg.norm_scale == 2.0 and isinstance(cfg.norm_scale, float) and cfg.matryoshka_prefixes == [8, 64]


def test_cfg_json_has_saelens_keys(tmp_path):
    save_sae(small_sae(**{"norm_scale": 1.0, "model_name": "m", "hook_name": "blocks.0.hook_resid_pre"}), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in (
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "k",
        "metadata",
        "saelab",
    ):
        assert key in cfg, key
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["k"] == 4
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu" and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["model_name"] == "m" and meta["hook_name"] == "blocks.0.hook_resid_pre"
    for key in ("context_size", "prepend_bos", "dataset_path", "hook_head_index"):
        assert key in meta, key
    assert meta["hook_head_index"] is None
    assert provenance_cfg().to_saelens_dict()["normalize_activations"] == "expected_average_only_in"
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {"W_enc", "W_dec", "b_enc", "b_dec"}


def test_plain_saelens_cfg_is_read():
    plain = {
        "architecture": "topk",
        "d_in": 16,
        "d_sae": 64,
        "k": 8,
        "dtype": "torch.float32",
        "device": "cuda",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {
            "model_name": "gpt2",
            "hook_name": "blocks.8.hook_resid_pre",
            "context_size": 1024,
            "prepend_bos": True,
            "dataset_path": "openwebtext",
            "hook_head_index": None,
        },
    }
    cfg = SAEConfig.from_file_dict(plain)
    assert (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.k) == ("topk", 16, 64, 8)
    assert (cfg.model_name, cfg.hook_name, cfg.context_size, cfg.prepend_bos, cfg.dataset) == (
        "gpt2",
        "blocks.8.hook_resid_pre",
        1024,
        True,
        "openwebtext",
    )
    assert cfg.torch_dtype == torch.float32 and cfg.extra["device"] == "cuda"


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(UserError, match=r"unknown SAE architecture 'nope'.*topk"):
        make_sae(SAEConfig(d_in=4, d_sae=8, architecture="nope"))


def test_k_larger_than_d_sae_is_a_user_error():
    with pytest.raises(UserError, match="k <= d_sae"):
        make_sae(SAEConfig(d_in=4, d_sae=8, k=9))


def test_topk_is_registered_when_topk_is_imported_first():
    """Importing an architecture module first still lets sae.registry list every architecture (no import cycle)."""
    code = "import sae.topk; from sae.registry import ARCHITECTURES; assert 'topk' in ARCHITECTURES, ARCHITECTURES"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = make_sae(provenance_cfg())
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    folder = save_sae(sae, tmp_path / "new" / "sae")  # creates missing parents
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]  # no temp left
    loaded = load_sae(folder)
    assert type(loaded) is TopKSAE
    assert loaded.cfg == sae.cfg
    x = torch.randn(10, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    for name, p in loaded.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad and p.device.type == "cpu", name
        assert torch.equal(p, getattr(sae, name))
    save_sae(loaded, folder)  # overwriting an existing save works
    assert load_sae(folder).cfg == sae.cfg


def test_a_loaded_sae_trains_on_exactly_like_the_one_saved(tmp_path):
    """The file's tensors sit at odd offsets (8 bytes past a 16-byte boundary here); the CPU kernels round some
    sums differently there, so load_sae copies them into torch's own memory: a resumed run stays bit-identical."""
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=64, d_sae=128, k=8, hook_name="h")
    xs = [torch.randn(256, 64) for _ in range(6)]
    for hook in (f"h{'x' * n}" for n in range(64)):  # the header's length sets the offsets: find an odd one
        sae = make_sae(replace(cfg, hook_name=hook))
        folder = save_sae(sae, tmp_path / "sae")
        if all(t.data_ptr() % 16 for t in load_file(folder / "sae_weights.safetensors").values()):
            break
    else:
        pytest.fail("no hook name gave a file with tensors off a 16-byte boundary")
    loaded = load_sae(folder)
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())

    def train(model: SAE) -> dict[str, torch.Tensor]:
        optimizer = torch.optim.Adam(model.optimizer_groups(), lr=1e-3)
        for x in xs:
            train_step(model, optimizer, x, lr=1e-3, grad_clip=1.0)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    want, got = train(sae), train(loaded)
    assert all(torch.equal(got[name], want[name]) for name in want), "the loaded SAE trained differently"


def test_save_writes_cfg_dtype(tmp_path):
    sae = make_sae(SAEConfig(d_in=4, d_sae=8, k=2, dtype="bfloat16"))
    assert sae.dtype == torch.bfloat16
    save_sae(sae.float(), tmp_path)  # parameters moved to float32 by the user: file still follows cfg
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "sae_weights.safetensors").values())
    assert load_sae(tmp_path).dtype == torch.bfloat16


def _write_weights(folder: Path, **overrides) -> None:
    """Rewrite the folder's safetensors with some tensors replaced (None: dropped)."""
    tensors = load_file(folder / "sae_weights.safetensors")
    for name, value in overrides.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    save_file(tensors, folder / "sae_weights.safetensors")


def _edit_cfg(folder: Path, **changes) -> None:
    """Change keys in both the SAELens top level and the saelab section of cfg.json."""
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    cfg["saelab"].update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_saelab(folder: Path, **changes) -> None:
    """Change (None: drop) keys of the saelab section only."""
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        cfg["saelab"].pop(key) if value is None else cfg["saelab"].update({key: value})
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_cfg_top(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _truncate(folder: Path) -> None:
    path = folder / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKERS = {
    "folder missing": (lambda f: None, "does not exist"),
    "cfg missing": (lambda f: (f / "cfg.json").unlink(), r"cfg\.json is missing"),
    "bad json": (lambda f: (f / "cfg.json").write_text("{not json"), "not valid JSON"),
    "json not object": (lambda f: (f / "cfg.json").write_text("[1, 2]"), "must hold a JSON object"),
    "no d_in": (lambda f: (f / "cfg.json").write_text('{"d_sae": 64}'), "has no 'd_in'"),
    "weights missing": (lambda f: (f / "sae_weights.safetensors").unlink(), r"sae_weights\.safetensors is missing"),
    "truncated": (_truncate, "corrupt or truncated"),
    "empty weights": (lambda f: (f / "sae_weights.safetensors").write_bytes(b""), "corrupt or truncated"),
    "unknown arch": (lambda f: _edit_cfg(f, architecture="mystery"), "unknown SAE architecture 'mystery'"),
    "tensor missing": (lambda f: _write_weights(f, b_enc=None), "missing tensor.*b_enc"),
    "extra tensor": (lambda f: _write_weights(f, threshold=torch.zeros(64)), "threshold"),
    "wrong shape": (lambda f: _write_weights(f, W_dec=torch.zeros(64, 15)), r"W_dec has shape \(64, 15\).*\(64, 16\)"),
    "cfg shape": (lambda f: _edit_cfg(f, d_sae=65), r"W_enc has shape \(16, 64\).*\(16, 65\)"),
    "int dtype": (
        lambda f: _write_weights(f, b_dec=torch.zeros(16, dtype=torch.int32)),
        "b_dec has non-floating dtype",
    ),
    "dtype differs": (
        lambda f: _write_weights(f, W_enc=torch.zeros(16, 64, dtype=torch.float16)),
        r"W_enc has dtype torch\.float16 but cfg\.json says dtype torch\.float32",
    ),
    "nan": (lambda f: _write_weights(f, b_enc=torch.full((64,), float("nan"))), "b_enc contains NaN or Inf"),
    "inf": (lambda f: _write_weights(f, W_dec=torch.full((64, 16), float("inf"))), "W_dec contains NaN or Inf"),
    "nan in a bias": (
        lambda f: _write_weights(f, b_dec=torch.tensor([0.0] * 15 + [float("nan")])),
        r"sae_weights\.safetensors: tensor b_dec contains NaN or Inf",
    ),
    "scaled by 1e30": (
        lambda f: _write_weights(f, W_enc=load_file(f / "sae_weights.safetensors")["W_enc"] * 1e30),
        r"tensor W_enc holds values up to .*e\+29, absurd for an SAE \(limit 1e\+06\)",
    ),
    "huge decoder rows": (
        lambda f: _write_weights(f, W_dec=torch.full((64, 16), 5e5)),
        r"W_dec has decoder rows of norm up to 2e\+06",
    ),
    "k not a number": (lambda f: _edit_cfg(f, k="many"), r"field 'k' must be an integer, got 'many' \(str\)"),
    "norm_scale a string": (lambda f: _edit_cfg(f, norm_scale="2"), "field 'norm_scale' must be a finite number"),
    "no norm_scale": (lambda f: _edit_saelab(f, norm_scale=None), r"no norm_scale.*add \"norm_scale\""),
    "saelab not an object": (lambda f: _edit_cfg_top(f, saelab=[1]), r"\"saelab\" section must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_load_errors_name_the_problem(tmp_path, case):
    folder = tmp_path / "sae"
    if case != "folder missing":
        save_sae(small_sae(), folder)
    breaker, message = BREAKERS[case]
    breaker(folder)
    with pytest.raises(UserError, match=message) as err:
        load_sae(folder)
    assert "\n" not in str(err.value)


def test_load_on_missing_cuda_is_a_user_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    save_sae(small_sae(), tmp_path)
    with pytest.raises(UserError, match="CUDA is not available"):
        load_sae(tmp_path, device="cuda")
