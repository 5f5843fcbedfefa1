"""``memfd``: an anonymous memory file (memfd_create(2)) with seeded
content, an offset, and optionally seals (F_ADD_SEALS).

The checker compares the name /proc shows (``/memfd:NAME (deleted)``), the
content, the offset and the seals (F_GET_SEALS: a memfd created without
MFD_ALLOW_SEALING reports F_SEAL_SEAL, memfd_create(2)).
"""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import SAMPLE, Ctx, Opened, bytes_check, check

try:
    from .. import seeded, sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import seeded  # type: ignore[no-redef]
    import sysapi  # type: ignore[no-redef]

KIND = "memfd"
TAGS = ("memfd",)


def fields(s) -> dict:
    return {"memfd": s.Str(), "bytes": s.Size(), "seed": s.Int(0), "seek": s.Size(),
            "seals": s.List_(s.Enum(tuple(sysapi.SEALS)))}


def expected_seals(e: dict) -> int:
    if "seals" not in e:
        return sysapi.SEALS["F_SEAL_SEAL"]      # not sealable at all
    return sysapi.names_to_mask(e["seals"], sysapi.SEALS)


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    sealing = "seals" in e
    fd = os.memfd_create(e["memfd"], sysapi.MFD_ALLOW_SEALING if sealing else 0)
    c = seeded.Content.seeded(int(e["bytes"]), int(e.get("seed", 0)))
    for seg in c.segments:
        os.write(fd, seg.read(0, seg.length))
    os.lseek(fd, int(e.get("seek", 0)), os.SEEK_SET)
    if sealing and e["seals"]:
        fcntl.fcntl(fd, sysapi.F_ADD_SEALS, expected_seals(e))
    return [Opened(fd, int(e["fd"]), "memfd", {"mode": oct(os.fstat(fd).st_mode & 0o7777)})]


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    c = seeded.Content.seeded(int(e["bytes"]), int(e.get("seed", 0)))
    if phase == "inspect":
        return [check(fd, "link", f"/memfd:{e['memfd']} (deleted)", os.readlink(f"/proc/self/fd/{fd}")),
                check(fd, "mode", recs[0]["extra"].get("mode"), oct(os.fstat(fd).st_mode & 0o7777)),
                check(fd, "seals (F_GET_SEALS)", hex(expected_seals(e)), hex(fcntl.fcntl(fd, sysapi.F_GET_SEALS))),
                bytes_check(fd, "content", c.read(0, c.size), os.pread(fd, c.size + 1, 0))]
    if phase == "consume":
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        return [bytes_check(fd, "read at offset", c.read(pos, SAMPLE), os.read(fd, SAMPLE), pos)]
    return []
