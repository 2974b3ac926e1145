"""activations.files: atomic writes leave the old file (or nothing) on failure, and no temp file behind, and give
files and folders the mode the user's umask asks for."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from activations.files import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_dir,
    atomic_write_json,
    atomic_write_text,
    umask,
)
from sae.config import SAEConfig
from sae.io import load_sae, save_sae
from sae.registry import make_sae
from sae.saelens import export_saelens


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


# ---- file modes follow the umask -------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077, 0o002])
def mask(request):
    """Run the test under a real process umask, restored afterwards."""
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_being_changed(mask):
    assert umask() == mask
    assert os.umask(mask) == mask  # still set


def test_atomic_writes_give_files_the_users_umask_mode(mask, tmp_path):
    atomic_write_json(tmp_path / "a.json", {"a": 1})
    atomic_write_text(tmp_path / "b.txt", "b")
    atomic_write_bytes(tmp_path / "c.bin", b"c")
    atomic_write(tmp_path / "d", lambda tmp: (tmp.unlink(), tmp.write_text("recreated by the writer")))
    (tmp_path / "plain.txt").write_text("what open() gives")
    for name in ("a.json", "b.txt", "c.bin", "d"):
        assert _mode(tmp_path / name) == 0o666 & ~mask == _mode(tmp_path / "plain.txt"), name


def test_atomic_dirs_get_the_users_umask_mode(mask, tmp_path):
    atomic_write_dir(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    (tmp_path / "plain").mkdir()
    assert _mode(tmp_path / "model") == 0o777 & ~mask == _mode(tmp_path / "plain")


def test_saved_sae_folders_follow_the_umask(mask, tmp_path):
    folder = save_sae(make_sae(SAEConfig(d_in=4, d_sae=8, k=2, norm_scale=2.0)), tmp_path / "sae")
    export_saelens(load_sae(folder), tmp_path / "exported")
    for path in (*folder.iterdir(), *(tmp_path / "exported").iterdir()):
        assert _mode(path) == 0o666 & ~mask, path
