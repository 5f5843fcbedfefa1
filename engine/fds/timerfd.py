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

Expirations already counted but not read ("ticks") are put back with
TFD_IOC_SET_TICKS (fs/timerfd.c, CONFIG_CHECKPOINT_RESTORE, the ioctl CRIU
uses). On a kernel without it, a one-shot timer that fired once is still
re-created exactly by arming it for 1 ns and waiting for that expiry; any
other unread count is refused by name at restore, before a process exists.
TFD_TIMER_CANCEL_ON_SET (its "cancelled" state is not visible) is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct

from .. import pidfd
from . import _sys
from ._util import check_async, check_held_outside, closed_on_error, failed, refuse, refuse_rec

KIND = "timerfd"
REASONS = ("unsupported-fd", "unsupported-state", "image-invalid")

CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME",
          8: "CLOCK_REALTIME_ALARM", 9: "CLOCK_BOOTTIME_ALARM"}
_WALL = (0, 8)


def _fdinfo(info, kv=None) -> dict:
    kv = info.fdinfo if kv is None else kv
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


def _times(info):
    with pidfd.target_fd(info.pid, info.fd) as dup:
        return _sys.timerfd_gettime(dup)


def classify(info, ctx) -> str:
    """Raises unsupported-fd (CANCEL_ON_SET, unknown clock; O_ASYNC:
    unsupported-state); EngineError when the duplicate cannot be made.
    Unread expirations are restored (see the module docstring); a kernel
    that cannot put them back is found at restore, in validate()."""
    check_async(info, ctx)
    check_held_outside(info, ctx, "timerfd")
    st = _fdinfo(info)
    remaining, interval = _times(info)
    _check(info, st, remaining, interval)
    state = "disarmed" if remaining == 0 else f"remaining {remaining / 1e9:.3f}s"
    return (f"timerfd {CLOCKS[st['clockid']]} {state} interval {interval / 1e9:.3f}s"
            f"{' ABSTIME' if st['settime'] & _sys.TFD_TIMER_ABSTIME else ''}"
            f"{', %d unread expiration(s)' % st['ticks'] if st['ticks'] else ''}")


def _fresh_fdinfo(info) -> dict:
    """fdinfo read again: for an expired periodic timer the kernel counts
    the missed periods lazily, and timerfd_gettime() (in _times) is what
    folds them into "ticks" (fs/timerfd.c: hrtimer_forward_now)."""
    kv = {}
    with open(f"/proc/{info.pid}/fdinfo/{info.fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            kv.setdefault(k.strip(), v.strip())
    return _fdinfo(info, kv)


def dump(info, ctx) -> dict:
    remaining, interval = _times(info)
    st = _fresh_fdinfo(info)
    _check(info, st, remaining, interval)     # the timer may have moved since classify
    rec = {"clockid": st["clockid"], "ticks": st["ticks"], "abstime": bool(st["settime"] & _sys.TFD_TIMER_ABSTIME),
           "remaining_ns": remaining, "interval_ns": interval}
    if rec["abstime"] and st["clockid"] in _WALL and remaining:
        rec["deadline_ns"] = _sys.clock_gettime_ns(st["clockid"]) + remaining
    return rec


TFD_IOC_SET_TICKS = 0x40085400   # _IOW('T', 0, __u64)


def _set_ticks(fd: int, ticks: int) -> None:
    fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("Q", ticks))


def _one_shot_fired(rec: dict) -> bool:
    return rec["ticks"] == 1 and rec["remaining_ns"] == 0 and rec["interval_ns"] == 0


def _kernel_sets_ticks() -> bool:
    """Whether this kernel has TFD_IOC_SET_TICKS, asked of a throwaway timerfd."""
    fd = _sys.timerfd_create(1, os.O_CLOEXEC)
    try:
        _set_ticks(fd, 1)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        os.close(fd)


def validate(rec: dict, ctx) -> None:
    if rec["clockid"] not in CLOCKS:
        raise refuse_rec(rec, ctx, "image-invalid", f"timerfd on unknown clock {rec['clockid']}")
    if not isinstance(rec.get("ticks"), int) or rec["ticks"] < 0:
        raise refuse_rec(rec, ctx, "image-invalid", "timerfd record has no valid tick count")
    if rec["ticks"] and not _one_shot_fired(rec):
        have = ctx.shared.get("timerfd:set-ticks")
        if have is None:
            have = ctx.shared["timerfd:set-ticks"] = _kernel_sets_ticks()
        if not have:
            raise refuse_rec(rec, ctx, "unsupported-fd",
                             f"timerfd with {rec['ticks']} unread expirations, and this kernel has no "
                             "TFD_IOC_SET_TICKS (CONFIG_CHECKPOINT_RESTORE) to put them back")


def restore(rec: dict, ctx) -> int:
    """A new timerfd in the dumped state. Raises EngineError."""
    clock = rec["clockid"]
    try:
        fd = _sys.timerfd_create(clock, os.O_CLOEXEC)
        with closed_on_error(fd):
            _arm(fd, rec)
            _sys.set_status_flags(fd, rec.get("flags", 0))
    except OSError as e:
        raise failed(rec, ctx, f"recreating the timerfd on {CLOCKS.get(clock)}", e) from e
    return fd


def _arm(fd: int, rec: dict) -> None:
    remaining, interval = rec["remaining_ns"], rec["interval_ns"]
    if remaining:
        if not rec["abstime"]:
            _sys.timerfd_settime(fd, 0, remaining, interval)
        elif "deadline_ns" in rec:
            _sys.timerfd_settime(fd, _sys.TFD_TIMER_ABSTIME, rec["deadline_ns"], interval)
        else:
            now = _sys.clock_gettime_ns(rec["clockid"])
            _sys.timerfd_settime(fd, _sys.TFD_TIMER_ABSTIME, now + remaining, interval)
    # (a disarmed timer stays disarmed)
    if not rec["ticks"]:
        return
    try:
        # After arming: timerfd_settime() zeroes the count (timerfd_setup).
        _set_ticks(fd, rec["ticks"])
    except OSError as e:
        if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP) or not _one_shot_fired(rec):
            raise
        # No TFD_IOC_SET_TICKS; a one-shot that fired once, unread: fire it
        # again, now, and wait.
        _sys.timerfd_settime(fd, 0, 1, 0)
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(5000):
            raise OSError(0, "a 1 ns timer did not expire within 5 s")
