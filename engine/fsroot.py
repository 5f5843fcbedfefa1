"""A chrooted process's root directory, restored (zdtm chroot,
chroot-file): before, a process whose root differed from ckpt's was
refused; a restored process is a clone of the restorer and had ckpt's.

Recorded at the dump: the root's path as ckpt sees it (/proc/PID/root,
which d_path resolves from the reader's root) with its device, inode and inode generation;
ckpt's own root is the one the link names "/" (a bind mount of it is the
same directory through another mount, without the mounts below: a path).
Refused there (`unsupported-state`) when that path does not name that
directory from ckpt (a root that was removed, or is not reachable from
ckpt's own root). At restore the path must still be that directory
(`file-missing` / `file-changed` before any process exists); the new
process calls chroot(path) itself after everything that opens by path
in it (its fds, /proc files) and before its credentials drop
(CAP_SYS_CHROOT), and the restorer reads /proc/PID/root back (device and
inode, generation): a path swapped meanwhile fails the restore. Its working
directory is set before (fchdir) and stays what it was, inside the root
or not, as chroot(2) leaves it. A member sharing its fs with its parent
(CLONE_FS) has it from there.
"""

from __future__ import annotations

import os

from .errors import EngineError, Refusal
from .procfs import self_memo

_ROOT_STAT: dict = self_memo({})


def _mine() -> os.stat_result:
    key = os.getpid()
    if key not in _ROOT_STAT:
        _ROOT_STAT.clear()
        _ROOT_STAT[key] = os.stat("/")
    return _ROOT_STAT[key]


def _gen(path: str):
    """The directory's inode generation (inode numbers are reused once
    freed; dev+ino+generation are not), None where the fs has none."""
    from .files import _generation_of
    return _generation_of(path, None)


def dump(pid: int):
    """None (ckpt's root) or {"path", "dev", "ino"}; raises Refusal."""
    st = os.stat(f"/proc/{pid}/root")
    me = _mine()
    path = os.readlink(f"/proc/{pid}/root")
    # ckpt's own root is "/" from here; the same directory through another
    # mount (a bind mount of /: none of the mounts below it) is a path
    if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino) and path == "/":
        return None
    try:
        here = os.stat(path) if path.startswith("/") else None
    except OSError:
        here = None
    if here is None or (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
        raise Refusal("unsupported-state", f"chrooted to {path}, which does not name its root directory from "
                      "ckpt (removed, or outside ckpt's root)", pid=pid)
    return {"path": path, "dev": st.st_dev, "ino": st.st_ino, "gen": _gen(f"/proc/{pid}/root")}


def check_record(rec) -> bool:
    return rec is None or (isinstance(rec, dict) and isinstance(rec.get("path"), str)
                           and rec["path"].startswith("/") and "\0" not in rec["path"]
                           and all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool)
                                   and rec[k] >= 0 for k in ("dev", "ino"))
                           and (rec.get("gen") is None or isinstance(rec["gen"], int)))


def validate(rec) -> list:
    if rec is None:
        return []
    if not check_record(rec):
        return [Refusal("image-invalid", "core.json root")]
    try:
        st = os.stat(rec["path"])
    except OSError as e:
        return [Refusal("file-missing", f"the process's root directory: {e.strerror}", path=rec["path"])]
    if (st.st_dev, st.st_ino) != (rec["dev"], rec["ino"]) or _gen(rec["path"]) != rec.get("gen"):
        return [Refusal("file-changed", "the process's root directory is another directory now", path=rec["path"])]
    return []


def enter(b) -> None:
    """In the new process: chroot(path), then read back from outside."""
    rec = b.job.core.get("root")
    if rec is None or b.fs_shared:
        return
    path = rec["path"].encode() + b"\0"
    if len(path) > 2048:
        raise EngineError("root path too long for the scratch area", pid=b.pid)
    b.call("chroot", b.put(path, 0))
    st = os.stat(f"/proc/{b.pid}/root")
    if (st.st_dev, st.st_ino) != (rec["dev"], rec["ino"]) or _gen(f"/proc/{b.pid}/root") != rec.get("gen"):
        raise EngineError(f"root directory {rec['path']} came back another directory", pid=b.pid)
