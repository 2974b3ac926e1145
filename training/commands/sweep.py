"""`sae sweep`: train a grid of SAEs (architectures × k, or × sparsity coefficient) from one activation cache, one
run folder per point (OUT/<arch>-k<k> or OUT/<arch>-c<coef>), each evaluated, ready for `sae compare OUT`.

Each point is an ordinary `sae train` run made by the train command's own code, one after another. A point already
trained is skipped and one stopped part-way is resumed from its checkpoint, so a killed sweep continues where it
stopped when run again. Every grid value, and every point's config, is checked before anything trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from activations.cache import read_manifest
from activations.config import StoreConfig
from activations.errors import UserError
from activations.files import check_writable
from activations.options import build, check_fields, flag_of, leaf_fields, option
from sae.cli import run_command
from sae.config import SAEConfig
from sae.registry import ARCHITECTURES, COEFFICIENT_OF
from sae.runs import sae_folders
from training.checkpoint import has_checkpoint
from training.commands import train as train_command
from training.config import DataConfig, TrainConfig, TrainRunConfig

HELP = "train a grid of SAEs (architectures x k or coefficient) from one activation cache, then evaluate each"
DESCRIPTION = (
    "Trains every point of --architectures × --k (topk, batchtopk, matryoshka, transcoder) or × --coefficients "
    "(relu, gated: L1; jumprelu: L0) from the cache --activations into OUT/<arch>-k<k> or OUT/<arch>-c<coef>, one "
    "after another, and evaluates each. Run it again to continue an interrupted sweep: finished points are skipped, "
    "a stopped one resumes. Then `sae compare OUT` makes the table and Pareto plots."
)

K_ARCHITECTURES = tuple(sorted(set(ARCHITECTURES) - set(COEFFICIENT_OF)))
DEFAULT_K = [16, 32, 64]
# Options that do not change what a point trains, so a rerun may give other values (a resumed `sae train` may
# change each of them too); any other option differing from a started point's is refused.
FREE = {"out", "resume", "evaluate", "eval_tokens", "device", "data_dir", "log_every", "checkpoint_every"}
FREE |= {"wandb", "compile"}


@dataclass
class GridConfig:
    """The grid (architectures × k or × coefficient), the dictionary width of every point, and the sweep folder."""

    architectures: list[str] = option(
        default_factory=lambda: ["topk", "batchtopk"],
        help=f"comma-separated SAE architectures, of {', '.join(sorted(ARCHITECTURES))} (default topk,batchtopk)",
    )
    k: list[int] | None = option(
        None, f"comma-separated k values for {', '.join(K_ARCHITECTURES)} (default {','.join(map(str, DEFAULT_K))})"
    )
    coefficients: list[float] | None = option(
        None, "comma-separated sparsity coefficients for relu, gated (L1) and jumprelu (L0), SAELens units"
    )
    expansion: int = option(8, "d_sae = expansion × d_model, every point", low=1)
    d_sae: int | None = option(None, "number of latents of every point (overrides --expansion)", low=1)
    out: str = option("sweep", "sweep folder: one run folder per point, OUT/<arch>-k<k> or OUT/<arch>-c<coef>")

    def __post_init__(self) -> None:
        check_fields(self)
        archs, ks, coefs = self.architectures, self.k, self.coefficients
        if not archs:
            raise UserError("--architectures is empty; give one or more, e.g. --architectures topk,batchtopk")
        for flag, values in (("--architectures", archs), ("--k", ks or []), ("--coefficients", coefs or [])):
            if len(set(values)) != len(values):
                raise UserError(f"{flag} lists a value twice ({','.join(map(str, values))}); give each once.")
        for arch in archs:
            if arch not in ARCHITECTURES:
                raise UserError(
                    f"--architectures {arch!r} is not an SAE architecture; use {', '.join(sorted(ARCHITECTURES))}."
                )
        for k in ks or []:
            if k < 1:
                raise UserError(f"--k {k} is too small: a token needs at least one active latent; give k >= 1.")
        for c in coefs or []:
            if not (math.isfinite(c) and c >= 0):
                raise UserError(f"--coefficients {c!r} is not a finite number >= 0; give e.g. --coefficients 1,5,20")
        by_k = [a for a in archs if a not in COEFFICIENT_OF]
        by_coef = [a for a in archs if a in COEFFICIENT_OF]
        if ks is not None and not ks:
            raise UserError("--k is empty; give one or more values, e.g. --k 16,32,64")
        if ks and not by_k:
            raise UserError(
                f"--k is for {', '.join(K_ARCHITECTURES)}, and --architectures has none of them; drop --k or add one."
            )
        if coefs is not None and not by_coef:
            raise UserError(
                "--coefficients is for relu, gated and jumprelu, and --architectures has none of them; "
                "drop --coefficients or add one."
            )
        if by_coef and not coefs:
            raise UserError(
                f"{', '.join(by_coef)} {'is' if len(by_coef) == 1 else 'are'} swept over sparsity coefficients; "
                "give them, e.g. --coefficients 1,5,20"
            )

    def points(self) -> list[tuple[str, dict]]:
        """(folder name, the dictionary options of that point) for every point, architectures in the order given."""
        out = []
        for arch in self.architectures:
            if arch in COEFFICIENT_OF:
                out += [(f"{arch}-c{c:g}", {"architecture": arch, COEFFICIENT_OF[arch]: c}) for c in self.coefficients]
            else:
                out += [(f"{arch}-k{k}", {"architecture": arch, "k": k}) for k in self.k or DEFAULT_K]
        return out


@dataclass
class SweepRunConfig:
    """Where the points train and how each is evaluated."""

    device: str = option("auto", "cpu, cuda, cuda:1 … (default: cuda when available)")
    evaluate: bool = option(True, "skip the evaluation after each point", flag="--no-eval")
    eval_tokens: int = option(16384, "held-out tokens for each point's evaluation", low=1)
    data_dir: str | None = option(None, "folder holding local copies of the named corpora (for the evaluation)")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Config:
    """`sae sweep`: the grid, the cache and hooks, and the train options every point shares."""

    grid: GridConfig = field(default_factory=GridConfig, metadata=dict(help="grid"))
    data: DataConfig = field(default_factory=DataConfig, metadata=dict(help="activation cache and hooks"))
    store: StoreConfig = field(default_factory=StoreConfig, metadata=dict(help="activation batches"))
    training: TrainConfig = field(default_factory=TrainConfig, metadata=dict(help="optimisation and logging"))
    run: SweepRunConfig = field(default_factory=SweepRunConfig, metadata=dict(help="device and evaluation"))

    def __post_init__(self) -> None:
        if not self.data.activations:
            raise UserError(
                "sae sweep trains every point from one activation cache; give --activations DIR "
                "(write one with `sae cache --out DIR`)."
            )


@dataclass
class Point:
    """One grid point: its run folder, its train config, and what is left to do there."""

    name: str
    folder: Path
    cfg: TrainRunConfig
    state: str  # "trained", "resume" (stopped part-way), "new"


def shared_values(cfg: Config) -> dict:
    """The train options every point gets: each option of the sweep's data, store, training and run sections,
    under its `sae train` name, with the cache's path made absolute (a rerun from elsewhere names the same)."""
    values = {}
    for path, f, _ in leaf_fields(Config):
        section = path.split(".")[0]
        if section in ("data", "store", "training", "run"):
            values[f.name] = getattr(getattr(cfg, section), f.name)
    values["activations"] = str(Path(cfg.data.activations).resolve())
    values.update(expansion=cfg.grid.expansion, d_sae=cfg.grid.d_sae)
    return values


