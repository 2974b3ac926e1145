"""Feature sources linked to the head catalogue, and mechanism tags checked against them, on the hand-built
two-layer model (tests/hand_models.py): a feature reading the induction head's output has that head as its top
source and its induction tag is supported; the same tag on a feature the previous-token head computes is flagged;
an SAE hooked before the induction head's layer cannot test it."""

from __future__ import annotations

import json

import pytest
import torch
from hand_models import INDUCTION_HEAD, JUNK0, OUT, PREV, PREV_HEAD, V, hand_model, hand_tokenizer

from activations.errors import UserError
from activations.hookpoints import parse_hook
from activations.models import LoadedModel
from analysis.catalogue import CATALOGUE, CatalogueResult, load_catalogue
from analysis.component_capture import span_of
from analysis.component_evidence import add_component_evidence
from analysis.component_types import ComponentTypes, label
from analysis.components import feature_entries, feature_sources
from analysis.dashboard_sources import read_sources
from analysis.head_probes import prefix_ids, repeated_tokens, token_pool
from analysis.heads import ProbeSettings, classify_heads
from sae.config import SAEConfig
from sae.registry import make_sae

pytestmark = pytest.mark.usefixtures("one_thread")
INDUCTION_FEATURE, PREV_FEATURE, JUNK_FEATURE = 0, 1, 2


@pytest.fixture(scope="module")
def hand_lm() -> LoadedModel:
    return LoadedModel(model=hand_model(), tokenizer=hand_tokenizer(), name="hand-built")


@pytest.fixture(scope="module")
def types(hand_lm) -> ComponentTypes:
    return ComponentTypes(heads=classify_heads(hand_lm, ProbeSettings(rows=8, half=10), cache=False))


def _sae(lm: LoadedModel, hook: str):
    """Three features by construction: one reads the prediction slot (only the induction head writes it), one the
    previous-token slot (only the previous-token head), one a junk dimension (only the BOS distractor heads)."""
    sae = make_sae(SAEConfig(d_in=lm.d_model, d_sae=3, k=3, hook_name=hook, model_name=lm.name))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[OUT : OUT + V, INDUCTION_FEATURE] = 1 / V**0.5
        sae.W_enc[PREV : PREV + V, PREV_FEATURE] = 1 / V**0.5
        sae.W_enc[JUNK0, JUNK_FEATURE] = 1.0
    return sae


def _second_half(lm: LoadedModel) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    gen = torch.Generator().manual_seed(7)
    probe = repeated_tokens(token_pool(lm.tokenizer, V), prefix_ids(lm.tokenizer), 2, 10, gen)
    start = probe.start + probe.half + 1
    return probe.tokens, [(b, t) for b in range(2) for t in range(start, start + 6)]


def _tags(folder, tagged: dict[int, list[str]]) -> None:
    """A features/mechanisms.json tagging features by hand (scores 1), as the detectors would write it."""
    catalogue = load_catalogue()
    mechanisms = sorted({m for ms in tagged.values() for m in ms})
    tags = {
        f: [{"mechanism": m, "name": catalogue[m].name, "score": 1.0, "threshold": 0.5, "evidence": {}} for m in ms]
        for f, ms in tagged.items()
    }
    detectors = {m: {"threshold": 0.5, "probe": "by hand", "passed": 1, "seconds": 0} for m in mechanisms}
    scores = {m: [1.0 if m in tagged.get(f, []) else 0.0 for f in range(3)] for m in mechanisms}
    CatalogueResult(1, 3, scores, detectors, tags).save(folder)


def _evidence(folder, feature: int, mechanism: str) -> dict:
    data = json.loads((folder / "features" / "mechanisms.json").read_text())
    return next(t for t in data["tags"][str(feature)] if t["mechanism"] == mechanism)


