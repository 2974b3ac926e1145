"""Feature absorption on first letters (Chanin et al. 2024, "A is for Absorption"; SAEBench's absorption eval).

For each letter L, on single-token words read in a spelling prompt (analysis/absorption_words.py):
- probe: a one-vs-rest logistic regression (balanced classes; analysis/logistic.py) on the raw activations says
  "starts with L"; its test F1 is `probe_f1`, its unit weight vector p the letter's direction (raw activation space).
- main latents: k-sparse probing on the SAE's latents. Latents are ranked by a non-negative L1 logistic
  regression on all latents (ties by class mean difference); for k = 1, 2, .. max_k a logistic regression on the
  top k gives a test F1. The top latent is kept (as in SAEBench), unless it fires less on the letter's train
  words than on the others (then nothing encodes the letter and it has no main latent), and each next one is
  kept while it raises the F1 by more than `tau`. `num_split_features` = how many are kept.
- absorption, over the probe's true positives (test words of L the probe calls L). A latent i contributes
  a_i W_dec_i / norm_scale to the raw reconstruction; its probe projection is proj_i = a_i (W_dec_i . p) / norm_scale
  and the word's is P = (x - b_dec / norm_scale) . p, the part the latents must explain (SAEBench projects x
  itself; the two agree when b_dec = 0).
  * full absorption: every main latent is silent, P > 0, and the latent with the largest proj_i has
    cos(W_dec_i, p) >= `absorber_cos` and proj_i >= `projection_share` * P. `full_absorption_rate` = the share of
    the probe's true positives fully absorbed.
  * absorption fraction: A = the sum of the `max_absorbers` largest positive proj_i over non-main latents with
    cos >= `partial_absorber_cos`; M = the main latents' total proj. It is 0 if M >= P or A < share * P, 1 if
    M <= 0, else min(A, P - M) / (min(A, P - M) + M). `mean_absorption_fraction` = its mean over the true positives.
The scores are the means over the letters whose probe F1 is at least `absorption_min_probe_f1` ("scored").
Option names are AbsorptionConfig's (without their `absorption_` prefix above); the defaults are SAEBench's.
"""

from __future__ import annotations

import statistics
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from activations.errors import UserError
from activations.hookpoints import parse_hook
from activations.models import LoadedModel
from activations.options import check_fields, option
from analysis.absorption_words import (
    LETTERS,
    TEMPLATE,
    Word,
    WordSplit,
    prompt_prefix,
    split_words,
    train_count,
    word_activations,
)
from analysis.logistic import example_weights, fit_logistic
from sae.base import SAE
from sae.runs import check_sae_fits

# The probes' L2 penalties are stated on centred inputs of unit mean squared norm. fit_logistic scales its inputs
# to unit mean variance per coordinate instead, i.e. mean squared norm d: sqrt(d) times larger, so the same model
# has its weights sqrt(d) times smaller and takes the penalty times d (`_l2`).
PROBE_L2 = 1e-5  # L2 penalty of the letter probes
K_SPARSE_L2 = 1e-3  # the k-sparse probes' (on a few latents: SAEBench fits them with sklearn's default C = 1)
RANK_L1 = 0.1  # the ranking regression's L1 penalty, as a fraction of the smallest one that keeps every weight 0
RANK_STEPS = 300  # proximal-gradient (FISTA) steps of the ranking regression


