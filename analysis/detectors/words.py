"""Text-shape detectors: subword-merging features (word continuations) and script/language features
(one writing system or language), probed with generated sentences and short texts in many scripts."""

from __future__ import annotations

import torch

from analysis.detectors import probes
from analysis.detectors.base import FIRE_FRACTION, DetectorResult, Subject, contrast


def subword_merging(subject: Subject) -> DetectorResult:
    """Fires on continuation tokens of multi-token words rather than on word starts."""
    probe = probes.word_sentences(subject.tokenizer, subject.generator(23))
    acts = subject.acts(probe.tokens)
    cond, ctrl = [acts[probe.masks["continuation"]]], [acts[probe.masks["start"]]]
    described = f"{len(probe.tokens)} sentences of long and short words"
    if subject.text is not None:
        start, cont = probes.word_roles(subject.tokenizer, subject.text)
        start[:, 0] = cont[:, 0] = False
        text_acts = subject.text_acts()
        cond.append(text_acts[cont])
        ctrl.append(text_acts[start])
        described += f" and {len(subject.text)} held-out text contexts"
    cond_t, ctrl_t = torch.cat(cond), torch.cat(ctrl)
    c = contrast(cond_t, ctrl_t, subject.reference(cond_t))
    stats = {k: c[k] for k in ("selectivity", "reliability", "mean_condition", "mean_control")}
    stats["continuation_positions"] = torch.full_like(c["score"], float(len(cond_t)))
    return DetectorResult(
        "subword_merging", c["score"], stats, f"word-continuation tokens against word-start tokens in {described}"
    )


def _group_score(
    acts_by_group: list[torch.Tensor], ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """score [F], best group index [F], reliability [F] for per-group activations [n_g, F]."""
    means = torch.stack([a.mean(0) for a in acts_by_group])  # [G, F]
    g = len(acts_by_group)
    share, best = (means / means.sum(0).clamp_min(1e-12)).max(0)
    selectivity = ((share - 1 / g) / (1 - 1 / g)).clamp(0, 1) * (means.sum(0) > 0)
    rel = torch.stack([((a > FIRE_FRACTION * ref) & (a > 0)).float().mean(0) for a in acts_by_group])
    reliability = rel.gather(0, best[None])[0]
    return (selectivity * reliability).sqrt(), best, reliability


def script(subject: Subject) -> DetectorResult:
    """Fires on one script (or one language of a script) and not on the others."""
    p = probes.script_texts(subject.tokenizer)
    acts = subject.acts(p.tokens)
    valid = p.valid.clone()
    valid[:, 0] = False
    ref = subject.reference(acts[valid])
    out = {}
    for level, labels in (("script", p.script), ("language", p.language)):
        names = list(dict.fromkeys(labels))
        groups = [torch.cat([acts[i][valid[i]] for i, lab in enumerate(labels) if lab == name]) for name in names]
        score, best, rel = _group_score(groups, ref)
        out[level] = (score, best, rel, names)
    s_script, s_lang = out["script"][0], out["language"][0]
    use_lang = s_lang > s_script
    score = torch.maximum(s_script, s_lang)
    stats = {
        "script_score": s_script,
        "language_score": s_lang,
        "reliability": torch.where(use_lang, out["language"][2], out["script"][2]),
    }

    def details(f: int) -> dict:
        level = "language" if use_lang[f] else "script"
        _, best, _, names = out[level]
        return {"group": f"{level}: {names[int(best[f])]}"}

    groups = ", ".join(dict.fromkeys(p.language))
    return DetectorResult("script", score, stats, f"{len(p.tokens)} short texts in {groups}", details)
