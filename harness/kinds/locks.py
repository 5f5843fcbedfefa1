"""``lock``: a file opened by name (read-write) holding a file lock:
``{fd: 3, lock: flock|posix|ofd|lease, path: data, mode: read|write, start, len}``
(``len`` 0: to the end of the file; flock locks the whole file). A
``lease`` is taken with F_SETLEASE on an open for reading (a read lease)
or for reading and writing (a write lease), with F_SETSIG SIGURG (ignored
by default: a lease break must not kill the workload); ``outside: lock``
makes another process hold a read lease too, ``outside: break`` makes one
open the file (O_NONBLOCK: turned away) so that the lease is being broken
at the dump - refusals. The lease checker reads it back (fdinfo,
F_GETLEASE, its owner must be the process, F_GETSIG) and, in the mutate
phase, has a child open the file: the lease must turn it away.
``outside: lock`` makes a process outside the dump hold another lock on
the same file (a shared lock on a range that does not conflict), ``outside:
wait`` one that waits for this lock: both are refusals (``file-lock``).

The checker (inspect) reads the lock back from /proc/self/fdinfo and asks
a fresh child process whether the range is taken, and by whom: a POSIX
lock must be this process's own (F_GETLK names its pid), flock and OFD
locks must block the child's conflicting attempt.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import Callable, List

from . import outside
from .core import Ctx, Opened, check

KIND = "lock"
TAGS = ("locks",)
REQUIRED = ("fd", "lock", "path")
F_OFD_GETLK, F_OFD_SETLK = 36, 37


def fields(s) -> dict:
    return {"lock": s.Enum(("flock", "posix", "ofd", "lease")), "path": s.Path(), "mode": s.Enum(("read", "write")),
            "start": s.Int(0), "len": s.Int(0), "outside": s.Enum(("lock", "wait", "break"))}


F_SETLEASE, F_GETLEASE, F_SETSIG, F_GETSIG = 1024, 1025, 10, 11
LEASE_SIGNAL = 23      # SIGURG


def validate(e: dict, fds: dict) -> List[tuple]:
    if e["lock"] == "lease":
        if "start" in e or "len" in e:
            return [("start", "a lease covers the whole file: no start/len")]
        if e.get("outside") == "wait" or (e.get("outside") == "lock" and e.get("mode", "write") != "read"):
            return [("outside", "another holder of a lease holds a read lease beside a read lease; "
                     "a lease has no waiters (outside: break)")]
    elif e.get("outside") == "break":
        return [("outside", "only a lease is broken")]
    if e["lock"] == "flock" and ("start" in e or "len" in e):
        return [("start", "flock locks the whole file: no start/len")]
    if e.get("outside") == "wait" and (e["lock"] == "posix" or e.get("mode", "write") != "write"):
        return [("outside", "a waiter needs a flock or OFD write lock to wait for")]
    return []


def _struct(typ: int, start: int, length: int) -> bytes:
    return struct.pack("=hh4xqqi4x", typ, os.SEEK_SET, start, length, 0)


def _rw(e: dict) -> int:
    return fcntl.F_WRLCK if e.get("mode", "write") == "write" else fcntl.F_RDLCK


def _take(fd: int, e: dict, wait: bool = False) -> None:
    kind = e["lock"]
    start, length = int(e.get("start", 0)), int(e.get("len", 0))
    if kind == "flock":
        op = fcntl.LOCK_EX if e.get("mode", "write") == "write" else fcntl.LOCK_SH
        fcntl.flock(fd, op if wait else op | fcntl.LOCK_NB)
    elif kind == "posix":
        fcntl.fcntl(fd, fcntl.F_SETLKW if wait else fcntl.F_SETLK, _struct(_rw(e), start, length))
    else:
        fcntl.fcntl(fd, 38 if wait else F_OFD_SETLK, _struct(_rw(e), start, length))   # F_OFD_SETLKW


def _lease_flags(e: dict) -> int:
    return os.O_RDWR if e.get("mode", "write") == "write" else os.O_RDONLY


def _in_child(answer: Callable[[], str]) -> str:
    """answer() run in a fresh child (a process of its own: its locks and
    opens are not the workload's) and what it returned."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            os.write(w, answer().encode())
        finally:
            os._exit(0)
    os.close(w)
    ans = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(child, 0)
    return ans


def _break_open(path: str, e: dict) -> str:
    """From a fresh child: open `path` the way that breaks the entry's lease,
    without waiting: 'turned away' (EWOULDBLOCK) or 'opened'."""
    def answer() -> str:
        flags = os.O_RDONLY if e.get("mode", "write") == "write" else os.O_WRONLY
        try:
            os.close(os.open(path, flags | os.O_NONBLOCK))
            return "opened"
        except BlockingIOError:
            return "turned away"
    return _in_child(answer)


def _outsider(path: str, e: dict) -> int:
    """A process outside the workload's tree holding a lock on `path` that
    does not conflict, or waiting for this one."""
    def lock(ready):
        if e["lock"] == "lease":
            fd = os.open(path, os.O_RDONLY)
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)       # a second read lease
            ready()
            return
        fd = os.open(path, os.O_RDWR)
        if e.get("outside") == "lock":
            if e["lock"] == "flock":
                fcntl.flock(fd, fcntl.LOCK_SH)        # the entry's flock must be shared too
            else:
                # a read lock beyond the entry's range: no conflict
                far = int(e.get("start", 0)) + max(int(e.get("len", 0)), 1) + (1 << 20)
                fcntl.fcntl(fd, fcntl.F_SETLK, _struct(fcntl.F_RDLCK, far, 1))
            ready()
            return
        ready()
        _take(fd, e, wait=True)                   # blocks: the workload holds it
    pid = outside.spawn(lock)
    if e.get("outside") == "wait":
        # wait until the kernel lists the waiter, so the dump sees it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open("/proc/locks") as f:
                if " -> " in f.read():
                    break
            time.sleep(0.01)
    return pid


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    path = os.path.join(ctx.workdir, e["path"])
    if e["lock"] == "lease":
        fd = os.open(path, _lease_flags(e))
        fcntl.fcntl(fd, F_SETLEASE, _rw(e))
        fcntl.fcntl(fd, F_SETSIG, LEASE_SIGNAL)
        if e.get("outside") == "lock":
            ctx.helpers.append(_outsider(path, e))
        elif e.get("outside") == "break":
            _break_open(path, e)        # the lease is being broken from now on
        return [Opened(fd, int(e["fd"]), "lock")]
    fd = os.open(path, os.O_RDWR)
    if e["lock"] != "posix":
        _take(fd, e)           # flock and OFD locks belong to the open file: they move with it
    if e.get("outside"):
        ctx.helpers.append(_outsider(path, e))
    return [Opened(fd, int(e["fd"]), "lock")]


