"""Small helpers every fd handler of this package uses."""

from __future__ import annotations

import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Iterator

from ..errors import EngineError, Refusal


def refuse(info, reason: str, detail: str) -> Refusal:
    """A refusal about a dumped fd (FdInfo)."""
    return Refusal(reason, detail, pid=info.pid, fd=info.fd, path=info.link)


def refuse_rec(rec: dict, ctx, reason: str, detail: str) -> Refusal:
    """A refusal about a restore record."""
    return Refusal(reason, detail, pid=getattr(ctx, "pid", None), fd=rec.get("fd"), path=rec.get("link"))


def failed(rec: dict, ctx, what: str, e: OSError) -> EngineError:
    """A system error while restoring one record."""
    return EngineError(f"fd {rec.get('fd')} ({rec.get('link')}): {what}: {e.strerror or e}",
                       pid=getattr(ctx, "pid", None), errno=e.errno)


class closed_on_error:
    """``with closed_on_error(fd):`` closes `fd` if the block raises
    anything (the fd is handed out only when it is fully set up); the
    exception propagates unchanged. (A class: contextlib costs every run
    ~0.5 ms to import.)"""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None:
            os.close(self.fd)
        return False


def with_status_flags(rec: dict, ctx, fd: int) -> int:
    """`fd` with the record's F_GETFL status flags set, handed back; on
    failure `fd` is closed (the caller no longer owns it) and EngineError
    is raised."""
    from . import _sys
    try:
        _sys.set_status_flags(fd, rec.get("flags", 0))
    except OSError as e:
        os.close(fd)
        raise failed(rec, ctx, "setting status flags", e) from e
    return fd


def end_of(flags: int) -> str:
    """'r', 'w' or 'rw' from open flags."""
    acc = flags & os.O_ACCMODE
    return {os.O_RDONLY: "r", os.O_WRONLY: "w"}.get(acc, "rw")


def open_accmode(end: str) -> int:
    return {"r": os.O_RDONLY, "w": os.O_WRONLY}.get(end, os.O_RDWR)


F_SETSIG, F_GETSIG, F_SETOWN_EX, F_GETOWN_EX = 10, 11, 15, 16      # fcntl(2)
F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP = 0, 1, 2
_OWNER_KIND = {F_OWNER_TID: "thread", F_OWNER_PID: "process", F_OWNER_PGRP: "process group"}


def async_owner(info) -> dict:
    """The O_ASYNC signal-driven I/O state of the open file behind ``info``:
    its F_SETOWN_EX owner and F_SETSIG signal (per open file description,
    read through a duplicate). Raises EngineError when it cannot be read."""
    import fcntl
    import struct
    from .. import pidfd
    try:
        with pidfd.target_fd(info.pid, info.fd) as dup:
            typ, pid = struct.unpack("ii", fcntl.fcntl(dup, F_GETOWN_EX, bytes(8)))
            sig = fcntl.fcntl(dup, F_GETSIG)
    except OSError as e:
        raise EngineError(f"pid {info.pid} fd {info.fd}: reading the O_ASYNC owner: {e.strerror or e}",
                          pid=info.pid, errno=e.errno) from e
    return {"owner_type": typ, "owner": pid, "signal": sig}


def check_async(info, ctx=None) -> None:
    """O_ASYNC (SIGIO, or F_SETSIG's signal, to an F_SETOWN owner): saved and
    restored when the owner is none or in the dump (a member, one of its
    threads, or a member's process group); refused when it is outside,
    whose signals a restore could not send there."""
    from ._sys import O_ASYNC
    if not info.flags & O_ASYNC:
        return
    check_owner(info, ctx, async_owner(info))


def check_owner(info, ctx, a: dict) -> None:
    """An F_SETOWN owner (with or without O_ASYNC: SIGURG and a later
    O_ASYNC go by it) must be in the dump. Raises Refusal(unsupported-state)."""
    if not a["owner"] or ctx is None:
        return
    members = set(getattr(ctx, "tree_pids", ()) or ()) or {info.pid}
    if a["owner_type"] == F_OWNER_PGRP:
        ok = any(_pgid(m) == a["owner"] for m in members)
    elif a["owner_type"] == F_OWNER_TID:
        ok = any(os.path.exists(f"/proc/{m}/task/{a['owner']}") for m in members)
    else:
        ok = a["owner"] in members
    if not ok:
        from ._sys import O_ASYNC
        what = "O_ASYNC (signal-driven I/O) is set with" if info.flags & O_ASYNC else "F_SETOWN names"
        raise refuse(info, "unsupported-state",
                     f"{what} {_OWNER_KIND.get(a['owner_type'], 'owner')} "
                     f"{a['owner']} as its owner, outside the dump: its signals could not go there")


