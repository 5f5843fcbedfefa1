"""mlockall(MCL_FUTURE [| MCL_ONFAULT]): every mapping made from then on is
locked (the mm's def_flags). Shown by no /proc file: the mappings locked
since are (VmFlags "lo", refused as mlock()ed), but a process that made
none since would have come back without it, its next mappings not locked.

Seen by its effect: the dump maps one page in the frozen process (PROT_READ,
anonymous) and reads VmLck before and after: it grows by the page when
def_flags lock it (or the mmap fails with EAGAIN: over RLIMIT_MEMLOCK);
MCL_ONFAULT is told by the page not being populated (pagemap), which
MCL_FUTURE alone does at mmap. The page is unmapped again. Restored as the
restore's last injected calls (procattrs.last, before MDWE), so that none of
the restore's own mappings is locked.
"""

from __future__ import annotations

import os
import struct

from .errors import Refusal
from .libc import SysError

MCL_FUTURE, MCL_ONFAULT = 2, 4
PROT_READ, MAP_PRIVATE, MAP_ANONYMOUS = 1, 2, 0x20
EAGAIN = 11


def vmlck(pid: int) -> int:
    from .procfs import read_status_fields
    return int(read_status_fields(f"/proc/{pid}/status", ("VmLck",)).get("VmLck", "0 kB").split()[0])


def judge(pid: int, addr: int, before: int) -> int:
    """The flags shown by a private anonymous mapping at `addr` just made
    in the frozen process (nothing written to it yet), `before` being its
    VmLck (kB) read just before: locked if MCL_FUTURE, and then populated
    unless MCL_ONFAULT."""
    if vmlck(pid) <= before:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        f.seek(addr // page * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    return MCL_FUTURE if entry >> 63 & 1 else MCL_FUTURE | MCL_ONFAULT


def probe(task) -> int:
    """At the dump, the process frozen: its MCL_FUTURE | MCL_ONFAULT flags
    (0: none), with a page mapped for the purpose (where the batched
    reads ran, their own area told it already: dumpbatch). Raises
    Refusal(unsupported-state) where they cannot be told."""
    page = os.sysconf("SC_PAGE_SIZE")
    before = vmlck(task.pid)
    addr = task.syscall(task.arch.SYS["mmap"], 0, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, (1 << 64) - 1, 0)
    if addr == -EAGAIN:
        raise Refusal("unsupported-state", "mlockall(MCL_FUTURE) at its RLIMIT_MEMLOCK (a page mapped for "
                      "the check could not be locked): whether with MCL_ONFAULT cannot be told", pid=task.pid)
    if -4096 < addr < 0:
        raise SysError("mmap (injected, mlockall check)", -addr, task.pid)
    try:
        return judge(task.pid, addr, before)
    finally:
        r = task.syscall(task.arch.SYS["munmap"], addr, page)
        if -4096 < r < 0:
            raise SysError("munmap (injected, mlockall check)", -r, task.pid)
