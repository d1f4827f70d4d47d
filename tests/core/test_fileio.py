"""Atomic writes of files and directories, the removal of temps that killed writers left behind, and the build lock."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from recbole_llm.core import fileio
from recbole_llm.core.fileio import (STALE_AFTER_S, atomic_dir, atomic_path, atomic_write_text, build_lock,
                                     remove_stale_temps)
from tests.helpers_foundation import start_lock_holder

DAY_AGO = time.time() - STALE_AFTER_S - 60

KILLED_WRITER = ("import os, signal, sys\n"
                 "from recbole_llm.core.fileio import atomic_path, atomic_dir\n"
                 "path, kind = sys.argv[1], sys.argv[2]\n"
                 "with (atomic_path(path) if kind == 'file' else atomic_dir(path)) as tmp:\n"
                 "    if kind == 'dir':\n"
                 "        tmp = os.path.join(tmp, 'weights.bin')\n"
                 "    open(tmp, 'w').write('half')\n"
                 "    os.kill(os.getpid(), signal.SIGKILL)\n")


def _age(path):
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (DAY_AGO, DAY_AGO))
    os.utime(path, (DAY_AGO, DAY_AGO))


def _killed_write(path, kind):
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), kind], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p for p in path.parent.iterdir() if p.name != path.name]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".{path.name}.")  # SIGKILL skips the cleanup
    assert not path.exists()
    return leftovers[0]


def test_a_killed_file_writers_temp_is_removed_by_the_next_write_once_stale(tmp_path):
    target = tmp_path / "vectors.json"
    leftover = _killed_write(target, "file")
    atomic_write_text(str(target), "{}")
    assert leftover.exists()  # recent: it could be a live writer's temp
    _age(leftover)
    atomic_write_text(str(target), "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.json"]


def test_a_killed_directory_writers_temp_is_removed_by_the_next_write_once_stale(tmp_path):
    target = tmp_path / "model"
    leftover = _killed_write(target, "dir")
    _age(leftover)
    os.utime(leftover / "weights.bin")  # a file inside still being written: the writer may be alive
    assert remove_stale_temps(str(target), ".tmpdir") == []
    _age(leftover)
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert os.listdir(target) == ["config.json"]


def test_only_the_targets_own_temps_are_removed(tmp_path):
    mine = tmp_path / ".x.item.abcd_123.tmp"
    longer_name = tmp_path / ".x.item.bak.abcd_123.tmp"  # a temp of "x.item.bak"
    other_suffix = tmp_path / ".x.item.abcd_123.pth"
    for p in (mine, longer_name, other_suffix):
        p.write_text("old")
        _age(p)
    assert remove_stale_temps(str(tmp_path / "x.item"), ".tmp") == [str(mine)]
    assert longer_name.exists() and other_suffix.exists()


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_leaves_nothing_on_error_and_keeps_or_replaces_a_finished_copy(tmp_path):
    target = tmp_path / "converted"
    with pytest.raises(RuntimeError):
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "part"), "w").write("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "mine"), "w").write("x")
        target.mkdir()  # another process finished the same directory first
        (target / "theirs").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
    assert os.listdir(target) == ["theirs"]

    with atomic_dir(str(target), replace=True) as tmp:
        open(os.path.join(tmp, "mine"), "w").write("x")
    assert os.listdir(target) == ["mine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]


def test_build_lock_makes_a_second_builder_wait_for_the_first(tmp_path, caplog):
    target = tmp_path / "cache.bin"
    holder = start_lock_holder(target, "open(args[0], 'w').write('built by the first')", target)
    with caplog.at_level("INFO", logger="recbole_llm.core.fileio"), build_lock(target, "building the cache"):
        # we only get in after the first builder has finished its file
        assert target.read_text() == "built by the first"
    assert holder.wait(timeout=60) == 0
    assert "Waiting for another process to finish building the cache" in caplog.text


def test_build_lock_of_a_killed_holder_is_free_again(tmp_path):
    target = tmp_path / "cache.bin"
    holder = start_lock_holder(target, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert holder.wait(timeout=60) == -signal.SIGKILL
    taker = (f"from recbole_llm.core.fileio import build_lock\n"
             f"with build_lock({str(target)!r}, 'x'):\n"
             "    print('taken')\n")
    # a lock left held would block here; the timeout turns that into a failure instead of a hang
    taken = subprocess.run([sys.executable, "-c", taker], capture_output=True, text=True, timeout=60)
    assert taken.stdout.strip() == "taken"


class FakeMsvcrt:
    """Windows' msvcrt.locking as it behaves: an exclusive lock on ``nbytes`` bytes from the descriptor's
    current position; another descriptor's LK_NBLCK on a locked range raises OSError; LK_UNLCK of a range that
    this descriptor does not hold raises OSError. Ranges are keyed by the file's inode."""
    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self):
        self.held = {}  # (inode, offset, nbytes) -> fd
        self.guard = threading.Lock()
        self.refusals = 0

    def locking(self, fd, mode, nbytes):
        key = (os.fstat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR), nbytes)
        with self.guard:
            if mode == self.LK_NBLCK:
                if key in self.held:
                    self.refusals += 1
                    raise PermissionError(13, "Permission denied")
                self.held[key] = fd
            elif mode == self.LK_UNLCK:
                if self.held.get(key) != fd:
                    raise PermissionError(13, "Permission denied")
                del self.held[key]
            else:
                raise AssertionError(f"build_lock should only use LK_NBLCK and LK_UNLCK, used mode {mode}")


def test_build_lock_without_fcntl_takes_turns_through_msvcrt(tmp_path, monkeypatch, caplog):
    fake = FakeMsvcrt()
    monkeypatch.setattr(fileio, "fcntl", None)
    monkeypatch.setattr(fileio, "msvcrt", fake)
    monkeypatch.setattr(fileio, "LOCK_POLL_S", 0.01)
    target = tmp_path / "cache.bin"
    (tmp_path / ".cache.bin.lock").write_bytes(b"x")  # a non-empty lock file: the lock must still be at byte 0
    holding, order = threading.Event(), []

    def second_builder():
        holding.wait()
        with build_lock(target, "building the cache"):
            order.append("second")

    waiter = threading.Thread(target=second_builder, daemon=True)  # a failed test must not hang pytest
    with caplog.at_level("INFO", logger="recbole_llm.core.fileio"):
        with build_lock(target, "building the cache"):
            assert [offset for _, offset, _ in fake.held] == [0]
            waiter.start()
            holding.set()
            deadline = time.monotonic() + 30
            while fake.refusals < 2:  # the second builder has been refused and is polling
                assert time.monotonic() < deadline, "the second builder never retried the held lock"
                time.sleep(0.01)
            order.append("first")
        waiter.join(timeout=30)
    assert order == ["first", "second"]
    assert fake.held == {}  # both released
    assert "Waiting for another process to finish building the cache" in caplog.text


def test_build_lock_without_any_lock_api_still_runs_the_block(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "fcntl", None)
    monkeypatch.setattr(fileio, "msvcrt", None)
    with build_lock(tmp_path / "cache.bin", "building the cache"):
        with build_lock(tmp_path / "cache.bin", "building the cache"):  # no lock, so nesting cannot block
            pass
