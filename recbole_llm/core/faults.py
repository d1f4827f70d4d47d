"""Kill points for recovery tests: ``RECBOLE_LLM_KILL_AT=<point>[:<n>]`` sends SIGKILL to this process the
n-th time (default 1st) execution reaches ``kill_point(<point>)``.

Points: ``knowledge_batch`` (after a generated batch is appended to the cache), ``item_refresh_batch``
(inside Laser's item-matrix refresh), ``train_batch`` (before a training step), ``align_step`` (before a step
of SeRALM's alignment, phase B), ``checkpoint_write``
(after the temp file is written, before it is renamed into place). Unset, a point costs one dict lookup.
"""

import os
import signal
from collections import Counter

ENV = "RECBOLE_LLM_KILL_AT"
_hits = Counter()


def kill_point(name):
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def with_kill_point(fn, name):
    """``fn`` with ``kill_point(name)`` before each call (unchanged when no kill point is armed)."""
    if not os.environ.get(ENV):
        return fn

    def wrapped(*args, **kwargs):
        kill_point(name)
        return fn(*args, **kwargs)

    return wrapped