def test_a_feature_reading_the_induction_head_has_it_as_top_source(hand_lm, types):
    sae = _sae(hand_lm, "blocks.1.hook_resid_post")
    tokens, positions = _second_half(hand_lm)
    report = feature_sources(sae, hand_lm, tokens, positions, [INDUCTION_FEATURE, PREV_FEATURE])
    for i, feature in enumerate(report.features.tolist()):
        top = report.names[int(report.contributions[i].argmax())]
        assert top == (f"L1H{INDUCTION_HEAD}" if feature == INDUCTION_FEATURE else f"L0H{PREV_HEAD}"), report.top(i)
    assert report.remainder.abs().max() < 1e-4
    entries = feature_entries(report, types)
    induction = entries[str(INDUCTION_FEATURE)]
    assert induction["fractions"][0][0] == f"L1H{INDUCTION_HEAD}" and induction["fractions"][0][1] > 0.9
    assert induction["type_shares"]["head:induction"] > 0.9
    assert induction["summary"].startswith(f"L1H{INDUCTION_HEAD} (induction head ")
    assert entries[str(PREV_FEATURE)]["type_shares"]["head:previous_token"] > 0.9
    assert "head:induction" not in entries[str(PREV_FEATURE)]["type_shares"]
    assert label("L0H0", []) == "L0H0" and types.of("embed") == [("embed", 1.0), ("effective_embed", 1.0)]


def test_tags_are_supported_flagged_or_untestable_by_their_sources(hand_lm, types, tmp_path):
    tokens, positions = _second_half(hand_lm)
    every = [INDUCTION_FEATURE, PREV_FEATURE, JUNK_FEATURE]
    for hook, folder in (
        ("blocks.1.hook_resid_post", tmp_path / "after"),
        ("blocks.1.hook_resid_pre", tmp_path / "before"),
    ):
        sae = _sae(hand_lm, hook)
        report = feature_sources(sae, hand_lm, tokens, positions, every)
        sources = {"hook": hook, "components": report.names, "features": feature_entries(report, types)}
        _tags(folder, {0: ["induction"], 1: ["induction", "previous_token"], 2: ["token", "script"]})
        span = span_of(parse_hook(hook, hand_lm.model))
        counts = add_component_evidence(folder, sources, types, span)
        assert sum(sum(c.values()) for c in counts.values()) == 5

    after = tmp_path / "after"
    right = _evidence(after, INDUCTION_FEATURE, "induction")
    assert right["components"]["status"] == "supported" and "flag" not in right
    assert right["components"]["components"][0][:1] == [f"L1H{INDUCTION_HEAD}"]
    wrong = _evidence(after, PREV_FEATURE, "induction")
    assert wrong["components"]["status"] == "disagrees" and wrong["components"]["share"] < 0.01
    assert "components disagree" in wrong["flag"]
    assert _evidence(after, PREV_FEATURE, "previous_token")["components"]["status"] == "supported"
    assert _evidence(after, JUNK_FEATURE, "token")["components"]["status"] == "disagrees"  # BOS heads write it
    assert _evidence(after, JUNK_FEATURE, "script")["components"]["status"] == "untested"  # no component type listed

    before = _evidence(tmp_path / "before", INDUCTION_FEATURE, "induction")["components"]
    assert before["status"] == "untestable" and "upstream" in before["reason"]  # layer 1's head is downstream


def test_catalogue_component_types_are_checked(tmp_path):
    typo = tmp_path / "mechanisms.yaml"
    typo.write_text(CATALOGUE.read_text().replace("components: [head:induction]", "components: [head:inductoin]"))
    with pytest.raises(UserError, match="unknown component types"):
        load_catalogue(typo)
    assert load_catalogue()["induction"].components == ("head:induction",)


def test_a_damaged_components_file_is_one_clear_error(tmp_path):
    assert read_sources(tmp_path) is None  # none written yet: no sources on the dashboard
    (tmp_path / "components.json").write_text('{"hook": "blocks.1.hook_resid_post", "feat')
    with pytest.raises(UserError, match="components.json is unreadable.*sae inspect"):
        read_sources(tmp_path)
