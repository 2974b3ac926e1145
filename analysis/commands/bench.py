"""`sae bench RUN [RUN ...]`: SAEBench's core metrics, first-letter absorption and sparse probing of each SAE on
held-out text, written part by part to RUN/bench.json (next to eval.json) and summed up in one table."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from activations.config import HeldOutText, SAEModelConfig
from activations.errors import UserError
from activations.files import atomic_write_json, check_writable
from activations.models import DEFAULT_MODEL, LoadedModel, resolve_model_path
from activations.options import check_fields, option
from activations.sources import open_text_source
from analysis.absorption import AbsorptionConfig, absorption, word_split
from analysis.bench_core import core_metrics
from analysis.compare import expand_runs
from analysis.evaluate import EvalConfig
from analysis.sparse_probing import ProbingConfig, sparse_probing
from sae.config import SAEConfig
from sae.io import read_cfg
from sae.runs import open_sae, sae_folders

HELP = "benchmark SAEs: SAEBench core metrics, absorption, sparse probing (writes RUN/bench.json)"
DESCRIPTION = (
    "For each run (and each SAE of a several-hook run): core metrics under SAEBench's names (reconstruction, CE and "
    "KL scores with the SAE spliced in, sparsity, decoder similarity), first-letter feature absorption (Chanin et "
    "al. 2024) and k-sparse probing on offline tasks, on held-out text. Each part is written to bench.json as soon "
    "as it finishes (a rerun keeps the others); --parts runs some of them."
)
PARTS = ("core", "absorption", "probing")
FILE = "bench.json"
BENCH_VERSION = 1


@dataclass
class Config:
    """Which runs, which parts, and each part's settings."""

    runs: list[str] = option(
        help="run folders (space- or comma-separated), SAE folders, or a folder of runs (sae sweep's --out)",
        positional=True,
    )
    parts: list[str] = option(default_factory=lambda: list(PARTS), help=f"parts to run, of {', '.join(PARTS)}")
    model: SAEModelConfig = field(default_factory=SAEModelConfig, metadata=dict(help="model"))
    text: HeldOutText = field(default_factory=HeldOutText, metadata=dict(help="held-out text (core metrics)"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=dict(help="core metrics"))
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig, metadata=dict(help="absorption"))
    probing: ProbingConfig = field(default_factory=ProbingConfig, metadata=dict(help="sparse probing"))

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise UserError(f"--parts {','.join(self.parts) or '(none)'}: use some of {', '.join(PARTS)}.")


def _folders(runs: list[str]) -> list[Path]:
    """Every SAE folder of the runs, each checked writable before any model loads."""
    folders = [folder for run in expand_runs(runs) for folder in sae_folders(run).values()]
    for folder in folders:
        check_writable(folder, "RUN")
    return folders


def _check_sizes(folders: list[Path], cfg: Config) -> None:
    """What can be refuted before any model loads: from each SAE's cfg.json, more probe latents than the SAE has;
    from each model's tokenizer, absorption words that the vocabulary cannot supply or that leave no letter with
    both train and test words."""
    if "probing" in cfg.parts:
        for folder in folders:
            d_sae = _read(folder / "cfg.json").get("d_sae")
            if isinstance(d_sae, int) and max(cfg.probing.probe_ks) > d_sae:
                raise UserError(
                    f"--probe-ks {max(cfg.probing.probe_ks)} is more than the {d_sae} latents of {folder}; use fewer."
                )
    if "absorption" in cfg.parts:
        absorbing = [f for f in folders if not getattr(_sae_cfg(f), "hook_name_out", "")]  # transcoders are skipped
        for name in sorted({_model_name(folder, cfg) for folder in absorbing}):
            tokenizer = _tokenizer(name)
            if tokenizer is not None:
                word_split(tokenizer, cfg.absorption)


def _sae_cfg(folder: Path) -> SAEConfig | None:
    """The SAE's config from its cfg.json, or None when that cannot be read (opening the SAE then says why)."""
    try:
        return read_cfg(folder)
    except UserError:
        return None


def _tokenizer(name: str):
    """The tokenizer of model `name` without its weights, or None when it cannot be read (loading the model then
    says why). The embedded default's first use converts its GGUF file, as loading it would."""
    from transformers import AutoTokenizer  # imported when used, as in activations/models.py: it is slow to import

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError, KeyError):
        return None


