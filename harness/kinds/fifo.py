"""``fifo``: one end of a named fifo (r, w or rw), optionally with bytes
buffered in it. The checker drains the buffer without blocking and compares
it with the workload's own data followed by what before_dump steps wrote,
then proves the ends are still one fifo by sending a marker through."""

from __future__ import annotations

import os

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import MARKER, Ctx, Opened, bytes_check, check, drain

try:
    from .. import seeded
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import seeded  # type: ignore[no-redef]

KIND = "fifo"
TAGS = ("fifo",)


def fields(s) -> dict:
    return {"fifo": s.Path(), "end": s.Enum(("r", "w", "rw")), "nonblock": s.Bool(), "data": s.Data()}


def fifo_expected(path: str, ctx: Ctx, own: List[dict]) -> bytes:
    """What a fifo's buffer must hold: the data of each of the workload's
    entries on it (in the order they were opened, which is list order: one
    kind, one OPEN_ORDER), then what before_dump steps wrote into it."""
    out = b""
    for d in own:
        out += seeded.data(int(d.get("seed", 0)), 0, int(d["bytes"]))
    for seed, n in ctx.model.fifo_data(path):
        out += seeded.data(seed, 0, n)
    return out


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    end = e.get("end", "r")
    extra_flags = os.O_NONBLOCK if e.get("nonblock") else 0
    # Opening one end of a fifo blocks until the other end is open (fifo(7));
    # a temporary O_RDWR fd (never blocks on Linux) stands in for the peer.
    keep = os.open(e["fifo"], os.O_RDWR | os.O_NONBLOCK)
    try:
        fd = os.open(e["fifo"], {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[end] | extra_flags)
        if e.get("data"):
            os.write(keep, seeded.data(int(e["data"].get("seed", 0)), 0, int(e["data"]["bytes"])))
    finally:
        os.close(keep)
    return [Opened(fd, int(e["fd"]), "fifo-" + end)]


def _fifo_group(e: dict, all_entries: List[dict]) -> dict:
    """The fifo's other entries in the workload (one fifo, several fds)."""
    return {x.get("end", "r"): x for x in all_entries if x.get("fifo") == e["fifo"]}


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    end = e.get("end", "r")
    group = _fifo_group(e, ctx.entries)
    # every end's data went into the one buffer (found by the generator:
    # gen-s2026-0006, data on both the read and the write end)
    expected = fifo_expected(e["fifo"], ctx, [x["data"] for x in ctx.entries
                                              if x.get("fifo") == e["fifo"] and x.get("data")])
    reader = group.get("r") or group.get("rw")
    out = []
    if phase == "consume" and reader is e:
        out.append(bytes_check(fd, "fifo buffered bytes, in order, nothing more", expected, drain(fd)))
    elif phase == "consume" and reader is None and (group.get("w") is e):
        # only the write end is ours: read the buffer through a new read end
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
        try:
            out.append(bytes_check(fd, "fifo buffered bytes, in order, nothing more", expected, drain(rfd)))
        finally:
            os.close(rfd)
    elif phase == "mutate" and end in ("w", "rw") and reader is not None:
        os.write(fd, MARKER)
        rfd = ctx.fd_of(reader)
        out.append(check(fd, "write reaches our read end", MARKER.decode(),
                         drain(rfd).decode(errors="replace")))
    return out
