"""Fold an SAE's input normalisation into its weights, so it reads raw model activations directly.

An SAE trained on x_n = s * x_raw has pre-activations (s x_raw - b_dec) W_enc + b_enc. With
W_enc' = s W_enc and b_dec' = b_dec / s they are unchanged for x_raw, so every activation rule
(TopK, thresholds, gates) fires exactly as before; W_dec' = W_dec / s then decodes into the raw
scale. A transcoder's decoder uses the output hook's scale instead. (SAELens folds the same way.)
"""

from __future__ import annotations

import copy

import torch

from sae.base import SAE


@torch.no_grad()
def fold_norm_scale(sae: SAE) -> SAE:
    """A copy of `sae` that encodes raw activations as `sae.encode_raw` does, with norm_scale 1.

    folded.encode(x_raw) == sae.encode_raw(x_raw) and folded.forward(x_raw) == sae.reconstruct_raw(x_raw).
    Decoder rows are no longer unit norm afterwards (they carry 1 / scale): the result is for inference.
    """
    folded = copy.deepcopy(sae)
    cfg = folded.cfg
    s_in = float(cfg.norm_scale)
    transcoder = cfg.architecture == "transcoder"  # its decoder writes into the output hook's space
    s_out = float(cfg.norm_scale_out) if transcoder else s_in
    if s_in == 1.0 and s_out == 1.0:
        return folded
    folded.W_enc.mul_(s_in)
    folded.W_dec.div_(s_out)
    folded.b_dec.div_(s_out)  # for an SAE this also un-scales the input centring, as derived above
    cfg.extra = {**cfg.extra, "folded_norm_scale": s_in}
    cfg.norm_scale = 1.0
    if transcoder:
        cfg.extra["folded_norm_scale_out"] = s_out
        cfg.norm_scale_out = 1.0
    return folded
