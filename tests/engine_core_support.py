"""Support for the engine-core tests: real targets (a C program compiled
here with the system gcc, and a CPython script), their own proof of being
restored exactly (the output sequence they write), and cleanup by PID.

The test process makes itself a child subreaper (prctl
PR_SET_CHILD_SUBREAPER) so that restored processes, orphaned when the
restorer exits, become its children and are reaped here: PID 1 on this
machine reaps slowly (ENGINE-NOTES "quirks").
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = os.path.join(HERE, "targets")
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def compile_counter(outdir: str) -> str:
    exe = os.path.join(outdir, "counter")
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", exe, os.path.join(TARGETS, "counter.c")],
                   check=True, capture_output=True)
    return exe


def build_target(directory, name: str, *flags: str) -> str:
    """tests/targets/NAME.c built into `directory` (gcc `flags`: -pthread, -lrt ...)."""
    exe = os.path.join(str(directory), name)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, f"{name}.c"), *flags], check=True,
                   capture_output=True)
    return exe


def compile_target(tmp_path_factory, name: str, *flags: str) -> str:
    """tests/targets/NAME.c built once per module (a module-scoped fixture's body)."""
    return build_target(tmp_path_factory.mktemp(f"{name}-bin"), name, *flags)


def lines_of(out: str, prefix: str) -> list:
    """The lines of file `out` that start with `prefix` ([] while it does not exist)."""
    try:
        with open(out) as f:
            return [line.rstrip("\n") for line in f if line.startswith(prefix)]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def start_ready_script(procs: "Procs", cwd, setup: str, imports: str = "os, time", tick: float = 1) -> subprocess.Popen:
    """A CPython target that runs `setup`, says ready (the file `ready` in
    `cwd`, made atomically) and then sleeps in a loop; kept in `procs`."""
    src = (f"import {imports}\n{setup}\n"
           "open('ready.tmp', 'w').close(); os.rename('ready.tmp', 'ready')\n"
           f"while True: time.sleep({tick})\n")
    p = subprocess.Popen([python_exe(), "-c", src], cwd=str(cwd), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                         start_new_session=True)
    procs.popens.append(p)
    wait_for(lambda: os.path.exists(os.path.join(str(cwd), "ready")) or p.poll() is not None, what="the target")
    return p


class Procs:
    """PIDs the test started or restored; `cleanup()` SIGKILLs and reaps
    each of them by PID (never by name)."""

    def __init__(self) -> None:
        self.popens: List[subprocess.Popen] = []
        self.pids: List[int] = []

    def start(self, argv: List[str], cwd: Optional[str] = None, umask: Optional[int] = None) -> subprocess.Popen:
        def pre():
            if umask is not None:
                os.umask(umask)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True,
                             cwd=cwd, preexec_fn=pre)
        self.popens.append(p)
        return p

    def adopt(self, pid: int) -> None:
        self.pids.append(pid)

    def reap(self, pid: int, timeout: float = 5.0) -> None:
        """Wait for a (restored, reparented-to-us) child to be gone."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                p, _ = os.waitpid(pid, os.WNOHANG)
                if p:
                    return
            except ChildProcessError:
                if not os.path.exists(f"/proc/{pid}"):
                    return
            time.sleep(0.01)
        raise AssertionError(f"pid {pid} did not go away")

    def kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.reap(pid)

    def cleanup(self) -> None:
        for p in self.popens:
            if p.poll() is None:
                p.kill()
            p.wait()
        for pid in self.pids:
            try:
                self.kill(pid)
            except AssertionError:
                pass


# -- the counter's proof -----------------------------------------------------------

_X0: Dict[int, int] = {}


def counter_x0(words: int) -> int:
    if words not in _X0:
        x = 0
        for i in range(words):
            x ^= (i * 7) & 0xFFFFFFFF
        _X0[words] = x
    return _X0[words]


def check_counter(out_path: str, in_data: bytes, mib: int = 4) -> dict:
    """Every line of the counter's output is right: n consecutive from 1, the
    n-th input byte, the xor of its memory. Returns {"last": n, "usr1": [n...]}."""
    words = mib << 18
    x = counter_x0(words)
    n_expected = 1
    usr1 = []
    with open(out_path) as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" or lines[-1].split()[0].isdigit(), lines[-1]
    for line in lines[:-1]:
        parts = line.split()
        if parts[0] == "usr1":
            usr1.append((int(parts[1]), parts[2:]))
            continue
        n, b, got = (int(p) for p in parts)
        assert n == n_expected, f"gap or repeat: expected step {n_expected}, found {n}"
        x ^= n
        assert b == in_data[n - 1], f"step {n}: read byte {b}, input has {in_data[n - 1]}"
        assert got == x, f"step {n}: memory xor {got}, expected {x}"
        n_expected += 1
    return {"last": n_expected - 1, "usr1": usr1}


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line[:1].isdigit())
    except FileNotFoundError:
        return 0


# -- the python worker's proof -------------------------------------------------------

def check_pyworker(out_path: str, in_data: bytes) -> dict:
    size = 1 << 20
    buf = bytearray(i % 251 for i in range(size))
    n_expected = 1
    usr1 = []
    with open(out_path) as f:
        lines = f.read().split("\n")
    for line in lines[:-1]:
        parts = line.split()
        if parts[0] == "usr1":
            usr1.append(int(parts[1]))
            continue
        n, b, digest = int(parts[0]), int(parts[1]), parts[2]
        assert n == n_expected, f"gap or repeat: expected step {n_expected}, found {n}"
        buf[(n * 7919) % size] = n & 255
        assert b == in_data[n - 1]
        assert digest == hashlib.sha256(buf).hexdigest()[:16], f"step {n}: memory hash differs"
        n_expected += 1
    return {"last": n_expected - 1, "usr1": usr1}


def python_exe() -> str:
    # The guest's own python3 is what the engine targets; any CPython 3 does.
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def tree_digest(path: str) -> Dict[str, str]:
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def proc_facts(pid: int) -> dict:
    """What must be identical after a restore, read from /proc."""
    def read(name):
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    status = dict(line.split(":", 1) for line in read("status").decode().splitlines() if ":" in line)
    stat = read("stat").decode().rsplit(")", 1)[1].split()
    return {
        "maps": read("maps").decode(),
        "status": {k: status[k].strip() for k in ("SigBlk", "SigIgn", "SigCgt", "Umask", "Uid", "Gid", "Name")},
        "limits": read("limits").decode(),
        "cwd": os.readlink(f"/proc/{pid}/cwd"),
        "exe": os.readlink(f"/proc/{pid}/exe"),
        "auxv": read("auxv"),
        "cmdline": read("cmdline"),
        "environ": read("environ"),
        # start_code .. env_end (stat fields 26-28, 45-51), session, pgrp
        "mm": [stat[i - 3] for i in (26, 27, 28, 45, 46, 47, 48, 49, 50, 51)],
        "session": (stat[5 - 3], stat[6 - 3]),
        "fds": {fd: _fdflags(pid, fd) for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int)},
    }


def _fdflags(pid: int, fd: str) -> str:
    """fdinfo flags (access mode, O_APPEND, O_CLOEXEC ...) and the target."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        flags = [line.split()[1] for line in f if line.startswith("flags:")][0]
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    if link.startswith("pipe:["):
        link = "pipe:[*]"   # a restored pipe is a new pipe: same ends, new inode
    return f"{flags} {link}"


