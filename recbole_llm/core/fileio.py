"""Atomic file writes: every file or directory the package writes appears whole or not at all.

A writer that dies without running its cleanup (SIGKILL, power cut) leaves its temp beside the target. The next
write of the same target removes such leftovers once nothing has touched them for ``STALE_AFTER_S``: a live
writer keeps touching its temp, so the age tells a dead writer's leftover from a write still going on.

``build_lock`` makes processes that would build the same cache take turns (see its docstring)."""

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time

try:
    import fcntl
except ImportError:  # Windows: byte-range locks through msvcrt instead
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

logger = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600
# msvcrt has no blocking lock that waits without limit (LK_LOCK gives up after 10 s), so a waiter polls.
LOCK_POLL_S = 1.0


def _temp_prefix(path):
    return f".{os.path.basename(path)}."


def _newest_mtime(path):
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def remove_stale_temps(path, suffix, older_than_s=STALE_AFTER_S):
    """Remove the temps that earlier, killed writes of ``path`` left beside it; returns the removed paths."""
    directory = os.path.dirname(os.path.abspath(path))
    # tempfile's random part has no dot, so the temps of a longer name ("x.item.bak") never match "x.item"'s.
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"[^.]+" + re.escape(suffix) + r"$")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    removed, now = [], time.time()
    for name in names:
        leftover = os.path.join(directory, name)
        if not pattern.match(name):
            continue
        try:
            if now - _newest_mtime(leftover) < older_than_s:
                continue
            if os.path.isdir(leftover) and not os.path.islink(leftover):
                shutil.rmtree(leftover)
            else:
                os.remove(leftover)
            removed.append(leftover)
        except FileNotFoundError:  # another process cleaned it first
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp", mode=0o644):
    """Yield a temporary path beside ``path``; when the block ends normally the file is renamed over
    ``path`` (readable with ``mode``), and on any error or interruption it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path, replace=False):
    """Yield an empty temporary directory beside ``path``; when the block ends normally it becomes ``path``.

    ``replace=False``: a directory that another process finished at ``path`` meanwhile is kept (the same job
    done twice; either copy is good). ``replace=True``: an existing ``path`` is replaced."""
    suffix = ".tmpdir"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path, suffix)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=suffix, dir=directory)
    try:
        yield tmp
        if replace and os.path.isdir(path):
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not os.path.isdir(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


@contextlib.contextmanager
def build_lock(path, what):
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` for the block; ``what`` names the job in the
    waiting message. The lock file stays (removing it would let a third process lock a new file while the second
    still waits on the old one); it is hidden and empty.

    Processes that would build the same cache (parallel ``run_hyper.py`` trials, benchmark streams) take turns:
    the second waits, then finds the first one's finished file instead of building it again, and two writers
    never append to one resume file. The OS drops the lock when its holder dies, so a killed run never
    leaves the cache locked. A lock is per open file, so a process must not nest two locks on one path."""
    directory, name = os.path.split(os.path.abspath(path))
    lock_path = os.path.join(directory, f".{name}.lock")  # never matches remove_stale_temps' temp names
    os.makedirs(directory, exist_ok=True)
    with open(lock_path, "ab") as handle:
        if not _try_lock(handle):
            logger.info(f"Waiting for another process to finish {what} (lock {lock_path})")
            _wait_for_lock(handle)
        try:
            yield
        finally:
            _unlock(handle)


# One exclusive lock per open lock file: flock on POSIX; on Windows a lock on its first byte (msvcrt, which
# locks from the file position; locking past the end of the empty file is allowed). Both are released by the
# OS when the holder dies. On a platform with neither, the lock is a no-op and parallel builders duplicate work.
def _try_lock(handle):
    """Take the lock without waiting; False when another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:
        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
    return True


def _wait_for_lock(handle):
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return
    while not _try_lock(handle):
        time.sleep(LOCK_POLL_S)


def _unlock(handle):
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
    elif msvcrt is not None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
