"""``eventfd``: a counter (initval + add), optionally EFD_SEMAPHORE; the
checker compares fdinfo's eventfd-count and what read(2) returns."""

from __future__ import annotations

import os
import struct

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import FD_FLAGS, Ctx, Opened, check, fdinfo, flag_bits, wait_readable

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

KIND = "eventfd"
TAGS = ("eventfd",)


def fields(s) -> dict:
    return {"eventfd": s.Map({"initval": s.Int(0, 2**32 - 1), "add": s.Int(0, 2**62),
                              "flags": s.List_(s.Enum(("EFD_SEMAPHORE", "EFD_NONBLOCK", "EFD_CLOEXEC")))})}


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["eventfd"]
    flags = flag_bits([f for f in spec.get("flags", []) if f != "EFD_SEMAPHORE"], FD_FLAGS)
    if "EFD_SEMAPHORE" in spec.get("flags", []):
        flags |= sysapi.EFD_SEMAPHORE
    fd = sysapi.eventfd(int(spec.get("initval", 0)), flags)
    if spec.get("add"):
        os.write(fd, struct.pack("Q", int(spec["add"])))
    return [Opened(fd, int(e["fd"]), "eventfd")]


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd, spec = recs[0]["fd"], e["eventfd"]
    count = int(spec.get("initval", 0)) + int(spec.get("add", 0))
    if phase == "inspect":
        return [check(fd, "eventfd-count", count, int(fdinfo(fd).get("eventfd-count", "-1"), 16))]
    if phase == "consume" and count:
        semaphore = "EFD_SEMAPHORE" in spec.get("flags", [])
        # never block: a restored counter of 0 would hang a blocking read
        got = struct.unpack("Q", os.read(fd, 8))[0] if wait_readable(fd, 0) else "not readable"
        return [check(fd, "read() value", 1 if semaphore else count, got)]
    return []
