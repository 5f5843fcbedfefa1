"""Which call a task blocked in restart_syscall(2) was really making.

A sleeping call the kernel restarts through a restart block (nanosleep,
clock_nanosleep, poll, futex wait with a timeout) is resumed, after a stop
(SIGSTOP/SIGCONT, a debugger, ``ckpt check``, ``dump --leave-running``), by
restart_syscall(2): the syscall register then holds __NR_restart_syscall
and the state lives in the task's restart_block, which a new process does
not have (there, restart_syscall returns -EINTR). Dumped in that state, the
process can only be restored by re-executing the ORIGINAL call, whose
arguments are still in the argument registers (restart_syscall does not
touch them) but whose number is gone.

The kernel shows which restart function the task sleeps in: its stack
(/proc/PID/stack, root only), read *before* the freeze (at the ptrace stop
the task is in get_signal and the restart function is off the stack). The
mapping below is by those names; an unknown stack, or a task that moved
between the read and the freeze, is refused, never guessed.

Seen on x86_64 6.18 (tests/test_engine_restart.py): futex_wait_restart,
do_restart_poll and posix_cpu_nsleep_restart are on the stack;
hrtimer_nanosleep_restart tail-calls the sleep, so a nanosleep restart
shows nothing but the syscall entry.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional, Sequence

# restart function -> the call whose restart it is ("nanosleep-family":
# nanosleep or clock_nanosleep, told apart by the first argument).
RESTART_FNS = {
    "futex_wait_restart": "futex",
    "do_restart_poll": "poll",
    "posix_cpu_nsleep_restart": "clock_nanosleep",
    "alarm_timer_nsleep_restart": "clock_nanosleep",
    "hrtimer_nanosleep_restart": "nanosleep-family",
    "compat_nanosleep_restart": None,       # 32-bit tasks: never ours
}
ENTRY_FNS = ("do_syscall_64", "entry_SYSCALL_64_after_hwframe", "el0_svc", "el0_svc_common",
             "invoke_syscall", "do_el0_svc", "el0t_64_sync_handler", "el0t_64_sync", "x64_sys_call")


def snapshot(pid: int) -> Optional[dict]:
    """/proc/PID/syscall and /proc/PID/stack as they are now (before the
    freeze): {"nr", "args", "sp", "pc", "frames"}; None when the task is
    not blocked in a syscall or the files cannot be read."""
    try:
        line = _read(f"/proc/{pid}/syscall").split()
        if len(line) != 9:
            return None     # not in a syscall: the stack would not be looked at (parse_snapshot)
        # The stack (which the kernel unwinds to show) tells only what a
        # restart_syscall(2) restarts: original_call looks at it only when
        # the snapshot was taken in one, else refuses "moved" whatever it is.
        stack = _read(f"/proc/{pid}/stack") if _in_restart(line[0]) else ""
    except OSError:
        return None
    return parse_snapshot(line, stack)


def _in_restart(nr: str) -> bool:
    from .arch import current
    try:
        return int(nr, 0) == current().NR_RESTART_SYSCALL
    except ValueError:
        return True         # not a number: parse_snapshot decides (None)


def _read(path: str) -> str:
    # os.read, not open(): two of these per task at every freeze
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = b""
        while True:
            more = os.read(fd, 65536)
            if not more:
                return data.decode()
            data += more
    finally:
        os.close(fd)


def parse_snapshot(line: Sequence[str], stack: str) -> Optional[dict]:
    if len(line) != 9:      # "running", or "-1 sp pc" (blocked outside a syscall)
        return None
    try:
        nums = [int(x, 0) for x in line]
    except ValueError:
        return None
    return {"nr": nums[0], "args": nums[1:7], "sp": nums[7], "pc": nums[8], "frames": stack_frames(stack)}


def stack_frames(text: str) -> List[str]:
    """Function names of a /proc/PID/stack dump, innermost first."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out.append(parts[-1].split("+")[0])
    return out


def original_call(snap: Optional[dict], site: dict, restart_nr: int) -> str:
    """Name of the call a task stopped in restart_syscall was making, from
    the pre-freeze snapshot and the registers at the stop (`site`:
    {"nr", "args", "sp", "pc"} as /proc/PID/syscall shows them).
    Raises ValueError with the reason when it cannot be known for sure."""
    if snap is None:
        raise ValueError("the process was not seen blocked in it before the freeze")
    if snap["nr"] != restart_nr or any(snap[k] != site[k] for k in ("args", "sp", "pc")):
        raise ValueError("the process moved between the look before the freeze and the freeze")
    frames = snap["frames"]
    kind = None
    for fn in frames:
        if fn in RESTART_FNS:
            kind = RESTART_FNS[fn]
            if kind is None:
                raise ValueError(f"restart function {fn} is not supported")
            break
    else:
        inner = [f for f in frames if f not in ENTRY_FNS]
        if frames and not inner:
            # Nothing between the syscall entry and the sleep: the restart
            # function tail-called it, which only the hrtimer nanosleep
            # restart does among the kernel's restart functions.
            kind = "nanosleep-family"
        else:
            raise ValueError(f"unknown restart function (kernel stack: {' <- '.join(frames) or 'unreadable'})")
    if kind != "nanosleep-family":
        return kind
    # clock_nanosleep(clockid, flags, req, rem) vs nanosleep(req, rem): an
    # hrtimer clock id is below 16, a timespec pointer is never that low.
    a0 = site["args"][0]
    if a0 < 16:
        return "clock_nanosleep"
    if a0 >= 4096:
        return "nanosleep"
    raise ValueError(f"nanosleep restart with first argument {a0:#x}")
