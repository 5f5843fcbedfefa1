"""``epoll``: an epoll instance with registrations; each carries its own
``data`` (by default a distinctive value built from the epoll fd, the
target's index and fd, never just the fd number) so an engine that swaps two
registrations' data is caught. The checker compares every registration
(tfd, events, data) from fdinfo and the ready list (data, events) from
epoll_wait with what the process saw before the dump, and with the data the
scenario asked for."""

from __future__ import annotations

import os
import select

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import EPOLL_EVENTS, Ctx, Opened, check

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

KIND = "epoll"
TAGS = ("epoll",)
OPEN_ORDER = 2     # after every target (and dup): a registration is keyed by the target's fd number
CHECK_ORDER = -1   # readiness is read before any other checker consumes or writes


def fields(s) -> dict:
    return {"epoll": s.Map({"targets": s.List_(s.Map({
        "fd": s.FdNum(), "events": s.List_(s.Enum(tuple(EPOLL_EVENTS))), "data": s.Int(0, 2**64 - 1)},
        required=("fd",)))}, required=("targets",))}


def validate(e: dict, fds: dict) -> List[tuple]:
    return [("epoll", f"target fd {t['fd']} is not opened by the workload")
            for t in e["epoll"]["targets"] if t["fd"] not in fds]


def data_of(e: dict, i: int) -> int:
    t = e["epoll"]["targets"][i]
    if "data" in t:
        return int(t["data"])
    return (0xC0DE << 48) | (int(e["fd"]) << 32) | (i << 16) | int(t["fd"])


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    ep = select.epoll()
    # select.epoll has no detach(): keep a dup and close the object's own fd
    fd = os.dup(ep.fileno())
    ep.close()
    for i, t in enumerate(e["epoll"]["targets"]):
        sysapi.epoll_ctl_add(fd, int(t["fd"]), sysapi.names_to_mask(t.get("events", ["EPOLLIN"]), EPOLL_EVENTS),
                             data_of(e, i))
    return [Opened(fd, int(e["fd"]), "epoll")]


def epoll_fdinfo(fd: int) -> List[list]:
    """``[tfd, events, data]`` per registration (proc(5): ``tfd: %8d events: %8x data: %16llx``)."""
    out = []
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("tfd:"):
                parts = line.split()
                out.append([int(parts[1]), int(parts[3], 16), int(parts[5], 16)])
    return sorted(out)


def epoll_ready(fd: int) -> List[list]:
    return sorted([data, events] for data, events in sysapi.epoll_wait_now(fd))


def extras(rec: dict) -> None:
    rec["extra"]["targets"] = epoll_fdinfo(rec["fd"])
    rec["extra"]["ready"] = epoll_ready(rec["fd"])


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    rec = recs[0]
    fd = rec["fd"]
    if phase != "inspect":
        return []
    asked = sorted([int(t["fd"]), data_of(e, i)] for i, t in enumerate(e["epoll"]["targets"]))
    return [check(fd, "epoll registrations (tfd, events, data)", rec["extra"]["targets"], epoll_fdinfo(fd)),
            check(fd, "epoll data per target, as registered", asked,
                  sorted([tfd, data] for tfd, _ev, data in epoll_fdinfo(fd))),
            check(fd, "epoll readiness (data, events)", rec["extra"]["ready"], epoll_ready(fd))]
