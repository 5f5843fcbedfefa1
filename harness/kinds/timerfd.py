"""``timerfd``: a timer on a clock with a first expiry and an interval.

``expirations: N`` makes the workload wait, before the dump, until the timer
has fired N times without reading it; with a one-shot timer, or an interval
far longer than the test (>= 60 s), that count is then exact at check time.
The checker compares the count from fdinfo (``ticks``) and from read(2) with
that, and the next expiry with what the process saw before the dump.

Tolerance rule for the next expiry (timerfd_gettime it_value): time passes
between the pre-dump observation and the check, and an engine may or may not
count the time the process spent in the image (ckpt re-arms with the time
that remained at the dump). So with R0 the remaining time seen before the
dump and E the wall time since then: R0 - E - 2 s <= remaining <= R0 + 50 ms
(never later than it was; never earlier than if the clock ran all along).
"""

from __future__ import annotations

import os
import struct
import time

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import FD_FLAGS, Ctx, Opened, check, fdinfo, flag_bits, wait_readable, within

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

KIND = "timerfd"
TAGS = ("timerfd",)
LONG_MS = 60000          # an interval at least this long does not fire during a scenario
LATE_S, EARLY_S = 0.05, 2.0


def fields(s) -> dict:
    return {"timerfd": s.Map({"clock": s.Enum(("monotonic", "realtime", "boottime")), "value_ms": s.Int(1),
                              "interval_ms": s.Int(0), "flags": s.FdFlags("TFD"), "expirations": s.Int(0)},
                             required=("value_ms",))}


def validate(e: dict, fds: dict) -> List[tuple]:
    spec = e["timerfd"]
    n, interval = spec.get("expirations"), spec.get("interval_ms", 0)
    if n is None:
        return []
    if interval == 0 and n > 1:
        return [("timerfd.expirations", "a one-shot timer fires at most once")]
    if 0 < interval < LONG_MS:
        return [("timerfd.expirations", f"an exact count needs a one-shot timer or interval_ms >= {LONG_MS}")]
    if n > 1:
        return [("timerfd.expirations", "with a long interval the timer fires once during a scenario")]
    return []


def ticks(fd: int) -> int:
    return int(fdinfo(fd).get("ticks", "-1"))


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["timerfd"]
    fd = sysapi.timerfd_create(sysapi.CLOCKS[spec.get("clock", "monotonic")], flag_bits(spec.get("flags"), FD_FLAGS))
    sysapi.timerfd_settime(fd, int(spec["value_ms"]), int(spec.get("interval_ms", 0)))
    want = int(spec.get("expirations", 0))
    deadline = time.monotonic() + int(spec["value_ms"]) / 1000 + 10
    while ticks(fd) < want and time.monotonic() < deadline:
        time.sleep(0.005)
    if ticks(fd) != want and "expirations" in spec:
        raise RuntimeError(f"timerfd fd {e['fd']}: {ticks(fd)} expirations, the scenario says {want}")
    return [Opened(fd, int(e["fd"]), "timerfd")]


def extras(rec: dict) -> None:
    remaining, interval = sysapi.timerfd_gettime(rec["fd"])
    rec["extra"].update(ticks=ticks(rec["fd"]), remaining=remaining, interval=interval, at=time.time())


def _exact(spec: dict) -> bool:
    """Is the expiration count at check time the one before the dump?"""
    return "expirations" in spec or spec.get("interval_ms", 0) >= LONG_MS or \
        (not spec.get("interval_ms") and int(spec["value_ms"]) >= LONG_MS)


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    rec = recs[0]
    fd, spec, seen = rec["fd"], e["timerfd"], rec["extra"]
    interval_ms = int(spec.get("interval_ms", 0))
    out = []
    if phase == "inspect":
        remaining, interval = sysapi.timerfd_gettime(fd)
        clock = sysapi.CLOCKS[spec.get("clock", "monotonic")]
        out += [check(fd, "clockid", clock, int(fdinfo(fd).get("clockid", "-1"))),
                check(fd, "interval (ms)", interval_ms, round(interval * 1000))]
        if _exact(spec):
            out.append(check(fd, "expirations (fdinfo ticks)", int(spec.get("expirations", seen["ticks"])), ticks(fd)))
            out.append(check(fd, "expirations before the dump (fdinfo ticks)", int(spec.get("expirations", 0)),
                             seen["ticks"]))
            if seen["remaining"] == 0:
                out.append(check(fd, "disarmed (it_value)", 0.0, remaining))
            else:
                elapsed = time.time() - seen["at"]
                out.append(within(fd, "next expiry (s): R0 - elapsed - 2 s .. R0 + 50 ms",
                                  seen["remaining"] - elapsed - EARLY_S, seen["remaining"] + LATE_S, remaining))
        elif not interval_ms:
            out.append({"fd": fd, "what": "still armed", "expected": f"0 < remaining <= {spec['value_ms']} ms",
                        "got": round(remaining * 1000), "ok": 0 < remaining * 1000 <= int(spec["value_ms"])})
    elif phase == "consume" and _exact(spec):
        n = int(spec.get("expirations", seen["ticks"]))
        # never block: a count lost in the restore would hang a blocking read
        got = struct.unpack("Q", os.read(fd, 8))[0] if wait_readable(fd, 0) else 0
        out.append(check(fd, "read() expirations", n, got))
    elif phase == "mutate" and interval_ms and not _exact(spec):
        out.append(check(fd, "periodic timer ticks", True, wait_readable(fd, 3 * interval_ms / 1000 + 1)))
    return out
