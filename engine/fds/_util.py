"""Small helpers every fd handler of this package uses."""

from __future__ import annotations

import os

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
