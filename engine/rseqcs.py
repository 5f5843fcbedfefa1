"""An rseq critical section the freeze interrupted: abort it, as the kernel
would have.

A thread stopped by the freeze was preempted (scheduled out in its ptrace
stop), so the kernel owes it an abort: on its next return to user space,
with its IP inside the section its rseq area's rseq_cs names, it continues
at the section's abort handler (kernel/rseq.c rseq_ip_fixup). But the
first call the dump injects returns to user space at an IP outside the
section, where the same fix-up only clears rseq_cs; put back inside the
section afterwards, in the dumped process (--leave-running, check, a
refused dump) or in a restored one, the thread would run the rest of the
section as if never preempted, and a per-CPU algorithm would commit what it
computed for another CPU: silent corruption. So the abort is done here, at
the freeze, before anything is injected: the registers every release and
the image get continue at the abort handler, and rseq_cs is cleared, as the
kernel does when it aborts. The dumped process and the restored one then
run the handler, as they would after any preemption.

A descriptor the kernel would reject (it kills the thread with SIGSEGV at
its next return to user space) is refused, as is a thread stopped in a
system call inside a section (not allowed by rseq; the kernel's own abort
would drop the call's restart, which the image's restart handling would
not). Layouts: include/uapi/linux/rseq.h.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

from . import ptrace
from .errors import Refusal
from .libc import SysError

RSEQ_CS_FIELD = 8           # struct rseq: u32 cpu_id_start, u32 cpu_id, u64 rseq_cs
DESCRIPTOR = struct.Struct("<IIQQQ")   # version, flags, start_ip, post_commit_offset, abort_ip
TASK_SIZE = 1 << 56         # the largest user space of x86_64 (LA57) and aarch64; above it is rejected
SIG_BEFORE_ABORT = 4        # the signature is the 4 bytes before abort_ip


def inspect(task) -> Optional[tuple]:
    """At the freeze, before any injected call and before the task's mask
    is touched (a refusal lets it go as it was): (area, abort_ip) when the
    thread is inside its rseq critical section, else None. Raises
    Refusal(unsupported-state) for a descriptor the kernel would reject
    and for a system call inside a section; SysError."""
    try:
        conf = ptrace.get_rseq(task.pid)
    except SysError as e:
        if e.errno == 5:    # EIO: no PTRACE_GET_RSEQ_CONFIGURATION (< 5.13); the dump refuses it later
            return None
        raise
    area = conf["pointer"]
    if not area:
        return None
    (cs,) = struct.unpack("<Q", task.read_mem(area + RSEQ_CS_FIELD, 8))
    if not cs:
        return None
    ip = task.arch.pc(task.orig_regs)
    try:
        version, flags, start, length, abort_ip = DESCRIPTOR.unpack(task.read_mem(cs, DESCRIPTOR.size))
    except (SysError, OSError) as e:
        raise _bad(task, f"rseq_cs {cs:#x} cannot be read ({e})") from None
    inside = 0 <= ip - start < length
    _check(task, cs, version, flags if inside else 0, start, length, abort_ip, conf["signature"])
    if not inside:
        return None     # the kernel only clears rseq_cs at the next return
    if task.arch.in_call(task.orig_regs):
        raise Refusal("unsupported-state", f"thread {task.pid} is stopped in a system call inside an rseq "
                      f"critical section ({start:#x}+{length:#x})", pid=task.pid)
    return area, abort_ip


def abort(task, found: tuple) -> None:
    """Once the registers to resume with and to save are known: both
    continue at the abort handler, and rseq_cs is cleared (kernel/rseq.c
    rseq_ip_fixup clears it as it aborts)."""
    area, abort_ip = found
    for name in ("resume_regs", "image_regs"):
        regs = getattr(task, name).copy()
        task.arch.set_pc(regs, abort_ip)
        setattr(task, name, regs)
    task.write_mem(area + RSEQ_CS_FIELD, bytes(8))
    task.rseq_aborted = abort_ip


def _check(task, cs, version, flags, start, length, abort_ip, signature) -> None:
    # kernel/rseq.c rseq_get_rseq_cs (at every fix-up) and rseq_warn_flags
    # (only inside, hence flags 0 from outside): what makes the kernel kill
    # the thread instead of clearing rseq_cs or aborting the section.
    end = start + length
    if version or flags or start >= TASK_SIZE or end >= TASK_SIZE or abort_ip >= TASK_SIZE \
            or abort_ip < SIG_BEFORE_ABORT or 0 <= abort_ip - start < length:
        raise _bad(task, f"rseq_cs {cs:#x}: version {version}, flags {flags:#x}, "
                         f"section {start:#x}+{length:#x}, abort {abort_ip:#x}")
    try:
        (sig,) = struct.unpack("<I", task.read_mem(abort_ip - SIG_BEFORE_ABORT, 4))
    except (SysError, OSError) as e:
        raise _bad(task, f"the signature before rseq abort handler {abort_ip:#x} cannot be read ({e})") from None
    if sig != signature:
        raise _bad(task, f"rseq abort handler {abort_ip:#x} has signature {sig:#x}, registered {signature:#x}")


def _bad(task, what: str) -> Refusal:
    return Refusal("unsupported-state", f"thread {task.pid}: {what}; the kernel kills the thread (SIGSEGV) "
                   "at its next return to user space", pid=task.pid)
