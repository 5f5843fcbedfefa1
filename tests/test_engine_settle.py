"""A signal with a handler that is pending while a thread is in an
interrupted call, at the moment every task is frozen (engine/task.py
Task.settle): the thread takes it before anything is surveyed - the kernel,
still inside the do_signal() that stopped it, sets up the handler's frame
with its own restart decision - and the handler runs once, after the
restore (or in the original that carried on), with the call's outcome the
kernel gives: EINTR without SA_RESTART, the read() going on with it.

On aarch64 this is the only exact way (the kernel keeps the -ERESTARTxxx
code in a local variable, arch/aarch64.py); on x86_64 the registers would
carry it too, so these tests also check that the signal was taken at the
freeze (it is no longer pending in the image): the same path both machines
run, tested here.

Targets: tests/targets/blocker.c "thread_sigs" (a second thread, the only
one with SIGUSR2 unblocked, blocked in one raw read()); a C program in
sigsuspend (the mask it saved must come back after the handler); a Python
parent with a child (a tree) blocked in a raw read() under a SIGCHLD
handler. The signal is queued by a hook on threads.finish_freeze: every
task stopped, the freeze not finished yet.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import time

import pytest

import engine.threads
from engine.context import Options
from engine.dump import check, dump
from engine.restore import restore
from engine_core_support import procs, wait_for  # noqa: F401
from test_engine_tree import session_killer  # noqa: F401
from restart_support import (NR, SI_QUEUE, _siginfo, blocker_bin, lines, sig_lines,  # noqa: F401
                             sigqueue, write_pipe)

USR2 = signal.SIGUSR2
_libc = ctypes.CDLL(None, use_errno=True)


def _start(procs, exe, out, sa_restart):
    p = procs.start([exe, out, "thread_sigs", "1000"] + (["restart"] if sa_restart else []),
                    cwd=os.path.dirname(out))
    tid = int(wait_for(lambda: next((m.group(1) for x in lines(out) for m in [re.match(r"ready tid=(\d+)", x)] if m),
                                    None), what="the reader thread"))

    def in_read():
        try:
            with open(f"/proc/{p.pid}/task/{tid}/syscall") as f:
                return f.read().split()[0] == str(NR["read"])
        except (OSError, IndexError):
            return False
    wait_for(in_read, what="the thread blocked in read()")
    return p, tid


def _send_at_the_freeze(monkeypatch, pid, tid, queue, value, sig=USR2):
    """Queue SIGUSR2 once every task is stopped, before the freeze is
    finished (threads.finish_freeze): pending at the interrupt stop, as a
    SIGCHLD from a member exiting during a tree's freeze is."""
    real = engine.threads.finish_freeze
    sent = []

    def hooked(tasks):
        if not sent:
            if queue == "shared":
                sigqueue(pid, sig, value)
            else:
                buf = ctypes.create_string_buffer(_siginfo(sig, value), 128)
                assert _libc.syscall(297, pid, tid, sig, buf) == 0      # rt_tgsigqueueinfo
            sent.append(value)
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                st = dict(x.split(":\t", 1) for x in f.read().splitlines() if ":\t" in x)
            assert (int(st["SigPnd"], 16) | int(st["ShdPnd"], 16)) >> (sig - 1) & 1, "not pending"
        return real(tasks)
    monkeypatch.setattr(engine.threads, "finish_freeze", hooked)
    return sent


def _pending_in_image(image: str) -> list:
    with open(os.path.join(image, "core.json")) as f:
        core = json.load(f)
    sigs = [s["signo"] for q in ("thread", "shared") for s in core["signals"][q]]
    for t in core.get("threads", []):
        sigs += [s["signo"] for q in ("thread", "shared") for s in t["signals"][q]]
    return sigs


def _outcome(procs, p, out, sa_restart, value):
    wait_for(lambda: sig_lines(out), what="the handler")
    assert sig_lines(out) == [(USR2, SI_QUEUE, os.getpid(), os.getuid(), value)]
    if sa_restart:
        time.sleep(0.3)
        assert not any(x.startswith("read ") for x in lines(out)), ("read() must still be waiting", lines(out))
        write_pipe(p, b"go")
        wait_for(lambda: any(x.startswith("read ") for x in lines(out)), what="read() to return the data")
        assert "read ret=2 errno=0" in lines(out)
    else:
        wait_for(lambda: any(x.startswith("read ") for x in lines(out)), what="read() to fail")
        assert "read ret=-1 errno=4" in lines(out)
    time.sleep(0.2)
    assert len(sig_lines(out)) == 1, "the handler ran more than once"


@pytest.mark.parametrize("queue", ["shared", "thread"])
@pytest.mark.parametrize("sa_restart", [False, True], ids=["eintr", "sa_restart"])
def test_pending_handled_signal_at_the_freeze_restored_exactly(procs, blocker_bin, tmp_path, monkeypatch,
                                                               queue, sa_restart):
    out = str(tmp_path / "out.txt")
    p, tid = _start(procs, blocker_bin, out, sa_restart)
    sent = _send_at_the_freeze(monkeypatch, p.pid, tid, queue, 41)
    image = str(tmp_path / "img")
    res = dump(p.pid, image, Options())
    assert sent == [41] and res["signals_taken"] == 1
    # Taken at the freeze: its frame is in the dumped memory, not in a queue.
    assert _pending_in_image(res["image"]) == []
    assert not sig_lines(out), "the handler must not run in the original"
    p.wait()
    restore(image, Options())
    procs.adopt(p.pid)
    _outcome(procs, p.pid, out, sa_restart, 41)


