"""Repetition detectors: duplicate-token features (the current token appeared before) and induction
features (the current position continues a repeated sequence, [A][B] ... [A] -> [B]).

Both compare matched positions of the same random sequences with and without the repetition, so
position and token identity cancel out. A feature that fires on every repeated token whether or
not its neighbours repeat counts as duplicate-token; induction needs the sequence to repeat too,
or (copy route) fires exactly where its own top promoted token is the induction target.
"""

from __future__ import annotations

import torch

from analysis.detectors import probes
from analysis.detectors.base import (
    DetectorResult,
    Subject,
    contrast,
    masked_contrast,
    run_once,
)
from analysis.detectors.output import logit_summary, token_promoting

DUP_ROWS, DUP_LENGTH = 16, 64
REP_ROWS, REP_HALF = 12, 24
COPY_REPS, COPY_HALF = 4, 24
COPY_MIN_HITS = 2  # copy route: firings needed at the feature's induction targets
COPY_MIN_PROMOTING = 0.25  # copy route: only features whose top token stands out this much (token_promoting score)


def _duplicates(subject: Subject) -> dict:
    if "duplicates" not in subject.cache:
        probe = probes.duplicate_sequences(probes.token_pool(subject), DUP_ROWS, DUP_LENGTH, subject.generator(11))
        acts = subject.acts(probe.tokens)
        subject.cache["duplicates"] = {"cond": acts[probe.masks["condition"]], "ctrl": acts[probe.masks["control"]]}
    return subject.cache["duplicates"]


def _repeats(subject: Subject) -> dict:
    if "repeats" not in subject.cache:
        probe = probes.repeated_sequences(probes.token_pool(subject), REP_ROWS, REP_HALF, subject.generator(13))
        acts = subject.acts(probe.tokens)
        subject.cache["repeats"] = {
            "cond": acts[probe.masks["condition"]],
            "ctrl": acts[probe.masks["control"]],
            "tokens": probe.tokens,
            "acts": acts,
        }
    return subject.cache["repeats"]


def duplicate_token(subject: Subject) -> DetectorResult:
    """Fires on a token that already occurred in the context (neighbours not repeated)."""
    d = _duplicates(subject)
    c = contrast(d["cond"], d["ctrl"], subject.reference(d["cond"]))
    stats = {k: c[k] for k in ("selectivity", "reliability", "mean_condition", "mean_control")}
    probe = (
        f"{DUP_ROWS} random sequences of {DUP_LENGTH} distinct tokens where every 4th position from 8 on "
        "copies a random earlier token, against the same positions of the unmodified sequences"
    )
    return DetectorResult("duplicate_token", c["score"], stats, probe)


def induction(subject: Subject) -> DetectorResult:
    """max(generic route, copy route); see the module docstring."""
    r, d = _repeats(subject), _duplicates(subject)
    ref = subject.reference(r["cond"])
    rep = contrast(r["cond"], r["ctrl"], ref)
    mean_rep = rep["mean_condition"]
    iso = d["cond"].mean(0)
    iso_ratio = (iso / mean_rep.clamp_min(1e-12)).clamp(0, 1)
    generic = torch.minimum(rep["score"], 1 - iso_ratio)
    stats = {
        "repeat_selectivity": rep["selectivity"],
        "repeat_reliability": rep["reliability"],
        "isolated_repeat_ratio": iso_ratio,
        "generic_score": generic,
    }
    score = generic
    copy = _copy_route(subject)
    if copy is not None:
        stats["copy_score"] = copy["score"]
        stats["copy_reliability"] = copy["reliability"]
        score = torch.maximum(generic, copy["score"])
    probe = (
        f"{REP_ROWS} sequences of {REP_HALF} random tokens repeated once, against the same first halves "
        "followed by fresh tokens; isolated repeats from the duplicate-token probe"
    )
    if copy is not None:
        probe += (
            f"; copy route: each feature's top promoted token inside repeated random sequences "
            f"({COPY_REPS} repetitions), read where that token is the induction target"
        )
    tokens, acts = r["tokens"], r["acts"]

    def details(f: int) -> dict:
        row = int(acts[:REP_ROWS, :, f].sum(1).argmax())
        text = [[subject.tokenizer.decode([int(t)]), round(float(a), 2)] for t, a in zip(tokens[row], acts[row, :, f])]
        return {"example_repeated_sequence": text}

    return DetectorResult("induction", score, stats, probe, details)


def _copy_route(subject: Subject) -> dict | None:
    """Fires at the position before the second occurrence of its top promoted token B (where the
    earlier [A][B] makes B the induction target), not elsewhere in the same sequences."""
    if not subject.has_output:
        return None
    promoting = run_once(subject, "token_promoting", token_promoting).score
    cand = promoting >= COPY_MIN_PROMOTING
    if not cand.any():
        return None
    top = logit_summary(subject)["top_ids"][:, 0]
    targets = top[cand].unique()
    pool = probes.token_pool(subject)
    pool = pool[~torch.isin(pool, targets)]
    gen = subject.generator(19)
    rows, predict = [], []
    for _ in range(COPY_REPS):
        order = targets[torch.randperm(len(targets), generator=gen)]
        for start in range(0, len(order), COPY_HALF // 2):
            chunk = order[start : start + COPY_HALF // 2]
            fill = probes.distinct_rows(pool, 1, COPY_HALF - len(chunk), gen)[0]
            half = torch.cat([chunk, fill])[torch.randperm(COPY_HALF, generator=gen)]
            row = torch.cat([half, half])
            # position p predicts row[p + 1]; in the second half that is the induction target
            nxt = torch.full_like(row, -1)
            nxt[COPY_HALF:-1] = row[COPY_HALF + 1 :]
            rows.append(row)
            predict.append(nxt)
    tokens, nxt = torch.stack(rows), torch.stack(predict)
    acts = subject.acts(tokens)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[:, 0] = False
    a, target = acts[valid], nxt[valid]
    cond = (target[:, None] == top[None, :]) & cand[None, :]
    ctrl = ~cond
    ref = subject.reference(a)
    out = masked_contrast(a, cond, ctrl, ref)
    hits = ((a > 0.1 * ref) & (a > 0) & cond).sum(0)
    out["score"] = out["score"] * cand * (hits >= COPY_MIN_HITS)
    return out
