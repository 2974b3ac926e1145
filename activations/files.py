"""Atomic file and folder writes: a reader sees the old version or the new one, never a half-written file.

Each writer fills a temp file (or folder) next to the target, then os.replace moves it into place in one step;
if the writer fails, the temp is removed and the target is left as it was. tempfile makes its temps private
(0600 / 0700), so each is given the mode a plain open() would have given it (0666 / 0777 less the umask) before
it is moved: a saved SAE is as readable as any other file its user writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from activations.errors import UserError

T = TypeVar("T")


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # no call only reads it: set the strictest one for that instant, then restore
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """Call write(tmp) on a temp file in path's folder, then move it onto `path`; returns what write returned."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # after write(): a writer may have replaced the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text` in one step."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one step."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, ensure_ascii: bool = True) -> None:
    """Replace `path` with `data` as JSON (plus a final newline) in one step."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=ensure_ascii) + "\n")


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fill a temp folder next to `path` with write(tmp), then move it to `path` (which must not exist yet).

    If another process created `path` meanwhile, its folder is kept and ours is discarded; either way `path`
    is returned complete.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():
            raise
    return path


def check_writable(folder: str | os.PathLike, flag: str = "--out") -> None:
    """UserError now, before any expensive work, when `folder` could not be created or written later."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(
            f"{flag} {folder} cannot be created: {existing} is a file, not a folder; choose another {flag}."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{flag} {folder} cannot be written: {existing} is read-only for this user; choose another "
            f"{flag} or fix the folder's permissions."
        )