@dataclass
class AbsorptionConfig:
    """Which words, and the thresholds of the absorption metrics (SAEBench's defaults)."""

    absorption_words: int = option(3000, "single-token words to probe (train + test)", low=20)
    absorption_train_fraction: float = option(0.8, "fraction of the words the probes are fitted on", above=0, high=1)
    absorption_icl_examples: int = option(10, "answered examples in the prompt before each word", low=0)
    absorption_seed: int = option(42, "seed of the word sample, its split and the prompt's examples", low=0)
    absorption_batch_size: int = option(128, "words per model forward", low=1)
    absorption_max_k: int = option(10, "most latents tried per letter by k-sparse probing", low=1)
    absorption_tau: float = option(0.03, "F1 gain a further latent must bring to count as a split feature", low=0)
    absorption_min_probe_f1: float = option(0.6, "probe F1 a letter needs to be scored", low=0, high=1)
    absorber_cos: float = option(
        0.025, "cosine with the probe the top latent needs for full absorption", low=-1, high=1
    )
    partial_absorber_cos: float = option(0.1, "cosine with the probe an absorbing latent needs", low=-1, high=1)
    projection_share: float = option(0.4, "share of the probe projection absorbing latents must carry", low=0)
    max_absorbers: int = option(3, "most latents counted as absorbing one word (absorption fraction)", low=1)

    def __post_init__(self) -> None:
        check_fields(self)
        train_count(self.absorption_words, self.absorption_train_fraction)


# ---- probes ------------------------------------------------------------------------------------------------


def _l2(penalty: float, x: Tensor) -> float:
    """fit_logistic's L2 penalty for `penalty` on centred inputs of unit mean squared norm (see PROBE_L2)."""
    return penalty * x.shape[-1]


def f1_scores(pred: Tensor, truth: Tensor) -> Tensor:
    """F1 per column of boolean [n, C] predictions against truth: 2 TP / (2 TP + FP + FN), 0 when that is 0/0."""
    tp = (pred & truth).sum(0).double()
    wrong = (pred ^ truth).sum(0).double()
    return torch.where(tp > 0, 2 * tp / (2 * tp + wrong), torch.zeros_like(tp))


@dataclass
class LetterProbe:
    """Linear first-letter probes: logit of `letters[c]` = x @ weight[c] + bias[c]; `f1` is each one's test F1."""

    letters: list[int]  # indices into LETTERS: the letters with train and test words
    weight: Tensor  # [C, d] raw activation space, float64
    bias: Tensor  # [C]
    f1: list[float]

    def logits(self, x: Tensor) -> Tensor:
        """[n, C] logits of raw activations [n, d]."""
        return x.double() @ self.weight.T + self.bias

    def direction(self, c: int) -> Tensor:
        """The unit direction [d] of probe c (float32)."""
        return (self.weight[c] / self.weight[c].norm()).float()


def one_hot(labels: Tensor, letters: list[int]) -> Tensor:
    """Boolean [n, C]: whether each example's label is letters[c]."""
    return labels[:, None] == torch.tensor(letters, device=labels.device)[None, :]


def probe_letters(y_train: Tensor, y_test: Tensor) -> list[int]:
    """The letters (indices into LETTERS) that have train and test words; a UserError when none has."""
    letters = [c for c in range(len(LETTERS)) if (y_train == c).any() and (y_test == c).any()]
    if not letters:
        raise UserError("no letter has both train and test words; use more --absorption-words.")
    return letters


def first_letter_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> LetterProbe:
    """Fit a probe per letter that has train and test words (labels are indices into LETTERS); score it on test."""
    letters = probe_letters(y_train, y_test)
    weight, bias = fit_logistic(x_train, one_hot(y_train, letters), _l2(PROBE_L2, x_train))
    f1 = f1_scores(x_test.double() @ weight.T + bias > 0, one_hot(y_test, letters))
    return LetterProbe(letters, weight, bias, f1.tolist())


# ---- k-sparse probing on latents ---------------------------------------------------------------------------


