"""A POSIX timer whose signal is pending at the dump
(engine/signals.py timer_pending, engine/posixtimers.py fire_pending),
proven from inside the restored process by tests/targets/tmrpend.c: a
fired one-shot timer's signal is the timer's own again (taken with the
same siginfo, the timer disarmed, no overrun, and set once more it fires
as before); a periodic timer's is refused (its overrun count cannot be
read), the target unharmed."""

from __future__ import annotations

import os
import signal

import pytest

from engine import posixtimers
from engine.context import Options
from engine.dump import dump
from engine.errors import EngineError, Refusal, Refusals
from engine.restore import restore
from engine_core_support import compile_target, lines_of, procs, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def tmrpend_bin(tmp_path_factory) -> str:
    return compile_target(tmp_path_factory, "tmrpend", "-pthread", "-lrt")


def _start(procs, exe, tmp_path, mode):
    out = str(tmp_path / "out")
    p = procs.start([exe, out, mode], cwd=str(tmp_path))
    wait_for(lambda: lines_of(out, "ready") or p.poll() is not None, what="the timer's signal pending")
    assert p.poll() is None
    return p, out


def _taken(p, out) -> list:
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: lines_of(out, "done"), what="the target's report")
    text = open(out).read().splitlines()
    return text[text.index("ready") + 1:]


WANT = ["round 0 got 1 code -2 timer 1 overrun 0 value 42 getoverrun 0 value 0.000000000", "pending after 0",
        "round 1 got 1 code -2 timer 1 overrun 0 value 42 getoverrun 0 value 0.000000000", "pending after 0",
        "done"]


# Set again before it is taken, the timer's own pending signal is dropped
# by the kernel: one signal, the new expiry's (a signal queued again by
# hand would stay: two).
WANT_REARM = ["rearm 0 code -2 timer 1 overrun 0 value 42", "rearm taken 1", "done"]
# Notifying a thread of its own (SIGEV_THREAD_ID): pending in that thread's queue.
WANT_THREAD = ["thread got 1 code -2 timer 1 overrun 0 value 42 getoverrun 0", "pending after 0", "done"]
MODES = [("oneshot", WANT), ("rearm", WANT_REARM), ("thread", WANT_THREAD)]


@pytest.mark.parametrize("mode, want", MODES, ids=[m for m, _ in MODES])
def test_without_a_restore(procs, tmrpend_bin, tmp_path, mode, want):
    p, out = _start(procs, tmrpend_bin, tmp_path, mode)
    assert _taken(p, out) == want


@pytest.mark.parametrize("mode, want", MODES, ids=[m for m, _ in MODES])
def test_a_fired_one_shot_timers_pending_signal_restored(procs, tmrpend_bin, tmp_path, mode, want):
    p, out = _start(procs, tmrpend_bin, tmp_path, mode)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    tids = sorted(int(t) for t in os.listdir(f"/proc/{p.pid}/task"))
    with open(f"/proc/{p.pid}/task/{tids[-1]}/status") as f:
        st = dict(ln.split(":", 1) for ln in f)
    # pending before the process runs on: the process's queue, or the thread's
    key = "SigPnd" if mode == "thread" else "ShdPnd"
    assert int(st[key].split()[0], 16) >> (signal.SIGRTMIN + 2 - 1) & 1, st[key]
    assert _taken(p, out) == want


def test_a_timer_that_does_not_queue_its_signal_fails_the_restore(procs, tmrpend_bin, tmp_path, monkeypatch):
    """The read-back: a timer fired with another value queues a siginfo
    that is not the image's, and the restore fails before the target runs."""
    p, out = _start(procs, tmrpend_bin, tmp_path, "oneshot")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    real = posixtimers.sigevent
    monkeypatch.setattr(posixtimers, "sigevent", lambda t, pid: real(dict(t, value=7), pid))
    with pytest.raises(EngineError) as e:
        restore(str(tmp_path / "img"), Options())
    assert "did not queue its signal as it was" in str(e.value)
    assert not os.path.exists(f"/proc/{p.pid}") or open(f"/proc/{p.pid}/stat").read().split()[2] == "Z"
    assert not lines_of(out, "round")


def test_a_periodic_timers_pending_signal_is_refused_target_unharmed(procs, tmrpend_bin, tmp_path):
    p, out = _start(procs, tmrpend_bin, tmp_path, "periodic")
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    assert "the timer is periodic" in str(e.value)
    assert not os.path.exists(tmp_path / "img")
    lines = _taken(p, out)
    assert lines[0].startswith("round 0 got 1 code -2 timer 1 ") and " value 42 " in lines[0]
