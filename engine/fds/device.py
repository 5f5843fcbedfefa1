"""Character devices that carry no state: reopened by device number.

Only the memory devices whose behaviour does not depend on anything saved
(/dev/null, /dev/zero, /dev/full, /dev/random, /dev/urandom) are restored;
pseudo-terminals and /dev/tty are the tty kind's (tty.py); other
terminals, block devices and every other device are refused as `device`,
because reopening them would not bring back what the process was talking to.

A node of one of those devices that was unlinked while open (a mknod'ed
/dev/null clone, then rm) is recreated: same device number, mode, owner and
times, under its old name and unlinked again (engine.unlinked), so the fd
reads "<path> (deleted)" and fstat shows what it showed.
"""

from __future__ import annotations

import os
import stat

from .. import unlinked
from ..errors import EngineError, Refusal

KIND = "device"
REASONS = ("device", "file-missing", "image-invalid")

# (major, minor) of drivers/char/mem.c devices -> canonical path
SAFE = {(1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full",
        (1, 8): "/dev/random", (1, 9): "/dev/urandom"}


def _refuse(info, why: str) -> Refusal:
    kind = "block" if stat.S_ISBLK(info.mode) else "character"
    return Refusal("device", f"{kind} device {os.major(info.rdev)}:{os.minor(info.rdev)}: {why}",
                   pid=info.pid, fd=info.fd, path=info.link)


def classify(info, ctx) -> str:
    if not stat.S_ISCHR(info.mode):
        raise _refuse(info, "block devices are not restorable")
    if (os.major(info.rdev), os.minor(info.rdev)) not in SAFE:
        raise _refuse(info, "only " + ", ".join(sorted(SAFE.values())) + " are restorable")
    if _ghost(info):
        return (f"unlinked device node {info.link} ({os.major(info.rdev)}:{os.minor(info.rdev)}), "
                f"mode {stat.filemode(info.mode)}: recreated and unlinked again at restore")
    return f"device {info.link} ({os.major(info.rdev)}:{os.minor(info.rdev)})"


def _ghost(info) -> bool:
    return info.link.endswith(unlinked.DELETED) and info.nlink == 0


def dump(info, ctx) -> dict:
    classify(info, ctx)
    rec = {"rdev": [os.major(info.rdev), os.minor(info.rdev)]}
    if _ghost(info):
        st = os.stat(info.proc_path)
        rec["ghost"] = {"id": f"n{st.st_dev}-{st.st_ino}", "path": unlinked.original_path(info.link),
                        **unlinked.attrs_of(st)}
    return rec


def _target(rec: dict):
    rdev = rec.get("rdev")
    if not (isinstance(rdev, list) and len(rdev) == 2 and tuple(rdev) in SAFE):
        raise Refusal("image-invalid", f"device record names no known device: {rdev!r}", fd=rec.get("fd"))
    return tuple(rdev)


def _path_for(rec: dict) -> str:
    """The recorded path when it is still that device, else the canonical one."""
    want = _target(rec)
    for path in (rec.get("link"), SAFE[want]):
        try:
            st = os.stat(path) if isinstance(path, str) else None
        except OSError:
            continue
        if st is not None and stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == want:
            return path
    raise Refusal("device", f"no {SAFE[want]} device node ({want[0]}:{want[1]}) to reopen",
                  fd=rec.get("fd"), path=rec.get("link"))


def validate(rec: dict, ctx) -> None:
    ghost = rec.get("ghost")
    if ghost is None:
        _path_for(rec)
        return
    _target(rec)
    if not (isinstance(ghost, dict) and isinstance(ghost.get("path"), str) and isinstance(ghost.get("mode"), int)
            and stat.S_ISCHR(ghost["mode"])):
        raise Refusal("image-invalid", "unlinked device node record is malformed", fd=rec.get("fd"))
    why = unlinked.missing_parent(ghost["path"])
    if why:
        raise Refusal("file-missing", f"cannot recreate the unlinked device node: {why}",
                      fd=rec.get("fd"), path=rec.get("link"))


def _ghost_node(rec: dict, ctx) -> int:
    """The recreated node (an O_PATH fd reading rec's own name), once per
    restore: one inode under every name its fds had (hard links, all unlinked)."""
    g = rec["ghost"]
    key = f"ghostnode:{g['id']}"
    fds = ctx.shared.get(key)
    if fds is None:
        paths = [g["path"]] + sorted({r["ghost"]["path"] for r in (ctx.records or [])
                                      if r.get("kind") == KIND and isinstance(r.get("ghost"), dict)
                                      and r["ghost"].get("id") == g["id"]} - {g["path"]})
        fds = unlinked.create_device(paths, g["mode"], os.makedev(*_target(rec)))
        ctx.shared.setdefault("_close_after_restore", []).extend(fds.values())
        try:
            unlinked.apply_attrs(fds[g["path"]], g)
        except OSError as e:
            raise EngineError(f"cannot set the attributes of device node {g['path']}: {e.strerror}",
                              errno=e.errno) from e
        ctx.shared[key] = fds
    return fds[g["path"]]


def restore(rec: dict, ctx) -> int:
    flags = rec["flags"] & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC)
    if rec.get("ghost"):
        where = f"/proc/self/fd/{_ghost_node(rec, ctx)}"   # same dentry: "<path> (deleted)"
    else:
        where = _path_for(rec)
    fd = os.open(where, flags | os.O_NOCTTY | os.O_CLOEXEC)
    if rec.get("pos"):
        try:
            os.lseek(fd, rec["pos"], os.SEEK_SET)
        except OSError:
            pass   # the memory devices ignore the position anyway
    return fd