def rank_latents(codes: Tensor, y: Tensor, top: int, l1_fraction: float = RANK_L1) -> Tensor:
    """The `top` latents [C, top] most predictive of each column of y (boolean [n, C]), best first.

    A non-negative L1 logistic regression (balanced weights) on all latents that fire on some example, fitted by
    FISTA on the sparse latents; latents are ordered by weight, then by class mean difference (which orders the
    zero weights). The L1 penalty is `l1_fraction` of the one at which every weight is 0, so the ranking does not
    depend on the scale of the latents.
    """
    active = (codes != 0).any(0).nonzero().squeeze(1)
    top = min(top, len(active))
    if top == 0:  # no latent fires on any example
        return torch.zeros(y.shape[1], 0, dtype=torch.long)
    dense = codes[:, active].double()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": products with dense matrices are what we use
        warnings.simplefilter("ignore", UserWarning)
        x, xt = dense.to_sparse_csr(), dense.T.contiguous().to_sparse_csr()  # SAE codes are mostly zeros
    weights, target = example_weights(y), y.double()  # [n, C]
    mean_diff = xt @ (weights * torch.where(y, 2.0, -2.0).double())  # [m, C]: mean over positives - over negatives
    penalty = l1_fraction * (mean_diff.clamp_min(0) / 4).amax(0)  # [C]: the loss gradient at 0 is -mean_diff / 4

    def hessian_bound(v: Tensor, vb: Tensor) -> tuple[Tensor, Tensor]:
        """[x, 1]' diag(weights) [x, 1] applied to (v [m, C], vb [C]), column by column."""
        u = weights * (x @ v + vb)
        return xt @ u, u.sum(0)

    v, vb = torch.ones_like(mean_diff), torch.ones(y.shape[1], dtype=torch.float64)
    for _ in range(50):  # power iteration for the largest eigenvalue, per column
        v, vb = hessian_bound(v, vb)
        norm = (v.pow(2).sum(0) + vb.pow(2)).sqrt().clamp_min(1e-30)
        v, vb = v / norm, vb / norm
    hv, hvb = hessian_bound(v, vb)
    step = 1 / ((v * hv).sum(0) + vb * hvb).clamp_min(1e-30) * 4 / 1.05  # 1 / Lipschitz; sigmoid' <= 1/4

    coef, bias = torch.zeros_like(mean_diff), torch.zeros_like(vb)
    ahead, ahead_b, t = coef, bias, 1.0
    for _ in range(RANK_STEPS):
        residual = weights * (torch.sigmoid(x @ ahead + ahead_b) - target)
        new = (ahead - step * (xt @ residual) - step * penalty).clamp_min(0)  # prox of the non-negative L1
        new_b = ahead_b - step * residual.sum(0)  # the bias is not penalised
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        ahead, ahead_b = new + (t - 1) / t_next * (new - coef), new_b + (t - 1) / t_next * (new_b - bias)
        coef, bias, t = new, new_b, t_next
    by_diff = torch.sort(-mean_diff, dim=0, stable=True).indices  # [m, C]
    by_weight = torch.sort(-coef.gather(0, by_diff), dim=0, stable=True).indices
    return active[by_diff.gather(0, by_weight)[:top].T]


@dataclass
class SplitFeatures:
    """One letter's main latents from k-sparse probing, and the test F1 of the probe on the top k, per k."""

    latents: list[int]
    f1_by_k: list[float]

    @property
    def f1(self) -> float:
        """The F1 of the latents kept (0 when none are)."""
        return self.f1_by_k[len(self.latents) - 1] if self.latents else 0.0


def split_features(
    codes_train: Tensor, y_train: Tensor, codes_test: Tensor, y_test: Tensor, max_k: int, tau: float
) -> list[SplitFeatures]:
    """Main latents per column of y (boolean [n, C]): the top-ranked latents kept while the test F1 of a
    logistic regression on the top k rises by more than `tau` with each k (see the module docstring)."""
    ranked = rank_latents(codes_train, y_train, max_k)  # [C, K]
    f1_by_k = []
    for k in range(1, ranked.shape[1] + 1):
        idx = ranked[:, :k]  # [C, k]
        inputs = codes_train.T[idx].transpose(1, 2)  # [C, n, k]
        weight, bias = fit_logistic(inputs, y_train, _l2(K_SPARSE_L2, inputs))
        test_logits = torch.einsum("cnk,ck->nc", codes_test.T[idx].transpose(1, 2).double(), weight) + bias
        f1_by_k.append(f1_scores(test_logits > 0, y_test))
    out = []
    for c in range(y_train.shape[1]):
        scores = [float(f[c]) for f in f1_by_k]
        kept = 0
        if scores:
            top, is_letter = codes_train[:, ranked[c, 0]], y_train[:, c]
            kept = int(bool(top[is_letter].mean() > top[~is_letter].mean()))  # does the best latent favour it?
        while 0 < kept < len(scores) and scores[kept] > scores[kept - 1] + tau:
            kept += 1
        out.append(SplitFeatures(ranked[c, :kept].tolist(), scores))
    return out


