"""Regular files that still have a name: reopened by path, identity-checked.

A file renamed after it was opened is followed to its new name (the kernel's
link text is the current name); a file whose name now leads elsewhere is
refused, never silently swapped.
"""

from __future__ import annotations

import os

from .. import files
from ..errors import Refusal
from . import _locks

KIND = "regular"
REASONS = ("file-missing", "file-changed", "unsupported-state", "image-invalid", "file-lock")

# Flags the kernel keeps only for open(): never replayed.
_OPEN_ONLY = files.OPEN_ONLY


def preflight(info, path: str, locks_ok: bool = False) -> None:
    """Refusals shared by every fd of a file: state on the open file that a
    reopen would not bring back. File locks are restored on regular files
    that keep their name (`locks_ok`, engine/fds/_locks.py) only."""
    locks = _locks.lock_lines(info.fdinfo_text)
    if locks and not locks_ok:
        raise Refusal("file-lock", f"holds a file lock ({' '.join(locks[0].split()[1:4])}) on a file of this "
                      "kind; locks are restored on regular files that keep their name only",
                      pid=info.pid, fd=info.fd, path=path)
    # F_SETLEASE turns O_ASYNC on (lease breaks are signalled through
    # fasync, fs/locks.c lease_setup); the restored lease sets it again.
    leased = locks_ok and any(lk.split()[1:2] == ["LEASE"] for lk in locks)
    if info.flags & getattr(os, "O_ASYNC", 0o20000) and not leased:
        raise Refusal("unsupported-state", "O_ASYNC signal-driven I/O is not restored",
                      pid=info.pid, fd=info.fd, path=path)


def _mode_text(flags: int) -> str:
    acc = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}.get(flags & 3, "O_PATH?")
    if flags & getattr(os, "O_PATH", 0o10000000):
        acc = "O_PATH"
    extra = [n for n, b in (("O_APPEND", os.O_APPEND), ("O_NONBLOCK", os.O_NONBLOCK),
                            ("O_DIRECT", getattr(os, "O_DIRECT", 0)), ("O_SYNC", os.O_SYNC),
                            ("O_NOATIME", getattr(os, "O_NOATIME", 0))) if b and flags & b == b]
    return "|".join([acc] + extra)


def classify(info, ctx) -> str:
    locks = _locks.record(info, ctx)
    preflight(info, info.link, locks_ok=True)
    try:
        pst = os.stat(info.link)
    except OSError:
        pst = None
    if pst is None or (pst.st_dev, pst.st_ino) != (info.dev, info.ino):
        raise Refusal("file-changed", "its path no longer names the open file",
                      pid=info.pid, fd=info.fd, path=info.link)
    held = f", locks {', '.join(_locks.text(lk) for lk in locks)}" if locks else ""
    return f"regular {info.link} at {info.pos} {_mode_text(info.flags)} size {info.size}{held}"


def dump(info, ctx) -> dict:
    locks = _locks.record(info, ctx)
    if any(lk["kind"] == "LEASE" for lk in locks):
        # any open of a file with a write lease breaks it (a read lease: an
        # open for writing): read the target's own open file instead
        from .. import pidfd
        with pidfd.target_fd(info.pid, info.fd) as dup:
            rec = {"file": files.record_identity(info.link, info.proc_path, ctx, fd=info.fd, pid=info.pid,
                                                 opened=dup)}
    else:
        rec = {"file": files.record_identity(info.link, info.proc_path, ctx, fd=info.fd, pid=info.pid)}
    if locks:
        rec["locks"] = locks
    return rec


def validate(rec: dict, ctx) -> None:
    ident = rec.get("file")
    if not isinstance(ident, dict) or not isinstance(ident.get("path"), str):
        raise Refusal("image-invalid", "regular-file record names no file", fd=rec.get("fd"))
    files.check_identity(ident, ctx, fd=rec.get("fd"), pid=ctx.pid)
    _locks.validate(rec, ctx, ident["path"])


def open_checked(rec: dict, ctx) -> int:
    """Open by path and verify that what was opened is the recorded file
    (closing the race between validate() and open())."""
    ident = rec["file"]
    try:
        # O_ASYNC comes back with a lease (_locks.finish), never from open(2)
        fd = os.open(ident["path"], (rec["flags"] & ~_OPEN_ONLY & ~getattr(os, "O_ASYNC", 0o20000)) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Refusal("file-missing", "no file at this path any more", pid=ctx.pid,
                      fd=rec["fd"], path=ident["path"]) from None
    except OSError as e:
        raise Refusal("file-changed", f"cannot reopen it with its flags: {e.strerror}", pid=ctx.pid,
                      fd=rec["fd"], path=ident["path"]) from None
    try:
        files.check_identity(ident, ctx, fd=rec["fd"], pid=ctx.pid, opened=fd)
        if rec.get("pos"):
            os.lseek(fd, rec["pos"], os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def restore(rec: dict, ctx) -> int:
    fd = open_checked(rec, ctx)
    if rec.get("locks"):
        try:
            _locks.take_on_file(rec, ctx, fd)
        except BaseException:
            os.close(fd)
            raise
    return fd


def finish(rec: dict, ctx, task) -> None:
    """POSIX locks are the new process's own: taken there (_locks)."""
    _locks.finish(rec, ctx, task)
