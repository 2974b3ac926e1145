"""Regenerate tests/fixtures/saelens/: small SAEs written by the real sae-lens package, with its own outputs.

Each folder is what sae-lens 6.x saves (cfg.json + sae_weights.safetensors) for a random SAE with
d_in 16, d_sae 32, plus expected.safetensors holding a fixed input `x` and sae-lens's own
`feature_acts = sae.encode(x)` and `reconstruction = sae.decode(feature_acts)`, so tests/test_saelens.py
checks that saelab loads the folders and computes the same numbers without sae-lens installed.

Runs only where sae_lens is importable (it is not a saelab dependency), e.g.
    python3 -m venv /tmp/saelens-venv && . /tmp/saelens-venv/bin/activate
    pip install torch==2.13.0 && pip install sae-lens
    python scripts/make_saelens_fixtures.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "saelens"
D_IN, D_SAE = 16, 32


def _randomise(sae, seed: int) -> None:
    """Random weights of realistic scale for every parameter (and the BatchTopK threshold buffer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_dec":
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 + torch.rand(p.shape[0], 1, generator=g)) / D_IN**0.5)
            elif name == "W_enc":
                p.copy_(torch.randn(p.shape, generator=g) / D_IN**0.5)
            elif name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.8)
            elif name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)


def _expected(folder: Path, sae, x: torch.Tensor) -> None:
    with torch.no_grad():
        feature_acts = sae.encode(x)
        reconstruction = sae.decode(feature_acts)
    assert (feature_acts != 0).any(), f"{folder.name}: no latent fires; pick other random weights"
    save_file(
        {"x": x.contiguous(), "feature_acts": feature_acts.contiguous(), "reconstruction": reconstruction.contiguous()},
        str(folder / "expected.safetensors"),
    )


def main() -> int:
    try:
        import sae_lens
        from sae_lens import (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig,
            GatedSAE,
            GatedSAEConfig,
            JumpReLUSAE,
            JumpReLUSAEConfig,
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
            StandardSAE,
            StandardSAEConfig,
            TopKSAE,
            TopKSAEConfig,
        )
        from sae_lens.saes.sae import SAEMetadata
    except ImportError:
        print(
            "sae_lens is not importable here; install it in a separate venv (see this file's docstring)",
            file=sys.stderr,
        )
        return 1

    meta = dict(
        model_name="tiny-random",
        hook_name="blocks.1.hook_resid_post",
        context_size=64,
        prepend_bos=False,
        dataset_path="random",
    )
    x = torch.randn(24, D_IN, generator=torch.Generator().manual_seed(1234)) * 1.5

    def common() -> dict:
        """d_in, d_sae and a fresh metadata object (training configs add their details to theirs)."""
        return dict(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(**meta))

    inference = {
        "standard": StandardSAE(StandardSAEConfig(**common())),
        "standard_no_b_dec_in": StandardSAE(StandardSAEConfig(**common(), apply_b_dec_to_input=False)),
        "topk": TopKSAE(TopKSAEConfig(**common(), k=4)),
        "topk_rescaled": TopKSAE(TopKSAEConfig(**common(), k=4, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(**common())),
        "gated": GatedSAE(GatedSAEConfig(**common(), apply_b_dec_to_input=False)),
    }
    training = {  # saved twice: for inference (a jumprelu folder, what SAELens hands out) and as a training checkpoint
        "batchtopk": BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common(), k=4.0)),
        "matryoshka_batchtopk": MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(**common(), k=4.0, matryoshka_widths=[8, 16, D_SAE])
        ),
    }
    shutil.rmtree(OUT, ignore_errors=True)
    for seed, (name, sae) in enumerate({**inference, **training}.items()):
        _randomise(sae, seed)
        sae.eval()
        folder = OUT / name
        if name in training:
            sae.save_inference_model(folder)
            reference = sae_lens.SAE.load_from_disk(str(folder))  # what SAELens infers with
            sae.save_model(OUT / f"{name}_training")
            _expected(OUT / f"{name}_training", reference, x)
        else:
            sae.save_model(folder)
            reference = sae_lens.SAE.load_from_disk(str(folder))
        _expected(folder, reference, x)
    (OUT / "VERSION").write_text(json.dumps({"sae_lens": sae_lens.__version__, "torch": torch.__version__}) + "\n")
    print(f"wrote {len(list(OUT.glob('*/cfg.json')))} fixtures with sae-lens {sae_lens.__version__} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
