"""epoll: its registrations come from fdinfo, one line per target
(fs/eventpoll.c ep_show_fdinfo: "tfd: %8d events: %8x data: %16llx ..."),
and are re-added in finish(), once every fd of the new process is in
place, by injecting epoll_ctl(EPOLL_CTL_ADD) with the same fd numbers,
events (EPOLLET/ONESHOT/EXCLUSIVE/WAKEUP included) and data.

Exactness checks at dump:
* an epoll entry is keyed by (file, fd number). The file registered under
  tfd is the file the process holds at tfd now (kcmp KCMP_EPOLL_TFD), or,
  after close(tfd) (the registration lives on as long as the file does: a
  dup of it, CRIU's zdtm epoll, epoll01), the one it holds at another fd,
  "via", found by the target's inode (fdinfo ino:) and kcmp. Such a
  registration is re-added in the new process under its old number: the
  via file is put at tfd for the EPOLL_CTL_ADD (what occupies tfd now is
  moved aside and put back with its close-on-exec flag), then tfd closed
  again. Closing an fd drops the process's POSIX locks on its file, so
  this is done only when neither file is a regular file or directory;
  a registration whose file the process holds nowhere is refused;
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
import stat
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
_INO = re.compile(r"^tfd:.*\sino:([0-9a-f]+)", re.M)


def parse_targets(fdinfo_text: str) -> List[dict]:
    """[{tfd, events, data}] from an epoll fd's fdinfo text (pure)."""
    return [{"tfd": int(m.group(1)), "events": int(m.group(2), 16), "data": int(m.group(3), 16)}
            for m in _LINE.finditer(fdinfo_text)]


def _target_inodes(fdinfo_text: str) -> List[int]:
    """The target files' inode numbers, in the order of parse_targets."""
    return [int(m.group(1), 16) for m in _INO.finditer(fdinfo_text)]


def _plain(info) -> bool:
    """A regular file or a directory: closing an fd of it would drop the
    process's POSIX locks on it."""
    return stat.S_ISREG(info.mode) or stat.S_ISDIR(info.mode)


def _via(info, ctx, t: dict, toff: int, ino: int):
    """The fd at which the process holds the file registered under tfd
    (the toff-th registration under that number), when tfd itself does not
    hold it; None when tfd does. Raises unsupported-fd."""
    tfd = t["tfd"]
    if tfd in (ctx.all_fds or {}) and pidfd.epoll_target_is(info.pid, info.fd, tfd, tfd, toff):
        return None
    where = "closed" if tfd not in (ctx.all_fds or {}) else "another file now"
    for fd, other in sorted((ctx.all_fds or {}).items()):
        if other.ino == ino and fd != info.fd and pidfd.epoll_target_is(info.pid, info.fd, tfd, fd, toff):
            occupant = (ctx.all_fds or {}).get(tfd)
            if _plain(other) or (occupant is not None and _plain(occupant)):
                raise refuse(info, "unsupported-fd",
                             f"epoll's registration under fd {tfd} ({where}) is a file the process holds at fd "
                             f"{fd}: re-adding it would close a regular file's fd in the new process, "
                             "dropping its POSIX locks")
            return fd
    raise refuse(info, "unsupported-fd",
                 f"epoll watches fd {tfd} ({where}); its file lives on in the epoll set, held by no fd of "
                 "the process, and cannot be registered again")


def _targets(info, ctx) -> List[dict]:
    targets = parse_targets(info.fdinfo_text)
    inodes = _target_inodes(info.fdinfo_text)
    if len(inodes) != len(targets):
        raise refuse(info, "unsupported-fd", "epoll's fdinfo names no inode for some target")
    seen: dict = {}
    for t, ino in zip(targets, inodes):
        tfd = t["tfd"]
        toff = seen.get(tfd, 0)
        seen[tfd] = toff + 1
        via = None
        if ctx.all_fds:
            via = _via(info, ctx, t, toff, ino)
        elif not pidfd.epoll_target_is(info.pid, info.fd, tfd, tfd, toff):
            raise refuse(info, "unsupported-fd", f"epoll's registration under fd {tfd} is not the file now at "
                         f"fd {tfd} (and the process's other fds are not known here)")
        if via is not None:
            t["via"] = via
        src = tfd if via is None else via
        if not t["events"] & ~_PRIVATE:
            raise refuse(info, "unsupported-fd",
                         f"EPOLLONESHOT registration of fd {tfd} already fired (disarmed); it cannot be re-added disarmed")
        if t["events"] & EPOLLET and _ready(info.pid, src, t["events"]):
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
    body = ", ".join(f"fd {t['tfd']}" + (f" (closed since; its file at fd {t['via']})" if "via" in t else "") +
                     f" events {t['events']:#x} data {t['data']:#x}" for t in targets)
    return f"epoll with {len(targets)} targets" + (f": {body}" if body else "")


def dump(info, ctx) -> dict:
    return {"targets": _targets(info, ctx)}


def validate(rec: dict, ctx) -> None:
    """Every target must be an fd the image restores (image-invalid)."""
    if ctx.records is None:
        return
    fds = {r["fd"] for r in ctx.records}
    for t in rec["targets"]:
        if t.get("via", t["tfd"]) not in fds or not isinstance(t["tfd"], int) or t["tfd"] < 0:
            raise refuse_rec(rec, ctx, "image-invalid", f"epoll target fd {t.get('via', t['tfd'])} is not in the image")


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
        if "via" in t:
            _add_via(rec, ctx, task, t)
            continue
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
    key = lambda t: (t["tfd"], t["events"], t["data"])  # noqa: E731
    want = [{k: t[k] for k in ("tfd", "events", "data")} for t in rec["targets"]]
    if sorted(got, key=key) != sorted(want, key=key):
        raise EngineError(f"epoll fd {rec['fd']} restored as {got}, expected {rec['targets']}", pid=pid)


def _add_via(rec: dict, ctx, task, t: dict) -> None:
    """EPOLL_CTL_ADD in the new process of the file at fd t["via"] under
    the number t["tfd"], which the process no longer uses for it: the file
    is put at tfd for the call (what tfd holds is moved aside first and put
    back after, with its close-on-exec flag), then tfd is restored. The
    event struct is already at task.scratch. Raises EngineError."""
    nr = pidfd.syscall_nr
    tfd, via, epfd = t["tfd"], t["via"], rec["fd"]
    occupant = next((r for r in ctx.records or [] if r["fd"] == tfd), None)
    aside = -1

    def call(name, *args):
        ret = task.syscall(nr(name), *args)
        if ret < 0:
            raise EngineError(f"epoll fd {epfd}: re-adding the registration under fd {tfd} (file at fd {via}): "
                              f"{name}: {os.strerror(-ret)}", pid=ctx.pid, errno=-ret)
        return ret
    if occupant is not None:
        base = max(r["fd"] for r in ctx.records) + 1
        aside = call("fcntl", tfd, 1030, base)              # F_DUPFD_CLOEXEC
    call("dup3", via, tfd, 0)
    call("epoll_ctl", epfd, EPOLL_CTL_ADD, tfd, task.scratch)
    if occupant is not None:
        call("dup3", aside, tfd, os.O_CLOEXEC if occupant.get("cloexec") else 0)
        call("close", aside)
    else:
        call("close", tfd)
