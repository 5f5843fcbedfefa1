"""eventfd: the 64-bit counter comes from fdinfo (fs/eventfd.c:
eventfd_show_fdinfo prints "eventfd-count: %16llx"); EFD_NONBLOCK is the
file's O_NONBLOCK status flag; EFD_SEMAPHORE lives only in the eventfd's
own ctx->flags. Linux 6.6+ prints it ("eventfd-semaphore: %d"); below 6.6
it is found by a probe (engine/fds/_efdprobe.py) on the same open file,
which leaves the counter as it found it or refuses. Restored exactly.

An eventfd whose count is ULLONG_MAX (only the kernel's eventfd_signal()
gets there: poll reports EPOLLERR) is refused: write(2) cannot add up to
it, so no restore can make it again.
"""

from __future__ import annotations

import os
import struct

from . import _efdprobe, _sys
from ._util import check_async, check_held_outside, closed_on_error, failed, refuse

KIND = "eventfd"
REASONS = ("unsupported-fd", "unsupported-state")

_MAX = 0xFFFFFFFFFFFFFFFE      # the largest count write(2) can leave (eventfd(2))

# Tests only: set to "1", ckpt acts as on a kernel whose fdinfo lacks the
# eventfd-semaphore line (Linux < 6.6) and probes instead.
HIDE_SEMAPHORE_LINE_ENV = "CKPT_TEST_EVENTFD_NO_SEMAPHORE_LINE"


def _semaphore_line(kv) -> "str | None":
    if os.environ.get(HIDE_SEMAPHORE_LINE_ENV) == "1":
        return None
    return kv.get("eventfd-semaphore")


def _parse(info, ctx) -> dict:
    kv = info.fdinfo
    if "eventfd-count" not in kv:
        raise refuse(info, "unsupported-fd", "eventfd without eventfd-count in fdinfo")
    count = int(kv["eventfd-count"], 16)
    if count > _MAX:
        raise refuse(info, "unsupported-fd", "eventfd count overflowed to ULLONG_MAX (signalled by the kernel, "
                     "EPOLLERR): write(2) cannot make that count again")
    line = _semaphore_line(kv)
    if line is not None:
        return {"count": count, "semaphore": line.strip() == "1"}
    if ctx.dry_run and not getattr(ctx.options, "probe", True):
        return {"count": count, "semaphore": None, "probed": False}
    # once per fd and dump: classify and dump both ask, and each probe writes
    key = f"eventfd-probe:{info.pid}:{info.fd}"
    if key not in ctx.shared:
        ctx.shared[key] = _efdprobe.semaphore(info, ctx, count)
    return {"count": count, "semaphore": ctx.shared[key], "probed": True}


def classify(info, ctx) -> str:
    """Raises unsupported-fd (a count of ULLONG_MAX; held by a process
    outside the dump too; below Linux 6.6, a probe that cannot be exact:
    see _efdprobe; O_ASYNC: unsupported-state)."""
    check_async(info, ctx)
    check_held_outside(info, ctx, "eventfd")
    st = _parse(info, ctx)
    sem = " EFD_SEMAPHORE" if st["semaphore"] else ""
    nb = " EFD_NONBLOCK" if info.flags & os.O_NONBLOCK else ""
    how = " (probed)" if st.get("probed") else ""
    if st["semaphore"] is None:
        how = " (EFD_SEMAPHORE not shown below Linux 6.6: found by a probe at dump, not looked at here)"
    return f"eventfd count {st['count']}{sem}{nb}{how}"


def dump(info, ctx) -> dict:
    st = _parse(info, ctx)
    return {"count": st["count"], "semaphore": st["semaphore"]}


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
