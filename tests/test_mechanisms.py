"""The mechanism catalogue and its detectors: the catalogue file, the probes, every detector on planted
ground truth (precision and recall), an SAE with hand-set decoder rows on the real model, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from activations.errors import UserError
from activations.models import load_model
from activations.sources import open_text_source
from analysis.catalogue import (
    CATALOGUE,
    TAGS_FILE,
    CatalogueConfig,
    CatalogueResult,
    detect_run,
    held_out_text,
    load_catalogue,
    load_tags,
    sae_subject,
    summary_table,
    tag_features,
)
from analysis.commands.catalogue import describe
from analysis.detectors import DETECTORS, probes
from analysis.detectors.output import null_space
from analysis.detectors.planted import bigram_seen_before, planted_bank, planted_subject, precision_recall, seen_before
from analysis.logits import unembedding
from sae.cli import main
from sae.config import SAEConfig
from sae.io import save_sae
from sae.registry import make_sae

REQUIRED = {
    "token",
    "previous_token",
    "positional",
    "subword_merging",
    "duplicate_token",
    "induction",
    "successor",
    "token_promoting",
    "suppression",
    "entropy",
    "attention_sink",
    "script",
}


# ---- the catalogue file --------------------------------------------------------------------------


def test_catalogue_has_every_required_mechanism_with_sources():

    cat = load_catalogue()
    assert isinstance(cat.version, int) and cat.primer["arxiv"] == "2405.00208"
    assert REQUIRED <= set(cat.ids)
    for m in cat.mechanisms:
        assert m.detector in DETECTORS and 0 < m.threshold <= 1
        assert m.primer_section[:1].isdigit() and len(m.description) > 80 and m.score
        assert m.papers and all({"authors", "year", "title", "arxiv"} <= set(p) for p in m.papers)


@pytest.mark.parametrize(
    "text, match",
    [
        ("version: 1\nmechanisms: [{id: x}]\n", "lacks name"),
        ("mechanisms: []\n", "needs a 'version'"),
        ("version: 1\nmechanisms: [\n", "not valid YAML"),
    ],
)
def test_broken_catalogue_files_are_clear_errors(tmp_path, text, match):

    path = tmp_path / "cat.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        load_catalogue(path)


def test_catalogue_entry_naming_a_missing_detector_is_a_clear_error(tmp_path):

    path = tmp_path / "cat.yaml"
    path.write_text(CATALOGUE.read_text().replace("detector: successor", "detector: succesor"))
    with pytest.raises(UserError, match="names detector 'succesor', which does not exist"):
        load_catalogue(path)
    with pytest.raises(UserError, match="unknown mechanism 'nope'"):
        load_catalogue()["nope"]


# ---- probes --------------------------------------------------------------------------------------


def test_probes_put_repeats_and_word_roles_where_they_say(tokenizer):

    gen = torch.Generator().manual_seed(0)
    pool = torch.arange(1000, 5000)
    rep = probes.repeated_sequences(pool, 3, 8, gen)
    assert torch.equal(bigram_seen_before(rep.tokens), rep.masks["condition"])  # exactly the repeated second halves
    dup = probes.duplicate_sequences(pool, 3, 32, gen)
    cond = dup.masks["condition"]
    assert seen_before(dup.tokens)[cond].all() and not seen_before(dup.tokens)[dup.masks["control"]].any()
    assert not bigram_seen_before(dup.tokens).any()  # neighbours never repeat
    ids = torch.tensor([tokenizer(" unbelievably good", add_special_tokens=False)["input_ids"]])
    start, cont = probes.word_roles(tokenizer, ids)
    pieces = [tokenizer.decode([int(i)]) for i in ids[0]]
    assert start[0].tolist() == [p.startswith(" ") for p in pieces]
    assert cont[0].tolist() == [i > 0 and not p.startswith(" ") for i, p in enumerate(pieces)] and cont.sum() >= 1
    ordinal = probes.ordinal_lists(tokenizer, gen)
    assert {"days", "months", "digits"} <= set(ordinal.families)
    assert (ordinal.family[:, 0] == -1).all()


# ---- every detector on planted ground truth --------------------------------------------------------


@pytest.fixture(scope="module")
def smol():

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def held_out(tokenizer):

    return held_out_text(open_text_source("wikitext-2", split="test"), tokenizer, 2048, 128, False)


@pytest.fixture(scope="module")
def planted(smol, held_out):
    """The standard planted bank on SmolLM2's tokenizer and unembedding, tagged by every detector."""

    un = unembedding(smol)
    W = un.W_U * un.gain
    bank = planted_bank(smol.tokenizer, W, un.center)
    subject = planted_subject(bank, smol.tokenizer, W, held_out, un.center)
    return bank, tag_features(subject)


