"""Successor detector (Gould et al. 2023): fires on elements of ordinal sequences (digits, number
words, days, months, letters) and its direct logit effect ranks each element's successor first
among the members of that sequence."""

from __future__ import annotations

import torch

from analysis.detectors import probes
from analysis.detectors.base import FIRE_FRACTION, DetectorResult, Subject, zero_result
from analysis.detectors.output import logit_z

MIN_FIRINGS = 3
MIN_Z = 3.0  # the successor must stand out in the whole vocabulary ...
MIN_MARGIN = 1.0  # ... and beat every other member of its sequence by this many z units


def successor(subject: Subject) -> DetectorResult:
    if not subject.has_output:
        return zero_result("successor", subject.n_features, "no decoder directions / unembedding given")
    p = probes.ordinal_lists(subject.tokenizer, subject.generator(29))
    if not p.families:
        return zero_result("successor", subject.n_features, "no ordinal family is single-token for this tokenizer")
    fam_ids = list(p.families.values())
    sizes = torch.tensor([len(ids) for ids in fam_ids])
    # every position whose token is a family member with a successor is an element (probe and text)
    member_fam = torch.full((len(subject.tokenizer),), -1)
    member_idx = torch.full((len(subject.tokenizer),), -1)
    for fam, ids in reversed(list(enumerate(fam_ids))):
        member_fam[torch.tensor(ids[:-1])] = fam
        member_idx[torch.tensor(ids[:-1])] = torch.arange(len(ids) - 1)
    token_rows = [p.tokens[:, 1:]]
    act_rows = [subject.acts(p.tokens)[:, 1:]]
    if subject.text is not None:
        token_rows.append(subject.text[:, 1:])
        act_rows.append(subject.text_acts()[:, 1:])
    tokens = torch.cat([t.reshape(-1) for t in token_rows])
    acts = torch.cat([a.reshape(-1, subject.n_features) for a in act_rows])
    is_elem = member_fam[tokens] >= 0
    elem = acts[is_elem]  # [nE, F]
    fam_of, idx_of = member_fam[tokens[is_elem]], member_idx[tokens[is_elem]]

    # direct logit effect (z over the vocabulary) on every family member: [F, sum of family sizes]
    flat = torch.tensor([i for ids in fam_ids for i in ids])
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), sizes[:-1]]), 0)
    logits = logit_z(subject, flat)
    is_succ = torch.zeros(len(elem), subject.n_features, dtype=torch.bool)
    for fam in range(len(fam_ids)):
        rows = fam_of == fam
        if not rows.any():
            continue
        block = logits[:, offsets[fam] : offsets[fam] + sizes[fam]]  # [F, n]
        top2 = block.topk(2, dim=-1)
        clear = (top2.values[:, 0] >= MIN_Z) & (top2.values[:, 0] - top2.values[:, 1] >= MIN_MARGIN)
        is_succ[rows] = (top2.indices[:, 0][None, :] == (idx_of[rows] + 1)[:, None]) & clear[None, :]

    mass_e = elem.sum(0)
    base = len(elem) / len(acts)
    share = mass_e / acts.sum(0).clamp_min(1e-12)
    selectivity = ((share - base) / (1 - base)).clamp(0, 1)
    rate = (elem * is_succ).sum(0) / mass_e.clamp_min(1e-12)
    firings = ((elem > FIRE_FRACTION * subject.reference(elem)) & (elem > 0)).sum(0)
    score = torch.minimum(selectivity, rate) * (firings >= MIN_FIRINGS)
    stats = {"ordinal_selectivity": selectivity, "successor_rate": rate, "ordinal_firings": firings}
    tok = subject.tokenizer

    def details(f: int) -> dict:
        a = elem[:, f]
        order = a.argsort(descending=True)[:5]
        out = []
        for i in order[a[order] > 0].tolist():
            fam, k = int(fam_of[i]), int(idx_of[i])
            block = logits[f, offsets[fam] : offsets[fam] + sizes[fam]]
            out.append(
                [tok.decode([fam_ids[fam][k]]), round(float(a[i]), 3), tok.decode([fam_ids[fam][int(block.argmax())]])]
            )
        return {"fires_on_then_promotes": out}

    names = ", ".join(p.families)
    probe = (
        f"{len(p.tokens)} ordinal lists ({names}){' and held-out text' if subject.text is not None else ''}: "
        "positions holding a sequence element against all other positions"
    )
    return DetectorResult("successor", score, stats, probe, details)
