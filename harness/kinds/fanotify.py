"""``fanotify``: a notification-class fanotify group with one mark; opening
the marked file must still report FAN_OPEN after restore."""

from __future__ import annotations

import os
import struct

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import Ctx, Opened, check, wait_readable

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

KIND = "fanotify"
TAGS = ("fanotify",)


def fields(s) -> dict:
    return {"fanotify": s.Map({"mark": s.Path(), "mask": s.List_(s.Enum(("FAN_ACCESS", "FAN_MODIFY", "FAN_OPEN",
                                                                        "FAN_CLOSE_WRITE", "FAN_CLOSE_NOWRITE")))},
                              required=("mark",))}


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["fanotify"]
    fd = sysapi.fanotify_init(sysapi.FAN_CLASS_NOTIF | sysapi.FAN_NONBLOCK, os.O_RDONLY)
    sysapi.fanotify_mark(fd, sysapi.FAN_MARK_ADD, sysapi.names_to_mask(spec.get("mask", ["FAN_OPEN"]),
                                                                        sysapi.FAN_FLAGS), spec["mark"])
    return [Opened(fd, int(e["fd"]), "fanotify")]


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    if phase != "mutate":
        return []
    os.close(os.open(e["fanotify"]["mark"], os.O_RDONLY))
    got = []
    if wait_readable(fd, 2):
        buf = os.read(fd, 4096)
        off = 0
        while off + 24 <= len(buf):   # struct fanotify_event_metadata (fanotify(7))
            ln, _v, _r, _ml, mask, efd, pid = struct.unpack_from("IBBHQii", buf, off)
            got.append(mask)
            if efd >= 0:
                os.close(efd)
            off += ln or 24
    return [check(fd, "FAN_OPEN event", True, any(m & sysapi.FAN_FLAGS["FAN_OPEN"] for m in got))]