@pytest.mark.parametrize("mechanism", sorted(REQUIRED))
def test_detector_finds_planted_features_and_nothing_else(planted, mechanism):

    bank, result = planted
    threshold = result.detectors[mechanism]["threshold"]
    passed = torch.tensor(result.scores[mechanism]) >= threshold
    r = precision_recall(bank, {mechanism: passed})[mechanism]
    assert r["positives"] >= 3 and r["negatives"] >= 20
    assert r["recall"] >= 0.75, f"missed: {r['missed']}"
    assert r["precision"] >= 0.75, f"false positives: {r['false_positives']}"


def test_random_features_stay_unlabelled_and_tags_carry_evidence(planted):
    bank, result = planted
    for i, b in enumerate(bank):
        if b.name.startswith(("random sparse", "dense", "bigram")):
            assert i not in result.tags, (b.name, result.tags.get(i))
    f = next(i for i, b in enumerate(bank) if b.name.startswith("promotes ' water'"))
    tag = next(t for t in result.tags[f] if t["mechanism"] == "token_promoting")
    assert tag["section"].startswith("5.2.2") and tag["score"] >= tag["threshold"]
    assert tag["evidence"]["promoted_tokens"][0][0] == " water" and "random directions" in tag["evidence"]["probe"]
    f = next(i for i, b in enumerate(bank) if b.name.startswith("repeated sequence"))
    ev = next(t for t in result.tags[f] if t["mechanism"] == "induction")["evidence"]
    assert ev["repeat_reliability"] > 0.9 and ev["isolated_repeat_ratio"] < 0.1 and ev["example_repeated_sequence"]


# ---- an SAE with chosen decoder rows, through the real model ----------------------------------------


def test_sae_rows_set_to_unembedding_directions_get_output_tags(smol, held_out):
    """Row 0 = unembedding row of ' water' (token-promoting), row 1 its negative (suppression), row 2 in the
    unembedding's null space (entropy), row 3 random (unlabelled)."""

    un = unembedding(smol)
    W = un.W_U * un.gain
    water = smol.tokenizer(" water", add_special_tokens=False)["input_ids"][0]
    torch.manual_seed(0)
    sae = make_sae(
        SAEConfig(
            d_in=smol.d_model,
            d_sae=4,
            k=2,
            hook_name="blocks.1.hook_resid_pre",
            hook_layer=1,
            model_name="smollm2-135m",
            context_size=128,
        )
    )
    rows = torch.stack([W[water], -W[water], null_space(W, un.center)[:3].sum(0), torch.randn(smol.d_model)])
    with torch.no_grad():
        sae.W_dec.copy_(rows / rows.norm(dim=-1, keepdim=True))
    subject = sae_subject(sae, smol, held_out[:2], CatalogueConfig(resid_positions=64))
    result = tag_features(subject, mechanisms=["token_promoting", "suppression", "entropy"])
    tags = {f: {t["mechanism"] for t in ts} for f, ts in result.tags.items()}
    assert tags.get(0) == {"token_promoting"} and tags.get(1) == {"suppression"}
    assert tags.get(2) == {"entropy"} and 3 not in tags
    ev = next(t for t in result.tags[2] if t["mechanism"] == "entropy")["evidence"]
    assert ev["null_space_fraction"] > 0.9 and "final_norm_change" in ev and "entropy_change_nats" in ev


# ---- the whole path on a tiny model, the stored tags and the CLI ---------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama):
    """A random TopK SAE on the tiny Llama, saved as a run folder."""

    torch.manual_seed(0)
    sae = make_sae(
        SAEConfig(
            d_in=64,
            d_sae=128,
            k=8,
            hook_name="blocks.2.hook_resid_pre",
            hook_layer=2,
            model_name="tiny",
            context_size=32,
            dataset="wikitext-2",
        )
    )
    return save_sae(sae, tmp_path_factory.mktemp("run")), sae


def test_detect_run_stores_tags_and_summary_counts_them(tiny_run, tiny_llama, capsys):

    folder, _ = tiny_run
    result = detect_run(folder, tiny_llama, tokens=256, progress=False)
    stored = json.loads((folder / TAGS_FILE).read_text())
    assert set(stored["scores"]) == REQUIRED and len(stored["scores"]["token"]) == 128
    back = load_tags(folder)
    assert back.counts() == result.counts() and back.tags == {int(k): v for k, v in stored["tags"].items()}
    for f, tags in back.tags.items():
        for t in tags:
            assert t["score"] >= t["threshold"] and back.scores[t["mechanism"]][f] == t["score"]
    table = summary_table({"": back})
    assert "blocks.2.hook_resid_pre (128)" in table and "unlabelled" in table
    for m, n in back.counts().items():
        assert any(line.split()[:1] == [m] and line.split()[-1] == str(n) for line in table.splitlines())
    if back.tags:
        m = back.tags[min(back.tags)][0]["mechanism"]
        assert describe(back, m, 2)


