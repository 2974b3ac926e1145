"""Evaluate a trained SAE on held-out text: reconstruction (FVU, L0, dead latents) and the model's
next-token loss with the SAE's reconstruction spliced in, against clean and zero-ablated runs.

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
    fvu: float
    explained_variance: float
    mse: float
    l0: float
    dead_fraction: float
    ce_loss_clean: float
    ce_loss_sae: float
    ce_loss_zero: float
    ce_recovered: float
    kl_sae: float
    tokens: int
    hook: str
    spliced_positions: str = "all but each context's first position and special tokens"

    def to_dict(self) -> dict:
        return asdict(self)


def _next_token_ce(logits: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Summed CE of predicting tokens[:, t+1] from position t, over positions where `where[:, t]`."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (nll * where[:, :-1]).sum()


@torch.inference_mode()
def evaluate(sae: SAE, lm: LoadedModel, source: Iterable[Document], cfg: EvalConfig = EvalConfig()) -> EvalResult:
    """One pass over `cfg.tokens` tokens of `source`; everything in raw (unnormalised) activation space."""
    hp = parse_hook(sae.cfg.hook_name, lm.model)
    # A transcoder reads hook_name and reconstructs hook_name_out: its output is spliced in there.
    hp_out = parse_hook(sae.cfg.hook_name_out, lm.model) if getattr(sae.cfg, "hook_name_out", None) else hp
    check_sae_fits(sae, lm)
    sums = dict(sq_err=0.0, n_acts=0, l0=0.0, ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl=0.0, n_pred=0)
    x_sum = x_sq = None
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.W_dec.device)
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
            logits_clean = lm.model(input_ids=tokens, use_cache=False).logits
        x_in = captured["in"][keep].float().to(sae.W_dec.device)
        x = captured["out" if hp_out is not hp else "in"][keep].float().to(sae.W_dec.device)  # what is reconstructed
        feats = sae.encode_raw(x_in)
        x_hat = sae.decode(feats) / getattr(sae.cfg, "norm_scale_out" if hp_out is not hp else "norm_scale")
        fired |= (feats > 0).any(0)

        def splice(act, replacement=x_hat):
            act = act.clone()
            act[keep] = replacement.to(act.dtype).to(act.device)
            return act

        with patched(lm.model, hp_out, splice):
            logits_sae = lm.model(input_ids=tokens, use_cache=False).logits
        with patched(lm.model, hp_out, lambda act: splice(act, torch.zeros_like(x_hat))):
            logits_zero = lm.model(input_ids=tokens, use_cache=False).logits

        where = keep.float()
        sums["ce_clean"] += _next_token_ce(logits_clean, tokens, where).item()
        sums["ce_sae"] += _next_token_ce(logits_sae, tokens, where).item()
        sums["ce_zero"] += _next_token_ce(logits_zero, tokens, where).item()
        logp_clean = F.log_softmax(logits_clean[:, :-1].float(), -1)
        logp_sae = F.log_softmax(logits_sae[:, :-1].float(), -1)
        kl = (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1)
        sums["kl"] += (kl * where[:, :-1]).sum().item()
        sums["n_pred"] += int(where[:, :-1].sum())

        sums["sq_err"] += ((x - x_hat) ** 2).sum().item()
        x64 = x.double()  # float64 sums: the variance is a difference of large numbers
        x_sum = x64.sum(0) if x_sum is None else x_sum + x64.sum(0)
        x_sq = (x64**2).sum(0) if x_sq is None else x_sq + (x64**2).sum(0)
        sums["n_acts"] += len(x)
        sums["l0"] += (feats > 0).sum().item()
    n = sums["n_acts"]
    if n == 0:
        raise UserError("the evaluation text produced no tokens; give a larger held-out source (--dataset/--split).")
    total_var = (x_sq - x_sum**2 / n).sum().item()
    fvu = sums["sq_err"] / max(total_var, 1e-12)
    ce_clean, ce_sae, ce_zero = (sums[k] / sums["n_pred"] for k in ("ce_clean", "ce_sae", "ce_zero"))
    return EvalResult(
        fvu=fvu,
        explained_variance=1 - fvu,
        mse=sums["sq_err"] / n,
        l0=sums["l0"] / n,
        dead_fraction=1 - fired.float().mean().item(),
        ce_loss_clean=ce_clean,
        ce_loss_sae=ce_sae,
        ce_loss_zero=ce_zero,
        ce_recovered=(ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
        kl_sae=sums["kl"] / sums["n_pred"],
        tokens=n,
        hook=hp.name if hp_out is hp else f"{hp.name} -> {hp_out.name}",
    )


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
