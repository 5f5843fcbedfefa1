"""engine/placement.py: the restorer pins itself to the CPU it runs on,
the page writers' threads get the original mask back, a task it made is
given that mask (a zombie of a tree); the restored tasks' own masks are
checked in tests/test_engine_tree.py."""

from __future__ import annotations

import os

import pytest

from engine import placement
from engine_core_support import in_child as _in_child

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to pin")


def test_pin_spread_and_give_back():
    full = os.sched_getaffinity(0)

    def child():
        placement.pin()
        pinned = os.sched_getaffinity(0)
        import threading
        seen = []
        with placement.spread():
            t = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
            t.start()
            t.join()
            during = os.sched_getaffinity(0)
        after = os.sched_getaffinity(0)
        kid = os.fork()
        if kid == 0:
            import time
            time.sleep(5)
            os._exit(0)
        inherited = os.sched_getaffinity(kid)
        placement.restore_mask(kid)
        given = os.sched_getaffinity(kid)
        os.kill(kid, 9)
        os.waitpid(kid, 0)
        return (sorted(pinned), sorted(seen[0]), sorted(during), sorted(after), sorted(inherited), sorted(given),
                sorted(placement.original()))
    pinned, thread, during, after, inherited, given, original = eval(_in_child(child))
    assert len(pinned) == 1 and set(pinned) <= full
    assert thread == during == sorted(full), "spread(): the writers' threads on every CPU"
    assert after == pinned == inherited
    assert given == original == sorted(full)


def test_not_pinned_changes_nothing():
    def child():
        before = os.sched_getaffinity(0)
        with placement.spread():
            during = os.sched_getaffinity(0)
        return before == during == os.sched_getaffinity(0) and placement.original() is None
    assert _in_child(child) == "True"
