"""File locks held through an fd: flock(2), POSIX (fcntl F_SETLK) and OFD
(F_OFD_SETLK) locks, restored when the process is their only holder.

At dump: /proc/PID/fdinfo/N lists, as ``lock:`` lines, the locks taken
through that open file (fs/locks.c show_fd_locks: the file is this one and
the owner is this open file - flock, OFD - or this fd table - POSIX).
/proc/locks lists every lock and every *waiting* request (``->`` lines) on
the machine, keyed by device and inode. A lock is restorable when every
lock on the inode is one of the process's own (any lock or waiter left
over belongs to another process: refused as ``file-lock`` naming its pid),
nobody waits on the inode (a waiter would take the lock the moment the
process is gone), the locked open file is not shared with a process
outside the dump (flock/OFD locks belong to the open file: the other
process would keep the lock), and it is not a lease.

At restore: OFD locks belong to the open file, so the restorer takes them
on the fd it opened (they travel with it into the new process); POSIX
locks belong to the process, so they are taken by the new process itself
(fcntl(F_SETLK) injected in finish()), and so are flocks: they belong to
the open file, but /proc/locks and fdinfo show the pid that took them.
Known limit: a flock taken by another process (a parent before fork)
shows the restored process's pid afterwards. Before anything
is created, validate() asks the kernel whether each range is free
(F_OFD_GETLK on a scratch open; a non-blocking flock on one) and refuses
naming the holder.

Leases (F_SETLEASE, read or write) belong to the open file like an OFD
lock and are judged the same way (every lease and lock on the inode the
process's own, nobody waiting, the open file not shared outside); /proc
shows them as "LEASE ACTIVE READ|WRITE". Setting a lease also makes the
setter the file's owner (F_SETOWN: lease-break signals go to it,
fs/locks.c lease_setup), so it is taken by the new process itself in
finish(), then F_SETSIG as recorded. A lease owner other than the process
is refused; so is a lease being broken ("LEASE BREAKING": another process
opened the file, the holder was signalled, the break timer runs - none of
which can be set again). validate() places the lease on a scratch open of
the file and removes it, refusing when it cannot be placed now (the file
open elsewhere in a conflicting way).

Not carried: a process waiting for a lock (refused).
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

from .. import pidfd
from ..errors import EngineError, Refusal
from . import _dups, _peers

REASON = "file-lock"
F_GETLK, F_SETLK, F_OFD_GETLK, F_OFD_SETLK = 5, 6, 36, 37
F_SETSIG, F_GETSIG, F_SETLEASE, F_GETLEASE = 10, 11, 1024, 1025
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
_RW = {"READ": F_RDLCK, "WRITE": F_WRLCK}
_KINDS = ("FLOCK", "POSIX", "OFDLCK", "LEASE")
_OF_THE_FILE = ("FLOCK", "OFDLCK", "LEASE")      # owned by the open file, not the process
_LINE = None


def lock_lines(fdinfo_text: str) -> List[str]:
    """What follows "lock:" on each such line of an fd's fdinfo. Most fds
    hold no lock: re (~20 ms of a run under TCG) only for those that do."""
    global _LINE
    if "lock:" not in fdinfo_text:
        return []
    if _LINE is None:
        import re
        _LINE = re.compile(r"^lock:\s*(.*)$", re.M)
    return _LINE.findall(fdinfo_text)


def _flock_struct(typ: int, start: int, end: Optional[int], pid: int = 0) -> bytes:
    """struct flock (x86_64 and aarch64: short, short, off_t, off_t, pid_t)."""
    length = 0 if end is None else end - start + 1
    return struct.pack("=hh4xqqi4x", typ, os.SEEK_SET, start, length, pid)


def _parse(text: str) -> Optional[dict]:
    """'1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF' (or with '->')
    -> {kind, mode, rw, pid, dev, ino, start, end, waiting}."""
    f = text.split()
    if len(f) < 8:
        return None
    waiting = f[1] == "->"
    if waiting:
        f = [f[0]] + f[2:]
    if len(f) < 8:
        return None
    try:
        maj, mnr, ino = f[5].split(":")
        return {"kind": f[1], "mode": f[2], "rw": f[3], "pid": int(f[4]),
                "dev": os.makedev(int(maj, 16), int(mnr, 16)), "ino": int(ino), "start": int(f[6]),
                "end": None if f[7] == "EOF" else int(f[7]), "waiting": waiting}
    except ValueError:
        return None


def fd_locks(info) -> List[dict]:
    """The locks the fdinfo of `info` shows."""
    return [p for p in (_parse(x) for x in lock_lines(info.fdinfo_text)) if p]


def _key(lk: dict) -> Tuple:
    return (lk["kind"], lk["rw"], lk["start"], lk["end"])


def _refuse(info, detail: str) -> Refusal:
    return Refusal(REASON, detail, pid=info.pid, fd=info.fd, path=info.link)


def text(lk: dict) -> str:
    end = "EOF" if lk["end"] is None else lk["end"]
    if lk["kind"] == "LEASE":
        return f"{lk['rw'].lower()} lease"
    kind = {"OFDLCK": "OFD", "FLOCK": "flock"}.get(lk["kind"], lk["kind"])
    return f"{kind} {lk['rw']} {lk['start']}-{end}"


def _system_locks(ctx) -> List[dict]:
    key = "proc-locks"
    if key not in ctx.shared:
        with open("/proc/locks") as f:
            ctx.shared[key] = [p for p in (_parse(x) for x in f.read().splitlines()) if p]
    return ctx.shared[key]


def _may_wait_for_lock(ctx) -> bool:
    """Whether a thread of the frozen process may be queued for a lock:
    only a task stopped inside fcntl(2) or flock(2) can be (a blocked
    F_SETLKW/F_OFD_SETLKW/LOCK_EX waits in the call, which the freeze
    interrupts with orig_rax/x8 still naming it). Why ask: the first read of
    /proc/locks in a while costs an RCU grace period (~10-15 ms: the kernel
    takes file_rwsem for writing), most of a small process's dump."""
    tasks = [t for t in [getattr(ctx, "task", None)] + list(getattr(ctx, "threads", None) or []) if t is not None]
    if not tasks:
        return True         # not frozen by us (survey of another kind): ask the kernel
    calls = {pidfd.syscall_nr("fcntl"), pidfd.syscall_nr("flock")}
    for t in tasks:
        try:
            nr = t.arch.syscall_site(t.orig_regs)["nr"]
        except Exception:   # noqa: BLE001 - unknown state: assume it may wait
            return True
        if nr in calls:
            return True
    return False


