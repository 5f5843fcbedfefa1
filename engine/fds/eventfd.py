"""eventfd: the 64-bit counter and EFD_SEMAPHORE come from fdinfo
(fs/eventfd.c: eventfd_show_fdinfo prints "eventfd-count: %16llx" and,
since Linux 6.6, "eventfd-semaphore: %d"); EFD_NONBLOCK is the file's
O_NONBLOCK status flag. Restored exactly; refused on a kernel that does not
say whether the eventfd is a semaphore (it changes what read() returns).
"""

from __future__ import annotations

import os
import struct

from . import _sys
from ._util import check_async, closed_on_error, failed, refuse

KIND = "eventfd"
REASONS = ("unsupported-fd", "unsupported-state")

_MAX = 0xFFFFFFFFFFFFFFFE      # the largest value an eventfd can hold (eventfd(2))


def _parse(info) -> dict:
    kv = info.fdinfo
    if "eventfd-count" not in kv:
        raise refuse(info, "unsupported-fd", "eventfd without eventfd-count in fdinfo")
    if "eventfd-semaphore" not in kv:
        raise refuse(info, "unsupported-fd",
                     "this kernel does not report EFD_SEMAPHORE in fdinfo (Linux 6.6+ does)")
    return {"count": int(kv["eventfd-count"], 16), "semaphore": kv["eventfd-semaphore"].strip() == "1"}


def classify(info, ctx) -> str:
    """Raises unsupported-fd (kernel without eventfd-semaphore; O_ASYNC: unsupported-state)."""
    check_async(info, ctx)
    st = _parse(info)
    sem = " EFD_SEMAPHORE" if st["semaphore"] else ""
    nb = " EFD_NONBLOCK" if info.flags & os.O_NONBLOCK else ""
    return f"eventfd count {st['count']}{sem}{nb}"


def dump(info, ctx) -> dict:
    return _parse(info)


def validate(rec: dict, ctx) -> None:
    """Nothing on disk to check."""


def restore(rec: dict, ctx) -> int:
    """A new eventfd with the same counter and flags. Raises EngineError."""
    flags = os.O_CLOEXEC | (_sys.EFD_SEMAPHORE if rec["semaphore"] else 0)
    try:
        fd = _sys.eventfd(0, flags)
        with closed_on_error(fd):
            # eventfd()'s initval is an unsigned int; a write adds the full
            # 64-bit value (fs/eventfd.c: eventfd_write).
            if rec["count"]:
                os.write(fd, struct.pack("Q", min(rec["count"], _MAX)))
            _sys.set_status_flags(fd, rec.get("flags", 0))
    except OSError as e:
        raise failed(rec, ctx, "recreating the eventfd", e) from e
    return fd
