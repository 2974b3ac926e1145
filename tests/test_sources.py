"""Text sources: named corpora resolution, local files and folders, hub datasets, and every user error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from activations import sources
from activations.errors import UserError
from activations.sources import Document, open_text_source

SHARED_DATA = Path(sources.__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "wikitext-2" / "valid.txt").is_file(), reason="shared/data is not present on this machine"
)

TINY_WIKITEXT = """ 
 = First Article = 
 
 First paragraph of the first article . 
 
 = = A Section = = 
 
 Section text . 
 = = = Subsection = = = 
 More text . 
 
 = Second Article = 
 
 Only paragraph . 
"""


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """Hide every local copy of the named corpora: no env var, no shared/data above cwd or the repo.

    The walk up still runs (and is reported), but a copy outside tmp_path (a machine's /tmp/shared) is not seen.
    """
    monkeypatch.delenv("SAELAB_DATA", raising=False)
    monkeypatch.setattr(sources, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    holds = sources._holds_corpus
    monkeypatch.setattr(
        sources, "_holds_corpus", lambda folder, corpus: folder.is_relative_to(tmp_path) and holds(folder, corpus)
    )
    return tmp_path


@pytest.fixture
def offline_hub(monkeypatch):
    """Make the hub fail fast instead of retrying a network that is not there."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def write_wikitext(folder: Path, name: str = "valid.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(TINY_WIKITEXT, encoding="utf-8")
    return folder


# --- named corpora ------------------------------------------------------------------------------


@needs_shared_data
def test_wikitext_resolves_to_shared_copy_and_splits_articles_on_titles(monkeypatch):
    monkeypatch.delenv("SAELAB_DATA", raising=False)
    source = open_text_source("wikitext-2", "validation")
    assert source.name == "wikitext-2"
    assert str(SHARED_DATA.resolve() / "wikitext-2" / "valid.txt") in source.describe()
    docs = list(source)
    assert [d.id for d in docs] == list(range(len(docs)))
    assert docs[0].title == "Homarus gammarus"
    assert docs[1].title == "Frank <unk>"
    assert docs[0].text.startswith("= Homarus gammarus =\nHomarus gammarus , known as")
    assert "\n= = Description = =\n" in docs[0].text  # sections stay inside their article
    assert all(d.title and not d.title.startswith("=") for d in docs)
    assert all("\n\n" not in d.text for d in docs)  # empty lines stripped
    assert len(docs) == 60  # the validation split has 60 articles


@needs_shared_data
def test_wikitext_train_falls_back_to_valid_with_warning(monkeypatch):
    monkeypatch.delenv("SAELAB_DATA", raising=False)
    with pytest.warns(UserWarning, match="valid.txt.*test.txt stays held out"):
        source = open_text_source("wikitext-2", "train")
    assert source.describe().endswith("valid.txt)")
    test_source = open_text_source("wikitext-2", "test")
    assert test_source.describe().endswith("test.txt)")
    assert next(iter(test_source)).title != next(iter(source)).title


def test_title_rule_only_matches_top_level_titles():
    assert sources._wikitext_title("= Title =") == "Title"
    assert sources._wikitext_title("= A = B =") == "A = B"
    assert sources._wikitext_title("= = Section = =") is None
    assert sources._wikitext_title("= = = Sub = = =") is None
    assert sources._wikitext_title("x = y =") is None


def test_saelab_data_env_overrides_shared_copy(tmp_path, monkeypatch):
    write_wikitext(tmp_path / "wikitext-2")
    monkeypatch.setenv("SAELAB_DATA", str(tmp_path))
    source = open_text_source("wikitext-2", "validation")
    assert str(tmp_path / "wikitext-2" / "valid.txt") in source.describe()
    docs = list(source)
    assert [(d.id, d.title) for d in docs] == [(0, "First Article"), (1, "Second Article")]
    assert docs[0].text == (
        "= First Article =\nFirst paragraph of the first article .\n= = A Section = =\nSection text .\n"
        "= = = Subsection = = =\nMore text ."
    )
    assert docs[1].text == "= Second Article =\nOnly paragraph ."


@pytest.mark.parametrize("layout", ["corpus_subfolder", "files_directly"])
def test_data_dir_overrides_env(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("SAELAB_DATA", str(tmp_path / "elsewhere"))
    folder = tmp_path / "mine" / "wikitext-2" if layout == "corpus_subfolder" else tmp_path / "mine"
    write_wikitext(folder, "train.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # train.txt exists: no fallback warning
        source = open_text_source("wikitext-2", "train", data_dir=str(tmp_path / "mine"))
    assert str(folder / "train.txt") in source.describe()
    assert [d.title for d in source] == ["First Article", "Second Article"]


def test_data_dir_without_the_corpus_is_an_error(tmp_path):
    with pytest.raises(UserError, match="holds no copy of wikitext-2"):
        open_text_source("wikitext-2", "validation", data_dir=str(tmp_path))


def test_missing_split_file_is_an_error(tmp_path):
    write_wikitext(tmp_path / "wikitext-2")
    with pytest.raises(UserError, match="no test.txt for split 'test'"):
        open_text_source("wikitext-2", "test", data_dir=str(tmp_path))


def test_unknown_split_for_named_corpus(tmp_path):
    with pytest.raises(UserError, match="unknown split 'dev'"):
        open_text_source("wikitext-2", "dev", data_dir=str(tmp_path))


def test_shared_data_found_by_walking_up_from_cwd(no_local_data, monkeypatch):
    write_wikitext(no_local_data / "shared" / "data" / "wikitext-2")
    deep = no_local_data / "project" / "sub"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    source = open_text_source("wikitext-2", "validation")
    assert str(no_local_data / "shared" / "data" / "wikitext-2" / "valid.txt") in source.describe()


def test_tinyshakespeare_splits_speeches_90_10(tmp_path, monkeypatch):
    blocks = [f"SPEAKER{i}:\nLine {i} one.\nLine {i} two." for i in range(20)]
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    monkeypatch.setenv("SAELAB_DATA", str(tmp_path))
    train = list(open_text_source("tinyshakespeare", "train"))
    test = list(open_text_source("tinyshakespeare", "test"))
    assert [d.text for d in train] == blocks[:18]
    assert [d.text for d in test] == blocks[18:]
    assert [d.id for d in test] == [0, 1]
    assert train[0].title == "SPEAKER0"
    assert [d.text for d in open_text_source("tinyshakespeare", "validation")] == blocks[18:]


def test_tinyshakespeare_without_local_copy_says_how_to_fix(no_local_data):
    with pytest.raises(UserError, match="SAELAB_DATA") as info:
        open_text_source("tinyshakespeare")
    assert "looked in" in str(info.value)
    assert str(no_local_data) in str(info.value)


def test_wikitext_without_local_copy_streams_from_hub(no_local_data, monkeypatch):
    import datasets

    rows = [
        " \n",
        " = Alpha = \n",
        " \n",
        " First . \n",
        " = = Part = = \n",
        " Second . \n",
        " = Beta = \n",
        " Third . \n",
    ]
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return [{"text": r} for r in rows]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = open_text_source("wikitext-2", "validation")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", {"split": "validation", "streaming": True})]
    assert "hub" in source.describe()
    docs = list(source)
    assert [(d.title, d.text) for d in docs] == [
        ("Alpha", "= Alpha =\nFirst .\n= = Part = =\nSecond ."),
        ("Beta", "= Beta =\nThird ."),
    ]
    assert list(source) == docs  # re-iterable


def test_wikitext_hub_failure_names_local_places_and_hub(no_local_data, offline_hub):
    with pytest.raises(UserError, match="no local copy of wikitext-2 found.*Salesforce/wikitext"):
        open_text_source("wikitext-2", "train")


# --- local files --------------------------------------------------------------------------------


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time.\n\nThe end.\n", encoding="utf-8")
    source = open_text_source(str(path), "ignored-split")
    assert source.describe() == f"local: {path.resolve()}"
    assert list(source) == [Document(0, "Once upon a time.\n\nThe end.\n", "story.txt")]


def test_large_txt_file_is_streamed_as_blank_line_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "WHOLE_TXT_MAX_BYTES", 10)
    path = tmp_path / "big.txt"
    path.write_text("para one\nstill one\n\n\npara two  \n\n", encoding="utf-8")
    assert [d.text for d in open_text_source(str(path))] == ["para one\nstill one", "para two"]


def test_jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "alpha", "title": "A"}, {"text": ""}, {"body": "x", "text": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    docs = list(open_text_source(str(path)))
    assert docs == [Document(0, "alpha", "A"), Document(1, "gamma", None)]  # the empty one is skipped


def test_jsonl_custom_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"content": "one"}\n{"content": "two"}\n', encoding="utf-8")
    assert [d.text for d in open_text_source(str(path), text_field="content")] == ["one", "two"]


def test_parquet_file_read_in_batches(tmp_path):
    path = tmp_path / "docs.parquet"
    texts = [f"document number {i}" for i in range(2500)]
    pq.write_table(pa.table({"id": list(range(2500)), "text": texts}), path, row_group_size=700)
    docs = list(open_text_source(str(path)))
    assert [d.text for d in docs] == texts
    assert [d.id for d in docs] == list(range(2500))


def test_parquet_custom_column_and_titles(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["x", None, "z"], "title": ["X", "Y", "Z"]}), path)
    docs = list(open_text_source(str(path), text_field="body"))
    assert docs == [Document(0, "x", "X"), Document(1, "z", "Z")]


