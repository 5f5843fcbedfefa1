"""``pipe``: an anonymous pipe, one or both ends (an end the scenario does
not name is held by a process outside the dump), optionally with bytes
buffered. The checker drains the buffer without blocking, compares, and
sends a marker through."""

from __future__ import annotations

import os

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from . import outside
from .core import MARKER, Ctx, Opened, bytes_check, check, drain, seeded_bytes

KIND = "pipe"
TAGS = ("pipe",)
REQUIRED = ("pipe",)


def fields(s) -> dict:
    fdnum = s.FdNum()
    return {"pipe": s.Map({"read": fdnum, "write": fdnum}), "data": s.Data()}


def fd_numbers(e: dict) -> List[int]:
    return [e["pipe"][r] for r in ("read", "write") if r in e["pipe"]]


def validate(e: dict, fds: dict) -> List[tuple]:
    return [("pipe", "name at least one end (read / write)")] if not e["pipe"] else []


def _spawn_holder(keep: int) -> int:
    """A process outside the workload's tree holding ``keep`` and nothing else."""
    def hold(ready):
        ready()
    return outside.spawn(hold, keep=keep)


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    r, w = os.pipe()
    if e.get("data"):
        os.write(w, seeded_bytes(e["data"]))
    ends = e["pipe"]
    out = []
    for role, fd in (("read", r), ("write", w)):
        if role in ends:
            out.append(Opened(fd, int(ends[role]), "pipe-" + role))
        else:
            ctx.helpers.append(_spawn_holder(fd))
            os.close(fd)
    return out


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    by_role = {r["role"]: r["fd"] for r in recs}
    rfd, wfd = by_role.get("pipe-read"), by_role.get("pipe-write")
    expected = seeded_bytes(e.get("data"))
    out = []
    if phase == "inspect" and rfd is not None and wfd is not None:
        out.append(check(rfd, "both ends are one pipe", os.fstat(rfd).st_ino, os.fstat(wfd).st_ino))
    elif phase == "consume" and rfd is not None:
        out.append(bytes_check(rfd, "pipe buffered bytes, in order, nothing more", expected, drain(rfd)))
    elif phase == "mutate" and wfd is not None:
        n = os.write(wfd, MARKER)
        if rfd is not None:
            out.append(check(wfd, "write reaches our read end", MARKER.decode(), drain(rfd).decode(errors="replace")))
        else:
            out.append(check(wfd, "write accepted", len(MARKER), n))
    return out