def record(info, ctx) -> List[dict]:
    """The locks to restore for the open file at `info` (a leader fd);
    raises the `file-lock` refusal."""
    mine = fd_locks(info)
    for lk in mine:
        if lk["kind"] == "LEASE":
            if lk["mode"] != "ACTIVE":
                raise _refuse(info, f"holds a lease being broken (LEASE {lk['mode']}, to become {lk['rw']}): "
                              "another process opened the file and waits or was turned away; the lease "
                              "break in progress (its timer, the signal already sent) is not restored")
            continue
        if lk["kind"] not in _KINDS:
            raise _refuse(info, f"holds a lock of kind {lk['kind']} ({lk['mode']} {lk['rw']}), not restored")
        if lk["mode"] != "ADVISORY":
            raise _refuse(info, f"holds a {lk['mode'].lower()} lock ({text(lk)})")
    # /proc/locks names the inode as its superblock's dev and the inode
    # number (the fdinfo lines say which: an overlay file's locks sit on
    # the real inode); the fd's own stat is the fallback.
    inode = (mine[0]["dev"], mine[0]["ino"]) if mine else (info.dev, info.ino)
    if not mine and not _may_wait_for_lock(ctx):
        return []           # no locks here, and no thread sits in a lock call
    system = [lk for lk in _system_locks(ctx) if (lk["dev"], lk["ino"]) == inode]
    for lk in system:
        if lk["waiting"] and lk["pid"] == info.pid:
            raise _refuse(info, f"the process waits for a lock on this file ({text(lk)}); waiting lockers "
                          "are not restored")
    if not mine:
        return []
    # Every lock of the process on this inode, through any of its open files.
    ours: Dict[Tuple, int] = {}
    lead = _dups.leaders(ctx)
    for other in ctx.all_fds.values():
        if "lock:" not in other.fdinfo_text or lead.get(other.fd, other.fd) != other.fd:
            continue           # no locks, or a dup: the same open file shows the same locks
        for lk in fd_locks(other):
            if (lk["dev"], lk["ino"]) == inode:
                ours[_key(lk)] = ours.get(_key(lk), 0) + 1
    # The process's own entries first: a lock of another holder with the
    # same key (two read leases, two shared flocks) is then the one left
    # over and named, whatever order /proc/locks lists them in.
    for lk in sorted(system, key=lambda lk: lk["pid"] != info.pid):
        who = f"pid {lk['pid']}" if lk["pid"] > 0 else "an OFD lock owner (pid unknown)"
        if lk["waiting"]:
            raise _refuse(info, f"{who} waits for a lock on this file ({text(lk)}): it would take the "
                          "lock once the process is checkpointed")
        k = _key(lk)
        if ours.get(k):
            ours[k] -= 1
            continue
        if lk["pid"] <= 0:
            found = _peers.holders(ctx, info.link, info.dev, info.ino)
            if found:
                who = f"an OFD lock of {_peers.describe(found)}"
        raise _refuse(info, f"another holder: {who} holds {text(lk)} on this file")
    for lk in mine:
        if lk["kind"] in _OF_THE_FILE:
            for pid, fd in _peers.holders(ctx, info.link, info.dev, info.ino):
                try:
                    shared = pidfd.kcmp(info.pid, pid, pidfd.KCMP_FILE, info.fd, fd) == 0
                except OSError:
                    shared = True       # cannot tell: assume the worst
                if shared:
                    raise _refuse(info, f"{text(lk)}: the locked open file is shared with pid {pid} (fd {fd}), "
                                  "which would keep the lock")
    out = [{"kind": lk["kind"], "rw": lk["rw"], "start": lk["start"], "end": lk["end"]} for lk in mine]
    for lk in out:
        if lk["kind"] == "LEASE":
            lk["sig"] = _lease_signal(info)
    return out