def test_folder_reads_supported_files_recursively_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("from a", encoding="utf-8")
    (tmp_path / "b" / "c.jsonl").write_text('{"text": "from c1"}\n{"text": "from c2"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["from d"]}), tmp_path / "b" / "d.parquet")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.txt").write_text("ignored too", encoding="utf-8")
    source = open_text_source(str(tmp_path))
    assert "(3 files)" in source.describe()
    assert [(d.id, d.text) for d in source] == [(0, "from a"), (1, "from c1"), (2, "from c2"), (3, "from d")]
    assert [d.text for d in source] == ["from a", "from c1", "from c2", "from d"]  # re-iterable


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["missing/corpus.txt", "./nothing", "/no/such/folder", "data.jsonl", "a/b/c"])
def test_missing_local_path(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"no such file or folder: {spec}"):
        open_text_source(spec)


def test_empty_file_is_an_empty_source_detected_lazily(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n", encoding="utf-8")
    source = open_text_source(str(path))  # opening does not read everything up front
    with pytest.raises(UserError, match="the text source local: .*empty.txt is empty"):
        list(source)


def test_empty_jsonl_source(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": ""}\n{"text": "   "}\n', encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        list(open_text_source(str(path)))


def test_folder_without_supported_files(tmp_path):
    (tmp_path / "readme.md").write_text("hi", encoding="utf-8")
    with pytest.raises(UserError, match="holds no .txt, .jsonl or .parquet files"):
        open_text_source(str(tmp_path))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserError, match="unsupported file type"):
        open_text_source(str(path))


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: not valid JSON"):
        list(open_text_source(str(path)))


def test_missing_jsonl_field_lists_keys(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "x", "meta": 1}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"docs.jsonl, line 2: no field 'text' \(the record has keys: body, meta\)"):
        list(open_text_source(str(path)))


