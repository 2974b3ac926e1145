"""Evaluate a trained SAE on held-out text: reconstruction (FVU, MSE, cosine, shrinkage), sparsity (L0, L1,
latent densities) and the model's next-token loss and KL with the SAE's reconstruction spliced in, against
clean and zero-ablated runs, all from one pass (analysis/bench_core.py gives them SAEBench's names).

Splicing replaces the activation only at positions the SAE was trained on (not the first position
of a context or special tokens, matching the store's rules); CE and KL are averaged over the next-token
predictions made at those positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from activations.config import HeldOutText
from activations.errors import UserError
from activations.files import atomic_write_json
from activations.hookpoints import hooks_installed, parse_hook, patched
from activations.models import LoadedModel
from activations.options import check_fields, option
from activations.sources import Document, open_text_source
from analysis.heldout import heldout_batches
from sae.base import SAE
from sae.io import load_sae
from sae.runs import check_sae_fits


@dataclass
class EvalConfig:
    """How much held-out text to evaluate on."""

    tokens: int = option(16384, "held-out tokens to evaluate on", low=1)
    model_batch_size: int = option(8, "contexts per model forward", low=1)
    context_size: int | None = option(None, "tokens per context (default: the SAE's training context size)", low=2)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class EvalResult:
    """One evaluation pass, in raw activation space over the spliced positions (see the module docstring).

    Two averaging conventions, named per field: "pooled" sums over every kept token before dividing (fvu, mse,
    relative_reconstruction_bias), "per token" computes the value for each token and takes the mean (cossim,
    l2_ratio, l0, l1). analysis/bench_core.py maps these fields to SAEBench's names.
    """

    fvu: float  # pooled: sum ||x - x_hat||^2 / sum_d sum_t (x_td - mean_t x_td)^2
    explained_variance: float  # 1 - fvu (pooled, variance about the per-dimension mean)
    mse: float  # mean over tokens of ||x - x_hat||^2 (summed over dimensions, not averaged)
    l0: float  # per token: latents > 0, averaged
    dead_fraction: float  # latents that never fired on these tokens
    ce_loss_clean: float
    ce_loss_sae: float
    ce_loss_zero: float  # the activation zeroed at the spliced positions
    ce_recovered: float  # (ce_zero - ce_sae) / (ce_zero - ce_clean)
    kl_sae: float  # KL(clean || SAE spliced) of the next-token distribution, averaged over predictions
    kl_zero: float  # KL(clean || zero-ablated), the same positions
    l1: float  # per token: sum of latent activations, averaged
    cossim: float  # per token: cos(x, x_hat) (0 where either is the zero vector), averaged
    l2_norm_in: float  # per token: ||x||, averaged
    l2_norm_out: float  # per token: ||x_hat||, averaged
    l2_ratio: float  # per token: ||x_hat|| / ||x|| (||x|| < 1e-4 counts as 1), averaged
    relative_reconstruction_bias: float  # pooled: sum ||x_hat||^2 / sum <x, x_hat> (Bussmann et al., eq. 10)
    frac_alive: float  # 1 - dead_fraction: latents with density > 0
    freq_over_1_percent: float  # fraction of latents firing on more than 1% of tokens
    freq_over_10_percent: float  # ... more than 10%
    normalized_freq_over_1_percent: float  # the >1% latents' share of the summed density
    normalized_freq_over_10_percent: float  # the >10% latents' share of the summed density
    tokens: int
    hook: str
    spliced_positions: str = "all but each context's first position and special tokens"

    def to_dict(self) -> dict:
        return asdict(self)


class EvalSums:
    """Running sums of one evaluation pass, batch by batch, so every metric comes from a single forward.

    Reconstruction sums are float64 tensors on the SAE's device (one host sync at the end); `result` turns
    them into an EvalResult.
    """

    SCALARS = ("sq_err", "l0", "l1", "cos", "norm_in", "norm_out", "ratio", "out_sq", "dot")
    PREDICTIONS = ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero")

    def __init__(self, d_sae: int, d_out: int, device: torch.device | str):
        """Zero sums for an SAE of `d_sae` latents reconstructing `d_out`-wide vectors."""
        f64 = dict(dtype=torch.float64, device=device)
        self.sums = {name: torch.zeros((), **f64) for name in self.SCALARS + self.PREDICTIONS}
        self.x_sum, self.x_sq = torch.zeros(d_out, **f64), torch.zeros(d_out, **f64)
        self.fired = torch.zeros(d_sae, dtype=torch.long, device=device)  # tokens each latent fired on
        self.n_acts = 0
        self.n_pred = 0

    def add_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor, feats: torch.Tensor) -> None:
        """Add tokens' targets x [N, d], reconstructions x_hat [N, d] and latent activations feats [N, d_sae]."""
        s = self.sums
        x, x_hat = x.double(), x_hat.double()  # float64: the variance is a difference of large sums
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        dot = (x * x_hat).sum(-1)
        active = feats > 0
        s["sq_err"] += (x - x_hat).pow(2).sum()
        s["l0"] += active.sum()
        s["l1"] += torch.linalg.vector_norm(feats.float(), ord=1, dim=-1).double().sum()  # no [N, d_sae] copy
        s["cos"] += (dot / (norm_in * norm_out).clamp_min(1e-300)).sum()
        s["norm_in"] += norm_in.sum()
        s["norm_out"] += norm_out.sum()
        s["ratio"] += (norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in)).sum()
        s["out_sq"] += norm_out.pow(2).sum()
        s["dot"] += dot.sum()
        self.x_sum += x.sum(0)
        self.x_sq += x.pow(2).sum(0)
        self.fired += active.sum(0)
        self.n_acts += len(x)

    def add_predictions(self, tokens: torch.Tensor, where: torch.Tensor, logits: dict[str, torch.Tensor]) -> None:
        """Add next-token CE (of tokens[:, t+1]) and KL to the clean run at positions t where `where[:, t]`;
        `logits` holds the "clean", "sae" and "zero" runs' logits [B, T, V]."""
        w = where[:, :-1].double()
        logp_clean = F.log_softmax(logits["clean"][:, :-1].float(), dim=-1)
        p_clean = logp_clean.exp()
        for run in ("clean", "sae", "zero"):
            logp = logp_clean if run == "clean" else F.log_softmax(logits[run][:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
            self.sums[f"ce_{run}"] += (nll.double() * w.to(nll.device)).sum().to(self.x_sum.device)
            if run != "clean":
                kl = (p_clean * (logp_clean - logp)).sum(-1)
                self.sums[f"kl_{run}"] += (kl.double() * w.to(kl.device)).sum().to(self.x_sum.device)
        self.n_pred += int(w.sum())

    def result(self, hook: str) -> EvalResult:
        """The metrics of everything added so far (CE and KL NaN without predictions); UserError without tokens."""
        n = self.n_acts
        if n == 0:
            raise UserError(
                "the evaluation text produced no tokens; give a larger held-out source (--dataset/--split)."
            )
        s = {name: value.item() for name, value in self.sums.items()}
        total_var = (self.x_sq - self.x_sum**2 / n).sum().item()
        fvu = s["sq_err"] / max(total_var, 1e-12)
        per_pred = {k: s[k] / self.n_pred if self.n_pred else float("nan") for k in self.PREDICTIONS}
        ce_clean, ce_sae, ce_zero = (per_pred[k] for k in ("ce_clean", "ce_sae", "ce_zero"))
        density = self.fired.double() / n
        total_density = density.sum().item()

        def share(above: float) -> float:
            """The summed density of latents denser than `above`, as a fraction of all latents' (0 if none fire)."""
            return density[density > above].sum().item() / total_density if total_density else 0.0

        return EvalResult(
            fvu=fvu,
            explained_variance=1 - fvu,
            mse=s["sq_err"] / n,
            l0=s["l0"] / n,
            dead_fraction=(density == 0).double().mean().item(),
            ce_loss_clean=ce_clean,
            ce_loss_sae=ce_sae,
            ce_loss_zero=ce_zero,
            ce_recovered=(ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            kl_sae=per_pred["kl_sae"],
            kl_zero=per_pred["kl_zero"],
            l1=s["l1"] / n,
            cossim=s["cos"] / n,
            l2_norm_in=s["norm_in"] / n,
            l2_norm_out=s["norm_out"] / n,
            l2_ratio=s["ratio"] / n,
            relative_reconstruction_bias=s["out_sq"] / s["dot"] if s["dot"] else float("nan"),
            frac_alive=(density > 0).double().mean().item(),
            freq_over_1_percent=(density > 0.01).double().mean().item(),
            freq_over_10_percent=(density > 0.1).double().mean().item(),
            normalized_freq_over_1_percent=share(0.01),
            normalized_freq_over_10_percent=share(0.1),
            tokens=n,
            hook=hook,
        )


@torch.inference_mode()
def evaluate(sae: SAE, lm: LoadedModel, source: Iterable[Document], cfg: EvalConfig = EvalConfig()) -> EvalResult:
    """One pass over `cfg.tokens` tokens of `source`: three forwards per batch (clean, SAE spliced, zero-ablated),
    everything in raw (unnormalised) activation space."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    # A transcoder reads hook_name and reconstructs hook_name_out: its output is spliced in there.
    hp_out = parse_hook(sae.cfg.hook_name_out, lm.model) if getattr(sae.cfg, "hook_name_out", None) else hp
    check_sae_fits(sae, lm)
    sums = EvalSums(sae.cfg.d_sae, sae.W_dec.shape[1], sae.W_dec.device)
    for _, tokens, keep in heldout_batches(
        sae, lm, source, cfg.tokens, cfg.model_batch_size, cfg.context_size, desc="eval"
    ):
        captured: dict[str, torch.Tensor] = {}

        def capture(name):
            def fn(act):
                captured[name] = act
                return None

            return fn

        with hooks_installed(
            lm.model, {hp: capture("in")} if hp_out is hp else {hp: capture("in"), hp_out: capture("out")}
        ):
            logits = {"clean": lm.model(input_ids=tokens, use_cache=False).logits}
        x_in = captured["in"][keep].float().to(sae.W_dec.device)
        x = captured["out" if hp_out is not hp else "in"][keep].float().to(sae.W_dec.device)  # what is reconstructed
        feats = sae.encode_raw(x_in)
        x_hat = sae.decode(feats) / getattr(sae.cfg, "norm_scale_out" if hp_out is not hp else "norm_scale")
        sums.add_reconstruction(x, x_hat.float(), feats)

        def splice(act, replacement=x_hat):
            act = act.clone()
            act[keep] = replacement.to(act.dtype).to(act.device)
            return act

        with patched(lm.model, hp_out, splice):
            logits["sae"] = lm.model(input_ids=tokens, use_cache=False).logits
        with patched(lm.model, hp_out, lambda act: splice(act, torch.zeros_like(x_hat))):
            logits["zero"] = lm.model(input_ids=tokens, use_cache=False).logits
        sums.add_predictions(tokens, keep, logits)
    return sums.result(hp.name if hp_out is hp else f"{hp.name} -> {hp_out.name}")


def evaluate_run(
    folder: str | Path, lm: LoadedModel, text: HeldOutText = HeldOutText(), cfg: EvalConfig = EvalConfig()
) -> dict:
    """Evaluate the SAE in `folder` with `lm` on held-out text; prints a summary and writes folder/eval.json."""
    folder = Path(folder)
    sae = load_sae(folder, device=str(lm.device))
    dataset = text.dataset or sae.cfg.dataset or "wikitext-2"
    source = open_text_source(
        dataset, split=text.split, config=text.dataset_config, text_field=text.text_field, data_dir=text.data_dir
    )
    result = evaluate(sae, lm, source, cfg).to_dict()
    result.update(dataset=dataset, split=text.split, model=lm.name)
    print(
        f"eval on {result['tokens']} held-out tokens ({dataset}, {text.split}): FVU {result['fvu']:.3f}  "
        f"L0 {result['l0']:.1f}  dead {result['dead_fraction']:.3f}  CE clean {result['ce_loss_clean']:.3f} / "
        f"SAE {result['ce_loss_sae']:.3f} / zero {result['ce_loss_zero']:.3f}  ce_recovered "
        f"{result['ce_recovered']:.3f}  KL {result['kl_sae']:.3f}  → {folder / 'eval.json'}",
        flush=True,
    )
    atomic_write_json(folder / "eval.json", result)  # after printing: a failed write loses no result
    return result