def plan(cfg: Config) -> list[Point]:
    """Every point's config and state, checked before any training: grid values against the cache's width and
    hooks, and points already started against the options they were started with."""
    manifest = read_manifest(cfg.data.activations)
    hooks = cfg.data.hook_list(manifest["hooks"])
    missing = [h for h in hooks + ([cfg.data.hook_out] if cfg.data.hook_out else []) if h not in manifest["hooks"]]
    if missing:
        raise UserError(
            f"the cache {cfg.data.activations} has no hook {missing[0]} (it holds {', '.join(manifest['hooks'])}); "
            "pick --hook/--hooks among those, or cache that hook with `sae cache`."
        )
    out = Path(cfg.grid.out)
    check_writable(out)
    shared = shared_values(cfg)
    points = []
    for name, dictionary in cfg.grid.points():
        values = {**shared, **dictionary, "out": str(out / name)}
        if "k" not in dictionary:  # k is unused by penalty-trained SAEs, but must fit the width
            values["k"] = min(SAEConfig.k, cfg.grid.d_sae or cfg.grid.expansion * manifest["d_model"])
        point_cfg = build(TrainRunConfig, values)
        point_cfg.dictionary.width(manifest["d_model"])  # k above the width: a UserError naming --k
        folder = out / name
        state = _state(folder)
        if state != "new" and (folder / train_command.RUN_CONFIG).is_file():
            check_same(folder, train_command.load_run_config(folder), point_cfg)
        if state == "resume":
            point_cfg = train_command.make_config({**values, "resume": True})
        points.append(Point(name, folder, point_cfg, state))
    return points


