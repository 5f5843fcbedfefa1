"""timerfd: clock, interval and remaining time, restored exactly where the
kernel lets us.

Sources: fdinfo (fs/timerfd.c timerfd_show: "clockid", "ticks", "settime
flags", "it_value", "it_interval") and timerfd_gettime(2) on a pidfd_getfd
duplicate (read-only).

Restore, like CRIU: a disarmed timer stays disarmed; an armed one is
re-armed with the REMAINING time (relative: the process sees the time it
spent frozen in the image as if it had been stopped) and the same interval.
A TFD_TIMER_ABSTIME timer on a wall clock (REALTIME, REALTIME_ALARM) keeps
its absolute deadline instead: that is what it asked for.

Expirations already counted but not read ("ticks") cannot be injected,
except one: a one-shot timer that fired once is re-created by arming it
for 1 ns and waiting for that expiry (same ticks, disarmed). Anything else
with ticks, and TFD_TIMER_CANCEL_ON_SET (its "cancelled" state is not
visible), is refused by name.
"""

from __future__ import annotations

import os
import select

from .. import pidfd
from . import _sys
from ._util import check_async, failed, refuse, refuse_rec

KIND = "timerfd"
REASONS = ("unsupported-fd", "unsupported-state", "image-invalid")

CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME",
          8: "CLOCK_REALTIME_ALARM", 9: "CLOCK_BOOTTIME_ALARM"}
_WALL = (0, 8)


def _fdinfo(info) -> dict:
    kv = info.fdinfo
    try:
        return {"clockid": int(kv["clockid"]), "ticks": int(kv["ticks"]),
                "settime": int(kv["settime flags"], 8)}
    except (KeyError, ValueError) as e:
        raise refuse(info, "unsupported-fd", f"timerfd fdinfo not understood ({e})") from e


def _check(info, st: dict, remaining: int, interval: int) -> None:
    if st["clockid"] not in CLOCKS:
        raise refuse(info, "unsupported-fd", f"timerfd on unknown clock {st['clockid']}")
    if st["settime"] & _sys.TFD_TIMER_CANCEL_ON_SET:
        raise refuse(info, "unsupported-fd",
                     "timerfd with TFD_TIMER_CANCEL_ON_SET (whether it was cancelled is not visible)")
    ticks = st["ticks"]
    if ticks and not (ticks == 1 and remaining == 0 and interval == 0):
        raise refuse(info, "unsupported-fd", f"timerfd with {ticks} unread expirations")


def _times(info):
    with pidfd.target_fd(info.pid, info.fd) as dup:
        return _sys.timerfd_gettime(dup)


def classify(info, ctx) -> str:
    """Raises unsupported-fd (unread expirations, CANCEL_ON_SET, unknown
    clock, O_ASYNC: unsupported-state); EngineError when the duplicate cannot be made."""
    check_async(info)
    st = _fdinfo(info)
    remaining, interval = _times(info)
    _check(info, st, remaining, interval)
    state = "disarmed" if remaining == 0 else f"remaining {remaining / 1e9:.3f}s"
    return (f"timerfd {CLOCKS[st['clockid']]} {state} interval {interval / 1e9:.3f}s"
            f"{' ABSTIME' if st['settime'] & _sys.TFD_TIMER_ABSTIME else ''}"
            f"{', 1 unread expiration' if st['ticks'] else ''}")


def dump(info, ctx) -> dict:
    st = _fdinfo(info)
    remaining, interval = _times(info)
    _check(info, st, remaining, interval)     # the timer may have moved since classify
    rec = {"clockid": st["clockid"], "ticks": st["ticks"], "abstime": bool(st["settime"] & _sys.TFD_TIMER_ABSTIME),
           "remaining_ns": remaining, "interval_ns": interval}
    if rec["abstime"] and st["clockid"] in _WALL and remaining:
        rec["deadline_ns"] = _sys.clock_gettime_ns(st["clockid"]) + remaining
    return rec


def validate(rec: dict, ctx) -> None:
    if rec["clockid"] not in CLOCKS:
        raise refuse_rec(rec, ctx, "image-invalid", f"timerfd on unknown clock {rec['clockid']}")


def restore(rec: dict, ctx) -> int:
    """A new timerfd in the dumped state. Raises EngineError."""
    clock = rec["clockid"]
    try:
        fd = _sys.timerfd_create(clock, os.O_CLOEXEC)
        try:
            _arm(fd, rec)
            _sys.set_status_flags(fd, rec.get("flags", 0))
        except BaseException:
            os.close(fd)
            raise
    except OSError as e:
        raise failed(rec, ctx, f"recreating the timerfd on {CLOCKS.get(clock)}", e) from e
    return fd


def _arm(fd: int, rec: dict) -> None:
    remaining, interval = rec["remaining_ns"], rec["interval_ns"]
    if rec["ticks"]:
        # One-shot, fired once, unread: fire it again, now, and wait.
        _sys.timerfd_settime(fd, 0, 1, 0)
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(5000):
            raise OSError(0, "a 1 ns timer did not expire within 5 s")
        return
    if remaining == 0:
        return                                   # disarmed stays disarmed
    if rec["abstime"]:
        if "deadline_ns" in rec:
            _sys.timerfd_settime(fd, _sys.TFD_TIMER_ABSTIME, rec["deadline_ns"], interval)
        else:
            now = _sys.clock_gettime_ns(rec["clockid"])
            _sys.timerfd_settime(fd, _sys.TFD_TIMER_ABSTIME, now + remaining, interval)
        return
    _sys.timerfd_settime(fd, 0, remaining, interval)