def test_non_string_text_is_an_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 1: the text field holds int"):
        list(open_text_source(str(path)))


def test_corrupt_parquet_names_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(UserError, match="broken.parquet: not a valid parquet file"):
        list(open_text_source(str(path)))


def test_parquet_missing_column_lists_columns(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(UserError, match=r"no column 'text' \(columns: body\)"):
        list(open_text_source(str(path)))


def test_undecodable_text_names_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt: it is not valid UTF-8"):
        list(open_text_source(str(path)))


def test_unknown_hub_dataset_offline(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        open_text_source("no-such-org/no-such-dataset", "train")
    message = str(info.value)
    assert message.startswith(
        "could not open dataset 'no-such-org/no-such-dataset' (split 'train') from the Hugging Face hub:"
    )
    assert "no local file or folder" in message
    assert "pass a local .txt/.jsonl/.parquet path or 'wikitext-2'" in message


def test_hub_spec_with_config(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, config=None, **kw: calls.append((name, config, kw)) or [{"text": "t"}]
    )
    source = open_text_source("some/dataset:cfg", "test")
    assert calls == [("some/dataset", "cfg", {"split": "test", "streaming": True})]
    assert source.describe() == "hub: some/dataset:cfg, split 'test'"
    assert [d.text for d in source] == ["t"]
    open_text_source("plain", config="other")
    assert calls[-1][:2] == ("plain", "other")
    with pytest.raises(UserError, match="also given"):
        open_text_source("some/dataset:cfg", config="other")


def test_hub_rows_missing_text_field(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: [{"content": "x"}])
    with pytest.raises(UserError, match=r"row 0: no field 'text' \(fields: content\)"):
        list(open_text_source("some/dataset"))
