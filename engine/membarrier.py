"""membarrier(2) registrations: restored.

A process registers for the expedited barriers before it uses them
(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: liburcu, the .NET runtime's
FlushProcessWriteBuffers); the registration lives in its mm. A restored
process is a clone of the restorer, registered for nothing: its next
MEMBARRIER_CMD_PRIVATE_EXPEDITED fails with EPERM (proven on a host:
0 before the dump, -1 EPERM after the restore), which those programs
treat as fatal or silently fall back from.

Read by the process itself: MEMBARRIER_CMD_GET_REGISTRATIONS (Linux 6.3)
is one of the dump's batched reads where this kernel has it (asked once of
ckpt itself); on an older kernel each private command is issued from
inside the frozen process, as CRIU does: 0 where registered, EPERM where
not (a barrier among the process's own threads, all of them stopped: it
changes nothing). A global-expedited registration (REGISTER_GLOBAL_EXPEDITED)
cannot be seen that way and is lost there (README "Known limits").
Registered again with the process settings (engine/build.py process_state).
"""

from __future__ import annotations

CMD_QUERY, CMD_GET_REGISTRATIONS = 0, 1 << 9
EPERM = 1
#: (registration command, the command that fails with EPERM without it)
PRIVATE = ((1 << 4, 1 << 3), (1 << 6, 1 << 5), (1 << 8, 1 << 7))
REGISTER_GLOBAL_EXPEDITED = 1 << 2
ALL = REGISTER_GLOBAL_EXPEDITED | sum(reg for reg, _ in PRIVATE)

_READS = [("membarrier", "membarrier", lambda scr: (CMD_GET_REGISTRATIONS, 0, 0), 0, None)]
_HERE: list = []


def _here() -> tuple:
    """(GET_REGISTRATIONS works, mask of supported commands), of ckpt's own kernel."""
    if not _HERE:
        from . import arch, libc
        nr = arch.current().SYS["membarrier"]
        try:
            supported = libc.syscall(nr, CMD_QUERY, 0, 0)
        except libc.SysError:       # ENOSYS: no membarrier, nothing to register
            supported = 0
        try:
            libc.syscall(nr, CMD_GET_REGISTRATIONS, 0, 0)
            _HERE.append((True, supported))
        except libc.SysError:
            _HERE.append((False, supported))
    return _HERE[0]


def reads() -> list:
    """engine/dump.py _injected_reads appends these (Linux 6.3+)."""
    return _READS if _here()[0] else []


def probe(task) -> int:
    """The private registrations, asked from inside one command at a time
    (a kernel without GET_REGISTRATIONS)."""
    from .libc import SysError
    supported = _here()[1]
    mask = 0
    for reg, cmd in PRIVATE:
        if not supported & cmd:
            continue
        r = task.syscall(task.arch.SYS["membarrier"], cmd, 0, 0)
        if r == 0:
            mask |= reg
        elif r != -EPERM:
            raise SysError("membarrier (injected)", -r, task.pid)
    return mask


def check_record(rec) -> bool:
    return type(rec) is int and rec & ~ALL == 0


def describe(mask: int) -> str:
    names = {4: "global expedited", 16: "private expedited", 64: "private expedited sync-core",
             256: "private expedited rseq"}
    return ", ".join(n for bit, n in names.items() if mask & bit) or "none"


def queue(b, mask: int) -> None:
    for reg in (REGISTER_GLOBAL_EXPEDITED,) + tuple(r for r, _ in PRIVATE):
        if mask & reg:
            b.pending.add("membarrier", reg, 0, 0)
