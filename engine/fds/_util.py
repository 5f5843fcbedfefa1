"""Small helpers every fd handler of this package uses."""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def closed_on_error(fd: int) -> Iterator[int]:
    """``with closed_on_error(fd):`` closes `fd` if the block raises
    anything (the fd is handed out only when it is fully set up); the
    exception propagates unchanged."""
    try:
        yield fd
    except BaseException:
        os.close(fd)
        raise


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


def check_async(info) -> None:
    """O_ASYNC (SIGIO to an F_SETOWN owner) is process-wide signal state the
    fd handlers do not carry: refuse it rather than lose the signals."""
    from ._sys import O_ASYNC
    if info.flags & O_ASYNC:
        raise refuse(info, "unsupported-state",
                     "O_ASYNC (signal-driven I/O) is set; its owner and signal are not restored")
