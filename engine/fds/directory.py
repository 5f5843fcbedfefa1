"""Directory fds: reopened by path with O_DIRECTORY, identity-checked, at
the same getdents position; dnotify registrations refused.

dnotify (fcntl F_NOTIFY) is not shown in fdinfo. Its evidence is the fd's
owner: fcntl_dirnotify() calls __f_setown(filp, task_pid(current),
PIDTYPE_TGID, 0) (fs/notify/dnotify/dnotify.c), so a directory with a
dnotify registration has an F_GETOWN owner. It is read on a pidfd_getfd
duplicate (same struct file). Known limits: an owner set with F_SETOWN
without dnotify is refused too (a safe false positive); a registration
whose owner was cleared afterwards with F_SETOWN 0 is not seen.

Identity: on the same node the path must name the same (dev, ino), else
``file-changed``; on another node it must be a directory. The position
is a filesystem cookie (ext4 htree hash, tmpfs index), meaningful only
for the same directory inode: a non-zero position is restored with lseek
on the same node and refused on another.

A directory removed while open (nlink 0) is recreated empty, with its mode,
owner and times, under its old name and removed again (engine.unlinked;
shared with a removed cwd on the same directory).
"""

from __future__ import annotations

import fcntl
import os
import stat

from .. import pidfd, unlinked
from . import _sys
from ._util import check_async, failed, refuse, refuse_rec

KIND = "directory"
REASONS = ("dnotify", "file-missing", "file-changed", "unsupported-fd", "unsupported-state")

_DELETED = " (deleted)"
_DROP = os.O_CLOEXEC | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | _sys.O_ASYNC


def _owner(info):
    with pidfd.target_fd(info.pid, info.fd) as dup:
        if info.flags & os.O_PATH:
            return 0, 0        # fcntl F_GETOWN fails on O_PATH files, and F_NOTIFY needs a real open
        return fcntl.fcntl(dup, fcntl.F_GETOWN), fcntl.fcntl(dup, _sys.F_GETSIG)


def classify(info, ctx) -> str:
    """Raises dnotify, file-missing (directory removed), file-changed (the
    path names another inode), unsupported-fd (O_ASYNC: unsupported-state)."""
    path = info.link
    removed = unlinked.is_unlinked(path, info.stat or os.stat(info.proc_path))
    if not removed and (path.endswith(_DELETED) or info.nlink == 0):
        raise refuse(info, "file-missing", "the directory was removed while open")
    owner, sig = _owner(info)
    if owner:
        raise refuse(info, "dnotify",
                     f"directory fd has an F_GETOWN owner ({owner}, F_GETSIG {sig}): "
                     f"fcntl(F_NOTIFY) sets one; dnotify registrations cannot be restored")
    check_async(info)
    if removed:
        return f"removed directory {path} at {info.pos}: recreated and removed again at restore"
    try:
        st = os.stat(path)
    except OSError as e:
        raise refuse(info, "file-missing", f"{path}: {e.strerror}") from e
    if (st.st_dev, st.st_ino) != (info.dev, info.ino):
        raise refuse(info, "file-changed", f"{path} names inode {st.st_ino}, the fd has {info.ino}")
    return f"directory {path} at {info.pos}"


def _handle(fd: int):
    """(type, hex) file handle of fd's inode, None where the filesystem has
    none. Unlike (dev, ino) it carries the inode generation."""
    try:
        t, h = _sys.name_to_handle_at(fd, "", _sys.AT_EMPTY_PATH)
    except OSError:
        return None
    return [t, h.hex()]


def dump(info, ctx) -> dict:
    st = os.stat(info.proc_path)
    if unlinked.is_unlinked(info.link, st):
        return {"path": info.link, "removed": unlinked.dir_record(info.link, st)}
    with pidfd.target_fd(info.pid, info.fd) as dup:
        handle = _handle(dup)
    return {"path": info.link, "dev": info.dev, "ino": info.ino, "mode": stat.S_IMODE(info.mode),
            "handle": handle}


def validate(rec: dict, ctx) -> None:
    """Raises file-missing, file-changed, unsupported-fd (see module doc)."""
    if rec.get("removed"):
        why = unlinked.missing_parent(rec["removed"]["path"])
        if why:
            raise refuse_rec(rec, ctx, "file-missing", f"cannot recreate the removed directory: {why}")
        return
    _check(rec, ctx, rec["path"])


def _check(rec: dict, ctx, path: str, fd: int = -1) -> None:
    try:
        st = os.fstat(fd) if fd >= 0 else os.stat(path)
    except OSError as e:
        raise refuse_rec(rec, ctx, "file-missing", f"{path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise refuse_rec(rec, ctx, "file-changed", f"{path} is not a directory any more")
    if ctx.same_node and (st.st_dev, st.st_ino) != (rec["dev"], rec["ino"]):
        raise refuse_rec(rec, ctx, "file-changed",
                         f"{path} is another directory now (inode {st.st_ino}, was {rec['ino']})")
    if ctx.same_node and fd >= 0 and rec.get("handle") and _handle(fd) not in (None, rec["handle"]):
        raise refuse_rec(rec, ctx, "file-changed",
                         f"{path} is a new directory that reuses inode {st.st_ino}")
    if rec.get("pos") and not ctx.same_node:
        raise refuse_rec(rec, ctx, "unsupported-fd",
                         f"directory read position {rec['pos']} is a cookie of the original "
                         f"directory and cannot be placed on another node")


def restore(rec: dict, ctx) -> int:
    """The directory reopened with the same flags and position. Raises the
    refusals of validate (re-checked on the opened fd: no race) and
    EngineError."""
    path = rec["path"]
    flags = (rec.get("flags", 0) & ~_DROP) | os.O_DIRECTORY | os.O_CLOEXEC
    if rec.get("removed"):     # through the recreated one's /proc link: same "(deleted)" name
        path = f"/proc/self/fd/{unlinked.restore_dir(rec['removed'], ctx)}"
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise refuse_rec(rec, ctx, "file-missing", f"{path}: {e.strerror}") from e
    try:
        if not rec.get("removed"):
            _check(rec, ctx, path, fd)
        if rec.get("pos"):
            os.lseek(fd, rec["pos"], os.SEEK_SET)
    except OSError as e:
        os.close(fd)
        raise failed(rec, ctx, f"positioning {path}", e) from e
    except BaseException:
        os.close(fd)
        raise
    return fd
