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

import pytest

from engine_core_support import build_target, procs, wait_for  # noqa: F401

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


def _ckpt(*args, preexec=None):
    # A ckpt with only fds 0-2: the low numbers it keeps the new process's
    # files on are the numbers the target uses.
    return subprocess.run([sys.executable, "-S", "-m", "engine", *args], cwd=REPO, close_fds=True,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec)


def test_fds_at_the_top_of_the_limit(procs, tmp_path):  # noqa: F811
    exe = build_target(tmp_path, "topfds")
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


def test_more_fds_than_ckpts_soft_limit(procs, tmp_path):  # noqa: F811
    """A process with more fds than ckpt's soft RLIMIT_NOFILE (a server
    started with a higher one than the login shell's 1024 that ckpt is run
    from): the restore holds a copy of each at once. It failed "Invalid
    argument" after the dump had killed the process; ckpt now raises its
    own soft limit to its hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 1500
    if hard < n + 100:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} too low here")
    src = ("import os, resource, time\n"
           f"resource.setrlimit(resource.RLIMIT_NOFILE, ({hard}, {hard}))\n"
           f"fds = [os.open('/dev/null', os.O_RDONLY) for _ in range({n})]\n"
           # counted by fstat, not by listing /proc/self/fd: a dump that froze
           # it inside that listdir found a /proc directory open and refused
           # it, rightly (failed so once)
           "def held():\n"
           "    n = 0\n"
           "    for fd in range(max(fds) + 1):\n"
           "        try:\n"
           "            os.fstat(fd)\n"
           "            n += 1\n"
           "        except OSError:\n"
           "            pass\n"
           "    return n\n"
           "i = 0\n"
           "while True:\n"
           "    i += 1\n"
           "    open('count.tmp', 'w').write(f'{i} {held()}')\n"
           "    os.rename('count.tmp', 'count')\n"
           "    time.sleep(0.05)\n")
    p = subprocess.Popen([sys.executable, "-S", "-c", src], cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                         start_new_session=True)
    procs.popens.append(p)
    count = lambda: (tmp_path / "count").read_text().split() if (tmp_path / "count").exists() else []  # noqa: E731
    wait_for(lambda: count() or p.poll() is not None, what="the target")
    fds = int(count()[1])
    assert fds > n
    low = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # noqa: E731
    r = _ckpt("dump", "-t", str(p.pid), "-D", str(tmp_path / "img"), preexec=low)
    assert r.returncode == 0, r.stderr
    p.wait()
    r = _ckpt("restore", "-D", str(tmp_path / "img"), preexec=low)
    assert r.returncode == 0, r.stderr
    procs.adopt(p.pid)
    i = int(count()[0])
    wait_for(lambda: int(count()[0]) > i, what="the count to go on")
    assert int(count()[1]) == fds
    with open(f"/proc/{p.pid}/limits") as f:
        assert [ln.split()[3:5] for ln in f if ln.startswith("Max open files")] == [[str(hard), str(hard)]]
