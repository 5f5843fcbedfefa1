"""What every fd kind of the workload shares: the records, the check
helpers, and the flag tables (the kind modules import only this, seeded and
sysapi).

Runs in the guest (stdlib only, Python >= 3.9). A kind's opener returns
:class:`Opened` fds at temporary numbers (the workload moves them to the
numbers the scenario gives); its checker returns check dicts
``{fd, what, expected, got, ok}`` built with :func:`check` /
:func:`bytes_check`. Checkers never block: a restored fd that is empty
when it must hold data is a failed check, not a hung workload.
"""

from __future__ import annotations

import os
import select

TYPE_CHECKING = False   # annotations only: the exec'd workload imports this module at every start
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

try:
    from .. import records, seeded
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import records  # type: ignore[no-redef]
    import seeded  # type: ignore[no-redef]

MODES = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR,
         "a": os.O_WRONLY | os.O_APPEND, "a+": os.O_RDWR | os.O_APPEND}


OPEN_FLAGS = {"O_APPEND": os.O_APPEND, "O_NONBLOCK": os.O_NONBLOCK, "O_SYNC": os.O_SYNC,
              "O_DSYNC": os.O_DSYNC, "O_NOATIME": os.O_NOATIME}


FD_FLAGS = {"NONBLOCK": os.O_NONBLOCK, "CLOEXEC": os.O_CLOEXEC}   # *_NONBLOCK / *_CLOEXEC


EPOLL_EVENTS = {"EPOLLIN": select.EPOLLIN, "EPOLLOUT": select.EPOLLOUT,
                "EPOLLPRI": select.EPOLLPRI, "EPOLLET": select.EPOLLET,
                "EPOLLRDHUP": select.EPOLLRDHUP}


SAMPLE = 4096


FULL_COMPARE_MAX = 1 << 20


MARKER = b"crucible-marker\n"


class Opened(records.Record):
    """One fd made by an opener: where it is now and where it must go."""

    FIELDS = ("tmp", "target", "role", "extra")

    def __init__(self, tmp: int, target: int, role: str = "fd", extra: Optional[Dict[str, Any]] = None):
        self.tmp = tmp
        self.target = target
        self.role = role
        self.extra = {} if extra is None else extra


class Ctx(records.Record):
    FIELDS = ("workdir", "model", "entries", "recs", "helpers", "sigio")

    def __init__(self, workdir: str, model: Any, entries: Optional[List[dict]] = None,
                 recs: Optional[List[dict]] = None, helpers: Optional[List[int]] = None,
                 sigio: Optional[List[int]] = None):
        self.workdir = workdir
        self.model = model      # world.Model: after setup at open time, after before_dump at check time
        self.entries = [] if entries is None else entries   # the scenario's fd entries
        self.recs = [] if recs is None else recs            # what was opened, as in the ready file
        self.helpers = [] if helpers is None else helpers   # PIDs of outside peers
        self.sigio = [0] if sigio is None else sigio

    def fd_of(self, entry: dict) -> int:
        """The (first) fd number opened for ``entry``."""
        idx = self.entries.index(entry)
        return next(r["fd"] for r in self.recs if r["entry"] == idx)

    def rec_of_fd(self, fd: int) -> Optional[dict]:
        """The record of the fd the workload holds at number ``fd``."""
        return next((r for r in self.recs if r["fd"] == fd), None)


def check(fd: Optional[int], what: str, expected: Any, got: Any) -> Dict[str, Any]:
    return {"fd": fd, "what": what, "expected": expected, "got": got, "ok": expected == got}


def within(fd: Optional[int], what: str, lo: float, hi: float, got: Any) -> Dict[str, Any]:
    """A check that ``lo <= got <= hi`` (for values that move with time)."""
    ok = isinstance(got, (int, float)) and lo <= got <= hi
    return {"fd": fd, "what": what, "expected": f"in [{lo:g}, {hi:g}]", "got": got, "ok": ok}


def seeded_bytes(spec: Optional[dict]) -> bytes:
    """The bytes a ``data: {bytes, seed}`` field stands for (b"" for none)."""
    if not spec:
        return b""
    return seeded.data(int(spec.get("seed", 0)), 0, int(spec["bytes"]))


def flag_bits(names, table: Dict[str, int]) -> int:
    """OR of ``names``; ``IN_NONBLOCK`` / ``EFD_CLOEXEC``... match ``NONBLOCK`` / ``CLOEXEC``."""
    bits = 0
    for n in names or ():
        bits |= table[n if n in table else n.split("_", 1)[1]]
    return bits


def drain(fd: int, limit: int = 1 << 22) -> bytes:
    """Everything readable now, without blocking even on a blocking fd
    (poll(2) with a zero timeout before each read)."""
    out = b""
    p = select.poll()
    p.register(fd, select.POLLIN)
    while len(out) < limit and p.poll(0):
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        out += chunk
    return out


def wait_readable(fd: int, seconds: float) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(int(seconds * 1000)))


def describe_diff(expected: bytes, got: bytes, base: int = 0) -> str:
    """Where two byte strings first differ, for a person to read."""
    if expected == got:
        return "same"
    n = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return (f"{len(got)} bytes vs {len(expected)} expected; first difference at offset "
            f"{base + n}: got {got[n:n + 8].hex() or 'EOF'} expected {expected[n:n + 8].hex() or 'EOF'}")


def bytes_check(fd: Optional[int], what: str, expected: bytes, got: bytes, base: int = 0) -> Dict[str, Any]:
    ok = expected == got
    return {"fd": fd, "what": what, "ok": ok,
            "expected": f"{len(expected)} seeded bytes", "got": "same" if ok else describe_diff(expected, got, base)}


def fdinfo(fd: int) -> Dict[str, str]:
    out: Dict[str, str] = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            out.setdefault(k.strip(), v.strip())
    return out
