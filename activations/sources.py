"""Text sources: turn a dataset spec (a named corpus, local files, or a hub dataset) into a stream of Documents.

Everything streams: local files are read line by line or in row batches and hub datasets are opened
with ``streaming=True``, so a source of any size costs little memory. Mistakes raise ``UserError``.

Resolution of a spec, in order:
1. ``wikitext-2`` / ``tinyshakespeare``: a local copy (``data_dir``, ``$SAELAB_DATA``, ``shared/data``
   found by walking up from the current directory and from the repo), else the hub (wikitext-2 only).
2. An existing local file or folder of ``.txt`` / ``.jsonl`` / ``.parquet`` files.
3. A Hugging Face hub dataset ``name`` or ``name:config``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from activations.errors import UserError

NAMED_CORPORA = ("wikitext-2", "tinyshakespeare")
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".parquet")
DATA_ENV_VAR = "SAELAB_DATA"
REPO_ROOT = Path(__file__).resolve().parents[1]

WIKITEXT_HUB_NAME = "Salesforce/wikitext"
WIKITEXT_HUB_CONFIG = "wikitext-2-raw-v1"
WIKITEXT_FILES = ("train.txt", "valid.txt", "test.txt")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}

TINYSHAKESPEARE_TRAIN_FRACTION = 0.9
# A .txt file up to this size is one document; a larger one is split on blank lines (and into blocks of
# about this many characters where it has none) and streamed.
WHOLE_TXT_MAX_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024

_WIKITEXT_TITLE = re.compile(r"= (.+) =")


@dataclass
class Document:
    """One document of a source; ``id`` is its running index in the source, kept as provenance."""

    id: int
    text: str
    title: str | None = None


# A reader yields (text, title) pairs afresh on every call; TextSource numbers them and skips empty ones.
Reader = Callable[[], Iterator[tuple[str, str | None]]]


@dataclass
class TextSource:
    """A re-iterable stream of Documents: every ``iter()`` starts over from the first document."""

    name: str
    description: str
    read: Reader

    def describe(self) -> str:
        """Where the text comes from, in words, for logs and run provenance."""
        return self.description

    def __iter__(self) -> Iterator[Document]:
        count = 0
        for text, title in self.read():
            if not text.strip():
                continue
            yield Document(id=count, text=text, title=title)
            count += 1
        if count == 0:
            raise UserError(
                f"the text source {self.description} is empty: it holds no non-empty documents. "
                "Point it at a file, folder or dataset split that contains text."
            )


def open_text_source(
    spec: str,
    split: str = "train",
    *,
    config: str | None = None,
    text_field: str | None = None,
    data_dir: str | None = None,
) -> TextSource:
    """Resolve ``spec`` to a TextSource (named corpus, local path, or hub dataset); see the module docstring.

    ``data_dir`` only applies to the named corpora; ``split`` is ignored for local paths.
    """
    if spec in NAMED_CORPORA:
        return _open_named_corpus(spec, split, data_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return _open_local(spec, path, text_field or "text")
    if _looks_like_path(spec):
        raise UserError(f"no such file or folder: {spec}. Check the path, or give a hub dataset name or 'wikitext-2'.")
    return _open_hub(spec, split, config, text_field or "text")


# ---------------------------------------------------------------------------------------------
# Named corpora


def _open_named_corpus(corpus: str, split: str, data_dir: str | None) -> TextSource:
    """Find a local copy of a named corpus, falling back to the hub for wikitext-2."""
    split = _normalise_split(corpus, split)
    folder, looked_in = _find_corpus_folder(corpus, data_dir)
    if corpus == "wikitext-2":
        if folder is None:
            return _open_wikitext_hub(split, looked_in)
        return _open_wikitext_local(folder, split)
    if folder is None:
        raise UserError(
            f"no local copy of tinyshakespeare found (looked in: {', '.join(looked_in)}) and it has no hub "
            f"fallback. Set {DATA_ENV_VAR} to a folder holding tinyshakespeare/input.txt, or pass data_dir."
        )
    return _open_tinyshakespeare(folder / "input.txt", split)


def _normalise_split(corpus: str, split: str) -> str:
    if split not in SPLIT_ALIASES:
        raise UserError(f"unknown split '{split}' for {corpus}. Use 'train', 'validation' or 'test'.")
    return SPLIT_ALIASES[split]


def _holds_corpus(folder: Path, corpus: str) -> bool:
    if corpus == "wikitext-2":
        return any((folder / name).is_file() for name in WIKITEXT_FILES)
    return (folder / "input.txt").is_file()


def _find_corpus_folder(corpus: str, data_dir: str | None) -> tuple[Path | None, list[str]]:
    """The folder holding ``corpus``'s files, and every place looked in (for error messages).

    An explicit ``data_dir`` must hold the corpus; the environment variable and shared/data are
    tried in turn.
    """
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        for folder in (base / corpus, base):
            if _holds_corpus(folder, corpus):
                return folder, [str(folder)]
        expected = "valid.txt/test.txt" if corpus == "wikitext-2" else "input.txt"
        raise UserError(
            f"data_dir {base} holds no copy of {corpus}: expected {base / corpus}/{expected} or {base}/{expected}. "
            f"Fix data_dir, or leave it out to use {DATA_ENV_VAR} or shared/data."
        )
    candidates: list[Path] = []
    if os.environ.get(DATA_ENV_VAR):
        candidates.append(Path(os.environ[DATA_ENV_VAR]).expanduser() / corpus)
    for start in (Path.cwd().resolve(), REPO_ROOT):
        for folder in (start, *start.parents):
            candidates.append(folder / "shared" / "data" / corpus)
    looked_in = list(dict.fromkeys(str(c) for c in candidates))
    for folder in candidates:
        if _holds_corpus(folder, corpus):
            return folder, looked_in
    return None, looked_in


def _open_wikitext_local(folder: Path, split: str) -> TextSource:
    """WikiText-2 from local files; without train.txt, training uses valid.txt and test.txt stays held out."""
    file_name = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}[split]
    path = folder / file_name
    if split == "train" and not path.is_file() and (folder / "valid.txt").is_file():
        path = folder / "valid.txt"
        warnings.warn(
            f"wikitext-2 has no train.txt in {folder}: the train split uses valid.txt; "
            "test.txt stays held out for evaluation.",
            UserWarning,
            stacklevel=4,
        )
    if not path.is_file():
        raise UserError(
            f"the wikitext-2 copy in {folder} has no {file_name} for split '{split}'. "
            f"Add that file or ask for another split."
        )
    return TextSource(
        name="wikitext-2",
        description=f"wikitext-2 (local: {path})",
        read=lambda: _wikitext_articles(_read_lines(path)),
    )


def _open_wikitext_hub(split: str, looked_in: list[str]) -> TextSource:
    """WikiText-2 (raw) streamed from the hub, one row per line, grouped into articles."""
    try:
        from datasets import load_dataset

        dataset = load_dataset(WIKITEXT_HUB_NAME, WIKITEXT_HUB_CONFIG, split=split, streaming=True)
    except Exception as error:
        raise UserError(
            f"no local copy of wikitext-2 found (looked in: {', '.join(looked_in)}), and could not open "
            f"'{WIKITEXT_HUB_NAME}' (config '{WIKITEXT_HUB_CONFIG}', split '{split}') from the Hugging Face hub: "
            f"{_short_reason(error)}. Set {DATA_ENV_VAR} to a folder holding wikitext-2/valid.txt and test.txt, "
            "pass data_dir, or check your network."
        ) from error
    label = f"{WIKITEXT_HUB_NAME}:{WIKITEXT_HUB_CONFIG}"

    def read() -> Iterator[tuple[str, str | None]]:
        lines = (text for text, _ in _hub_rows(dataset, label, split, "text"))
        return _wikitext_articles(lines)

    return TextSource(name="wikitext-2", description=f"wikitext-2 (hub: {label}, split '{split}')", read=read)


def _wikitext_title(line: str) -> str | None:
    """The title of a top-level ``= Title =`` line (stripped), or None; ``= = Section = =`` is not one."""
    match = _WIKITEXT_TITLE.fullmatch(line)
    if match is None:
        return None
    inner = match.group(1)
    if inner.startswith("=") or inner.endswith("="):
        return None
    return inner.strip()


def _wikitext_articles(lines: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """Group WikiText lines into articles: each starts at a title line, which stays its first line.

    Empty lines are dropped and the remaining lines (headings and paragraphs) joined with newlines.
    """
    title: str | None = None
    paragraphs: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        new_title = _wikitext_title(line)
        if new_title is not None:
            if paragraphs:
                yield "\n".join(paragraphs), title
            title, paragraphs = new_title, []
        paragraphs.append(line)
    if paragraphs:
        yield "\n".join(paragraphs), title


def _open_tinyshakespeare(path: Path, split: str) -> TextSource:
    """Tiny Shakespeare as speeches (blank-line blocks): train is the first 90%, validation/test the rest."""

    def read() -> Iterator[tuple[str, str | None]]:
        total = sum(1 for _ in _blank_line_blocks(path))
        n_train = int(total * TINYSHAKESPEARE_TRAIN_FRACTION)
        for index, block in enumerate(_blank_line_blocks(path)):
            if (index < n_train) == (split == "train"):
                yield block, _speaker(block)

    part = "first 90%" if split == "train" else "last 10%"
    return TextSource(
        name="tinyshakespeare",
        description=f"tinyshakespeare (local: {path}, split '{split}': {part} of speeches)",
        read=read,
    )


def _speaker(block: str) -> str | None:
    """The speaker of a Tiny Shakespeare speech: its first line when that line ends with a colon."""
    first = block.split("\n", 1)[0].strip()
    return first[:-1] if first.endswith(":") else None


# ---------------------------------------------------------------------------------------------
# Local files


def _looks_like_path(spec: str) -> bool:
    """Whether a spec that names nothing on disk was meant as a path rather than a hub id.

    Hub ids have the form ``owner/name`` (one slash), so a single slash alone does not count.
    """
    return (
        spec.lower().endswith(LOCAL_EXTENSIONS)
        or spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") >= 2
    )


def _open_local(spec: str, path: Path, text_field: str) -> TextSource:
    """A local file, or every supported file under a folder (recursively, sorted, hidden ones skipped)."""
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in LOCAL_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise UserError(
                f"the folder {path} holds no .txt, .jsonl or .parquet files (searched recursively). "
                "Point to a folder or file with text in one of those formats."
            )
        description = f"local: {path.resolve()} ({len(files)} file{'s' if len(files) != 1 else ''})"
    else:
        if path.suffix.lower() not in LOCAL_EXTENSIONS:
            raise UserError(
                f"unsupported file type: {path}. Give a .txt, .jsonl or .parquet file, or a folder of them."
            )
        files = [path]
        description = f"local: {path.resolve()}"

    def read() -> Iterator[tuple[str, str | None]]:
        for file in files:
            yield from _read_file(file, text_field)

    return TextSource(name=spec, description=description, read=read)


def _read_file(path: Path, text_field: str) -> Iterator[tuple[str, str | None]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    return _read_parquet(path, text_field)


def _read_lines(path: Path) -> Iterator[str]:
    """Stream a UTF-8 text file line by line; unreadable or undecodable files become a UserError."""
    try:
        with open(path, encoding="utf-8") as handle:
            yield from handle
    except UnicodeDecodeError as error:
        raise UserError(
            f"cannot read {path}: it is not valid UTF-8 text ({error.reason} at byte {error.start} of a read chunk). "
            "Convert it to UTF-8 or remove it."
        ) from error
    except OSError as error:
        raise UserError(
            f"cannot read {path}: {error.strerror or error}. Check that it exists and is readable."
        ) from error


def _read_txt(path: Path) -> Iterator[tuple[str, str | None]]:
    """A small .txt file is one document; a large one is streamed as blank-line-separated blocks."""
    if path.stat().st_size <= WHOLE_TXT_MAX_BYTES:
        yield "".join(_read_lines(path)), path.name
    else:
        for block in _blank_line_blocks(path):
            yield block, path.name


def _blank_line_blocks(path: Path) -> Iterator[str]:
    """Stream the blocks of a text file that are separated by blank lines (trailing spaces trimmed).

    A block grown past WHOLE_TXT_MAX_BYTES characters (a file with no blank lines, e.g. one sentence per line)
    is cut at the next line end, so memory stays bounded whatever the file's layout.
    """
    lines: list[str] = []
    size = 0
    for line in _read_lines(path):
        if line.strip():
            lines.append(line.rstrip())
            size += len(lines[-1]) + 1
        if lines and (not line.strip() or size >= WHOLE_TXT_MAX_BYTES):
            yield "\n".join(lines)
            lines, size = [], 0
    if lines:
        yield "\n".join(lines)


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str | None]]:
    """One document per JSON line, text from ``text_field`` (and a title from a string ``title`` field)."""
    for line_number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path}, line {line_number}: not valid JSON ({error.msg}). Fix or remove that line."
            ) from error
        if not isinstance(record, dict):
            raise UserError(
                f"{path}, line {line_number}: expected a JSON object with a '{text_field}' field, "
                f"got {type(record).__name__}. Write one object per line."
            )
        if text_field not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise UserError(
                f"{path}, line {line_number}: no field '{text_field}' (the record has keys: {keys}). "
                "Set text_field to the key that holds the text."
            )
        title = record.get("title")
        yield _check_text(record[text_field], f"{path}, line {line_number}"), title if isinstance(title, str) else None


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str | None]]:
    """One document per row, column ``text_field`` (and ``title`` when present), read in row batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read {path}: not a valid parquet file ({error}). Re-export or remove it.") from error
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise UserError(
            f"{path}: no column '{text_field}' (columns: {', '.join(columns) or 'none'}). "
            "Set text_field to the column that holds the text."
        )
    wanted = [text_field] + (["title"] if "title" in columns and text_field != "title" else [])
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            texts = batch.column(0).to_pylist()
            titles = batch.column(1).to_pylist() if len(wanted) > 1 else [None] * len(texts)
            for text, title in zip(texts, titles):
                row += 1
                yield _check_text(text, f"{path}, row {row}"), title if isinstance(title, str) else None
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read {path}: corrupt parquet data ({error}). Re-export or remove it.") from error


