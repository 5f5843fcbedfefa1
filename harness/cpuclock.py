"""Where a scenario's wall time went on the host: CPU time run and time
spent runnable but waiting for a CPU, per process, from the scheduler's own
accounting (/proc/PID/task/TID/schedstat: ns on a CPU, ns waiting on a
run queue, slices; every thread summed).

Why: under TCG a guest's vCPU is a host thread. A scenario whose QEMU ran
for most of its wall time is the guest's own work (fewer or cheaper guest
steps help); one whose QEMU waited long on a run queue lost the time to a
saturated host (other guests, the harness, other jobs); one whose QEMU
neither ran nor waited was idle, waiting for the host (round trips).
A figure for the reports, never a verdict.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Tuple


def sample(pid: int) -> Optional[Tuple[int, int]]:
    """(ns run, ns waiting runnable) of ``pid``'s live threads; None: gone."""
    run = wait = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
            run += int(fields[0])
            wait += int(fields[1])
        except (OSError, IndexError, ValueError):
            continue        # a thread that ended between the listing and the read
    return run, wait


def take(pids: Iterable[int]) -> Dict[int, Tuple[int, int]]:
    """A sample of each of ``pids`` that is still there."""
    out: Dict[int, Tuple[int, int]] = {}
    for p in pids:
        s = sample(p)
        if s is not None:
            out[p] = s
    return out


def spent(before: Dict[int, Tuple[int, int]], after: Dict[int, Tuple[int, int]]) -> Tuple[float, float]:
    """Seconds (run, waiting) between two samples, summed over the processes
    in ``after`` (one not in ``before`` started since: all of its time)."""
    run = wait = 0
    for p, (r, w) in after.items():
        r0, w0 = before.get(p, (0, 0))
        run += max(0, r - r0)
        wait += max(0, w - w0)
    return round(run / 1e9, 3), round(wait / 1e9, 3)


def host_stat() -> Tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat's cpu line:
    idle and iowait are not busy); (0, 0) when unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    total = sum(fields[:8])         # user..steal (guest time is in user already)
    idle = sum(fields[3:5])
    return total - idle, total


def busy(before: Tuple[int, int], after: Tuple[int, int]) -> Optional[float]:
    """The share of all CPUs' time not idle between two :func:`host_stat`s."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 3) if total > 0 else None
