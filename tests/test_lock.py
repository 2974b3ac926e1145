"""activations.lock: one writer per run folder, with real second processes holding, and dying with, the lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from activations.errors import UserError
from activations.lock import LOCK_FILENAME, run_lock

REPO = Path(__file__).resolve().parents[1]
# A second process that takes the lock, says so, and holds it until killed.
HOLDER = """
import sys, time
from activations.lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(folder: Path) -> subprocess.Popen:
    """Start a process holding folder's lock; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_holds_pid_and_host_and_is_removed_on_exit(tmp_path):
    run = tmp_path / "run"  # created by the lock
    with run_lock(run) as path:
        record = json.loads(path.read_text())
        assert path == (run / LOCK_FILENAME).resolve()
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
    assert not path.exists()
    with pytest.raises(RuntimeError), run_lock(run):
        raise RuntimeError("training crashed")
    assert list(run.iterdir()) == []


def test_a_second_taker_fails_while_another_process_holds_it(tmp_path):
    proc = _hold(tmp_path)
    try:
        with pytest.raises(UserError) as err, run_lock(tmp_path):
            pass
        message = str(err.value)
        assert f"is being written by process {proc.pid} on {socket.gethostname()}" in message
        assert "started " in message and "wait for it to finish, or stop it first" in message
        assert "\n" not in message
    finally:
        proc.kill()
        proc.wait()


def test_the_same_process_cannot_take_it_twice(tmp_path):
    with run_lock(tmp_path), pytest.raises(UserError, match=f"process {os.getpid()}"), run_lock(tmp_path):
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    proc = _hold(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == proc.pid  # left behind
    with run_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock {path} (process {proc.pid} on" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_lock_whose_pid_now_belongs_to_a_later_process_is_stale(tmp_path):
    """A pid reused after a reboot or container restart: same pid, a different kernel start time."""
    proc = _hold(tmp_path)
    try:
        lock = tmp_path / LOCK_FILENAME
        record = json.loads(lock.read_text())
        if record["proc_start"] is None:
            pytest.skip("no /proc start times here")
        lock.write_text(json.dumps({**record, "proc_start": record["proc_start"] - 1}))
        with run_lock(tmp_path) as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
        own = {**record, "pid": os.getpid(), "proc_start": None}  # our own pid in a lock we never took
        lock.write_text(json.dumps(own))
        with run_lock(tmp_path):
            pass
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("content", ["", "{half a rec", '["not", "a", "record"]', '{"pid": "12", "host": "h"}'])
def test_an_empty_or_corrupt_lock_is_stale(tmp_path, capsys, content):
    (tmp_path / LOCK_FILENAME).write_text(content)
    start = time.monotonic()
    with run_lock(tmp_path):
        pass
    assert time.monotonic() - start < 30  # waited for a writer at most briefly, not forever
    assert "the file is empty or corrupt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_dead_pid_is_stale_but_another_hosts_lock_is_not(tmp_path):
    lock = tmp_path / LOCK_FILENAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "2025-01-01T00:00:00"}))
    with run_lock(tmp_path):
        pass
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2025-01-01T00:00:00"}))
    with pytest.raises(UserError, match=r"process 1 on elsewhere \(started 2025-01-01T00:00:00\).*delete .*\.lock"):
        with run_lock(tmp_path):
            pass
    assert lock.exists()  # a refused taker leaves the holder's lock alone


def test_a_lock_replaced_while_held_is_left_to_its_new_owner(tmp_path):
    with run_lock(tmp_path) as path:
        path.unlink()  # a user deleted it and another run took it
        path.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    assert json.loads(path.read_text())["host"] == "elsewhere"
