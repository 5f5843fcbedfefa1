"""State a process reads back from inside (tests/targets/prober.c), compared
before a dump and after the restore, after `ckpt check` and in an original
left running: each case is a piece of state the engine must restore exactly
or refuse. The prober says what it set, so each comparison is checked to
prove something (the value before differs from what a fresh process has)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import TARGETS, procs, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def prober_bin(tmp_path_factory) -> str:
    exe = str(tmp_path_factory.mktemp("prober-bin") / "prober")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "prober.c")], check=True,
                   capture_output=True)
    return exe


def _lines(out: str, prefix: str):
    try:
        with open(out) as f:
            return [line.rstrip("\n") for line in f if line.startswith(prefix)]
    except FileNotFoundError:
        return []


def start(procs, exe, out, *words) -> subprocess.Popen:
    err = out + ".err"
    with open(err, "w") as ef:
        p = subprocess.Popen([exe, out, *words], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=ef, close_fds=True, start_new_session=True)
    procs.popens.append(p)
    wait_for(lambda: _lines(out, "ready") or p.poll() is not None, what="the prober to start")
    assert p.poll() is None, open(err).read()
    return p


def report(pid: int, out: str, prefix: str = "report") -> str:
    n = len(_lines(out, prefix))
    os.kill(pid, signal.SIGUSR1)
    return wait_for(lambda: (lambda r: r[n] if len(r) > n else None)(_lines(out, prefix)),
                    what=f"a {prefix} line")


def fields(line: str) -> dict:
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def roundtrip(procs, exe, tmp_path, *words, how: str = "restore") -> tuple:
    """(report before, report after) of a prober started with `words`."""
    out = str(tmp_path / "out.txt")
    p = start(procs, exe, out, *words)
    before = report(p.pid, out)
    if how == "restore":
        dump(p.pid, str(tmp_path / "img"), Options())
        p.wait()
        restore(str(tmp_path / "img"), Options())
        procs.adopt(p.pid)
    elif how == "leave-running":
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    else:
        check(p.pid, Options())
    return before, report(p.pid, out)


HOWS = ["restore", "leave-running", "check"]


@pytest.mark.parametrize("how", HOWS)
def test_fd_owner_and_signal_without_o_async(procs, prober_bin, tmp_path, how):
    """F_SETOWN / F_SETOWN_EX (thread, process, process group) and F_SETSIG
    on a pipe and a socketpair, no O_ASYNC: SIGURG and a later O_ASYNC go
    by them. Before: saved only with O_ASYNC, so they read back 0."""
    before, after = roundtrip(procs, prober_bin, tmp_path, "owner", how=how)
    f = fields(before)
    assert (f["own0"], f["sig0"], f["own1"], f["own2"]) == ("1:1", "36", "0:1", "2:1"), before
    assert after == before


def test_fd_owner_outside_the_dump_is_refused_and_target_unharmed(procs, prober_bin, tmp_path):
    """An owner that is another process (here the test itself): its signals
    could not go there from a restored process."""
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out, "owner")
    import fcntl
    from engine import pidfd
    pfd = pidfd.pidfd_open(p.pid)
    dup = pidfd.pidfd_getfd(pfd, 4, p.pid)      # the pipe's read end (3 is OUT)
    try:
        fcntl.fcntl(dup, fcntl.F_SETOWN, os.getpid())
    finally:
        os.close(dup)
        os.close(pfd)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [(r.reason, r.fd) for r in refusals] == [("unsupported-state", 4)], ei.value
    assert "F_SETOWN names process" in str(ei.value)
    assert p.poll() is None and not os.path.exists(tmp_path / "img")
    assert " own0=1:" in report(p.pid, out)     # F_OWNER_PID; the pid is ours, not the prober's


@pytest.mark.parametrize("how", HOWS)
def test_autogroup_nice_of_a_session_leader(procs, prober_bin, tmp_path, how):
    """The prober is a session leader (its own autogroup) and set its
    autogroup's nice to 7. Before: the restored one had a new autogroup at 0."""
    if not os.path.exists("/proc/self/autogroup"):
        pytest.skip("no CONFIG_SCHED_AUTOGROUP")
    before, after = roundtrip(procs, prober_bin, tmp_path, "autogroup", how=how)
    assert fields(before)["ag_nice"] == "7"
    assert after == before


