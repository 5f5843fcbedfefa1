"""Job-control stopped processes (engine/jobstop.py): a shell's ^Z'd job,
dumped with its shell (a tree), comes back stopped by the same signal,
and the shell's view of that stop - its waitpid(WUNTRACED) report and its
SIGCHLD - is as it was, taken or not. A stopped process dumped alone would
be orphaned once restored (the kernel SIGHUPs such a group): refused, and
left stopped with its report. Each of these was refused before
("stopped by job control; continue it first")."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from fds_support import _members_gone

# A "shell": forks a job into its own process group in the shell's
# session, stops it with SIGTSTP (as the terminal's ^Z would), and takes
# the stop's report and SIGCHLD (as bash does) or leaves both. The job
# counts in a file while it runs. On SIGUSR1 the shell writes what its
# waitid(WSTOPPED|WNOHANG|WNOWAIT) and sigpending() say now (both look
# without taking).
SHELL = r'''
import os, signal, sys, time
take = sys.argv[1] == "taken"
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
child = os.fork()
if child == 0:
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    n = 0
    while True:
        n += 1
        with open("count.tmp", "w") as f:
            f.write(str(n))
        os.rename("count.tmp", "count")
        time.sleep(0.02)
os.setpgid(child, child)
while not os.path.exists("count"):
    time.sleep(0.01)
os.kill(child, signal.SIGTSTP)
if take:
    pid, st = os.waitpid(child, os.WUNTRACED)
    assert os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGTSTP
    assert signal.sigtimedwait([signal.SIGCHLD], 5).si_code == 5      # CLD_STOPPED
else:
    while open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.01)
def report(*_):
    r = os.waitid(os.P_PID, child, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)     # a look, nothing taken
    view = (r.si_pid, r.si_status) if r else (0, 0)
    with open("report.tmp", "w") as f:
        f.write(repr(view + (signal.SIGCHLD in signal.sigpending(),)))
    os.rename("report.tmp", "report")
signal.signal(signal.SIGUSR1, report)
with open("ready.tmp", "w") as f:
    f.write(str(child))
os.rename("ready.tmp", "ready")
while True:
    signal.pause()
'''


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _shd_pnd(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(ln.split()[1] for ln in f if ln.startswith("ShdPnd:"))


def _shell(procs, tmp_path, mode):
    (tmp_path / "shell.py").write_text(SHELL)
    p = procs.start([python_exe(), str(tmp_path / "shell.py"), mode], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the shell and its stopped job")
    assert p.poll() is None
    child = int((tmp_path / "ready").read_text())
    procs.adopt(child)
    return p, child


def _report(pid, tmp_path):
    r = tmp_path / "report"
    if r.exists():
        r.unlink()
    os.kill(pid, signal.SIGUSR1)
    wait_for(r.exists, what="the shell's report")
    return eval(r.read_text())      # (pid, stop signal, SIGCHLD pending): a tuple the shell wrote


@pytest.mark.parametrize("mode", ["taken", "pending"])
def test_a_shells_stopped_job_comes_back_stopped_with_the_shells_view(procs, tmp_path, mode):
    p, child = _shell(procs, tmp_path, mode)
    pend = _shd_pnd(p.pid)
    count = (tmp_path / "count").read_text()
    view = (0, 0, False) if mode == "taken" else (child, signal.SIGTSTP, True)
    rep = check(p.pid, Options())
    assert rep["refusals"] == [], rep["refusals"]
    wait_for(lambda: _state(child) == "T", timeout=2, what="back in its group stop after the check")
    assert _report(p.pid, tmp_path) == view      # the check left the shell's view as it was
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    _members_gone(str(tmp_path / "img"))
    out = restore(str(tmp_path / "img"), Options())
    assert out["pid"] == p.pid
    procs.adopt(p.pid)
    wait_for(lambda: _state(child) == "T", timeout=5, what="the job stopped again")
    time.sleep(0.2)
    assert (tmp_path / "count").read_text() == count            # it has not run a step
    assert _shd_pnd(p.pid) == pend                              # the shell's SIGCHLD: as it was
    assert _report(p.pid, tmp_path) == view     # taken: nothing new to wait for; else still waiting
    os.kill(child, signal.SIGCONT)                              # fg
    wait_for(lambda: (tmp_path / "count").read_text() != count, what="the job counting on after SIGCONT")


def test_a_job_stopped_by_sigstop_keeps_that_signal(procs, tmp_path):
    """The stop signal is the image's, not always SIGSTOP: here it is
    SIGSTOP itself, on the job the shell then left alone."""
    p, child = _shell(procs, tmp_path, "taken")
    os.kill(child, signal.SIGCONT)
    wait_for(lambda: _state(child) != "T", what="running")
    os.kill(child, signal.SIGSTOP)
    wait_for(lambda: _state(child) == "T", what="stopped by SIGSTOP")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    _members_gone(str(tmp_path / "img"))
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    wait_for(lambda: _state(child) == "T", timeout=5, what="stopped again")
    pid, stopsig, _ = _report(p.pid, tmp_path)
    assert (pid, stopsig) == (child, signal.SIGSTOP)


def test_a_stopped_process_alone_is_refused_and_left_as_it_was(procs, tmp_path):
    """Without its shell its group would be orphaned once restored, and the
    kernel would SIGHUP it: refused, still stopped, its report still
    waiting for its parent (this test)."""
    import subprocess
    p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, preexec_fn=lambda: os.setpgid(0, 0))
    procs.adopt(p.pid)
    os.kill(p.pid, signal.SIGTSTP)
    wait_for(lambda: _state(p.pid) == "T", what="stopped")
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    rs = e.value.refusals if isinstance(e.value, Refusals) else [e.value]
    assert any(r.reason == "unsupported-state" and "orphaned once restored" in r.message for r in rs), rs
    assert not (tmp_path / "img").exists()
    wait_for(lambda: _state(p.pid) == "T", timeout=2, what="back in its group stop")
    pid, st = os.waitpid(p.pid, os.WUNTRACED | os.WNOHANG)
    assert pid == p.pid and os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGTSTP


ORPHANED = r'''
import os, signal, time
child = os.fork()
if child == 0:
    n = 0
    while True:
        n += 1
        with open("count.tmp", "w") as f:
            f.write(str(n))
        os.rename("count.tmp", "count")
        time.sleep(0.02)
while not os.path.exists("count"):
    time.sleep(0.01)
os.kill(child, signal.SIGSTOP)
pid, st = os.waitpid(child, os.WUNTRACED)
with open("ready.tmp", "w") as f:
    f.write(str(child))
os.rename("ready.tmp", "ready")
while True:
    time.sleep(1)
'''


def test_a_stopped_child_in_an_orphaned_group_comes_back_stopped(procs, tmp_path):
    """zdtm vdso02: a session leader's child in its group, SIGSTOPped: the
    group is orphaned already (the leader's parent is in another session),
    so the restore orphans nothing (refused before)."""
    (tmp_path / "orph.py").write_text(ORPHANED)
    p = procs.start([python_exe(), str(tmp_path / "orph.py")], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the stopped child")
    child = int((tmp_path / "ready").read_text())
    procs.adopt(child)
    count = (tmp_path / "count").read_text()
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    _members_gone(str(tmp_path / "img"))
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    wait_for(lambda: _state(child) == "T", timeout=5, what="stopped again")
    time.sleep(0.3)
    assert _state(child) == "T" and (tmp_path / "count").read_text() == count     # no SIGHUP/SIGCONT came
    os.kill(child, signal.SIGCONT)
    wait_for(lambda: (tmp_path / "count").read_text() != count, what="counting on after SIGCONT")


def test_a_stopped_process_with_threads_is_refused(procs, tmp_path):
    src = ("import os, threading, time\nthreading.Thread(target=time.sleep, args=(1000,), daemon=True).start()\n"
           "open('tready.tmp', 'w').close(); os.rename('tready.tmp', 'tready')\ntime.sleep(1000)\n")
    p, child = _shell(procs, tmp_path, "taken")
    os.kill(child, signal.SIGKILL)
    (tmp_path / "t.py").write_text(src)
    import subprocess
    t = subprocess.Popen([python_exe(), str(tmp_path / "t.py")], cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                         preexec_fn=lambda: os.setpgid(0, 0))
    procs.adopt(t.pid)
    wait_for(lambda: (tmp_path / "tready").exists(), what="threads")
    os.kill(t.pid, signal.SIGSTOP)
    wait_for(lambda: _state(t.pid) == "T", what="stopped")
    rep = check(t.pid, Options())
    assert any("job control" in r["message"] and "threads" in r["message"] for r in rep["refusals"]), rep["refusals"]
    assert _state(t.pid) == "T" or (time.sleep(0.2) or _state(t.pid) == "T")
