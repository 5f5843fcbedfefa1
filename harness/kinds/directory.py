"""``dir``: a directory fd (O_DIRECTORY), checked to be the directory its
path names."""

from __future__ import annotations

import os

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import Ctx, Opened, check

KIND = "dir"
TAGS = ("dir",)


def fields(s) -> dict:
    return {"dir": s.Path()}


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    return [Opened(os.open(e["dir"], os.O_RDONLY | os.O_DIRECTORY), int(e["fd"]), "dir")]


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    if phase != "inspect" or ctx.model.lookup(e["dir"]) is None:
        return []
    return [check(fd, "same directory as its path", os.stat(e["dir"]).st_ino, os.fstat(fd).st_ino)]