def _check_text(value: object, where: str) -> str:
    """The text of a record: None counts as empty; anything but a string is a UserError."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"{where}: the text field holds {type(value).__name__}, not a string. Point text_field at a text field."
        )
    return value


# ---------------------------------------------------------------------------------------------
# Hugging Face hub


def _open_hub(spec: str, split: str, config: str | None, text_field: str) -> TextSource:
    """A hub dataset opened with ``streaming=True``; any failure to open it becomes one UserError."""
    name, _, spec_config = spec.partition(":")
    if spec_config and config and spec_config != config:
        raise UserError(
            f"dataset '{spec}' names config '{spec_config}' but config='{config}' was also given. Give one."
        )
    config = config or spec_config or None
    label = f"{name}:{config}" if config else name
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config, split=split, streaming=True)
    except Exception as error:
        local_note = f" (there is no local file or folder '{spec}' either)" if "/" in spec else ""
        raise UserError(
            f"could not open dataset '{label}' (split '{split}') from the Hugging Face hub: {_short_reason(error)}"
            f"{local_note}. Check the name/config/split, your network, or pass a local .txt/.jsonl/.parquet path "
            "or 'wikitext-2'."
        ) from error
    columns = getattr(dataset, "column_names", None)
    if columns and text_field not in columns:
        raise UserError(
            f"dataset '{label}' has no field '{text_field}' (fields: {', '.join(columns)}). "
            "Set text_field to the field that holds the text."
        )
    return TextSource(
        name=spec,
        description=f"hub: {label}, split '{split}'",
        read=lambda: _hub_rows(dataset, label, split, text_field),
    )


def _hub_rows(dataset: Iterable[dict], label: str, split: str, text_field: str) -> Iterator[tuple[str, str | None]]:
    """Stream (text, title) from a hub dataset; a failure while streaming becomes a UserError."""
    rows = iter(dataset)
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as error:
            raise UserError(
                f"reading dataset '{label}' (split '{split}') from the Hugging Face hub failed after {index} rows: "
                f"{_short_reason(error)}. Check your network, or use a local copy."
            ) from error
        if text_field not in row:
            raise UserError(
                f"dataset '{label}' row {index}: no field '{text_field}' (fields: {', '.join(row)}). "
                "Set text_field to the field that holds the text."
            )
        title = row.get("title")
        yield _check_text(row[text_field], f"dataset '{label}' row {index}"), title if isinstance(title, str) else None
        index += 1


def _short_reason(error: BaseException) -> str:
    """The first line of an exception message, shortened, for a one-line UserError."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
