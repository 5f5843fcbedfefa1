"""PR_SET_PDEATHSIG: per thread, shown by no /proc file, not inherited by
fork. A restore that dropped it would leave a process running that the
death of its parent should kill; it is read by injection (PR_GET_PDEATHSIG)
from the leader and every thread, one by one and side by side (three
threads or more, threads.prefetch; a tree's members, dump.prefetch_injected),
and refused until it is restored. The target goes on untouched, its signal
still set."""

from __future__ import annotations

import pytest

from engine.context import Options
from engine.dump import dump
from engine import tree
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, start_ready_script, wait_for  # noqa: F401
from fds_support import _members_gone

SETUP = """
libc = ctypes.CDLL(None, use_errno=True)
def pdeath(sig):
    assert libc.prctl(1, sig, 0, 0, 0) == 0          # PR_SET_PDEATHSIG
def get():
    v = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(v), 0, 0, 0)           # PR_GET_PDEATHSIG
    return v.value
WHERE, THREADS = {where!r}, {threads}
tids = []
def sleeper(mine):
    if mine:
        pdeath(10)
    tids.append(threading.get_native_id())
    while True:
        time.sleep(0.05)
for i in range(THREADS):
    threading.Thread(target=sleeper, args=(WHERE == "thread" and i == THREADS - 1,), daemon=True).start()
while len(tids) < THREADS:
    time.sleep(0.01)
if WHERE == "leader":
    pdeath(10)
def fork_child():
    if os.fork() == 0:
        signal.signal(10, lambda *a: open('got-usr1', 'w').close())
        pdeath(10)
        open('child.tmp', 'w').close(); os.rename('child.tmp', 'child')
        while True:
            time.sleep(0.05)
if WHERE == "child":
    fork_child()
if WHERE == "threadchild":     # forked by a thread other than the leader
    threading.Thread(target=lambda: (fork_child(), sleeper(False)), daemon=True).start()   # it lives on
while WHERE in ("child", "threadchild") and not os.path.exists('child'):
    time.sleep(0.01)
open('leader-pdeath', 'w').write(str(get()))
"""


def _refusals(exc) -> list:
    return getattr(exc, "refusals", [exc])


@pytest.mark.parametrize("where, threads", [("leader", 0), ("thread", 1), ("thread", 3), ("none", 3)])
def test_parent_death_signal_is_refused_never_dropped(procs, tmp_path, where, threads):
    p = start_ready_script(procs, tmp_path, SETUP.format(where=where, threads=threads), "ctypes, os, signal, threading, time",
                           tick=0.05)
    assert p.poll() is None
    if where == "none":     # the control: nothing set, the dump goes through
        res = dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
        assert res["left_running"]
        return
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    r = _refusals(ei.value)
    assert [(x.reason, x.pid) for x in r] == [("unsupported-state", p.pid)]
    assert "PR_SET_PDEATHSIG 10" in r[0].detail
    assert ("thread " in r[0].detail) == (where == "thread")
    assert not (tmp_path / "img").exists()
    assert p.poll() is None                                  # untouched: still running, its signal still set
    assert (tmp_path / "leader-pdeath").read_text() == ("10" if where == "leader" else "0")
    with open(f"/proc/{p.pid}/status") as f:
        assert "TracerPid:\t0" in f.read()


def test_parent_death_signal_of_a_tree_member_is_restored(procs, tmp_path):
    """A member forked by its parent's leader (zdtm pdeath_sig): it gets its
    signal when that parent dies after the restore (refused before)."""
    p = start_ready_script(procs, tmp_path, SETUP.format(where="child", threads=0),
                           "ctypes, os, signal, threading, time", tick=0.05)
    wait_for(lambda: (tmp_path / "child").exists(), what="the child")
    kids = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
    tree.dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    # the child, killed by the dump, is this subreaper's zombie until
    # reaped, and its pid not free for the restore (pid-in-use under load)
    _members_gone(str(tmp_path / "img"))
    restore(str(tmp_path / "img"), Options())
    procs.adopt(int(kids[0]))
    procs.adopt(p.pid)
    assert not (tmp_path / "got-usr1").exists()
    procs.kill(p.pid)
    wait_for(lambda: (tmp_path / "got-usr1").exists(), what="the child's parent-death signal")


def test_parent_death_signal_of_a_member_forked_by_a_thread_is_refused(procs, tmp_path):
    p = start_ready_script(procs, tmp_path, SETUP.format(where="threadchild", threads=0),
                           "ctypes, os, signal, threading, time", tick=0.05)
    wait_for(lambda: (tmp_path / "child").exists(), what="the child")
    with pytest.raises((Refusal, Refusals)) as ei:
        tree.dump(p.pid, str(tmp_path / "img"), Options())
    r = _refusals(ei.value)
    assert [x.reason for x in r] == ["unsupported-state"] and r[0].pid != p.pid
    assert "PR_SET_PDEATHSIG 10" in r[0].detail and "other than the leader" in r[0].detail
    assert not (tmp_path / "img").exists() and p.poll() is None
