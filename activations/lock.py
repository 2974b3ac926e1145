"""One writer per run folder: `with run_lock(RUN):` holds RUN/.lock while a command writes RUN.

The lock file is created with O_CREAT | O_EXCL (exactly one process wins) and holds the holder's pid,
host, start time and, on Linux, the kernel's start time of that pid. A second `sae train` or `sae cache`
on the same folder stops with a UserError naming the holder. A lock whose holder is gone - its pid no
longer runs on this host (`os.kill(pid, 0)`), or now belongs to a later process - or whose file is empty or
unreadable, is stale: it is taken over with a note. The lock is removed on exit, exceptions included.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from activations.errors import UserError

LOCK_FILENAME = ".lock"
_HELD: set[Path] = set()  # locks this process holds (its own pid in a lock it does not hold is a reused pid)


@contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold folder/.lock (creating folder) for the body of the with-block; yields the lock file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILENAME).resolve()
    record = _acquire(folder, path)
    _HELD.add(path)
    try:
        yield path
    finally:
        _HELD.discard(path)
        if _read(path, wait=False) == record:  # never remove a lock someone else took after deleting ours
            path.unlink(missing_ok=True)


def _acquire(folder: Path, path: Path) -> dict:
    """Create the lock file with our record, taking over a stale one; UserError while a live process holds it."""
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().isoformat(timespec="seconds"),
        "proc_start": _proc_start(os.getpid()),
    }
    for _ in range(10):  # each pass either creates the lock, raises, or removes a stale lock another racer left
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _read(path, wait=True)
            if holder is not None and _alive(holder, path):
                raise UserError(_busy_message(folder, holder)) from None
            _remove_stale(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))  # one small write: readers wait out the instant it is empty
        return record
    raise UserError(f"{path} keeps reappearing while being taken over; make sure no other run writes {folder}.")


def _read(path: Path, wait: bool) -> dict | None:
    """The lock's record, or None for a missing, empty or corrupt file (re-read briefly with `wait`: the
    holder may be between creating the file and writing it)."""
    for attempt in range(20 if wait else 1):
        try:
            record = json.loads(path.read_text())
            if isinstance(record, dict) and isinstance(record.get("pid"), int) and isinstance(record.get("host"), str):
                return record
        except (OSError, ValueError):
            pass
        if attempt + 1 < (20 if wait else 1):
            time.sleep(0.05)
    return None


def _alive(holder: dict, path: Path) -> bool:
    """Whether the lock's holder may still run: always on another host (we cannot look), else by its pid."""
    if holder["host"] != socket.gethostname():
        return True
    pid = holder["pid"]
    if pid == os.getpid():
        return path in _HELD  # our own pid in a lock we do not hold: a killed run's pid, reused for us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        pass
    recorded, now = holder.get("proc_start"), _proc_start(pid)
    return recorded is None or now is None or recorded == now  # a different start time: the pid was reused


def _remove_stale(path: Path, holder: dict | None) -> None:
    """Delete a stale lock after moving it aside, so that a racer's fresh lock is never the one deleted."""
    aside = path.with_name(f"{LOCK_FILENAME}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process took it over first
        return
    if _read(aside, wait=holder is None) != holder:  # moved a lock made after we read the stale one: restore it
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    else:
        why = f"process {holder['pid']} on {holder['host']} is gone" if holder else "the file is empty or corrupt"
        print(f"note: taking over the stale lock {path} ({why})", file=sys.stderr)
    aside.unlink(missing_ok=True)


def _busy_message(folder: Path, holder: dict) -> str:
    message = (
        f"{folder} is being written by process {holder['pid']} on {holder['host']} "
        f"(started {holder.get('started', 'at an unknown time')}); wait for it to finish, or stop it first"
    )
    if holder["host"] != socket.gethostname():
        message += f" (if nothing on {holder['host']} writes it any more, delete {folder / LOCK_FILENAME})"
    return message


def _proc_start(pid: int) -> int | None:
    """When the kernel started process `pid` (clock ticks since boot, Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return None
