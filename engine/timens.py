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
from where they stood at the dump, as CRIU's timens does. A restore that
cannot make the namespace (no time namespaces, no CAP_SYS_ADMIN /
CAP_SYS_TIME) is refused before a process exists. Clocks ahead (a machine
up longer) need nothing: the process sees time pass, as over a freeze.

A process already in a time namespace of its own (restored so, or put
there by a container runtime) is dumped like any other: the clocks
recorded are the ones it reads (ckpt's plus its namespace's offsets), and
its offsets too (meta "timens"). On the same boot the restore makes a
namespace with those very offsets (the process sees time pass, as every
other process of its old namespace does); on another boot, as above. One
that unshared a time namespace for its children and has none in it yet,
or a tree whose members are in different ones, is refused.
"""

from __future__ import annotations

import os
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Optional

from .errors import Refusal

CLONE_NEWTIME = 0x80
CLOCKS = (("monotonic", time.CLOCK_MONOTONIC), ("boottime", time.CLOCK_BOOTTIME))


# An offset the kernel takes: |offset| below KTIME_SEC_MAX (~292 years).
_MAX_OFFSET = 1 << 62


def record(offs: Optional[dict] = None) -> dict:
    """The clocks now as a process in a namespace with `offs` reads them
    (the dump's meta "clocks"), in ns."""
    offs = offs or {}
    return {name: time.clock_gettime_ns(cid) + offs.get(name, 0) for name, cid in CLOCKS}


def of(pid: int) -> Optional[dict]:
    """{clock name: offset ns} of the time namespace `pid` is in, None when
    it is ckpt's. Raises Refusal (`unsupported-state`): a namespace it
    unshared for its children and has none in it yet, or offsets that
    cannot be read."""
    try:
        mine = os.readlink("/proc/self/ns/time")
    except OSError:
        return None                      # no time namespaces here
    theirs = os.readlink(f"/proc/{pid}/ns/time")
    try:
        children = os.readlink(f"/proc/{pid}/ns/time_for_children")
    except OSError:
        children = None
    if children != theirs:
        raise Refusal("unsupported-state", "it unshared a time namespace for its children and has none in it yet: "
                      "their clocks' offsets cannot be carried")
    if theirs == mine:
        return None
    # /proc/PID/timens_offsets shows the namespace of its children: the
    # same one here (checked above)
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/timens_offsets") as f:
            for line in f:
                name, sec, nsec = line.split()
                out[name] = int(sec) * 1_000_000_000 + int(nsec)
    except (OSError, ValueError) as e:
        raise Refusal("unsupported-state", f"in a time namespace whose offsets cannot be read: {e}") from None
    if set(out) != {n for n, _ in CLOCKS}:
        raise Refusal("unsupported-state", f"in a time namespace with clocks {sorted(out)}, not "
                      f"{sorted(n for n, _ in CLOCKS)}")
    return out


def meta(offs: Optional[dict]) -> dict:
    """The dump's manifest meta of the clocks: as the process reads them,
    and the offsets of its own time namespace, if it is in one."""
    out = {"clocks": record(offs)}
    if offs is not None:
        out["timens"] = dict(offs)
    return out


def check_record(rec) -> bool:
    return rec is None or (isinstance(rec, dict) and set(rec) == {n for n, _ in CLOCKS} and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63 for v in rec.values()))


def check_offsets(rec) -> bool:
    return rec is None or (isinstance(rec, dict) and set(rec) == {n for n, _ in CLOCKS} and all(
        isinstance(v, int) and not isinstance(v, bool) and -_MAX_OFFSET < v < _MAX_OFFSET for v in rec.values()))


def offsets(meta: dict, same_node: bool) -> dict:
    """{clock name: offset ns} the restored process needs ({}: none): on
    the same boot, those of the namespace it was in; on another boot, each
    clock behind the image's is carried on from it."""
    if not isinstance(meta, dict):
        return {}
    if same_node:
        return dict(meta.get("timens") or {})
    rec = meta.get("clocks")
    if not isinstance(rec, dict):
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
    return Refusal("unsupported-state", f"the process's monotonic clocks need offsets here ({describe(offs)}), "
                   "or it would see them run backwards and its deadlines move that far into the future; "
                   f"that needs a time namespace, but {why}")


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
        raise Refusal("unsupported-state", f"the process's monotonic clocks need offsets here "
                      f"({describe(offs)}) and no time namespace could carry them: {e}") from None