# ---- absorption --------------------------------------------------------------------------------------------


@dataclass
class WordAbsorption:
    """Per word (the probe's true positives of one letter): the absorption fraction, whether it is fully
    absorbed, whether the main latents are all silent, and the latent with the largest probe projection."""

    fraction: Tensor  # [n] float
    full: Tensor  # [n] bool
    main_silent: Tensor  # [n] bool
    top_latent: Tensor  # [n] long


@torch.inference_mode()
def word_absorption(
    sae: SAE, x: Tensor, main_latents: list[int], direction: Tensor, cfg: AbsorptionConfig
) -> WordAbsorption:
    """Absorption of raw activations x [n, d] of one letter's words into latents other than `main_latents`,
    along the letter's probe `direction` [d] (definitions in the module docstring)."""
    p = (direction / direction.norm()).to(sae.W_dec.device, torch.float32)
    x = x.to(sae.W_dec.device, torch.float32)
    acts = sae.encode_raw(x).float()  # [n, d_sae]
    dec = sae.W_dec.float()
    along = dec @ p  # [d_sae]
    cos = along / dec.norm(dim=1).clamp_min(1e-12)
    proj = acts * (along / sae.cfg.norm_scale)  # [n, d_sae] each latent's raw contribution projected on p
    total = (x - sae.b_dec.float() / sae.cfg.norm_scale) @ p  # [n]
    is_main = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=dec.device)
    is_main[main_latents] = True
    main = proj[:, is_main].sum(1)
    main_silent = (acts[:, is_main] <= 0).all(1)

    candidate = torch.where(~is_main & (cos >= cfg.partial_absorber_cos) & (proj > 0), proj, torch.zeros_like(proj))
    absorbed = candidate.topk(min(cfg.max_absorbers, proj.shape[1]), dim=1).values.sum(1)
    enough = (total > 0) & (main < total) & (absorbed >= cfg.projection_share * total)
    share = torch.minimum(absorbed, total - main)
    fraction = torch.where(main <= 0, torch.ones_like(share), share / (share + main).clamp_min(1e-12))
    fraction = torch.where(enough, fraction.clamp(0, 1), torch.zeros_like(fraction))

    top_proj, top = proj.max(1)
    full = main_silent & (total > 0) & (cos[top] >= cfg.absorber_cos) & (top_proj >= cfg.projection_share * total)
    return WordAbsorption(fraction.cpu(), full.cpu(), main_silent.cpu(), top.cpu())


def letter_scores(
    sae: SAE,
    x_test: Tensor,
    y_test: Tensor,
    probe: LetterProbe,
    splits: list[SplitFeatures],
    cfg: AbsorptionConfig,
    y_train: Tensor | None = None,
) -> dict[str, dict]:
    """Per letter: the probe's F1, main latents, split count, absorption rates and word counts (JSON-ready)."""
    positive = probe.logits(x_test) > 0  # [n, C]
    out = {}
    for c, letter in enumerate(probe.letters):
        is_letter = y_test == letter
        hits = is_letter & positive[:, c]
        word = word_absorption(sae, x_test[hits], splits[c].latents, probe.direction(c), cfg)
        n_hits = int(hits.sum())
        absorbers = Counter(word.top_latent[word.full].tolist()).most_common(5)
        out[LETTERS[letter]] = dict(
            probe_f1=probe.f1[c],
            main_latents=splits[c].latents,
            num_split_features=len(splits[c].latents),
            split_f1=splits[c].f1,
            k_sparse_f1=splits[c].f1_by_k,
            n_train_words=int((y_train == letter).sum()) if y_train is not None else None,
            n_test_words=int(is_letter.sum()),
            n_probe_true_positives=n_hits,
            n_main_silent=int(word.main_silent.sum()),
            n_full_absorption=int(word.full.sum()),
            full_absorption_rate=float(word.full.float().mean()) if n_hits else 0.0,
            mean_absorption_fraction=float(word.fraction.mean()) if n_hits else 0.0,
            top_absorbing_latents=[[latent, count] for latent, count in absorbers],
            scored=probe.f1[c] >= cfg.absorption_min_probe_f1 and n_hits > 0,
        )
    return out


