"""Interrupted syscalls: a process dumped (or only frozen) while blocked in
a call continues in that same call after restore, and the call returns
what it would have returned without the checkpoint - never EINTR.

Each test uses a real process blocked in one raw syscall (tests/targets/
blocker.c, no EINTR retry loop) and proves the result by the call's own
return: the blocked read returns the bytes written after the restore, poll
and epoll report the fd ready, a sleep completes with elapsed >= requested.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine import restart
from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, wait_for  # noqa: F401
from restart_support import (NR, blocker_bin, done_line, lines, sigqueue, start_blocker,  # noqa: F401
                             syscall_nr, write_pipe)

EINTR, ETIMEDOUT = 4, 110
MS = 1000


def _poke(pid):
    write_pipe(pid, b"x")


def _hello(pid):
    write_pipe(pid, b"hello")


def _usr2(pid):
    sigqueue(pid, signal.SIGUSR2, 7)


# mode: (syscall it blocks in, what wakes it after restore (None: its timeout),
#        what it must return)
CALLS = {
    "poll_inf": (NR["poll"], _poke, {"ret": 1, "errno": 0, "revents": 1}),
    "poll_timeout": (NR["poll"], None, {"ret": 0, "errno": 0}),
    "nanosleep": (NR["nanosleep"], None, {"ret": 0, "errno": 0}),
    "clock_rel": (NR["clock_nanosleep"], None, {"ret": 0, "errno": 0}),
    "clock_abs": (NR["clock_nanosleep"], None, {"ret": 0, "errno": 0}),
    "futex": (NR["futex"], None, {"ret": -1, "errno": ETIMEDOUT}),
    "select": (NR["select"], _poke, {"ret": 1, "errno": 0, "isset": 1}),
    "pselect": (NR["pselect6"], _poke, {"ret": 1, "errno": 0, "isset": 1}),
    "epoll": (NR["epoll_wait"], _poke, {"ret": 1, "errno": 0, "data": 4242}),
    "read": (NR["read"], _hello, {"ret": 5, "errno": 0, "data": "hello"}),
    "sigtimedwait": (NR["rt_sigtimedwait"], _usr2, {"ret": signal.SIGUSR2, "errno": 0,
                                                    "sig": signal.SIGUSR2, "value": 7}),
}


def _dump_and_restore(p, image):
    dump(p.pid, image, Options())
    p.wait()
    out = restore(image, Options())
    assert out["pid"] == p.pid


def _finish(procs, pid, out, mode, nr):
    """The restored (or released) process is still in the same call; wake
    it (or let it time out) and check what the call returned."""
    _, wake, want = CALLS[mode]
    if wake is not None:
        time.sleep(0.2)
        assert not any(x.startswith("done") for x in lines(out)), "returned before it was woken"
        wait_for(lambda: syscall_nr(pid) in (nr, NR["restart_syscall"]), what="blocked in the same call")
        wake(pid)
    got = done_line(out, timeout=10)
    assert got["errno"] != EINTR, f"{mode} came back with EINTR: {got}"
    for k, v in want.items():
        assert got[k] == v, (mode, k, got)
    if wake is None:
        assert got["elapsed_ms"] >= MS, f"{mode} returned early: {got}"
    return got


@pytest.mark.parametrize("mode", sorted(CALLS))
def test_blocked_call_continues_after_restore(procs, blocker_bin, tmp_path, mode):
    nr = CALLS[mode][0]
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, mode, MS, nr=nr)
    time.sleep(0.1)
    _dump_and_restore(p, str(tmp_path / "img"))
    procs.adopt(p.pid)
    _finish(procs, p.pid, out, mode, nr)


@pytest.mark.parametrize("mode", ["epoll", "sigtimedwait", "poll_inf", "clock_rel"])
@pytest.mark.parametrize("how", ["check", "leave-running"])
def test_released_original_continues(procs, blocker_bin, tmp_path, mode, how):
    """ckpt check / dump --leave-running freeze the process and let it go:
    epoll_wait and sigtimedwait, which the freeze itself makes fail with
    EINTR, are re-executed; restart-block calls go on with the kernel's
    own restart."""
    nr = CALLS[mode][0]
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, mode, MS, nr=nr)
    if how == "check":
        assert check(p.pid, Options())["ok"]
    else:
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    got = _finish(procs, p.pid, out, mode, nr)
    if mode == "clock_rel":
        # The original keeps its restart_block: the remaining time, not a new second.
        assert got["elapsed_ms"] < 1.8 * MS, got


def _stop_cont(pid, nr):
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", what="stopped")
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: syscall_nr(pid) == NR["restart_syscall"], what="the call restarted via restart_syscall")


@pytest.mark.parametrize("mode", ["clock_rel", "nanosleep", "poll_inf", "futex", "poll_timeout"])
def test_dumped_inside_restart_syscall(procs, blocker_bin, tmp_path, mode):
    """Stopped and continued once (job control, a debugger, an earlier ckpt
    check), the call sleeps on in restart_syscall(2), whose restart_block
    a new process cannot have: the ORIGINAL call is re-executed instead."""
    nr = CALLS[mode][0]
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, mode, MS, nr=nr)
    _stop_cont(p.pid, nr)
    _dump_and_restore(p, str(tmp_path / "img"))
    procs.adopt(p.pid)
    if CALLS[mode][1] is not None:      # (a sleep may be over already)
        wait_for(lambda: syscall_nr(p.pid) == nr, what="the original call, not restart_syscall")
    _finish(procs, p.pid, out, mode, nr)


def test_check_then_dump_then_restore(procs, blocker_bin, tmp_path):
    """After a `ckpt check` the process sleeps in restart_syscall; dumping it
    then still restores a process blocked in its poll()."""
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, "poll_inf", nr=NR["poll"])
    assert check(p.pid, Options())["ok"]
    wait_for(lambda: syscall_nr(p.pid) == NR["restart_syscall"], what="restart_syscall after check")
    _dump_and_restore(p, str(tmp_path / "img"))
    procs.adopt(p.pid)
    wait_for(lambda: syscall_nr(p.pid) == NR["poll"], what="poll(), not restart_syscall")
    _finish(procs, p.pid, out, "poll_inf", NR["poll"])


def test_unknown_restart_is_refused_and_target_unharmed(procs, blocker_bin, tmp_path, monkeypatch):
    """When the call behind restart_syscall cannot be known, the dump is
    refused (nothing written) and the original sleeps on, undisturbed."""
    out = str(tmp_path / "out.txt")
    p = start_blocker(procs, blocker_bin, out, "clock_rel", 2 * MS, nr=NR["clock_nanosleep"])
    _stop_cont(p.pid, NR["clock_nanosleep"])
    monkeypatch.setattr(restart, "snapshot", lambda pid: None)
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    rs = e.value.refusals if isinstance(e.value, Refusals) else [e.value]
    assert [r.reason for r in rs] == ["unsupported-state"] and "restart_syscall" in rs[0].message
    assert not (tmp_path / "img").exists()
    r = check(p.pid, Options())
    assert not r["ok"] and any(i["what"] == "interrupted syscall" for i in r["items"])
    got = done_line(out, timeout=10)
    assert (got["ret"], got["errno"]) == (0, 0) and 2 * MS <= got["elapsed_ms"] < 3 * MS, got


def test_restart_snapshot_parsing_and_rules():
    stack = ("[<0>] poll_schedule_timeout.constprop.0+0x37/0x90\n[<0>] do_sys_poll+0x400/0x590\n"
             "[<0>] do_restart_poll+0x43/0x90\n[<0>] do_syscall_64+0x71/0x280\n")
    snap = restart.parse_snapshot("219 0x7ffd0 0x1 0xffffffffffffffff 0x0 0x0 0x0 0x7ff00 0x401002".split(), stack)
    assert snap["frames"][2] == "do_restart_poll" and snap["args"][:2] == [0x7FFD0, 1]
    site = {k: snap[k] for k in ("args", "sp", "pc")}
    assert restart.original_call(snap, site, 219) == "poll"
    assert restart.parse_snapshot(["running"], "") is None
    assert restart.parse_snapshot("-1 0x7ff00 0x401002".split(), "") is None
    with pytest.raises(ValueError):
        restart.original_call(dict(snap, nr=7), site, 219)           # was not in restart_syscall
    with pytest.raises(ValueError):
        restart.original_call(snap, dict(site, sp=0x7fe00), 219)     # moved since
    def hr(args):      # a hrtimer nanosleep restart: nothing but the entry on the stack
        return dict(snap, args=args, frames=["do_syscall_64", "entry_SYSCALL_64_after_hwframe"])
    for args, call in (([1, 0, 0x7FF10, 0, 0, 0], "clock_nanosleep"), ([0x7FF10, 0, 0, 0, 0, 0], "nanosleep")):
        assert restart.original_call(hr(args), dict(site, args=args), 219) == call
    with pytest.raises(ValueError):
        restart.original_call(hr([100] + [0] * 5), dict(site, args=[100] + [0] * 5), 219)
    with pytest.raises(ValueError):
        restart.original_call(dict(snap, frames=[]), site, 219)      # stack unreadable
