"""Symlinks held by an O_PATH | O_NOFOLLOW fd (the only way to hold one
open: CRIU's zdtm symlink, symlink01): reopened by path the same way.

At dump: the link's text (readlinkat on the fd itself, empty path), its
owner, group and times. At restore, on the same node the path must name
the same symlink (dev + inode, and the same text), else ``file-changed``;
on another node a symlink with the same text, owner and group. Nothing at
the path: ``file-missing``.

A symlink removed while held (nlink 0, "(deleted)") is recreated with its
text under its old name, its owner and times put back, opened, and
removed again, as a deleted regular file is (a new inode, as there): its
directory must exist and nothing may be at the name.
"""

from __future__ import annotations

import errno
import os
import stat

from .. import pidfd, unlinked
from ._util import failed, refuse, refuse_rec

KIND = "symlink"
REASONS = ("file-missing", "file-changed", "image-invalid")

_DELETED = " (deleted)"
_OPEN = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _text(fd: int) -> str:
    return os.readlink("", dir_fd=fd)


def classify(info, ctx) -> str:
    """Raises file-missing (removed and its directory gone). EngineError
    on system errors."""
    # (its text is not read here: readlink may touch the atime, which the
    # dump then records)
    if info.link.endswith(_DELETED) or info.nlink == 0:
        path = unlinked.original_path(info.link)
        why = unlinked.missing_parent(path)
        if why:
            raise refuse(info, "file-missing", f"cannot recreate the removed symlink {path}: {why}")
        return f"removed symlink {path} (O_PATH): recreated and removed again at restore"
    return f"symlink {info.link} (O_PATH)"


def dump(info, ctx) -> dict:
    with pidfd.target_fd(info.pid, info.fd) as dup:
        st = os.fstat(dup)          # before readlink, which may touch the atime (relatime)
        target = _text(dup)
    rec = {"path": info.link, "target": target, "dev": info.dev, "ino": info.ino,
           "uid": st.st_uid, "gid": st.st_gid, "times": [st.st_atime_ns, st.st_mtime_ns]}
    if info.link.endswith(_DELETED) or info.nlink == 0:
        rec["path"] = unlinked.original_path(info.link)
        rec["removed"] = True
    return rec


def validate(rec: dict, ctx) -> None:
    """Raises file-missing, file-changed (see the module doc)."""
    if not isinstance(rec.get("path"), str) or not rec["path"].startswith("/") or \
            not isinstance(rec.get("target"), str):
        raise refuse_rec(rec, ctx, "image-invalid", "symlink record malformed")
    path = rec["path"]
    if rec.get("removed"):
        why = unlinked.missing_parent(path)
        if why:
            raise refuse_rec(rec, ctx, "file-missing", f"cannot recreate the removed symlink {path}: {why}")
        if os.path.lexists(path):
            raise refuse_rec(rec, ctx, "file-changed", f"{path}: a file is there now; the removed symlink "
                             "cannot be recreated under its name")
        return
    fd = _open(rec, ctx)
    os.close(fd)


def _open(rec: dict, ctx) -> int:
    path = rec["path"]
    try:
        fd = os.open(path, _OPEN)
    except OSError as e:
        raise refuse_rec(rec, ctx, "file-missing" if e.errno == errno.ENOENT else "file-changed",
                         f"{path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        why = ""
        if not stat.S_ISLNK(st.st_mode):
            why = "is not a symlink any more"
        elif _text(fd) != rec["target"]:
            why = f"points elsewhere now ({_text(fd)!r}, was {rec['target']!r})"
        elif ctx.same_node and (st.st_dev, st.st_ino) != (rec["dev"], rec["ino"]):
            why = f"is another symlink now (inode {st.st_ino}, was {rec['ino']})"
        elif not ctx.same_node and (st.st_uid, st.st_gid) != (rec["uid"], rec["gid"]):
            why = f"has owner {st.st_uid}:{st.st_gid}, was {rec['uid']}:{rec['gid']}"
        if why:
            raise refuse_rec(rec, ctx, "file-changed", f"{path} {why}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def restore(rec: dict, ctx) -> int:
    """The symlink opened O_PATH | O_NOFOLLOW. Raises the refusals of
    validate and EngineError."""
    if not rec.get("removed"):
        return _open(rec, ctx)
    path = rec["path"]
    try:
        os.symlink(rec["target"], path)
    except OSError as e:
        raise failed(rec, ctx, f"recreating the removed symlink {path}", e) from e
    try:
        fd = os.open(path, _OPEN)
        try:
            os.chown(path, rec["uid"], rec["gid"], follow_symlinks=False)
            os.utime(path, ns=tuple(rec["times"]), follow_symlinks=False)
        except BaseException:
            os.close(fd)
            raise
    except OSError as e:
        raise failed(rec, ctx, f"recreating the removed symlink {path}", e) from e
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return fd