def summary(letters: dict[str, dict]) -> dict:
    """SAEBench's headline numbers: means (and standard deviations) over the scored letters; None without any."""
    scored = [v for v in letters.values() if v["scored"]]
    out: dict = {"n_letters_scored": len(scored)}
    for name, key in (
        ("absorption_fraction_score", "mean_absorption_fraction"),
        ("full_absorption_score", "full_absorption_rate"),
        ("num_split_features", "num_split_features"),
    ):
        values = [float(v[key]) for v in scored]
        out[f"mean_{name}"] = statistics.mean(values) if values else None
        out[f"std_dev_{name}"] = statistics.stdev(values) if len(values) > 1 else None
    return out


@torch.inference_mode()
def encode_all(sae: SAE, x: Tensor, batch_size: int = 1024) -> Tensor:
    """SAE latents [n, d_sae] (float32, CPU) of raw activations [n, d]."""
    parts = [
        sae.encode_raw(x[i : i + batch_size].to(sae.W_dec.device)).float().cpu() for i in range(0, len(x), batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, sae.cfg.d_sae)


def _labels(words: list[Word]) -> Tensor:
    return torch.tensor([w.letter for w in words], dtype=torch.long)


def word_split(tokenizer, cfg: AbsorptionConfig) -> WordSplit:
    """The benchmark's words for `tokenizer`, checked as far as the tokenizer alone can (so `sae bench` can refuse
    a bad --absorption-words before any model loads): a UserError when the vocabulary has too few words or no
    letter has both train and test words."""
    split = split_words(
        tokenizer,
        cfg.absorption_words,
        cfg.absorption_icl_examples,
        cfg.absorption_train_fraction,
        cfg.absorption_seed,
    )
    probe_letters(_labels(split.train), _labels(split.test))
    return split


def absorption(sae: SAE, lm: LoadedModel, cfg: AbsorptionConfig = AbsorptionConfig()) -> dict:
    """The first-letter absorption benchmark of `sae` on `lm` (see the module docstring); a JSON-ready dict."""
    if getattr(sae.cfg, "hook_name_out", ""):
        raise UserError(
            "absorption needs an SAE that reconstructs the activation it reads; this is a transcoder "
            f"({sae.cfg.hook_name} -> {sae.cfg.hook_name_out}); run the other benchmarks on it, or use an SAE."
        )
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    check_sae_fits(sae, lm)
    split = word_split(lm.tokenizer, cfg)
    prefix = prompt_prefix(lm.tokenizer, split.examples, bool(sae.cfg.prepend_bos))
    words = split.train + split.test
    acts = word_activations(lm, hp, prefix, words, cfg.absorption_batch_size, desc="absorption")
    labels = _labels(words)
    n = len(split.train)
    x_train, x_test, y_train, y_test = acts[:n], acts[n:], labels[:n], labels[n:]
    probe = first_letter_probe(x_train, y_train, x_test, y_test)
    codes = encode_all(sae, acts)
    splits = split_features(
        codes[:n],
        one_hot(y_train, probe.letters),
        codes[n:],
        one_hot(y_test, probe.letters),
        cfg.absorption_max_k,
        cfg.absorption_tau,
    )
    letters = letter_scores(sae, x_test, y_test, probe, splits, cfg, y_train=y_train)
    return {
        **summary(letters),
        "hook": hp.name,
        "train_words": len(split.train),
        "test_words": len(split.test),
        "prompt": TEMPLATE,
        "prompt_examples": [w.text for w in split.examples],
        "config": asdict(cfg),
        "letters": letters,
    }
