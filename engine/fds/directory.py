"""Directory fds: reopened by path with O_DIRECTORY, identity-checked, at
the same getdents position; dnotify registrations refused.

dnotify (fcntl F_NOTIFY) is not shown in fdinfo. Its evidence is the fd's
owner: fcntl_dirnotify() calls __f_setown(filp, task_pid(current),
PIDTYPE_TGID, 0) (fs/notify/dnotify/dnotify.c), so a directory with a
dnotify registration has an F_GETOWN owner. It is read on a pidfd_getfd
duplicate (same struct file). Known limits: an owner set with F_SETOWN
without dnotify is refused too (a safe false positive); a registration
whose owner was cleared afterwards with F_SETOWN 0 is not seen.

Identity (README "File identity"): on the same node (same boot) the path
must name the same directory: dev + inode + generation (the file handle
carries the generation), else ``file-changed``. On another node inode
numbers mean nothing, so the directory is recognised by what a program can
see of it: the same permission bits, owner and group, and the same
entries: the sha256 of its sorted (name, type) listing. A file added,
removed, renamed or turned into a directory there is ``file-changed``;
file contents are not part of it. ``--file-validation none`` checks only
that a directory is there. The position
is a filesystem cookie (ext4 htree hash, tmpfs index), meaningful only
for the same directory inode: a non-zero position is restored with lseek
on the same node and refused on another.

A directory removed while open (nlink 0) is recreated empty, with its mode,
owner and times, under its old name and removed again (engine.unlinked;
shared with a removed cwd on the same directory).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .. import pidfd, unlinked
from . import _sys
from ._util import check_async, failed, refuse, refuse_rec

KIND = "directory"
REASONS = ("dnotify", "file-missing", "file-changed", "unsupported-fd", "unsupported-state", "file-lock")

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
    check_async(info, ctx)
    if "\nlock:" in "\n" + info.fdinfo_text:
        # flock(2) on a directory (a lock directory): not carried yet, and
        # never silently dropped.
        raise refuse(info, "file-lock", "a file lock is held through this directory fd; locks are restored "
                     "on regular files only")
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


def listing(path: str) -> tuple:
    """(number of entries, sha256 of the sorted "name NUL type" lines) of
    the directory at `path`; the type is d, l, f or o (other) from d_type.
    `path` is opened anew (a /proc/.../fd/N path gives a new open file
    description), so no fd's getdents position moves."""
    import hashlib
    lines = []
    with os.scandir(os.fsencode(path)) as it:
        for e in it:
            t = (b"l" if e.is_symlink() else b"d" if e.is_dir(follow_symlinks=False)
                 else b"f" if e.is_file(follow_symlinks=False) else b"o")
            lines.append(e.name + b"\0" + t + b"\n")
    lines.sort()
    return len(lines), hashlib.sha256(b"".join(lines)).hexdigest()


def dump(info, ctx) -> dict:
    st = os.stat(info.proc_path)
    if unlinked.is_unlinked(info.link, st):
        return {"path": info.link, "removed": unlinked.dir_record(info.link, st)}
    with pidfd.target_fd(info.pid, info.fd) as dup:
        handle = _handle(dup)
    try:
        count, digest = listing(info.proc_path)
    except OSError as e:
        raise refuse(info, "file-changed", f"cannot list the directory: {e.strerror}") from e
    st = info.stat if info.stat is not None else os.stat(info.proc_path)
    return {"path": info.link, "dev": info.dev, "ino": info.ino, "mode": stat.S_IMODE(info.mode),
            "uid": st.st_uid, "gid": st.st_gid, "handle": handle,
            "entries": count, "listing_sha256": digest}


def validate(rec: dict, ctx) -> None:
    """Raises file-missing, file-changed, unsupported-fd (see module doc)."""
    if rec.get("removed"):
        why = unlinked.missing_parent(rec["removed"]["path"])
        if why:
            raise refuse_rec(rec, ctx, "file-missing", f"cannot recreate the removed directory: {why}")
        return
    path = rec["path"]
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise refuse_rec(rec, ctx, "file-missing" if e.errno == errno.ENOENT else "file-changed",
                         f"{path}: {e.strerror}") from e
    try:
        _check(rec, ctx, path, fd)
    finally:
        os.close(fd)


def _check(rec: dict, ctx, path: str, fd: int) -> None:
    """`fd` is the directory opened from `path`: it, not the path, is judged."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise refuse_rec(rec, ctx, "file-missing", f"{path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise refuse_rec(rec, ctx, "file-changed", f"{path} is not a directory any more")
    if ctx.same_node and (st.st_dev, st.st_ino) != (rec["dev"], rec["ino"]):
        raise refuse_rec(rec, ctx, "file-changed",
                         f"{path} is another directory now (inode {st.st_ino}, was {rec['ino']})")
    if ctx.same_node and rec.get("handle") and _handle(fd) not in (None, rec["handle"]):
        raise refuse_rec(rec, ctx, "file-changed",
                         f"{path} is a new directory that reuses inode {st.st_ino}")
    if not ctx.same_node and ctx.options.file_validation != "none":
        _check_other_node(rec, ctx, path, fd, st)
    if rec.get("pos") and not ctx.same_node:
        raise refuse_rec(rec, ctx, "unsupported-fd",
                         f"directory read position {rec['pos']} is a cookie of the original "
                         f"directory and cannot be placed on another node")


def _check_other_node(rec: dict, ctx, path: str, fd: int, st: os.stat_result) -> None:
    """Another node: same permission bits, owner, group and listing."""
    if "listing_sha256" not in rec:
        raise refuse_rec(rec, ctx, "file-changed", f"{path}: the image has no listing to recognise it by")
    was = (rec["mode"], rec.get("uid"), rec.get("gid"))
    now = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    if was != now:
        raise refuse_rec(rec, ctx, "file-changed", f"{path}: mode/uid/gid {oct(was[0])}/{was[1]}/{was[2]} -> "
                         f"{oct(now[0])}/{now[1]}/{now[2]}")
    try:
        count, digest = listing(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise refuse_rec(rec, ctx, "file-changed", f"{path}: cannot list it: {e.strerror}") from e
    if digest != rec["listing_sha256"]:
        raise refuse_rec(rec, ctx, "file-changed", f"{path}: another directory (its entries differ: "
                         f"{rec.get('entries')} -> {count} names, or other names or types)")


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