def _read(path: Path) -> dict:
    """The bench.json already there (its finished parts are kept), or {} for none or an unreadable one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def bench_folder(folder: Path, lm: LoadedModel, cfg: Config) -> dict:
    """Run the chosen parts on the SAE in `folder`, writing bench.json after each part."""
    sae, lm = open_sae(folder, lm=lm)
    path = folder / FILE
    result = _read(path)
    result.update(version=BENCH_VERSION, model=lm.name, hook=sae.cfg.hook_name)
    seconds = result.setdefault("seconds", {})
    for part in [p for p in PARTS if p in cfg.parts]:
        started = time.time()
        if part == "core":
            dataset = cfg.text.dataset or sae.cfg.dataset or "wikitext-2"
            source = open_text_source(
                dataset,
                split=cfg.text.split,
                config=cfg.text.dataset_config,
                text_field=cfg.text.text_field,
                data_dir=cfg.text.data_dir,
            )
            result["core"] = {**core_metrics(sae, lm, source, cfg.eval), "dataset": dataset, "split": cfg.text.split}
        elif part == "absorption":
            if getattr(sae.cfg, "hook_name_out", ""):
                result["absorption"] = None  # a transcoder reconstructs another activation than it reads
                result.setdefault("skipped", {})["absorption"] = "a transcoder: no first-letter features to absorb"
            else:
                result["absorption"] = absorption(sae, lm, cfg.absorption)
        else:
            result["sparse_probing"] = sparse_probing(sae, lm, cfg.probing)
        seconds[part] = round(time.time() - started, 1)
        atomic_write_json(path, result)  # each finished part is kept, whatever happens to the next
    return result


def _cell(value, digits: int = 3) -> str:
    return "n/a" if not isinstance(value, int | float) or not math.isfinite(value) else f"{value:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    """One line per SAE: its headline numbers."""
    head = ["SAE", "L0", "FVU", "ce_loss_score", "kl_div_score", "absorption", "split", "probe top-1", "probe LLM"]
    lines = [" | ".join(head)]
    for name, r in results.items():
        core, ab, pr = r.get("core") or r.get("eval") or {}, r.get("absorption") or {}, r.get("sparse_probing") or {}
        lines.append(
            " | ".join(
                [
                    name,
                    _cell(core.get("l0"), 1),
                    _cell(core.get("fvu")),
                    _cell(core.get("ce_loss_score")),
                    _cell(core.get("kl_div_score")),
                    _cell(ab.get("mean_absorption_fraction_score")),
                    _cell(ab.get("mean_num_split_features"), 2),
                    _cell(pr.get("sae_top_1_test_accuracy")),
                    _cell(pr.get("llm_test_accuracy")),
                ]
            )
        )
    return "\n".join(lines)


def _model_name(folder: Path, cfg: Config) -> str:
    """The model an SAE folder is benched with, as open_sae picks it: --model, else the one its cfg.json names
    (read as the SAE is, a plain SAELens cfg.json too), else the embedded default."""
    sae_cfg = _sae_cfg(folder)
    return cfg.model.model or (sae_cfg.model_name if sae_cfg else "") or DEFAULT_MODEL


def run(cfg: Config) -> dict[str, dict]:
    """Bench every SAE folder of the runs, one model load per model; returns {folder: bench.json's content}."""
    folders = _folders(cfg.runs)
    _check_sizes(folders, cfg)
    models: dict[str, LoadedModel] = {}
    results: dict[str, dict] = {}
    for folder in folders:
        name = _model_name(folder, cfg)
        if name not in models:
            models[name] = open_sae(folder, model=cfg.model.model, device=cfg.model.device)[1]
        results[str(folder)] = bench_folder(folder, models[name], cfg)
        if "core" not in results[str(folder)]:  # the table shows what sae eval measured, where bench did not
            seen = _read(folder / "eval.json")
            results[str(folder)] = {**results[str(folder)], "eval": {**seen, "ce_loss_score": seen.get("ce_recovered")}}
        print(f"bench → {folder / FILE}", flush=True)
    print(table(results))
    return results
