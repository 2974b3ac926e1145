"""Token and previous-token detectors: does a feature follow the identity of the current token, or of
the one before it? Screened on held-out text (where does the activation mass go), then confirmed by
placing each candidate's token in random contexts (the current token varied with the previous one
fixed, and the other way round).
"""

from __future__ import annotations

import torch
from torch import Tensor

from activations.tokens import special_token_mask
from analysis.detectors import probes
from analysis.detectors.base import FIRE_FRACTION, DetectorResult, Subject, masked_contrast, zero_result

TOP_IDS = 3  # concentration = activation mass share of this many token ids
CANDIDATE_SHARE = 0.3  # features below this concentration are not probed (they cannot pass)
MIN_FIRINGS = 3  # firings on held-out text needed to be a candidate
REPS = 5  # random contexts per candidate token
MAX_TARGETS = 1536  # probed tokens at most (the most concentrated candidates first)


def text_token_stats(subject: Subject) -> dict[str, Tensor]:
    """Where each feature's activation mass falls on held-out text, by current and by previous token."""
    if "text_tokens" in subject.cache:
        return subject.cache["text_tokens"]
    acts = subject.text_acts()[:, 1:]  # position 0 is an attention sink
    cur, prev = subject.text[:, 1:], subject.text[:, :-1]
    keep = ~special_token_mask(cur, subject.tokenizer)
    a = acts[keep]  # [N, F]
    ref = subject.reference()
    fires = (a > FIRE_FRACTION * ref) & (a > 0)
    out: dict[str, Tensor] = {"firings": fires.sum(0)}
    for name, ids in (("cur", cur[keep]), ("prev", prev[keep])):
        uniq, inv = ids.unique(return_inverse=True)
        mass = torch.zeros(len(uniq), a.shape[1]).index_add_(0, inv, a)  # [U, F]
        fired = torch.zeros(len(uniq), a.shape[1]).index_add_(0, inv, fires.float())
        count = torch.bincount(inv, minlength=len(uniq)).float()
        k = min(TOP_IDS, len(uniq))
        top = mass.topk(k, dim=0)  # [k, F]
        out[f"{name}_share"] = top.values.sum(0) / mass.sum(0).clamp_min(1e-12)
        out[f"{name}_top_ids"] = uniq[top.indices].T.contiguous()  # [F, k]
        out[f"{name}_top_share"] = (top.values / mass.sum(0).clamp_min(1e-12)).T.contiguous()
        out[f"{name}_coverage"] = fired[top.indices[0], torch.arange(a.shape[1])] / count[top.indices[0]].clamp_min(1)
    subject.cache["text_tokens"] = out
    return out


def _context_probe(subject: Subject) -> dict[str, Tensor]:
    """Activations with each candidate token in random contexts (shared by both detectors)."""
    if "token_probe" in subject.cache:
        return subject.cache["token_probe"]
    s = text_token_stats(subject)
    cand_cur = (s["cur_share"] >= CANDIDATE_SHARE) & (s["firings"] >= MIN_FIRINGS)
    cand_prev = (s["prev_share"] >= CANDIDATE_SHARE) & (s["firings"] >= MIN_FIRINGS)
    ids = torch.cat([s["cur_top_ids"][cand_cur, 0], s["prev_top_ids"][cand_prev, 0]])
    shares = torch.cat([s["cur_share"][cand_cur], s["prev_share"][cand_prev]])
    order = shares.argsort(descending=True)
    targets = []
    seen: set[int] = set()
    for i in ids[order].tolist():
        if i not in seen:
            seen.add(i)
            targets.append(i)
    targets = torch.tensor(targets[:MAX_TARGETS], dtype=torch.long)
    out: dict[str, Tensor] = {"targets": targets}
    if len(targets):
        pool = probes.token_pool(subject)
        probe = probes.interleaved(pool, targets, REPS, subject.generator(3))
        acts = subject.acts(probe.tokens)  # [B, T, F]
        valid = torch.ones_like(probe.tokens, dtype=torch.bool)
        valid[:, 0] = False
        prev_tokens = torch.roll(probe.tokens, 1, dims=1)
        out.update(acts=acts[valid], cur=probe.tokens[valid], prev=prev_tokens[valid], tokens=probe.tokens)
    subject.cache["token_probe"] = out
    return out


def _detector(subject: Subject, which: str) -> DetectorResult:
    mechanism = "token" if which == "cur" else "previous_token"
    if subject.text is None:
        return zero_result(mechanism, subject.n_features, "needs held-out text (Subject.text)")
    s = text_token_stats(subject)
    p = _context_probe(subject)
    share = s[f"{which}_share"]
    candidate = (share >= CANDIDATE_SHARE) & (s["firings"] >= MIN_FIRINGS)
    top = s[f"{which}_top_ids"][:, 0]
    c = {"score": torch.zeros(subject.n_features)}
    if "acts" in p:
        probed = torch.isin(top, p["targets"]) & candidate
        ids = p[which]  # [n] current or previous token
        cond = (ids[:, None] == top[None, :]) & probed[None, :]  # [n, F]
        ctrl = ids[:, None] != top[None, :]
        c = masked_contrast(p["acts"], cond, ctrl, subject.reference(p["acts"]))
    score = torch.minimum(share, c["score"]) * candidate
    stats = {f"{which}_token_share": share, "text_firings": s["firings"], "top_token_coverage": s[f"{which}_coverage"]}
    for k in ("selectivity", "reliability", "fire_rate_control"):
        if k in c:
            stats[f"probe_{k}"] = c[k]
    where = "current" if which == "cur" else "previous"

    def details(f: int) -> dict:
        ids, shares = s[f"{which}_top_ids"][f], s[f"{which}_top_share"][f]
        return {
            f"top_{where}_tokens": [
                [subject.tokenizer.decode([int(i)]), round(float(v), 3)] for i, v in zip(ids, shares) if v > 0
            ]
        }

    probe = (
        f"{len(p['targets'])} candidate tokens each as the {where} token in {REPS} random contexts "
        f"([random, token, random] interleaved), against random tokens; screened on held-out text"
    )
    return DetectorResult(mechanism, score, stats, probe, details)


def token(subject: Subject) -> DetectorResult:
    """Fires on one or a few current-token ids regardless of context."""
    return _detector(subject, "cur")


def previous_token(subject: Subject) -> DetectorResult:
    """Fires according to the previous token's identity, whatever the current token is."""
    return _detector(subject, "prev")
