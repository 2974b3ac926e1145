"""Synthetic activations from a planted sparse dictionary: ground truth for judging what an SAE recovers.

A sample is x = sum_i a_i d_i (+ noise) over n_features unit directions d_i in d_model dimensions (superposition
when n_features > d_model). Feature i fires with probability p_i, Zipf-like over a random ranking and scaled so
that mean_active features fire per sample on average, with a positive magnitude a_i drawn from one distribution.
Two planted structures, on disjoint features, make it harder in the ways real data is:

- correlated groups: features of a group fire through a Gaussian copula, z_i = sqrt(rho) s_group + sqrt(1-rho) e_i,
  firing when z_i > Phi^-1(1 - p_i), so each keeps its p_i while the group tends to co-fire;
- hierarchies: when a parent fires, with probability child_probability exactly one of its children (chosen
  uniformly) fires too; a child never fires without its parent and siblings never fire together. This is the
  setting in which SAEs absorb the parent into its children's latents (Chanin et al. 2024).

`SyntheticFeatures` holds the truth and samples it; `SyntheticBatches` serves it to training.trainer.Trainer (the
training.data.ActivationBatches protocol: nothing in it needs a model or a store). Every batch is drawn from its
own seeded generator, so batch i is the same whatever came before it, and a resumed stream starts at its position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from activations.errors import UserError
from activations.options import check_fields, option

MAGNITUDES = ("lognormal", "uniform", "exponential", "constant")
SYNTHETIC_HOOK = "synthetic"  # the one "hook" name a SyntheticBatches stream reports
_DICTIONARY, _HELDOUT, _SCALE = 0, 2**32 - 1, 2**32 - 2  # reserved streams; training batch i uses stream i + 1


@dataclass
class SyntheticConfig:
    """The planted dictionary and how its features fire (defaults: 512 features in 64 dimensions, 8 active)."""

    d_model: int = option(64, "width of the synthetic activations", low=1)
    n_features: int = option(512, "number of true features (more than --d-model: superposition)", low=1)
    mean_active: float = option(8.0, "features firing per sample on average", above=0)
    zipf_exponent: float = option(0.5, "firing probability of the rank-r feature goes as r^-exponent", low=0)
    max_probability: float = option(0.5, "no feature fires more often than this", above=0, high=1)
    magnitude: str = option("lognormal", "distribution of a firing feature's magnitude", choices=MAGNITUDES)
    magnitude_mean: float = option(1.0, "mean magnitude of a firing feature", above=0)
    magnitude_std: float = option(0.5, "standard deviation of the magnitude (lognormal, uniform)", low=0)
    n_groups: int = option(16, "correlated groups of features that tend to co-fire", low=0)
    group_size: int = option(4, "features per correlated group", low=2)
    correlation: float = option(0.6, "correlation of a group's latent Gaussians (copula strength)", low=0, high=0.99)
    n_parents: int = option(16, "parent features, each with mutually exclusive children", low=0)
    n_children: int = option(3, "children per parent", low=1)
    child_probability: float = option(0.75, "chance that one child fires when its parent fires", low=0, high=1)
    noise_std: float = option(0.0, "Gaussian noise added to every coordinate", low=0)
    seed: int = option(0, "seed of the dictionary and of every batch", low=0, high=2**31 - 1)

    def __post_init__(self) -> None:
        check_fields(self)
        structured = self.n_parents * (1 + self.n_children) + self.n_groups * self.group_size
        if structured > self.n_features:
            raise UserError(
                f"the hierarchies ({self.n_parents} × (1 + {self.n_children})) and correlated groups "
                f"({self.n_groups} × {self.group_size}) need {structured} features but --n-features is "
                f"{self.n_features}; raise --n-features or lower --n-parents / --n-groups."
            )
        if self.magnitude == "uniform" and self.magnitude_mean < math.sqrt(3) * self.magnitude_std:
            raise UserError(
                f"a uniform magnitude of mean {self.magnitude_mean:g} and std {self.magnitude_std:g} would go "
                "negative; keep --magnitude-std at most --magnitude-mean / sqrt(3)."
            )

    @property
    def n_children_total(self) -> int:
        """How many features are children (they fire only through their parents)."""
        return self.n_parents * self.n_children


@dataclass
class SyntheticSample:
    """n samples: x [n, d_model] and the true feature activations acts [n, n_features] (0 where silent)."""

    x: Tensor
    acts: Tensor


def firing_probabilities(ranks: Tensor, weights: Tensor, mean_active: float, exponent: float, cap: float) -> Tensor:
    """p_i = min(c (rank_i + 1)^-exponent, cap) with c chosen so sum_i weights_i p_i = mean_active.

    weights count a feature once plus the features it brings along (a parent: child_probability). The cap is
    met by water-filling: features at the cap are fixed there and c is solved again over the rest.
    """
    base = (ranks.double() + 1).pow(-exponent)
    weights = weights.double()
    if mean_active > cap * float(weights.sum()) * (1 - 1e-9):
        raise UserError(
            f"--mean-active {mean_active:g} is unreachable: even with every feature at --max-probability {cap:g} "
            f"only {cap * float(weights.sum()):.3g} fire on average; lower --mean-active or raise --max-probability."
        )
    capped = torch.zeros_like(base, dtype=torch.bool)
    while True:
        c = (mean_active - cap * float(weights[capped].sum())) / float((weights * base)[~capped].sum())
        over = (c * base > cap) & ~capped
        if not over.any():
            break
        capped |= over
    return torch.where(capped, torch.full_like(base, cap), c * base).float()


class SyntheticFeatures:
    """The ground truth: unit feature directions, firing probabilities, the planted groups and hierarchies.

    Features are laid out as [parents | children | grouped | independent]: `parents` [n_parents], `children`
    [n_parents, n_children] (row j: parent j's children), `groups` [n_groups, group_size]. `probabilities` are
    marginal firing rates (a child's is its parent's × child_probability / n_children); they sum to mean_active.
    """

    def __init__(self, cfg: SyntheticConfig):
        """Draw the directions and the firing ranking from cfg.seed (the same seed gives the same truth)."""
        self.cfg = cfg
        n, P, C = cfg.n_features, cfg.n_parents, cfg.n_children
        g = stream_generator(cfg.seed, _DICTIONARY)
        directions = torch.randn(n, cfg.d_model, generator=g)
        self.directions = directions / directions.norm(dim=1, keepdim=True)  # [n_features, d_model]
        self.parents = torch.arange(P)
        self.children = torch.arange(P, P + P * C).view(P, C)
        start = P + P * C
        self.groups = torch.arange(start, start + cfg.n_groups * cfg.group_size).view(cfg.n_groups, cfg.group_size)
        is_child = torch.zeros(n, dtype=torch.bool)
        is_child[self.children.flatten()] = True
        self.free = torch.nonzero(~is_child).flatten()  # features that fire on their own (not children)
        weights = torch.ones(len(self.free))
        weights[:P] += cfg.child_probability  # parents come first in `free`
        ranks = torch.randperm(len(self.free), generator=g)
        p_free = firing_probabilities(ranks, weights, cfg.mean_active, cfg.zipf_exponent, cfg.max_probability)
        self.probabilities = torch.zeros(n)
        self.probabilities[self.free] = p_free
        self.probabilities[self.children] = (p_free[:P] * cfg.child_probability / max(C, 1))[:, None]
        # the copula: a free feature fires when its latent Gaussian exceeds Phi^-1(1 - p)
        self._thresholds = torch.special.ndtri(1 - p_free.double()).float()

    @property
    def parent_of(self) -> Tensor:
        """[n_features]: each child's parent feature, -1 for features that are not children."""
        out = torch.full((self.cfg.n_features,), -1, dtype=torch.long)
        out[self.children] = self.parents[:, None].expand_as(self.children)
        return out

    def magnitudes(self, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
        """Positive magnitudes of firing features, from cfg.magnitude with mean magnitude_mean."""
        m, s = self.cfg.magnitude_mean, self.cfg.magnitude_std
        kind = self.cfg.magnitude
        if kind == "constant":
            return torch.full(shape, m)
        if kind == "exponential":
            return torch.empty(shape).exponential_(1 / m, generator=g)
        if kind == "uniform":
            half = math.sqrt(3) * s
            return m - half + 2 * half * torch.rand(shape, generator=g)
        sigma2 = math.log1p((s / m) ** 2)  # lognormal with the given mean and std
        return torch.exp(math.log(m) - sigma2 / 2 + math.sqrt(sigma2) * torch.randn(shape, generator=g))

    def sample(self, n: int, g: torch.Generator) -> SyntheticSample:
        """n samples drawn with generator g: which features fire, their magnitudes, and x = acts @ directions."""
        cfg, P, C = self.cfg, self.cfg.n_parents, self.cfg.n_children
        z = torch.randn(n, len(self.free), generator=g)  # latent Gaussians of the free features
        if cfg.n_groups:
            shared = torch.randn(n, cfg.n_groups, generator=g)
            grouped = self.groups.flatten() - P * C  # grouped features' positions in `free`
            z[:, grouped] = (
                math.sqrt(cfg.correlation) * shared.repeat_interleave(cfg.group_size, dim=1)
                + math.sqrt(1 - cfg.correlation) * z[:, grouped]
            )
        fires = torch.zeros(n, cfg.n_features, dtype=torch.bool)
        fires[:, self.free] = z > self._thresholds
        if P:
            parent_fires = fires[:, self.parents]
            with_child = parent_fires & (torch.rand(n, P, generator=g) < cfg.child_probability)
            which = torch.randint(0, C, (n, P), generator=g)
            rows, parents = torch.nonzero(with_child, as_tuple=True)
            fires[rows, self.children[parents, which[rows, parents]]] = True
        acts = torch.zeros(n, cfg.n_features)
        acts[fires] = self.magnitudes((int(fires.sum()),), g)  # only the firing entries draw a magnitude
        x = acts @ self.directions
        if cfg.noise_std:
            x = x + cfg.noise_std * torch.randn(n, cfg.d_model, generator=g)
        return SyntheticSample(x=x, acts=acts)

    def batch(self, index: int, batch_size: int) -> SyntheticSample:
        """Training batch `index` (0, 1, ...): its own seeded stream, so it never depends on earlier batches."""
        if not 0 <= index < _SCALE - 1:
            raise UserError(f"synthetic batch index {index} is out of range; start the stream within 2**32 - 3.")
        return self.sample(batch_size, stream_generator(self.cfg.seed, index + 1))

    def heldout(self, n: int) -> SyntheticSample:
        """n samples from a stream no training batch uses (for evaluation)."""
        return self.sample(n, stream_generator(self.cfg.seed, _HELDOUT))

    def scale(self, n: int = 16384) -> float:
        """The factor that makes the mean norm of x sqrt(d_model), as the activation store normalises."""
        x = self.sample(n, stream_generator(self.cfg.seed, _SCALE)).x
        return math.sqrt(self.cfg.d_model) / max(float(x.norm(dim=1).mean()), 1e-12)


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """The generator of one numbered stream of a seed (the dictionary, a batch, the held-out sample).

    (seed, stream) is scrambled by splitmix64's bijective finaliser, so distinct streams stay distinct and none
    coincides with torch.manual_seed(small number): an SAE seeded with 0 must not start at the planted dictionary.
    """
    mask = 2**64 - 1
    z = (((seed << 32) | stream) + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return torch.Generator().manual_seed(z ^ (z >> 31))


class SyntheticBatches:
    """A training.data.ActivationBatches over a SyntheticFeatures stream: `[batch_size, 1, d_model]` batches,
    normalised like the activation store (mean norm sqrt(d_model)) unless normalise=False, without end.

    contexts_consumed counts the samples served (a synthetic sample is its own context); a stream made with
    start=N (a multiple of batch_size) resumes where one that had served N samples stopped.
    """

    def __init__(self, truth: SyntheticFeatures, batch_size: int = 1024, normalise: bool = True, start: int = 0):
        """Estimate the normalisation factor once (from its own reserved stream) and stand at sample `start`."""
        if batch_size < 1:
            raise UserError(f"synthetic batch size must be at least 1, got {batch_size}; pass a positive size.")
        if start % batch_size:
            raise UserError(
                f"a synthetic stream resumes at a whole batch; start {start} is not a multiple of "
                f"batch size {batch_size}."
            )
        self.truth, self.batch_size, self.contexts_consumed = truth, batch_size, start
        self.hook_names = [SYNTHETIC_HOOK]
        self.scales: dict[str, float] | None = {SYNTHETIC_HOOK: truth.scale()} if normalise else None

    @property
    def factor(self) -> float:
        """What raw samples are multiplied by (1.0 when not normalised)."""
        return self.scales[SYNTHETIC_HOOK] if self.scales else 1.0

    def __iter__(self) -> Iterator[Tensor]:
        """Batches from the current position on, `[batch_size, 1, d_model]` float32; the stream never runs out."""
        while True:
            index = self.contexts_consumed // self.batch_size
            x = self.truth.batch(index, self.batch_size).x * self.factor
            self.contexts_consumed += self.batch_size
            yield x[:, None]