# -- pytest fixtures (imported by the test_engine_core_* modules) --------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def counter_bin(tmp_path_factory) -> str:
    return compile_counter(str(tmp_path_factory.mktemp("engine-core-bin")))


@pytest.fixture
def procs(monkeypatch):
    """Processes started or restored by the test, killed and reaped at the
    end. Also: every dump made during the test that kills its target has
    its restore rehearsed on the unchanged machine (tests/restorable.py)."""
    import engine.dump
    from restorable import WatchedWriter
    monkeypatch.setattr(engine.dump, "ImageWriter", WatchedWriter)
    become_subreaper()
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def world(tmp_path):
    """An input file of random bytes and a path for the target's output."""
    data = os.urandom(1 << 16)
    inp = tmp_path / "in.bin"
    inp.write_bytes(data)
    return {"dir": tmp_path, "in": str(inp), "in_data": data, "out": str(tmp_path / "out.txt")}


def start_counter(procs: Procs, counter_bin: str, world: dict, mode: str = "sleep", lines: int = 5,
                  umask: Optional[int] = None) -> subprocess.Popen:
    p = procs.start([counter_bin, world["out"], world["in"], "4", mode], cwd=str(world["dir"]), umask=umask)
    wait_for(lambda: count_lines(world["out"]) >= lines, what=f"{lines} lines from the counter")
    return p


def ptrace_facts(pid: int) -> dict:
    """State only ptrace shows: the rseq registration and the signal mask
    (briefly seizes the process, then lets it go)."""
    from engine import ptrace
    from engine.task import Task
    t = Task.seize(pid)
    try:
        # While frozen every signal is blocked (engine/signals.py); the
        # process's own mask is what the freeze saved.
        return {"rseq": ptrace.get_rseq(pid), "sigmask": t.sigmask}
    finally:
        t.release()


def shmem_inode_masked(maps: str) -> str:
    """A restored MAP_SHARED anonymous region is a new shmem object: same
    range, perms and name, another inode number."""
    out = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/dev/zero (deleted)"):
            parts[4] = "*"
        out.append(" ".join(parts))
    return "\n".join(out)


def in_child(fn) -> str:
    """fn() in a forked child (what only the restorer's process may do to
    itself: pinning, entering a time namespace); repr of its return value,
    or the exception's text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = repr(fn())
        except BaseException as e:     # noqa: BLE001 - reported to the test
            out = f"error {e!r}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    got = b""
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        got += b
    os.close(r)
    os.waitpid(pid, 0)
    return got.decode()
