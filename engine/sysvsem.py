"""SysV semaphores the process was the last to operate on: refused.

A semop with SEM_UNDO leaves an adjustment in the process's undo list,
which the kernel applies when the process exits. That list shows nowhere
(no /proc file, no query), so it cannot be saved - and the dump's own kill
of the original applies it: the semaphore goes back, and a restored
process that believed it held it now does not (proven on a host: semval
1 before the dump, 0 seen by the restored process). What does show is
each semaphore's last operating process (semctl GETPID: the tgid of its
last semop), so a process that was the last to operate on a semaphore is
refused, SEM_UNDO or not (that is not visible either). Not seen: an
adjustment on a semaphore another process has operated on since (see
README "Known limits"). Same IPC namespace as ckpt (engine/check.py
refuses any other), so /proc/sysvipc/sem lists the process's semaphores.
"""

from __future__ import annotations

import ctypes
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

from .errors import Refusal

GETPID = 11
_semctl = None


def last_operated_by(pid: int, table: "Optional[dict]" = None) -> list:
    """[(semid, semnum)] whose last semop was by process `pid`. `table`:
    snapshot()'s, taken once every process asked about was frozen (a
    tree's members): a frozen process makes no semop, so it cannot become
    the last operator after it; one it was may since have been operated
    on by another process (then refused when it need not be, never the
    other way round)."""
    if table is not None:
        return [key for key, last in table.items() if last == pid]
    try:
        with open("/proc/sysvipc/sem") as f:
            rows = f.read().splitlines()[1:]
    except OSError:             # no SysV IPC in this kernel
        return []
    if not rows:
        return []
    global _semctl
    if _semctl is None:
        _semctl = ctypes.CDLL(None, use_errno=True).semctl
    out = []
    for row in rows:
        f = row.split()
        semid, nsems = int(f[1]), int(f[3])
        for i in range(nsems):
            if _semctl(semid, i, GETPID) == pid:     # -1: removed since: none of its
                out.append((semid, i))
    return out


def snapshot() -> dict:
    """{(semid, semnum): pid of its last semop} of every semaphore now."""
    try:
        with open("/proc/sysvipc/sem") as f:
            rows = f.read().splitlines()[1:]
    except OSError:             # no SysV IPC in this kernel
        return {}
    if not rows:
        return {}
    global _semctl
    if _semctl is None:
        _semctl = ctypes.CDLL(None, use_errno=True).semctl
    out = {}
    for row in rows:
        f = row.split()
        semid, nsems = int(f[1]), int(f[3])
        for i in range(nsems):
            out[(semid, i)] = _semctl(semid, i, GETPID)     # -1: removed since: no one's
    return out


def check(pid: int, table: "Optional[dict]" = None) -> None:
    """Raises Refusal(unsupported-state) naming the semaphores. `table`:
    as for last_operated_by()."""
    sems = last_operated_by(pid, table)
    if sems:
        names = ", ".join(f"{semid}#{n}" for semid, n in sems[:4]) + (" ..." if len(sems) > 4 else "")
        raise Refusal("unsupported-state", f"last to operate on SysV semaphore {names}: a SEM_UNDO adjustment it "
                      "may hold is not visible, would not be restored, and the dump's kill would apply it", pid=pid)