def test_summary_has_a_column_per_layer(tiny_run, tiny_llama):

    folder, _ = tiny_run
    one = detect_run(folder, tiny_llama, tokens=256, progress=False, only=["token", "attention_sink"])
    other = CatalogueResult.from_json({**load_tags(folder).to_json(), "meta": {"hook": "blocks.3.hook_resid_pre"}})
    other.detectors["token"] = {**other.detectors["token"], "passed": 7}
    header, _, *rows = summary_table({"a": one, "b": other}).splitlines()
    assert "blocks.2.hook_resid_pre (128)" in header and "blocks.3.hook_resid_pre (128)" in header
    token = next(r.split() for r in rows if r.startswith("token "))
    assert token[-2:] == [str(one.counts()["token"]), "7"]
    assert next(r.split() for r in rows if r.startswith("induction"))[-2:] == ["-", "-"]


def test_catalogue_command_lists_and_reports_errors(tiny_run, tmp_path, capsys):

    assert main(["catalogue"]) == 0
    listing = capsys.readouterr().out
    for m in REQUIRED:
        assert f"\n{m}: " in "\n" + listing
    assert "Successor Heads" in listing and "2312.09230" in listing and "primer section: 5.1.2" in listing

    def one_line_error(args, *phrases):
        assert main(args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert all(p in lines[0] for p in phrases), lines[0]

    one_line_error(["catalogue", "--detect"], "needs a run folder")
    fresh = tmp_path / "fresh"
    save_sae(tiny_run[1], fresh)
    one_line_error(["catalogue", str(fresh)], "mechanisms.json is missing", "--detect")
    one_line_error(["catalogue", str(fresh), "--detect", "--only", "bogus"], "unknown mechanism 'bogus'")
    one_line_error(["catalogue", str(tmp_path / "nowhere")], "does not exist")


# ---- sae inspect: tags stored, shown per feature and on the mechanisms page ----------------------------


def _load_js(path, call):
    text = path.read_text(encoding="utf-8")
    return json.loads(f"[{text[len(f'SAELAB.{call}(') : text.rstrip().rindex(')')]}]")


def test_inspect_tags_features_and_the_dashboard_shows_them(tiny_run, tiny_llama_dir, tmp_path):
    import shutil
    import subprocess

    folder, _ = tiny_run
    out = tmp_path / "inspected"
    assert (
        main(
            [
                "inspect",
                str(folder),
                "--out",
                str(out),
                "--model",
                tiny_llama_dir,
                "--tokens",
                "512",
                "--top-k",
                "4",
                "--left",
                "3",
                "--right",
                "1",
                "--intervals",
                "2",
                "--per-interval",
                "1",
                "--chunk-size",
                "32",
                "--mechanism-tokens",
                "512",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    stored = load_tags(out)
    assert stored.tags, "the random tiny SAE has token features at layer 2"
    (meta,) = _load_js(out / "dashboard" / "data" / "index.js", "index")
    assert [page["id"] for page in meta["catalogue"]] == load_catalogue().ids
    for page in meta["catalogue"]:
        assert page["count"] == stored.detectors[page["id"]]["passed"]
        assert [f for f, _ in page["features"]] == stored.features_with(page["id"])
    f = min(stored.tags)
    _, records = _load_js(out / "dashboard" / "data" / f"features_{f // 32:05d}.js", "chunk")
    shown = [t for t in records[f % 32]["tags"] if isinstance(t, dict)]
    assert shown == stored.tags[f] and all(t["section"] and t["evidence"]["probe"] for t in shown)
    assert meta["features"][f][6] == [t["name"] for t in stored.tags[f]]

    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    url = (out / "dashboard" / "index.html").resolve().as_uri()
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ]
    page = subprocess.run([*flags, url + "#catalogue"], capture_output=True, text=True, timeout=120).stdout
    for m in load_catalogue().mechanisms:
        assert f'data-mechanism="{m.id}"' in page and m.name in page
    assert f'href="#feature={f}"' in page
    page = subprocess.run([*flags, url + f"#feature={f}"], capture_output=True, text=True, timeout=120).stdout
    assert 'id="mechanisms"' in page and "primer section " + shown[0]["section"] in page
    assert all(key in page for key in shown[0]["evidence"])