def finish(e: dict, fd: int) -> None:
    # A POSIX lock is taken once the fd is at its number: closing the
    # temporary fd would drop it (they die with any close of the file).
    if e["lock"] == "posix":
        _take(fd, e)


def extras(rec: dict) -> None:
    rec["extra"]["locks"] = _lines(rec["fd"])


def _lines(fd: int) -> List[str]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return [" ".join(x.split()[2:5] + x.split()[7:]) for x in f.read().splitlines() if x.startswith("lock:")]


def _probe(path: str, e: dict) -> str:
    """From a fresh child: 'free', 'blocked', or 'pid N' (F_GETLK's holder)."""
    def answer() -> str:
        fd = os.open(path, os.O_RDWR)
        start, length = int(e.get("start", 0)), int(e.get("len", 0))
        if e["lock"] == "posix":
            got = fcntl.fcntl(fd, fcntl.F_GETLK, _struct(fcntl.F_WRLCK, start, length))
            typ, = struct.unpack_from("=h", got)
            pid, = struct.unpack_from("=i", got, 24)
            return "free" if typ == fcntl.F_UNLCK else f"pid {pid}"
        try:
            if e["lock"] == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.fcntl(fd, F_OFD_SETLK, _struct(fcntl.F_WRLCK, start, length))
            return "free"
        except OSError:
            return "blocked"
    return _in_child(answer)


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    rec = recs[0]
    fd = rec["fd"]
    out = []
    if e["lock"] == "lease":
        path = os.path.join(ctx.workdir, e["path"])
        breaking = e.get("outside") == "break"
        if phase == "inspect":
            if not breaking:     # a break ends by itself after lease-break-time (45 s): the line goes
                out.append(check(fd, "the lease, as fdinfo shows it", rec["extra"].get("locks"), _lines(fd)))
            # being broken (or broken), a lease reads as what it is to become: F_UNLCK
            want = fcntl.F_UNLCK if breaking else _rw(e)
            out.append(check(fd, "F_GETLEASE, owner (F_GETOWN), F_GETSIG", [want, os.getpid(), LEASE_SIGNAL],
                             [fcntl.fcntl(fd, F_GETLEASE), fcntl.fcntl(fd, fcntl.F_GETOWN),
                              fcntl.fcntl(fd, F_GETSIG)]))
        elif phase == "mutate" and not breaking:
            out.append(check(fd, "the lease turns away an open that would break it", "turned away",
                             _break_open(path, e)))
        return out
    if phase == "inspect":
        out.append(check(fd, "the lock, as fdinfo shows it", rec["extra"].get("locks"), _lines(fd)))
        want = f"pid {os.getpid()}" if e["lock"] == "posix" else "blocked"
        out.append(check(fd, "another process finds the range taken", want,
                         _probe(os.path.join(ctx.workdir, e["path"]), e)))
    return out
