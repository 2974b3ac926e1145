"""Sparse probing (SAEBench's sparse_probing eval): how well k SAE latents alone classify known binary tasks.

For each task of analysis/probing_tasks.py, on the train split: pick the k latents whose class means differ most
(|mean over positives - mean over negatives|, ties to the lower index), fit a logistic regression on those k, and
report its accuracy on the test split, for every k in `probe_ks`. The same probe on all of the model's raw
activations is the baseline, `llm_test_accuracy`; `llm_top_{k}` selects k raw dimensions the same way and
`sae_test_accuracy` uses every latent (SAEBench reports both too).

The probe is our own deterministic logistic regression (analysis/logistic.py; no sklearn): features centred on the
train split's means and divided by one common scale (the root mean variance of the columns), then mean log-loss +
probe_l2 / 2 * |w|^2 (bias unpenalised) minimised in float64 by full-batch L-BFGS from zero, so the same data always
gives the same probe.
SAEBench fits sklearn's L2 logistic regression (C = 1) on the unscaled features; one common scale keeps the
columns' relative sizes as that does, while making the penalty mean the same for activations of any overall scale.
(Standardising each column instead inflates rarely-firing latents: on the default run the all-latent probe lost
3-6 points of test accuracy that way.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.errors import UserError
from activations.models import LoadedModel
from activations.options import check_fields, option
from analysis.logistic import fit_logistic
from analysis.probing_tasks import TASKS, ProbeTask, build_tasks, check_task_names
from sae.base import SAE
from sae.runs import check_sae_fits

DEFAULT_KS = [1, 2, 5, 10, 20, 50]


@dataclass
class ProbingConfig:
    """Which tasks, how many examples, and how the sparse probes are fitted."""

    probe_ks: list[int] = option(default_factory=lambda: list(DEFAULT_KS), help="numbers of latents k to probe with")
    probe_tasks: list[str] = option(default_factory=lambda: list(TASKS), help="probing tasks (default: all)")
    probe_train_examples: int = option(800, "train examples per task, half of each class", low=2)
    probe_test_examples: int = option(400, "test examples per task, half of each class", low=2)
    probe_sequence_tokens: int = option(32, "tokens per context of the mean-pooled wikitext/shakespeare task", low=2)
    probe_batch_size: int = option(16, "contexts per model forward while gathering activations", low=1)
    probe_seed: int = option(42, "seed of the examples drawn for each task", low=0)
    probe_l2: float = option(1e-3, "L2 penalty of the logistic probes (features centred, one common scale)", above=0)
    probe_max_iter: int = option(500, "L-BFGS iterations per probe at most", low=1)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.probe_ks or any(k < 1 for k in self.probe_ks) or len(set(self.probe_ks)) != len(self.probe_ks):
            raise UserError(f"--probe-ks {self.probe_ks} must be distinct whole numbers of 1 or more, e.g. 1,2,5.")
        check_task_names(self.probe_tasks)


@dataclass
class LogisticProbe:
    """A fitted linear probe: logit = x @ weight + bias; class 1 where the logit is positive."""

    weight: Tensor  # [d] float64, in the input's own space
    bias: Tensor  # a scalar

    def logits(self, x: Tensor) -> Tensor:
        """The probe's logits [n] for inputs [n, d]."""
        return x.double() @ self.weight + self.bias

    def accuracy(self, x: Tensor, labels: Tensor) -> float:
        """Fraction of `labels` (0/1) the probe gets right on `x`."""
        return ((self.logits(x) > 0).long() == labels).double().mean().item()


def fit_probe(x: Tensor, labels: Tensor, l2: float = 1e-3, max_iter: int = 500) -> LogisticProbe:
    """The L2-regularised logistic regression of 0/1 `labels` [n] on `x` [n, d] (see the module docstring):
    uniform example weights (the mean log-loss), and l2 as given, since fit_logistic scales its inputs to unit
    mean variance per coordinate, which is the one common scale described there."""
    weight, bias = fit_logistic(x, labels[:, None], l2, balanced=False, max_iter=max_iter)
    return LogisticProbe(weight[0], bias[0])