def _lease_signal(info) -> int:
    """F_GETSIG of a leased open file whose owner (F_GETOWN) is the
    process, as F_SETLEASE made it; raises the refusal otherwise."""
    try:
        with pidfd.target_fd(info.pid, info.fd) as dup:
            owner, sig = fcntl.fcntl(dup, fcntl.F_GETOWN), fcntl.fcntl(dup, F_GETSIG)
    except OSError as e:
        raise EngineError(f"reading the lease owner of pid {info.pid} fd {info.fd}: {e.strerror}",
                          pid=info.pid, errno=e.errno) from e
    if owner != info.pid:
        raise _refuse(info, f"holds a lease whose break signals go to {owner} (F_SETOWN), not to the process: "
                      "a lease set again makes the process the owner")
    return sig


# -- restore ----------------------------------------------------------------

def _rec_refuse(rec: dict, ctx, detail: str) -> Refusal:
    return Refusal(REASON, detail, pid=getattr(ctx, "pid", None), fd=rec.get("fd"), path=rec.get("link"))


def _check_list(rec: dict, ctx) -> List[dict]:
    locks = rec.get("locks") or []
    for lk in locks:
        if lk.get("kind") not in _KINDS or lk.get("rw") not in _RW or not isinstance(lk.get("start"), int):
            raise Refusal("image-invalid", f"lock record malformed: {lk!r}", fd=rec.get("fd"))
        if lk["kind"] == "LEASE" and not (isinstance(lk.get("sig"), int) and 0 <= lk["sig"] <= 64):
            raise Refusal("image-invalid", f"lease record malformed: {lk!r}", fd=rec.get("fd"))
    return locks


LEASE_SETTLE = 1.0     # seconds


