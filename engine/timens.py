"""The monotonic clocks across machines: a time namespace at a restore
where they are behind the image's.

A process reads CLOCK_MONOTONIC and CLOCK_BOOTTIME as absolute values and
keeps deadlines in them (clock_nanosleep with TIMER_ABSTIME: Python's
time.sleep since 3.11, glibc's timed waits, every event loop's timer
heap). On the dump's machine (same boot) they only go forward, as over a
long freeze. On another machine they are that machine's: where it has been
up for less time, the clocks would run backwards, every deadline would lie
that much in the future (a sleep stalls for the difference) and an elapsed
time could come out negative. Found by the scenario generator
(scenarios/found/gen-s1203-0197.yaml: a thread in a time.sleep loop,
restored on the second guest, stopped counting).

The dump records both clocks as they are when the process is last seen
(meta "clocks"). A restore on another boot whose clocks are behind makes
the restorer unshare a time namespace (Linux 5.6) whose offsets carry the
image's clocks on, before it creates any process: the process, its
threads and a tree's members are born in it and read the clocks going on
from where they stood at the dump, as CRIU's timens does. The restored
process is then in a time namespace other than ckpt's, which a later dump
refuses (`namespaces`, engine/check.py), by name; a restore that cannot
make the namespace (no time namespaces, no CAP_SYS_ADMIN/CAP_SYS_TIME) is
refused before a process exists. Clocks ahead (a machine up longer) need
nothing: the process sees time pass, as over a freeze.
"""

from __future__ import annotations

import os
import time

from .errors import Refusal

CLONE_NEWTIME = 0x80
CLOCKS = (("monotonic", time.CLOCK_MONOTONIC), ("boottime", time.CLOCK_BOOTTIME))


def record() -> dict:
    """The clocks now (the dump's meta "clocks"), in ns."""
    return {name: time.clock_gettime_ns(cid) for name, cid in CLOCKS}


def check_record(rec) -> bool:
    return rec is None or (isinstance(rec, dict) and set(rec) == {n for n, _ in CLOCKS} and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63 for v in rec.values()))


def offsets(meta: dict, same_node: bool) -> dict:
    """{clock name: offset ns} the restored process needs ({}: none): on
    another boot, each clock behind the image's is carried on from it."""
    rec = meta.get("clocks") if isinstance(meta, dict) else None
    if same_node or not isinstance(rec, dict):
        return {}
    now = record()
    behind = {n: rec[n] - now[n] for n, _ in CLOCKS if isinstance(rec.get(n), int) and rec[n] > now[n]}
    if not behind:
        return {}
    return {n: max(0, rec[n] - now[n]) for n, _ in CLOCKS if isinstance(rec.get(n), int)}


def describe(offs: dict) -> str:
    return ", ".join(f"{n} {v / 1e9:.3f} s" for n, v in sorted(offs.items()))


def usable() -> str:
    """Why this ckpt cannot make a time namespace ("" when it can)."""
    if not os.path.exists("/proc/self/timens_offsets"):
        return "this kernel has no time namespaces (Linux 5.6, CONFIG_TIME_NS)"
    with open("/proc/self/status") as f:
        eff = next((int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:")), 0)
    if not (eff >> 21 & 1 and eff >> 25 & 1):     # CAP_SYS_ADMIN, CAP_SYS_TIME
        return "ckpt lacks CAP_SYS_ADMIN or CAP_SYS_TIME"
    return ""


def refusal(offs: dict):
    """The pre-flight's refusal when the clocks need a namespace ckpt cannot make, else None."""
    if not offs:
        return None
    why = usable()
    if not why:
        return None
    return Refusal("unsupported-state", f"the monotonic clocks here are behind the image's ({describe(offs)}): "
                   "the process would see them run backwards and its deadlines move that far into the future; "
                   f"carrying them on needs a time namespace, but {why}")


def enter(offs: dict) -> None:
    """In the restorer, before it creates any process: its children are
    born in a new time namespace with these offsets. Raises Refusal."""
    if not offs:
        return
    import ctypes
    try:
        c = ctypes.CDLL(None, use_errno=True)
        if c.unshare(CLONE_NEWTIME) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"unshare(CLONE_NEWTIME): {os.strerror(e)}")
        text = "".join(f"{n} {v // 1_000_000_000} {v % 1_000_000_000}\n" for n, v in sorted(offs.items()))
        with open("/proc/self/timens_offsets", "w") as f:
            f.write(text)
    except OSError as e:
        raise Refusal("unsupported-state", f"the monotonic clocks here are behind the image's "
                      f"({describe(offs)}) and no time namespace could carry them on: {e}") from None
