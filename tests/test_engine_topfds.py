"""A process whose fds sit at the top of its RLIMIT_NOFILE (valgrind's
own: found by a survey of real programs, `valgrind prog` was dumped,
killed, and its restore failed "opening the process's files: Invalid
argument" - ckpt opened the files for it above its highest fd, past the
limit). Restored with every fd on its number - also those on the low
numbers where ckpt now keeps the files it opens for it, each such number
skipped - the pipes still pipes."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

from engine_core_support import TARGETS, procs, wait_for  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(out):
    return open(out).read().splitlines() if os.path.exists(out) else []


def _fds(pid):
    """fd -> what it is (a pipe: "pipe N", N naming its pipe among them)."""
    d = f"/proc/{pid}/fd"
    links = {int(n): os.readlink(f"{d}/{n}") for n in os.listdir(d)}
    pipes = sorted({v for v in links.values() if v.startswith("pipe:")}, key=lambda v: min(
        fd for fd, w in links.items() if w == v))
    return {fd: f"pipe {pipes.index(v)}" if v in pipes else v for fd, v in links.items()}


def _ckpt(*args):
    # A ckpt with only fds 0-2: the low numbers it keeps the new process's
    # files on are the numbers the target uses.
    return subprocess.run([sys.executable, "-S", "-m", "engine", *args], cwd=REPO, close_fds=True,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_fds_at_the_top_of_the_limit(procs, tmp_path):  # noqa: F811
    exe = str(tmp_path / "topfds")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "topfds.c")], check=True,
                   capture_output=True)
    out = str(tmp_path / "out")
    p = procs.start([exe, out])     # the same RLIMIT_NOFILE as ckpt here
    wait_for(lambda: _lines(out) or p.poll() is not None, what="the target")
    top = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
    assert _lines(out) == [f"ready {top}"]
    before = _fds(p.pid)
    assert sorted(before) == list(range(64)) + [top - 2, top - 1, top]
    r = _ckpt("dump", "-t", str(p.pid), "-D", str(tmp_path / "img"))
    assert r.returncode == 0, r.stderr
    p.wait()
    r = _ckpt("restore", "-D", str(tmp_path / "img"))
    assert r.returncode == 0, r.stderr
    procs.adopt(p.pid)
    assert _fds(p.pid) == before
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: _lines(out)[-1:] == ["report 1 x"], what="a report after the restore")
    assert _lines(out) == [f"ready {top}", "report 1 x"]
