"""signalfd: the signal mask is in fdinfo ("sigmask:\t%016llx", fs/signalfd.c
signalfd_show_fdinfo); SFD_NONBLOCK is the O_NONBLOCK status flag. The
pending signals it reads belong to the process and thread (restored with
the process's signal state by the core), not to the fd.
"""

from __future__ import annotations

import os
import signal

from . import _sys
from ._util import check_async, closed_on_error, failed, refuse

KIND = "signalfd"
REASONS = ("unsupported-fd", "unsupported-state")


def _mask(info) -> int:
    text = info.fdinfo.get("sigmask")
    if text is None:
        raise refuse(info, "unsupported-fd", "signalfd without sigmask in fdinfo")
    return int(text, 16)


def _names(mask: int) -> str:
    out = []
    for n in range(1, 65):
        if mask >> (n - 1) & 1:
            try:
                out.append(signal.Signals(n).name)
            except ValueError:
                out.append(str(n))
    return ",".join(out) or "empty"


def classify(info, ctx) -> str:
    """Raises unsupported-fd (no sigmask in fdinfo; O_ASYNC: unsupported-state)."""
    check_async(info, ctx)
    return f"signalfd mask {_names(_mask(info))}"


def dump(info, ctx) -> dict:
    return {"sigmask": _mask(info)}


def validate(rec: dict, ctx) -> None:
    """Nothing on disk to check."""


def restore(rec: dict, ctx) -> int:
    """A new signalfd with the same mask and flags. Raises EngineError."""
    try:
        fd = _sys.signalfd(rec["sigmask"], os.O_CLOEXEC)
        with closed_on_error(fd):
            _sys.set_status_flags(fd, rec.get("flags", 0))
    except OSError as e:
        raise failed(rec, ctx, "recreating the signalfd", e) from e
    return fd