def test_autogroup_nice_of_a_non_leader_differing_from_ckpts_is_refused(procs, prober_bin, tmp_path):
    """A process not its session leader shares its session's autogroup; a
    restore puts it in ckpt's: refused when the nice values differ."""
    if not os.path.exists("/proc/self/autogroup"):
        pytest.skip("no CONFIG_SCHED_AUTOGROUP")
    from engine import autogroup
    mine = autogroup.read("self")
    r = autogroup.refusal(mine + 1, sid=10, pid=11, leader_restored=False)
    assert r is not None and r.reason == "unsupported-state" and "autogroup" in r.detail
    assert autogroup.refusal(mine, sid=10, pid=11, leader_restored=False) is None
    assert autogroup.refusal(mine + 1, sid=11, pid=11, leader_restored=False) is None
    assert autogroup.refusal(mine + 1, sid=10, pid=11, leader_restored=True) is None
    assert autogroup.refusal(None, sid=10, pid=11, leader_restored=False) is None


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("word", ["sud", "sudblock"])
def test_syscall_user_dispatch(procs, prober_bin, tmp_path, word, how):
    """PR_SET_SYSCALL_USER_DISPATCH (per thread, seen only through ptrace):
    with the selector on BLOCK a system call from outside the allowed range
    raises SIGSYS (si_code 2, SYS_USER_DISPATCH). Before: a restored
    process had no dispatch at all (the call just ran); and with BLOCK
    at the freeze (sudblock, the prober waiting in libc's pause inside the
    allowed range) the dump's own injected calls were dispatched."""
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (6, 4):
        pytest.skip("no PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG (Linux < 6.4)")
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out, word)
    before = report(p.pid, out)
    assert fields(before)["sud_sigsys"] == "2", before
    if how == "restore":
        dump(p.pid, str(tmp_path / "img"), Options())
        p.wait()
        restore(str(tmp_path / "img"), Options())
        procs.adopt(p.pid)
    elif how == "leave-running":
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    else:
        check(p.pid, Options())
    assert report(p.pid, out) == before
    assert report(p.pid, out) == before     # and again: the handler put the selector back


def test_the_freeze_turns_dispatch_off_and_release_puts_it_back(procs, prober_bin, tmp_path):
    from engine import sud
    from engine.task import Task
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (6, 4):
        pytest.skip("no PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG (Linux < 6.4)")
    p = start(procs, prober_bin, str(tmp_path / "out.txt"), "sudblock")
    t = Task.seize(p.pid)
    try:
        assert t.sud is not None and t.sud["mode"] == 1 and t.sud["len"] > 0
        assert sud.read(p.pid) is None
    finally:
        t.release()
    t = Task.seize(p.pid)
    try:
        assert t.sud is not None and t.sud["len"] > 0
    finally:
        t.release()


@pytest.mark.parametrize("nobody", [False, True])
def test_a_process_in_a_landlock_domain_is_refused_and_target_unharmed(procs, prober_bin, tmp_path, nobody):
    """landlock_restrict_self: no /proc file shows it and a restore cannot
    make it again. Before: the restored process could read what its sandbox
    forbade (open /etc/hostname: EACCES before, success after). Also for a
    process of another uid than ckpt's (the probe's helper takes its ids)."""
    from engine import landlock
    if not landlock.enabled():
        pytest.skip("Landlock is not running on this kernel")
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out, "landlock", *(["nobody"] if nobody else []))
    before = report(p.pid, out)
    assert fields(before)["ll_open"] == "13"    # EACCES
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    assert [r.reason for r in getattr(ei.value, "refusals", [ei.value])] == ["unsupported-state"]
    assert "Landlock" in str(ei.value)
    assert p.poll() is None and not os.path.exists(tmp_path / "img")
    assert report(p.pid, out) == before
    assert "Landlock" in json.dumps(check(p.pid, Options()))


@pytest.mark.parametrize("words", [(), ("nobody",)])
def test_a_process_outside_any_landlock_domain_is_not_refused(procs, prober_bin, tmp_path, words):
    """The probe's other half: the same kcmp from a process with no domain
    (root, or another uid than ckpt's) passes."""
    before, after = roundtrip(procs, prober_bin, tmp_path, "owner", *words)
    assert after == before
