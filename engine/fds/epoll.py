"""epoll: its registrations come from fdinfo, one line per target
(fs/eventpoll.c ep_show_fdinfo: "tfd: %8d events: %8x data: %16llx ..."),
and are re-added in finish(), once every fd of the new process is in
place, by injecting epoll_ctl(EPOLL_CTL_ADD) with the same fd numbers,
events (EPOLLET/ONESHOT/EXCLUSIVE/WAKEUP included) and data.

Exactness checks at dump:
* an epoll entry is keyed by (file, fd number). The file registered under
  tfd must be the file the process holds at tfd now (kcmp KCMP_EPOLL_TFD):
  after close(tfd) the registration lives on as long as the file does, and
  cannot be re-added by number -> refused;
* a fired EPOLLONESHOT entry keeps only its flag bits (ep_send_events) and
  re-adding it would re-arm EPOLLERR|EPOLLHUP (do_epoll_ctl) -> refused;
* an edge-triggered entry whose target is ready now may or may not have had
  its edge reported already (the ready list is not visible); re-adding
  would report it (again) -> refused; a target not ready is exact.
After finish() the new process's fdinfo is read back and compared, so a
silently dropped flag (EPOLLWAKEUP without CAP_BLOCK_SUSPEND) fails loudly.
"""

from __future__ import annotations

import os
import re
import select
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List

from .. import pidfd
from ..errors import EngineError
from . import _sys
from ._util import check_async, check_held_outside, failed, refuse, refuse_rec

KIND = "epoll"
REASONS = ("unsupported-fd", "unsupported-state", "image-invalid")

EPOLL_CTL_ADD = 1
EPOLLEXCLUSIVE = 1 << 28
EPOLLWAKEUP = 1 << 29
EPOLLONESHOT = 1 << 30
EPOLLET = 1 << 31
_PRIVATE = EPOLLEXCLUSIVE | EPOLLWAKEUP | EPOLLONESHOT | EPOLLET

_LINE = re.compile(r"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)", re.M)


def parse_targets(fdinfo_text: str) -> List[dict]:
    """[{tfd, events, data}] from an epoll fd's fdinfo text (pure)."""
    return [{"tfd": int(m.group(1)), "events": int(m.group(2), 16), "data": int(m.group(3), 16)}
            for m in _LINE.finditer(fdinfo_text)]


def _targets(info, ctx) -> List[dict]:
    targets = parse_targets(info.fdinfo_text)
    seen = set()
    for t in targets:
        tfd = t["tfd"]
        if tfd in seen:
            raise refuse(info, "unsupported-fd",
                         f"epoll has two registrations under fd {tfd}: one is a file closed since")
        seen.add(tfd)
        if ctx.all_fds and tfd not in ctx.all_fds:
            raise refuse(info, "unsupported-fd",
                         f"epoll watches fd {tfd}, which is closed (its file lives on in the epoll set "
                         f"and cannot be registered again by number)")
        if not pidfd.epoll_target_is(info.pid, info.fd, tfd, tfd):
            raise refuse(info, "unsupported-fd",
                         f"epoll's registration under fd {tfd} is not the file now at fd {tfd} "
                         f"(closed and reused after EPOLL_CTL_ADD)")
        if not t["events"] & ~_PRIVATE:
            raise refuse(info, "unsupported-fd",
                         f"EPOLLONESHOT registration of fd {tfd} already fired (disarmed); it cannot be re-added disarmed")
        if t["events"] & EPOLLET and _ready(info.pid, tfd, t["events"]):
            raise refuse(info, "unsupported-fd",
                         f"edge-triggered fd {tfd} is ready now: whether its edge was already reported cannot be known")
    return targets


def _ready(pid: int, tfd: int, events: int) -> bool:
    # poll(2) on a duplicate of the target file: ->poll() has no side effects.
    with pidfd.target_fd(pid, tfd) as dup:
        p = select.poll()
        p.register(dup, events & 0xFFFF)
        return any(ev & (events | select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


def classify(info, ctx) -> str:
    """Raises unsupported-fd for a registration that cannot be re-added
    exactly (see the module doc); EngineError on system errors."""
    check_async(info, ctx)
    check_held_outside(info, ctx, "epoll instance")
    targets = _targets(info, ctx)
    body = ", ".join(f"fd {t['tfd']} events {t['events']:#x} data {t['data']:#x}" for t in targets)
    return f"epoll with {len(targets)} targets" + (f": {body}" if body else "")


def dump(info, ctx) -> dict:
    return {"targets": _targets(info, ctx)}


def validate(rec: dict, ctx) -> None:
    """Every target must be an fd the image restores (image-invalid)."""
    if ctx.records is None:
        return
    fds = {r["fd"] for r in ctx.records}
    for t in rec["targets"]:
        if t["tfd"] not in fds:
            raise refuse_rec(rec, ctx, "image-invalid", f"epoll target fd {t['tfd']} is not in the image")


def restore(rec: dict, ctx) -> int:
    """An empty epoll instance; finish() fills it. Raises EngineError."""
    try:
        fd = _sys.epoll_create1(os.O_CLOEXEC)
    except OSError as e:
        raise failed(rec, ctx, "epoll_create1", e) from e
    return fd


def finish(rec: dict, ctx, task) -> None:
    """EPOLL_CTL_ADD each target in the new process, then verify its
    fdinfo. Raises EngineError."""
    nr = pidfd.syscall_nr("epoll_ctl")
    if rec["targets"] and getattr(task, "scratch", None) is None:
        raise EngineError(f"epoll fd {rec['fd']}: the restorer gave no scratch memory in the new process "
                          f"(task.scratch) to pass struct epoll_event", pid=ctx.pid)
    for t in rec["targets"]:
        task.write_mem(task.scratch, _sys.epoll_event_bytes(t["events"], t["data"]))
        ret = task.syscall(nr, rec["fd"], EPOLL_CTL_ADD, t["tfd"], task.scratch)
        if ret < 0:
            raise EngineError(f"epoll_ctl(ADD, epoll fd {rec['fd']}, fd {t['tfd']}) in the new process: "
                              f"{os.strerror(-ret)}", pid=ctx.pid, errno=-ret)
    pid = getattr(task, "pid", None) or ctx.pid
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/fdinfo/{rec['fd']}") as f:
            got = parse_targets(f.read())
    except OSError as e:
        raise EngineError(f"cannot read back epoll fd {rec['fd']}: {e.strerror}", pid=pid, errno=e.errno) from e
    key = lambda t: t["tfd"]  # noqa: E731
    if sorted(got, key=key) != sorted(rec["targets"], key=key):
        raise EngineError(f"epoll fd {rec['fd']} restored as {got}, expected {rec['targets']}", pid=pid)
