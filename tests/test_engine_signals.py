"""Pending signals: saved with their siginfo and queued again at restore;
signals that arrive while the dump has the process frozen are not lost
(in the image, and in the original with --leave-running).

The target (tests/targets/blocker.c, mode "sigs") blocks SIGUSR1,
SIGRTMIN+1 and SIGRTMIN+2, sleeps in read() on its pipe, and once woken
unblocks them; every handler writes signo, si_code, si_pid, si_uid and
si_value, in the order the kernel delivers them.
"""

from __future__ import annotations

import os
import signal
import struct
import time

import pytest

import engine.dump
from engine import signals
from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal
from engine.restore import restore
from engine_core_support import procs, wait_for  # noqa: F401
from restart_support import (NR, SI_QUEUE, SIGRTMIN, blocker_bin, lines, pending_sets, sig_lines,  # noqa: F401
                             sigqueue, start_blocker, tgsigqueue, write_pipe)

USR1, USR2, RT1, RT2 = signal.SIGUSR1, signal.SIGUSR2, SIGRTMIN + 1, SIGRTMIN + 2


def bit(sig):
    return 1 << (sig - 1)


def _queue_blocked(pid):
    sigqueue(pid, USR1, 42)                 # process-wide, standard
    for v in (1, 2, 3):
        sigqueue(pid, RT1, v)               # process-wide, real-time, three times
    tgsigqueue(pid, RT2, 77)                # the thread's own queue


def _expected(me):
    uid = os.getuid()
    # The kernel takes the thread's queue first, then the process's, lowest
    # signal number first, real-time instances in the order they were sent.
    return [(RT2, SI_QUEUE, me, uid, 77), (USR1, SI_QUEUE, me, uid, 42),
            (RT1, SI_QUEUE, me, uid, 1), (RT1, SI_QUEUE, me, uid, 2), (RT1, SI_QUEUE, me, uid, 3)]


def _unblock_and_collect(pid, out):
    time.sleep(0.2)
    assert sig_lines(out) == [], "blocked signals must stay pending until unblocked"
    write_pipe(pid, b"go")
    wait_for(lambda: "unblocked" in lines(out), what="the target to unblock its signals")
    assert "read ret=2 errno=0" in lines(out)
    return sig_lines(out)


def test_blocked_pending_signals_restored_exactly(procs, blocker_bin, tmp_path):
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, "sigs", nr=NR["read"])
    _queue_blocked(p.pid)
    before = pending_sets(p.pid)
    assert before["ShdPnd"] == bit(USR1) | bit(RT1) and before["SigPnd"] == bit(RT2)
    assert before["SigBlk"] == bit(USR1) | bit(RT1) | bit(RT2)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert pending_sets(p.pid) == before, "same signals pending, in the same queues, still blocked"
    assert _unblock_and_collect(p.pid, out) == _expected(os.getpid())


def test_check_with_pending_signals_is_ok_and_leaves_them(procs, blocker_bin, tmp_path):
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, "sigs", nr=NR["read"])
    _queue_blocked(p.pid)
    before = pending_sets(p.pid)
    r = check(p.pid, Options())
    assert r["ok"] and r["refusals"] == []
    item = [i for i in r["items"] if i["what"] == "pending signals"][0]
    assert item["verdict"] == "ok" and f"{USR1}(shared" in item["detail"] and f"{RT2}(thread" in item["detail"]
    assert pending_sets(p.pid) == before
    assert _unblock_and_collect(p.pid, out) == _expected(os.getpid())


def _send_while_frozen(monkeypatch, pid, value, where):
    """Queue SIGUSR2 (unblocked, with a handler) while dump() has the target
    frozen, from inside the dump: before the syscalls injected to read its
    state (which used to dequeue it and drop it), or after them, before the
    memory copy."""
    real = getattr(engine.dump, where)
    sent = []

    def hooked(*a, **kw):
        with open(f"/proc/{pid}/status") as f:
            assert "TracerPid:\t0" not in f.read(), "the target must be frozen now"
        sigqueue(pid, USR2, value)
        sent.append(value)
        return real(*a, **kw)
    monkeypatch.setattr(engine.dump, where, hooked)
    return sent


@pytest.mark.parametrize("where", ["injected_state", "dump_memory"])
@pytest.mark.parametrize("leave_running", [False, True], ids=["restored", "leave-running"])
def test_signal_sent_during_the_freeze_is_delivered(procs, blocker_bin, tmp_path, monkeypatch, leave_running, where):
    """Its handler runs (in the restored process, or in the original that
    carried on), with its siginfo, and the read() it interrupted fails with
    EINTR, the handler having no SA_RESTART - as without the checkpoint."""
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, "sigs", nr=NR["read"])
    sent = _send_while_frozen(monkeypatch, p.pid, 99, where)
    dump(p.pid, str(tmp_path / "img"), Options(leave_running=leave_running))
    assert sent == [99]
    if not leave_running:
        p.wait()
        restore(str(tmp_path / "img"), Options())
        procs.adopt(p.pid)
    wait_for(lambda: "unblocked" in lines(out), what="the handler to run and read() to return")
    assert sig_lines(out) == [(USR2, SI_QUEUE, os.getpid(), os.getuid(), 99)]
    assert "read ret=-1 errno=4" in lines(out)
    # The process goes on normally: a blocked signal sent now is handled.
    sigqueue(p.pid, USR1, 5)
    wait_for(lambda: len(sig_lines(out)) == 2, what="a later signal")


def test_signal_during_freeze_with_sa_restart_restarts_the_read(procs, blocker_bin, tmp_path, monkeypatch):
    """Same, with SA_RESTART: after the handler the read() goes on waiting
    (-ERESTARTSYS restarts under an SA_RESTART handler) and returns the
    bytes written afterwards."""
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, "sigs", nr=NR["read"], sa_restart=True)
    _send_while_frozen(monkeypatch, p.pid, 98, "injected_state")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    wait_for(lambda: sig_lines(out), what="the handler")
    assert sig_lines(out) == [(USR2, SI_QUEUE, os.getpid(), os.getuid(), 98)]
    time.sleep(0.2)
    assert not any(x.startswith("read ") for x in lines(out)), ("read() must still be waiting", lines(out))
    write_pipe(p.pid, b"go")
    wait_for(lambda: "unblocked" in lines(out), what="read() to return the data")
    assert "read ret=2 errno=0" in lines(out)


def test_pending_signals_units():
    def si(sig, code, value=0):
        return signals.decode(struct.pack("<iiiiiIq", sig, 0, code, 0, 10, 0, value).ljust(128, b"\0"))
    ok = {"thread": [si(35, -1, 1)], "shared": [si(10, 0)]}
    assert signals.problem(ok) is None
    assert "POSIX timer" in signals.problem({"thread": [], "shared": [si(34, signals.SI_TIMER)]})
    signals.check_record(ok)
    signals.check_record({})
    for bad in ({"thread": "x"}, {"shared": [{"raw": "00"}]}, {"thread": [si(9, 0)]},
                {"thread": [{"raw": "zz" * 128}]}, []):
        with pytest.raises(Refusal) as e:
            signals.check_record(bad)
        assert e.value.reason == "image-invalid"
