"""`sae export`: write a trained SAE for other tools: SAELens format, or ours with the scale folded in.

Both outputs read raw model activations (the normalisation scale is folded into the weights). A
run trained on several hooks exports one folder per hook under --out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from activations.errors import UserError
from activations.files import check_writable
from activations.options import check_fields, option
from sae.fold import fold_norm_scale
from sae.io import load_sae, save_sae
from sae.runs import sae_folders
from sae.saelens import export_saelens

HELP = "export a trained SAE (SAELens format, or with the normalisation scale folded in)"
DESCRIPTION = (
    "Write RUN's SAE to --out as a SAELens 6.x folder (--format saelens; loads with "
    "sae_lens.SAE.load_from_disk) or a saelab folder (--format saelab). The normalisation scale is "
    "folded into the weights for SAELens, and for saelab with --fold-scale, so the SAE reads raw activations."
)


@dataclass
class Config:
    """What to export, where, and in which format."""

    run: str = option(
        help="run folder (or any SAE folder holding cfg.json and sae_weights.safetensors)", positional=True
    )
    out: str = option(help="folder to write (one subfolder per hook for a several-hook run)", required=True)
    format: str = option(
        "saelab", "saelab, or saelens (SAELens 6.x cfg.json + sae_weights.safetensors)", choices=("saelab", "saelens")
    )
    fold_scale: bool = option(False, "fold the normalisation scale into the weights (always done for saelens)")

    def __post_init__(self) -> None:
        check_fields(self)
        if Path(self.out).resolve() == Path(self.run).resolve():
            raise UserError(
                f"--out {self.out} is the run folder itself; export to a new folder so the run stays intact."
            )


def run(cfg: Config) -> list[Path]:
    """Export every SAE of the run; returns the written folders."""
    out = Path(cfg.out)
    check_writable(out)
    written = []
    for hook, folder in sae_folders(cfg.run).items():
        sae = load_sae(folder)
        target = out / hook if hook else out
        scale = sae.cfg.norm_scale
        if cfg.format == "saelens":
            export_saelens(sae, target)
        else:
            save_sae(fold_norm_scale(sae) if cfg.fold_scale else sae, target)
        folded = cfg.format == "saelens" or cfg.fold_scale
        print(
            f"exported {sae.cfg.architecture} SAE {sae.cfg.hook_name or folder} as {cfg.format} → {target}"
            + (
                f" (normalisation scale {scale:.4g} folded in: it reads raw activations)"
                if folded and scale != 1.0
                else ""
            )
        )
        written.append(target)
    return written
