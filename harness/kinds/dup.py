"""``dup``: a second fd on the open file description of another fd of the
workload (``{fd: 5, dup: 3}``: dup(2)), so the two share one offset and one
set of status flags. The checker proves the sharing: it moves one's offset
and reads the other's (both ways), and toggles O_NONBLOCK through one and
reads it through the other; then puts everything back."""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import Ctx, Opened, check

KIND = "dup"
TAGS = ("files",)
OPEN_ORDER = 1     # after the fd it duplicates sits at its number
SEEKABLE = ("open", "memfd")


def fields(s) -> dict:
    return {"dup": s.FdNum()}


def validate(e: dict, fds: dict) -> List[tuple]:
    target = fds.get(e["dup"])
    if target is None:
        return [("dup", f"fd {e['dup']} is not opened by the workload")]
    if not any(k in target for k in SEEKABLE):
        return [("dup", f"fd {e['dup']} is not one of {', '.join(SEEKABLE)} (sharing is proved by its offset)")]
    return []


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    return [Opened(os.dup(int(e["dup"])), int(e["fd"]), "dup")]


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    if phase != "inspect":
        return []
    a, b = int(e["dup"]), recs[0]["fd"]
    pa = os.lseek(a, 0, os.SEEK_CUR)
    out = [check(b, f"same offset as fd {a}", pa, os.lseek(b, 0, os.SEEK_CUR))]
    try:
        os.lseek(a, pa + 4097, os.SEEK_SET)
        out.append(check(b, f"offset moves when fd {a} seeks", pa + 4097, os.lseek(b, 0, os.SEEK_CUR)))
        os.lseek(b, pa + 1, os.SEEK_SET)
        out.append(check(a, f"offset moves when fd {b} seeks", pa + 1, os.lseek(a, 0, os.SEEK_CUR)))
        fl = fcntl.fcntl(a, fcntl.F_GETFL)
        fcntl.fcntl(a, fcntl.F_SETFL, fl ^ os.O_NONBLOCK)
        try:
            out.append(check(b, f"status flags change with fd {a}'s", oct(fl ^ os.O_NONBLOCK),
                             oct(fcntl.fcntl(b, fcntl.F_GETFL))))
        finally:
            fcntl.fcntl(a, fcntl.F_SETFL, fl)
    finally:
        os.lseek(a, pa, os.SEEK_SET)
    return out
