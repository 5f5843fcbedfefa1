"""``device``: a character device (/dev/null, /dev/zero, ...): same device
number, and /dev/zero still reads zeros."""

from __future__ import annotations

import os

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import MODES, Ctx, Opened, check

KIND = "device"
TAGS = ("device",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/full")


def fields(s) -> dict:
    return {"device": s.Enum(DEVICES), "mode": s.Enum(("r", "w", "rw"))}


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    return [Opened(os.open(e["device"], MODES[e.get("mode", "r")]), int(e["fd"]), "device",
                   {"rdev": os.stat(e["device"]).st_rdev})]


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    rec = recs[0]
    fd = rec["fd"]
    if phase == "inspect":
        return [check(fd, "device number", rec["extra"]["rdev"], os.fstat(fd).st_rdev)]
    if phase == "consume" and e["device"] == "/dev/zero" and rec["obs"]["flags"] & os.O_ACCMODE != os.O_WRONLY:
        return [check(fd, "reads zeros", "0" * 32, os.read(fd, 16).hex())]
    return []
