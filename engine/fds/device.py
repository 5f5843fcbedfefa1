"""Character devices that carry no state: reopened by device number.

Only the memory devices whose behaviour does not depend on anything saved
(/dev/null, /dev/zero, /dev/full, /dev/random, /dev/urandom) are restored;
terminals, block devices and every other device are refused as `device`,
because reopening them would not bring back what the process was talking to.
"""

from __future__ import annotations

import os
import stat

from ..errors import Refusal

KIND = "device"
REASONS = ("device", "image-invalid")

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
    return f"device {info.link} ({os.major(info.rdev)}:{os.minor(info.rdev)})"


def dump(info, ctx) -> dict:
    classify(info, ctx)
    return {"rdev": [os.major(info.rdev), os.minor(info.rdev)]}


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
    _path_for(rec)


def restore(rec: dict, ctx) -> int:
    flags = rec["flags"] & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC)
    fd = os.open(_path_for(rec), flags | os.O_NOCTTY | os.O_CLOEXEC)
    if rec.get("pos"):
        try:
            os.lseek(fd, rec["pos"], os.SEEK_SET)
        except OSError:
            pass   # the memory devices ignore the position anyway
    return fd
