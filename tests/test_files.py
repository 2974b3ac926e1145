"""activations.files: atomic writes leave the old file (or nothing) on failure, and no temp file behind."""

from __future__ import annotations

import json

import pytest

from activations.files import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_dir,
    atomic_write_json,
    atomic_write_text,
)


def test_atomic_write_writes_and_returns_the_writers_value(tmp_path):
    path = tmp_path / "out.txt"
    assert atomic_write(path, lambda tmp: tmp.write_text("hello")) == 5
    assert path.read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_text_json_and_bytes_helpers_replace_the_file(tmp_path):
    path = tmp_path / "x"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "keep.json"
    path.write_text("old contents")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_atomic_write_dir_moves_a_complete_folder_or_nothing(tmp_path):
    target = tmp_path / "model"

    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        atomic_write_dir(target, broken)
    assert list(tmp_path.iterdir()) == []

    assert atomic_write_dir(target, lambda tmp: (tmp / "config.json").write_text("{}")) == target
    assert (target / "config.json").read_text() == "{}"
    # a second writer that finishes later keeps the first folder and removes its own
    atomic_write_dir(target, lambda tmp: (tmp / "other").write_text("x"))
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