def _state(folder: Path) -> str:
    """trained (the SAEs are saved), resume (a checkpoint to continue from) or new (nothing to keep)."""
    if not folder.is_dir():
        return "new"
    try:
        sae_folders(folder)
        return "trained"
    except UserError:
        pass
    inside = [folder, *(d for d in folder.iterdir() if d.is_dir())]
    return "resume" if any(has_checkpoint(d) for d in inside) else "new"


def check_same(folder: Path, saved: TrainRunConfig, wanted: TrainRunConfig) -> None:
    """UserError when a point already started in `folder` was started with other options than this sweep gives."""
    for path, f, _ in leaf_fields(TrainRunConfig):
        if f.name in FREE:
            continue
        have, want = (_leaf(c, path, f.name) for c in (saved, wanted))
        if have != want:
            raise UserError(
                f"{folder} was started with {flag_of(f)} {have!r} but this sweep gives {want!r}; run the sweep with "
                f"the options it was started with, or give another --out."
            )


def _leaf(cfg: object, path: str, name: str) -> object:
    for part in path.split(".") if path else []:
        cfg = getattr(cfg, part)
    return getattr(cfg, name)


def _evaluated(folder: Path) -> bool:
    return all((f / "eval.json").is_file() for f in sae_folders(folder).values())


def run(cfg: Config) -> list[Path]:
    """Train and evaluate each point still to do, in order; returns the points' run folders."""
    points = plan(cfg)
    todo = sum(p.state != "trained" for p in points)
    print(f"sweep of {len(points)} points in {cfg.grid.out}: {todo} to train, {len(points) - todo} trained already")
    for n, point in enumerate(points, 1):
        where = f"[{n}/{len(points)}] {point.name}"
        try:
            if point.state == "trained":
                print(f"{where}: trained already, skipped")
            else:
                print(f"{where}: {'resuming' if point.state == 'resume' else 'training'} in {point.folder}")
                train_command.run(point.cfg)
            if cfg.run.evaluate and not _evaluated(point.folder):
                for argv in train_command.follow_up(point.cfg, point.folder):
                    run_command(argv)
        except KeyboardInterrupt:
            print(f"\nsweep stopped at {point.name}; run the same sae sweep command again to continue")
            raise
    print(f"sweep done: {len(points)} runs in {cfg.grid.out}")
    print(f"next: sae compare {cfg.grid.out} --out {Path(cfg.grid.out) / 'compare'}")
    return [p.folder for p in points]