def top_latents(latents: Tensor, labels: Tensor, k: int) -> Tensor:
    """Indices [k] of the columns with the largest |mean over labels 1 - mean over labels 0|, largest first
    (equal differences: lower index first)."""
    diff = (latents[labels == 1].double().mean(0) - latents[labels == 0].double().mean(0)).abs()
    return torch.sort(diff, descending=True, stable=True).indices[:k]


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, cfg: ProbingConfig) -> float:
    """Test accuracy of a probe fitted on the train split."""
    probe = fit_probe(train_x, train_y, cfg.probe_l2, cfg.probe_max_iter)
    return probe.accuracy(test_x, test_y)


def probe_task(task: ProbeTask, cfg: ProbingConfig) -> dict:
    """One task's results: sizes, the raw-activation probe, the k-sparse probes, and the top latents."""
    train, test = task.train, task.test
    out: dict = dict(kind=task.kind, description=task.description, n_train=len(train.labels), n_test=len(test.labels))
    out["llm_test_accuracy"] = probe_accuracy(train.acts, train.labels, test.acts, test.labels, cfg)
    dims = top_latents(train.acts, train.labels, min(max(cfg.probe_ks), train.acts.shape[1]))
    for k in cfg.probe_ks:
        d = dims[:k]
        out[f"llm_top_{k}_test_accuracy"] = probe_accuracy(
            train.acts[:, d], train.labels, test.acts[:, d], test.labels, cfg
        )
    out["sae_test_accuracy"] = probe_accuracy(train.latents, train.labels, test.latents, test.labels, cfg)
    chosen = top_latents(train.latents, train.labels, max(cfg.probe_ks))
    for k in cfg.probe_ks:
        c = chosen[:k]
        out[f"sae_top_{k}_test_accuracy"] = probe_accuracy(
            train.latents[:, c], train.labels, test.latents[:, c], test.labels, cfg
        )
    out["top_latents"] = chosen.tolist()
    return out


def sparse_probing(sae: SAE, lm: LoadedModel, cfg: ProbingConfig = ProbingConfig()) -> dict:
    """Build the tasks of `cfg` and probe each; JSON-ready means over tasks plus {"tasks": {name: results}} and
    {"skipped_tasks": {name: why}} for tasks left out for want of text."""
    check_sae_fits(sae, lm)
    if max(cfg.probe_ks) > sae.cfg.d_sae:
        raise UserError(f"--probe-ks {max(cfg.probe_ks)} is more than the SAE's {sae.cfg.d_sae} latents; use fewer.")
    tasks, skipped = build_tasks(
        sae,
        lm,
        cfg.probe_tasks,
        cfg.probe_train_examples,
        cfg.probe_test_examples,
        cfg.probe_sequence_tokens,
        cfg.probe_batch_size,
        cfg.probe_seed,
    )
    if not tasks:
        raise UserError(
            f"no probing task could be built ({'; '.join(f'{n}: {r}' for n, r in skipped.items())}); "
            f"add tasks with --probe-tasks, e.g. {', '.join(n for n in TASKS if n not in skipped)}."
        )
    results = {t.name: probe_task(t, cfg) for t in tqdm(tasks, desc="sparse probes", unit="task", leave=False)}
    keys = ["llm_test_accuracy", *(f"llm_top_{k}_test_accuracy" for k in cfg.probe_ks), "sae_test_accuracy"]
    keys += [f"sae_top_{k}_test_accuracy" for k in cfg.probe_ks]
    out: dict = {key: sum(r[key] for r in results.values()) / len(results) for key in keys}
    out.update(tasks=results, skipped_tasks=skipped, config=asdict(cfg))
    return out
