"""What saelab already knows about a circuit's feature nodes, read from their SAE's folder: mechanism tags with
their component evidence, top sources (heads named with their types), max-activating examples, and an explanation
when one exists (`sae explain`, features/explanations.jsonl). Each part is optional: a run never inspected
just has none."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from activations.errors import UserError
from analysis.dashboard import read_feature_tags
from analysis.dashboard_sources import read_sources
from analysis.explanations_store import latest
from analysis.feature_stats import FeatureStats

EXAMPLES_KEPT, EXAMPLE_LEFT, EXAMPLE_RIGHT = 3, 8, 3  # examples per node, tokens shown before / after


@dataclass
class FeatureNotes:
    """One SAE folder's catalogue, loaded once, asked per feature."""

    tags: dict[int, list] = field(default_factory=dict)
    sources: dict[str, dict] = field(default_factory=dict)
    explanations: dict[str, object] = field(default_factory=dict)
    stats: FeatureStats | None = None
    decode: object = None

    def of(self, feature: int) -> dict:
        """{"tags", "sources", "examples", "explanation"} of one feature (empty where the run has nothing)."""
        source = self.sources.get(str(feature), {})
        return {
            "tags": [_tag(t) for t in self.tags.get(feature, [])],
            "sources": source.get("summary", ""),
            "examples": self._examples(feature),
            "explanation": _explanation(self.explanations.get(str(feature))),
        }

    def _examples(self, feature: int) -> list[dict]:
        s = self.stats
        if s is None or not 0 <= feature < s.d_sae:
            return []
        centre, out = s.cfg.left, []
        lo, hi = max(0, centre - EXAMPLE_LEFT), centre + EXAMPLE_RIGHT + 1
        for act, tokens, acts in zip(s.top_act[feature], s.top_tokens[feature], s.top_window_acts[feature]):
            if float(act) <= 0 or len(out) >= EXAMPLES_KEPT:
                break
            ids, values = tokens[lo:hi].tolist(), acts[lo:hi].tolist()
            kept = [(i, v) for i, v in zip(ids, values) if i >= 0]
            out.append(
                {
                    "act": round(float(act), 4),
                    "tokens": [self.decode([i]) for i, _ in kept],
                    "acts": [round(v, 3) for _, v in kept],
                    "center": sum(1 for i in ids[: centre - lo] if i >= 0),
                }
            )
        return out


def _tag(tag) -> dict:
    """A tag as {"name", "evidence", "flag"}: the name, its component-evidence status, and any warning."""
    if isinstance(tag, str):
        return {"name": tag, "evidence": "", "flag": ""}
    evidence = tag.get("components") if isinstance(tag.get("components"), dict) else {}
    return {"name": str(tag.get("name", "")), "evidence": evidence.get("status", ""), "flag": tag.get("flag", "")}


def _explanation(value) -> str:
    if isinstance(value, dict):
        return str(value.get("text") or value.get("explanation") or "")
    return value if isinstance(value, str) else ""


def load_notes(sae_folder: Path, tokenizer) -> FeatureNotes:
    """The catalogue of one SAE folder (its features/ files, each optional)."""
    features = Path(sae_folder) / "features"
    notes = FeatureNotes(tags=read_feature_tags(features), decode=lambda ids: tokenizer.decode(ids))
    notes.sources = (read_sources(features) or {}).get("features", {})
    notes.explanations = {str(f): r for f, r in latest(features).items()}
    try:
        notes.stats = FeatureStats.load(features)
    except UserError:  # never inspected: no examples
        notes.stats = None
    return notes