def read_owner(info, pfd: int) -> Optional[dict]:
    """The F_SETOWN_EX owner and F_SETSIG signal of the open file behind
    ``info`` (through a duplicate taken with the process's pidfd ``pfd``),
    or None when neither is set. Raises EngineError."""
    import fcntl
    import struct
    from .. import pidfd
    if info.flags & os.O_PATH:
        return None        # fcntl(F_GETOWN_EX) of an O_PATH file fails EBADF: it can have no owner
    try:
        dup = pidfd.pidfd_getfd(pfd, info.fd, info.pid)
        try:
            typ, pid = struct.unpack("ii", fcntl.fcntl(dup, F_GETOWN_EX, bytes(8)))
            sig = fcntl.fcntl(dup, F_GETSIG)
        finally:
            os.close(dup)
    except OSError as e:
        raise EngineError(f"pid {info.pid} fd {info.fd}: reading its F_SETOWN owner: {e.strerror or e}",
                          pid=info.pid, errno=e.errno) from e
    if not pid and not sig:
        return None
    return {"owner_type": typ, "owner": pid, "signal": sig}


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def restore_async(rec: dict, pid: int) -> None:
    """Give the restored open file behind ``rec`` (fd ``rec['fd']`` of
    ``pid``, installed, not running yet) its O_ASYNC owner and signal, then
    O_ASYNC itself (set_status_flags leaves it out). Raises OSError."""
    import fcntl
    import struct
    from .. import pidfd
    from ._sys import O_ASYNC
    a = rec["async"]
    with pidfd.target_fd(pid, rec["fd"]) as dup:
        fcntl.fcntl(dup, F_SETOWN_EX, struct.pack("ii", a["owner_type"], a["owner"]))
        fcntl.fcntl(dup, F_SETSIG, a["signal"])
        # An owner without O_ASYNC (for SIGURG, or for an O_ASYNC set later)
        # is recorded too (images before it: only with O_ASYNC)
        if rec.get("flags", O_ASYNC) & O_ASYNC:
            fcntl.fcntl(dup, fcntl.F_SETFL, fcntl.fcntl(dup, fcntl.F_GETFL) | O_ASYNC)
        got = struct.unpack("ii", fcntl.fcntl(dup, F_GETOWN_EX, bytes(8))), fcntl.fcntl(dup, F_GETSIG)
    if got != ((a["owner_type"], a["owner"]), a["signal"]):
        raise OSError(22, f"the O_ASYNC owner reads back as {got}")


AT_FDCWD = -100
SYS_OPENAT = {"x86_64": 257, "aarch64": 56}


def reopen_in_process(rec: dict, ctx, task, path: str, flags: int, what: str) -> None:
    """Open `path` from inside the restored process (`task`: it must be
    the opener, e.g. its controlling terminal or its own /proc entry) and
    put it over the stand-in at rec's fd and every dup of it, each with its
    own close-on-exec bit. Raises SysError naming `what`."""
    addr = task.scratch + 256
    task.write_mem(addr, path.encode() + b"\0")
    fd = task.syscall(SYS_OPENAT[task.arch.MACHINE], AT_FDCWD & 0xFFFFFFFFFFFFFFFF, addr, flags, 0)
    if -4096 < fd < 0:
        from ..libc import SysError
        raise SysError(f"open {path} in pid {task.pid} (injected, {what})", -fd, task.pid)
    try:
        # its dups too: they hold the stand-in as well (install_fds)
        for r in [rec] + [r for r in ctx.records or [] if r.get("dup_of") == rec["fd"] and r is not rec]:
            task.call("dup3", fd, r["fd"], os.O_CLOEXEC if r.get("cloexec") else 0)
    finally:
        task.call("close", fd)


TREE_FDS_KEY = "tree:fd-links"     # ctx.shared: one for the whole tree (engine/tree.py TREE_KEYS)


def tree_fds(ctx, own: int):
    """(pid, fd, link) of every fd of the dump's other members (a dumped
    tree's; none for a single process). Read from /proc once a dump: the
    members are frozen, and each fd of a kind that asks (a pidfd, a /proc
    file) would otherwise read every member's fds again."""
    members = getattr(ctx, "tree_pids", ()) or ()
    if not members:
        return
    every = ctx.shared.get(TREE_FDS_KEY)
    if every is None:
        every = []
        for pid in sorted(members):
            try:
                names = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for n in names:
                try:
                    every.append((pid, int(n), os.readlink(f"/proc/{pid}/fd/{n}")))
                except OSError:
                    continue
        ctx.shared[TREE_FDS_KEY] = every
    for item in every:
        if item[0] != own:
            yield item


def check_held_outside(info, ctx, what: str) -> None:
    """Refuses (unsupported-fd, naming the holder) an open file description
    that a process outside the dump holds too, for kinds a restore makes
    anew (an eventfd, a timerfd, an epoll or inotify instance): the
    restored process would get its own, the outside one would keep the old,
    and what they shared (a counter, expirations, an interest list, an
    event queue) would silently stop being shared. kcmp(KCMP_FILE) against
    every outside fd on the same inode (all anon inodes are one inode, so
    each candidate is compared); the /proc scan is the dump's one
    (_peers.holders). A tree's other members are not outside."""
    import errno

    from .. import pidfd
    from . import _peers
    if ctx is None or info.pid == os.getpid():
        return      # a file in flight, peeked by ckpt: _inflight decides who else holds it
    key = f"held-outside:{info.pid}:{info.fd}"
    if key in ctx.shared:
        return      # looked at once this dump (an eventfd's classify, then its probe)
    for pid, fd in _peers.holders(ctx, info.link, info.dev, info.ino):
        if pid == os.getpid():
            continue        # ckpt's own duplicates (closed again by now)
        try:
            same = pidfd.same_file(info.pid, info.fd, pid, fd)
        except EngineError as e:
            if e.errno in (errno.ESRCH, errno.EBADF):
                continue    # gone, or closed: it holds nothing now
            raise
        if same:
            raise refuse(info, "unsupported-fd", f"pid {pid} (fd {fd}), outside the dump, holds this {what} too: "
                         f"a restore makes a new {what}, that process would keep the old one")
    ctx.shared[key] = True
