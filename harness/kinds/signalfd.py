"""``signalfd``: a signalfd on a few (blocked) signals; the checker compares
the sigmask, that the signals are still blocked, and reads a raised one."""

from __future__ import annotations

import os
import struct
# signal's enums without the enum module (harness/workload.py says why)
import _signal as signal

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List

from .core import FD_FLAGS, Ctx, Opened, check, fdinfo, flag_bits, wait_readable

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

KIND = "signalfd"
TAGS = ("signalfd",)
SIGNALS = ("SIGUSR2", "SIGHUP", "SIGINT", "SIGTERM", "SIGALRM", "SIGCHLD", "SIGWINCH", "SIGRTMIN")


def fields(s) -> dict:
    return {"signalfd": s.Map({"signals": s.List_(s.Enum(SIGNALS, "a signal the workload allows:")),
                               "flags": s.FdFlags("SFD")}, required=("signals",))}


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["signalfd"]
    sigs = [getattr(signal, s) for s in spec["signals"]]
    # signals read through a signalfd must be blocked (signalfd(2))
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    return [Opened(sysapi.signalfd(sigs, flag_bits(spec.get("flags"), FD_FLAGS)), int(e["fd"]), "signalfd")]


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    sigs = sorted(int(getattr(signal, s)) for s in e["signalfd"]["signals"])
    mask = sysapi.sigset_bits(sigs)
    if phase == "inspect":
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return [check(fd, "sigmask", f"{mask:016x}", fdinfo(fd).get("sigmask")),
                check(None, "signals still blocked", sigs, sorted(int(s) for s in blocked if int(s) in sigs))]
    if phase == "mutate":
        os.kill(os.getpid(), sigs[0])
        got = struct.unpack_from("I", os.read(fd, 128))[0] if wait_readable(fd, 2) else None
        return [check(fd, "signal read from signalfd", sigs[0], got)]
    return []
