"""`sae export`: write a trained SAE for other tools: SAELens format, or ours with the scale folded in.

Both outputs read raw model activations (the normalisation scale is folded into the weights). A
run trained on several hooks exports one folder per hook under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from activations.errors import UserError

HELP = "export a trained SAE (SAELens format, or with the normalisation scale folded in)"
DESCRIPTION = ("Write RUN's SAE to --out as a SAELens 6.x folder (--format saelens; loads with "
               "sae_lens.SAE.load_from_disk) or a saelab folder (--format saelab). The normalisation scale is "
               "folded into the weights for SAELens, and for saelab with --fold-scale, so the SAE reads raw activations.")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of `sae export`."""
    p.add_argument("run", help="run folder (or any SAE folder holding cfg.json and sae_weights.safetensors)")
    p.add_argument("--out", required=True, help="folder to write (one subfolder per hook for a several-hook run)")
    p.add_argument("--format", default="saelab", choices=["saelab", "saelens"],
                   help="saelab (default) or saelens (SAELens 6.x cfg.json + sae_weights.safetensors)")
    p.add_argument("--fold-scale", action="store_true",
                   help="fold the normalisation scale into the weights (always done for --format saelens)")


def sae_folders(run: Path) -> dict[str, Path]:
    """The SAE folders of a run: {"": run} for one SAE, {hook: run/hook} for a several-hook run."""
    if (run / "cfg.json").is_file():
        return {"": run}
    if not run.is_dir():
        raise UserError(f"{run} does not exist; give a run folder written by sae train.")
    found = {d.name: d for d in sorted(run.iterdir()) if d.is_dir() and (d / "cfg.json").is_file()}
    if found:
        return found
    if (run / "checkpoint").is_dir() or any((d / "checkpoint").is_dir() for d in run.iterdir() if d.is_dir()):
        raise UserError(f"{run} holds no finished SAE (training stopped before the end); finish it with "
                        f"`sae train --out {run} --resume`, or export its last checkpoint: sae export {run}/checkpoint ...")
    raise UserError(f"{run} holds no SAE (no cfg.json); give a run folder written by sae train or an SAE folder.")


def run(args: argparse.Namespace) -> list[Path]:
    """Export every SAE of the run; returns the written folders."""
    from sae.fold import fold_norm_scale
    from sae.io import load_sae, save_sae
    from sae.saelens import export_saelens

    run_dir, out = Path(args.run), Path(args.out)
    if out.resolve() == run_dir.resolve():
        raise UserError(f"--out {out} is the run folder itself; export to a new folder so the run stays intact.")
    written = []
    for hook, folder in sae_folders(run_dir).items():
        sae = load_sae(folder)
        target = out / hook if hook else out
        scale = sae.cfg.norm_scale
        if args.format == "saelens":
            export_saelens(sae, target)
        else:
            save_sae(fold_norm_scale(sae) if args.fold_scale else sae, target)
        folded = args.format == "saelens" or args.fold_scale
        print(f"exported {sae.cfg.architecture} SAE {sae.cfg.hook_name or folder} as {args.format} → {target}"
              + (f" (normalisation scale {scale:.4g} folded in: it reads raw activations)" if folded and scale != 1.0 else ""))
        written.append(target)
    return written
