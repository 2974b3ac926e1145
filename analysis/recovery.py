"""How well an SAE recovers a planted dictionary (activations.synthetic): matched directions and absorption.

Each true feature is matched to the latent whose decoder row points closest to it (cosine, signed: features and
latents are both non-negative). A feature counts as recovered when that cosine is at least `threshold` (0.9).
On held-out samples the SAE's L0 and FVU are measured, and, for each planted hierarchy, absorption: over the
samples where a child fires (so its parent fires too), the fraction in which the parent's latent stays silent
while the child's latent fires, i.e. the child's latent has taken over the parent's job (Chanin et al. 2024).
"""

from __future__ import annotations

import torch
from torch import Tensor

from activations.errors import UserError
from activations.synthetic import SyntheticFeatures
from sae.base import SAE


def decoder_cosines(sae: SAE, truth: SyntheticFeatures) -> Tensor:
    """[n_features, d_sae]: cosine of every true direction with every decoder row."""
    dec = sae.W_dec.detach().float().cpu()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return truth.directions @ dec.T


@torch.no_grad()
def recovery(
    sae: SAE, truth: SyntheticFeatures, n_samples: int = 16384, threshold: float = 0.9, batch_size: int = 4096
) -> dict:
    """Recovery of `truth` by `sae` (which reads raw synthetic samples times sae.cfg.norm_scale), as plain data.

    n_recovered / fraction_recovered: true features whose best decoder cosine >= threshold; mean_max_cos: the
    mean of those best cosines. l0, fvu, true_l0: on n_samples held-out samples. absorption: mean over parents
    of the rate above (None without hierarchies); parent_recall: how often the parent's latent fires when the
    parent fires without a child; child_leaning: mean over children of cos(child latent's decoder, parent
    direction) minus cos(child direction, parent direction), how far child latents lean toward their parent.
    """
    if sae.cfg.d_in != truth.cfg.d_model:
        raise UserError(
            f"the SAE reads {sae.cfg.d_in}-dimensional inputs but the synthetic data has d_model "
            f"{truth.cfg.d_model}; train the SAE on this SyntheticConfig (or build the config with its d_in)."
        )
    if not 0 < threshold <= 1 or n_samples < 1:
        raise UserError(f"recovery needs 0 < threshold <= 1 and n_samples >= 1, got {threshold}, {n_samples}.")
    cos = decoder_cosines(sae, truth)
    best, match = cos.max(dim=1)  # per true feature: the closest latent
    sample = truth.heldout(n_samples)
    x = sample.x
    fired, x_hat = [], []
    for chunk in x.split(batch_size):
        f = sae.encode_raw(chunk.to(sae.device))  # [chunk, d_sae]
        fired.append((f > 0).cpu())
        x_hat.append((sae.decode(f) / sae.cfg.norm_scale).float().cpu())
    latent_fires, x_hat = torch.cat(fired), torch.cat(x_hat)
    result = dict(
        n_features=truth.cfg.n_features,
        threshold=threshold,
        n_recovered=int((best >= threshold).sum()),
        fraction_recovered=float((best >= threshold).float().mean()),
        mean_max_cos=float(best.mean()),
        l0=float(latent_fires.sum(dim=1).float().mean()),
        true_l0=float((sample.acts > 0).sum(dim=1).float().mean()),
        fvu=float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)),
        n_samples=n_samples,
    )
    result.update(hierarchy_absorption(truth, sample.acts > 0, latent_fires, match, cos))
    return result


def hierarchy_absorption(
    truth: SyntheticFeatures, fires: Tensor, latent_fires: Tensor, match: Tensor, cos: Tensor
) -> dict:
    """Absorption, parent recall and child leaning per planted parent (see recovery); means over parents.

    fires [n, n_features] and latent_fires [n, d_sae] say who fired on each sample; match[i] is feature i's latent.
    A parent whose children never fired in the sample is left out of the absorption mean.
    """
    per_parent, recall, leaning = [], [], []
    for parent, children in zip(truth.parents.tolist(), truth.children.tolist()):
        parent_latent = latent_fires[:, match[parent]]
        absorbed = seen = 0
        for child in children:
            on = fires[:, child]
            absorbed += int((on & ~parent_latent & latent_fires[:, match[child]]).sum())
            seen += int(on.sum())
            leaning.append(float(cos[parent, match[child]] - truth.directions[child] @ truth.directions[parent]))
        if seen:
            per_parent.append(absorbed / seen)
        alone = fires[:, parent] & ~fires[:, children].any(dim=1)
        if alone.any():
            recall.append(float(parent_latent[alone].float().mean()))
    return dict(
        absorption=sum(per_parent) / len(per_parent) if per_parent else None,
        absorption_per_parent=per_parent,
        parent_recall=sum(recall) / len(recall) if recall else None,
        child_leaning=sum(leaning) / len(leaning) if leaning else None,
    )