@pytest.mark.parametrize("how", ["check", "leave-running"])
def test_pending_handled_signal_at_the_freeze_original_carries_on(procs, blocker_bin, tmp_path, monkeypatch, how):
    out = str(tmp_path / "out.txt")
    p, tid = _start(procs, blocker_bin, out, False)
    sent = _send_at_the_freeze(monkeypatch, p.pid, tid, "shared", 42)
    if how == "check":
        r = check(p.pid, Options())
        assert r["ok"], r["refusals"]
    else:
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    assert sent == [42]
    _outcome(procs, p.pid, out, False, 42)


SUSPENDER = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static int out;
static void on_sig(int sig) { char l[32]; int n = snprintf(l, sizeof l, "sig %d\n", sig); (void)!write(out, l, n); }
int main(int argc, char **argv) {
    out = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sig;
    sigaction(SIGUSR2, &sa, NULL);
    sigset_t b, none, now;
    sigemptyset(&b);
    sigaddset(&b, SIGUSR1);
    sigaddset(&b, SIGUSR2);
    sigprocmask(SIG_BLOCK, &b, NULL);
    (void)!write(out, "ready\n", 6);
    sigemptyset(&none);
    int r = sigsuspend(&none), e = errno;
    sigprocmask(SIG_BLOCK, NULL, &now);
    char l[128];
    int n = snprintf(l, sizeof l, "suspend ret=%d errno=%d usr1=%d usr2=%d\n", r, e,
                     sigismember(&now, SIGUSR1), sigismember(&now, SIGUSR2));
    (void)!write(out, l, n);
    for (;;) pause();
}
"""


def test_sigsuspend_mask_comes_back_after_the_handler(procs, tmp_path, monkeypatch):
    """rt_sigsuspend with a temporary mask: the signal taken at the freeze
    finds the temporary mask in force and the frame saves the one from
    before sigsuspend (the kernel's TIF_RESTORE_SIGMASK, which a
    PTRACE_SETSIGMASK before the delivery would have cleared): after the
    handler sigsuspend fails with EINTR and SIGUSR1/SIGUSR2 are blocked
    again, as without the checkpoint."""
    import subprocess
    src, exe, out = tmp_path / "susp.c", str(tmp_path / "susp"), str(tmp_path / "out.txt")
    src.write_text(SUSPENDER)
    subprocess.run(["gcc", "-O2", "-o", exe, str(src)], check=True, capture_output=True)
    p = procs.start([exe, out], cwd=str(tmp_path))
    wait_for(lambda: "ready" in lines(out), what="ready")
    wait_for(lambda: open(f"/proc/{p.pid}/syscall").read().split()[0] == "130", what="in rt_sigsuspend")
    sent = _send_at_the_freeze(monkeypatch, p.pid, p.pid, "thread", 43)
    res = dump(p.pid, str(tmp_path / "img"), Options())
    assert sent == [43] and res["signals_taken"] == 1
    assert _pending_in_image(res["image"]) == []
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    wait_for(lambda: any(x.startswith("suspend ") for x in lines(out)), what="sigsuspend to return")
    assert "suspend ret=-1 errno=4 usr1=1 usr2=1" in lines(out), lines(out)
    assert [x for x in lines(out) if x.startswith("sig ")] == [f"sig {USR2}"]


TREE_PARENT = r"""
import ctypes, json, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
kid = os.fork()
if kid == 0:
    while True:
        time.sleep(3600)
wr, ww = os.pipe()
os.set_blocking(ww, False)
os.set_blocking(wr, False)
signal.set_wakeup_fd(ww)                # the C handler writes one byte per delivery
signal.signal(signal.SIGCHLD, lambda *a: None)
signal.siginterrupt(signal.SIGCHLD, True)
with open("ready.tmp", "w") as f:
    json.dump({"kid": kid}, f)
os.rename("ready.tmp", "ready")
buf = ctypes.create_string_buffer(16)
n = libc.read(r, buf, 16)
e = ctypes.get_errno() if n < 0 else 0
try:
    got = list(os.read(wr, 16))
except BlockingIOError:
    got = []
with open("out.txt", "a") as f:
    f.write("read ret=%d errno=%d wakeups=%s\n" % (n, e, got))
while True:
    time.sleep(3600)
"""


def test_tree_sigchld_at_the_freeze_interrupts_the_parents_read(procs, session_killer, tmp_path,  # noqa: F811
                                                                monkeypatch):
    """A tree: the SIGCHLD a member gets while the whole tree is frozen (a
    child exiting then) over its raw read() is taken once every member is
    stopped (tree.freeze -> threads.finish_freeze), and after the restore
    its handler has run once and the read() failed with EINTR."""
    from engine_core_support import python_exe
    from test_engine_tree import _dump_restore, _ready
    p = procs.start([python_exe(), "-c", TREE_PARENT], cwd=str(tmp_path))
    session_killer.append(p.pid)
    _ready(tmp_path, p)
    wait_for(lambda: open(f"/proc/{p.pid}/syscall").read().split()[0] == str(NR["read"]), what="the parent in read()")
    sent = _send_at_the_freeze(monkeypatch, p.pid, p.pid, "shared", 0, sig=signal.SIGCHLD)
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert sent == [0] and res["signals_taken"] == 1 and res["members"] == 2
    assert _pending_in_image(res["image"]) == []
    out = str(tmp_path / "out.txt")
    wait_for(lambda: lines(out), what="the parent's read() to return")
    assert lines(out) == [f"read ret=-1 errno=4 wakeups=[{int(signal.SIGCHLD)}]"]