def _retrying(call):
    """call(), again for up to LEASE_SETTLE seconds while it fails with
    EAGAIN: the files of a process that just exited (the dumped original)
    are released by a delayed work item a tick later (fs/file_table.c
    fput: an exiting task cannot run task work), and until then its opens
    of the file still count against a lease."""
    import time
    deadline = time.monotonic() + LEASE_SETTLE
    while True:
        try:
            return call()
        except OSError as e:
            if e.errno != _errno.EAGAIN or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _lease_placeable(rec: dict, ctx, path: str, lk: dict) -> None:
    """Place the lease on a scratch open of `path` and remove it: raises
    `file-lock` when the kernel would not give it now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return            # the file's own checks name what is wrong
    try:
        try:
            _retrying(lambda: fcntl.fcntl(fd, F_SETLEASE, _RW[lk["rw"]]))
        except OSError as e:
            why = "it is open for writing" if lk["rw"] == "READ" else "it is open"
            raise _rec_refuse(rec, ctx, f"{text(lk)}: cannot be placed now ({e.strerror}): {why} "
                              "elsewhere") from None
        fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)
    finally:
        os.close(fd)


def validate(rec: dict, ctx, path: str) -> None:
    """Raises `file-lock` when a recorded lock's range is taken now (naming
    the holder) or image-invalid. Creates nothing."""
    locks = _check_list(rec, ctx)
    for lk in locks:
        if lk["kind"] == "LEASE":       # first, alone: the open below would count against a lease
            _lease_placeable(rec, ctx, path, lk)
    locks = [lk for lk in locks if lk["kind"] != "LEASE"]
    if not locks:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return            # the file's own checks name what is wrong
    try:
        for lk in locks:
            if lk["kind"] == "FLOCK":
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if lk["rw"] == "WRITE" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _rec_refuse(rec, ctx, f"{text(lk)}: another process holds a conflicting flock "
                                      "on the file now") from None
                fcntl.flock(fd, fcntl.LOCK_UN)
                continue
            got = fcntl.fcntl(fd, F_OFD_GETLK, _flock_struct(_RW[lk["rw"]], lk["start"], lk["end"]))
            typ, = struct.unpack_from("=h", got)
            if typ != F_UNLCK:
                pid, = struct.unpack_from("=i", got, 24)
                who = f"pid {pid}" if pid > 0 else "an OFD lock"
                raise _rec_refuse(rec, ctx, f"{text(lk)}: {who} holds a conflicting lock on the file now")
    finally:
        os.close(fd)


def take_on_file(rec: dict, ctx, fd: int) -> None:
    """Take the recorded OFD locks on `fd` (the restorer's open: they belong
    to the open file and show no pid). Raises `file-lock` (taken
    meanwhile)."""
    for lk in _check_list(rec, ctx):
        try:
            if lk["kind"] == "OFDLCK":
                fcntl.fcntl(fd, F_OFD_SETLK, _flock_struct(_RW[lk["rw"]], lk["start"], lk["end"]))
        except OSError as e:
            if e.errno in (_errno.EAGAIN, _errno.EACCES, _errno.EWOULDBLOCK):
                raise _rec_refuse(rec, ctx, f"{text(lk)}: taken by another process meanwhile") from None
            raise


def finish(rec: dict, ctx, task) -> None:
    """Take each recorded POSIX lock (fcntl F_SETLK: they belong to the
    process that takes them) and flock (flock(2): it belongs to the open
    file, but /proc/locks shows the pid that took it) in the new process.
    Raises `file-lock` or EngineError."""
    mine = [lk for lk in _check_list(rec, ctx) if lk["kind"] in ("POSIX", "FLOCK", "LEASE")]
    if not mine:
        return
    if getattr(task, "scratch", None) is None:
        raise EngineError(f"fd {rec['fd']}: no scratch memory in the new process for struct flock", pid=ctx.pid)
    for lk in mine:
        if lk["kind"] == "LEASE":
            # the new process sets it: it becomes the owner lease breaks signal
            ret = task.syscall(pidfd.syscall_nr("fcntl"), rec["fd"], F_SETLEASE, _RW[lk["rw"]])
            if ret == -_errno.EAGAIN:
                def again():
                    r = task.syscall(pidfd.syscall_nr("fcntl"), rec["fd"], F_SETLEASE, _RW[lk["rw"]])
                    if r == -_errno.EAGAIN:
                        raise OSError(_errno.EAGAIN, "lease")
                    return r
                try:
                    ret = _retrying(again)
                except OSError:
                    ret = -_errno.EAGAIN
            if ret == 0 and lk["sig"]:
                ret = task.syscall(pidfd.syscall_nr("fcntl"), rec["fd"], F_SETSIG, lk["sig"])
        elif lk["kind"] == "FLOCK":
            op = (fcntl.LOCK_EX if lk["rw"] == "WRITE" else fcntl.LOCK_SH) | fcntl.LOCK_NB
            ret = task.syscall(pidfd.syscall_nr("flock"), rec["fd"], op)
        else:
            task.write_mem(task.scratch, _flock_struct(_RW[lk["rw"]], lk["start"], lk["end"]))
            ret = task.syscall(pidfd.syscall_nr("fcntl"), rec["fd"], F_SETLK, task.scratch)
        if ret in (-_errno.EAGAIN, -_errno.EACCES):
            raise _rec_refuse(rec, ctx, f"{text(lk)}: taken by another process meanwhile")
        if ret < 0:
            raise EngineError(f"taking {text(lk)} on fd {rec['fd']} in the new process: "
                              f"{os.strerror(-ret)}", pid=ctx.pid, errno=-ret)
