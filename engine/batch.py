"""Batched syscall injection for a restore: many syscalls, one round trip.

Injecting one syscall costs a ptrace round trip (set the registers,
PTRACE_SYSCALL to the entry stop and again to the exit stop, two waits,
read the registers back); a tree of 50 small processes took ~2300 of them,
most of its restore time (far more under TCG, where every switch between
tracer and tracee is expensive). A :class:`Batch` collects calls that need
no decision in between (the mmaps of every mapping, the prctl/umask/...
settings, the fd installs) and runs them in the new process itself: a small
position-independent machine-code runner (arch ``BATCH_BLOB``) in the
restore's gadget area walks a table of entries

    nr, arg0..arg5, result          (8 little-endian u64: 64 bytes)

making each syscall and writing its result back, stops at the first one
that fails (-4095..-1), and ends on a breakpoint (``int3``) the tracer
catches. The task is resumed with PTRACE_CONT: no stop between the calls.

Results are checked exactly as one-by-one injection checks them: a failing
call raises the same SysError ("NAME (injected)", errno, pid); what a
caller checks in a result (an mmap that landed elsewhere) it checks after
run(). The calls always run in the order added, in both modes.

The breakpoint (x86 int3, arm64 brk #0; its SIGTRAP is recognised by the
pc and si_code the arch module gives) is safe only in a restore (never at dump time, where the
process's own SIGTRAP disposition and pending signals are in play): see
:func:`trap_safe`. Batching is off with ``CKPT_NO_BATCH=1`` (every call is
injected one by one, as before: to compare, and to test both paths), and
on machines whose arch module has no runner. Runners: x86_64 (int3) and
aarch64 (brk #0; tests/test_engine_aarch64_guest.py checks a restore in
an arm64 guest ran its calls in batches).
"""

from __future__ import annotations

import _signal      # not signal: its enums cost ~20 ms at import under TCG, ~14 us per pthread_sigmask
import os
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from . import faults, guard, ptrace, signals
from .errors import EngineError
from .libc import SysError
from .task import INJECTED

ENV_OFF = "CKPT_NO_BATCH"
ENTRY = 64                  # bytes per table entry
SENTINEL = 0x5A5A5A5A5A5A5A5A   # a result slot the runner never wrote (not a syscall result)
SIGTRAP = _signal.SIGTRAP

COUNT = INJECTED     # round trips and batched calls (engine/task.py)


class Data:
    """An argument that is a pointer to these bytes: copied into the batch
    area with the table, replaced by its address there. `place`, when
    given: a function of that address giving the bytes (as many as
    `data`), for data that points into itself (clone3's arguments and the
    TID they point to)."""

    def __init__(self, data: bytes, place=None):
        self.data = bytes(data)
        self.place = place

    def at(self, addr: int) -> bytes:
        if self.place is None:
            return self.data
        got = self.place(addr)
        if len(got) != len(self.data):
            raise EngineError(f"batched syscalls: data placed at {addr:#x} is {len(got)} bytes, not {len(self.data)}")
        return got


def enabled(arch) -> bool:
    return os.environ.get(ENV_OFF, "") in ("", "0") and getattr(arch, "BATCH_BLOB", None) is not None


def trap_safe(b) -> bool:
    """True while the runner's breakpoint SIGTRAP can neither change the
    process's state nor be confused with a signal of its own:
    - its SIGTRAP action is known to be the default (the restorer's,
      copied by the clone, and not yet replaced by the image's): the
      kernel's force_sig resets an ignored (or blocked) SIGTRAP's action
      to SIG_DFL (kernel/signal.c force_sig_info_to_task), so an image's
      SIG_IGN would be lost; the runner unblocks SIGTRAP around the run
      and puts the mask back, so "blocked" never applies;
    - no SIGTRAP of the image can be pending yet (they are queued by the
      pending_signals stage, after which nothing is batched): a second
      SIGTRAP would merge with ours and be lost.
    Nobody else sends this fresh process signals it could have had in the
    image; one that arrives anyway is held back and re-sent at release, as
    a one-by-one injection does (Task._await_syscall_stop)."""
    acts = b.inherited_actions
    return acts is not None and acts.get(str(int(SIGTRAP)), [0])[0] == 0 and not b.signals_queued


class Batch:
    """Calls for one Builder's task (`b`), run in order by run()."""

    def __init__(self, b):
        self.b = b
        self.calls: List[tuple] = []     # (name, nr, args)
        self.expect: dict = {}           # index -> (result wanted, message)
        self.uses_scratch = False        # a queued call reads Builder.put's scratch (Builder.put flushes)

    def add(self, name: str, *args, nr: Optional[int] = None, expect: Optional[tuple] = None) -> int:
        """Queue syscall `name` (or number `nr`, reported as `name`);
        returns its index in the results run() returns. `expect`: (value,
        message): a result other than value raises EngineError(message
        formatted with got=the result), as the caller checking it at once
        would (the calls after it have run then; the process is killed
        either way)."""
        self.calls.append((name, self.b.arch.SYS[name] if nr is None else nr, args))
        if expect is not None:
            self.expect[len(self.calls) - 1] = expect
        return len(self.calls) - 1

    def __len__(self) -> int:
        return len(self.calls)

    def run(self) -> list:
        """Run every queued call; returns their raw results. The first
        failure raises SysError("NAME (injected)", errno, pid) and the calls
        after it do not run (as with Builder.call one by one)."""
        calls, expect = self.take()
        b = self.b
        if not calls:
            return []
        if not _runnable(b, calls):
            results = [_one(b, c) for c in calls]
        else:
            results = []
            held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD)
            try:
                while calls:
                    chunk, calls = _chunk(calls, b.batch_size)
                    results += _finish(b, chunk, _start(b, chunk))
            finally:
                _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
        _check(b, results, expect)
        return results

    def take(self):
        """(the queued calls, their expected results), leaving none queued."""
        calls, self.calls = self.calls, []
        expect, self.expect = self.expect, {}
        self.uses_scratch = False
        return calls, expect


def run_each(builders) -> None:
    """Builder.flush() of several processes side by side (a tree's
    members: each its own address space, so its own table): every runner
    is started before the first is waited for, so the processes run their
    batches while the tracer starts the next (one wait each, not a round
    trip each in a row). A batch that cannot go to its runner in one piece
    is run on its own first. Every process's batch is run (up to its own
    first failure) before the first failure is raised (the caller kills
    them all), in both modes alike."""
    go, started, error = [], [], None
    for b in builders:
        if not b.pending:
            continue
        if _runnable(b, b.pending.calls) and not _chunk(b.pending.calls, b.batch_size)[1]:
            go.append(b)
            continue
        try:
            b.flush()
        except BaseException as e:      # noqa: BLE001 - the others run first
            error = error or e
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD)
    try:
        for b in go:
            calls, expect = b.pending.take()
            try:
                started.append((b, calls, expect, _start(b, calls)))
            except BaseException as e:      # noqa: BLE001 - the started ones are finished first
                error = e
                break
        for b, calls, expect, mask in started:
            try:
                _check(b, _finish(b, calls, mask), expect)
            except BaseException as e:      # noqa: BLE001 - the others are finished first
                error = error or e
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
    if error is not None:
        raise error


def _runnable(b, calls) -> bool:
    return bool(calls) and enabled(b.arch) and trap_safe(b) and bool(b.batch_area)


def _check(b, results: list, expect: dict) -> None:
    for i, (want, message) in sorted(expect.items()):
        if results[i] != want:
            raise EngineError(message.format(got=results[i]), pid=b.pid)


def _one(b, call) -> int:
    name, nr, args = call
    args = [b.put(a.at(b.scratch + 1024), 1024) if isinstance(a, Data) else a for a in args]
    r = b.task.syscall(nr, *args)
    if -4096 < r < 0:
        raise SysError(f"{name} (injected)", -r, b.pid)
    return r


def _chunk(calls: list, room: int):
    """As many calls (at least one) as fit in `room` bytes with their data."""
    used = 0
    for i, (_, _, args) in enumerate(calls):
        need = ENTRY + sum((len(a.data) + 7) & ~7 for a in args if isinstance(a, Data))
        if used + need > room and i:
            return calls[:i], calls[i:]
        used += need
    return calls, []


def _layout(area: int, calls: list) -> bytes:
    """The table (and the Data after it) as it goes to `area`."""
    n = len(calls)
    data = bytearray()
    table = bytearray()
    for _, nr, args in calls:
        vals = []
        for a in args:
            if isinstance(a, Data):
                at = area + n * ENTRY + len(data)
                vals.append(at)
                data += a.at(at) + b"\0" * (-len(a.data) % 8)
            else:
                vals.append(a & 0xFFFFFFFFFFFFFFFF)
        table += struct.pack("<8Q", nr, *(vals + [0] * (6 - len(vals))), SENTINEL)
    return bytes(table + data)


TRAP_BIT = 1 << (SIGTRAP - 1)


def _start(b, calls: list) -> int:
    """The table into the process's batch area, and the process on its way
    through it (with guard.HELD blocked by the caller); returns its signal
    mask, for _finish."""
    task, arch, pid = b.task, b.arch, b.pid
    for _, nr, _ in calls:
        faults.point(task.fault_name, nr)
    task.write_mem(b.batch_area, _layout(b.batch_area, calls))
    mask = ptrace.get_sigmask(pid)
    if mask & TRAP_BIT:
        ptrace.set_sigmask(pid, mask & ~TRAP_BIT)     # see trap_safe()
    regs = task.orig_regs.copy()
    arch.set_batch(regs, b.batch_blob, b.batch_area, len(calls))
    task.set_regs(regs)
    ptrace.cont(pid, 0)
    return mask


def _finish(b, calls: list, mask: int) -> list:
    """Wait for the runner started by _start; the results, or the first
    failure raised as one-by-one injection raises it."""
    task, arch, pid = b.task, b.arch, b.pid
    area, n = b.batch_area, len(calls)
    regs = _await_trap(task, b.batch_blob + arch.BATCH_TRAP_PC)
    if mask & TRAP_BIT:
        ptrace.set_sigmask(pid, mask)
    COUNT["round_trips"] += 1
    COUNT["batched_calls"] += n
    cursor, left = arch.batch_state(regs)
    done = n - left
    raw = task.read_mem(area, n * ENTRY)
    results = [struct.unpack_from("<q", raw, i * ENTRY + 56)[0] for i in range(n)]
    # The runner's registers and its table must tell the same story.
    ran = done + 1 if left else n
    if cursor != area + done * ENTRY or SENTINEL in results[:ran] \
            or any(r != SENTINEL for r in results[ran:]) \
            or results[ran - 1] != arch.retval(regs):
        raise EngineError(f"batched syscalls: the runner stopped in an inconsistent state "
                          f"(cursor {cursor:#x}, {left} left of {n})", pid=pid)
    if left:
        name, nr, _ = calls[done]
        r = results[done]
        if not -4096 < r < 0:
            raise EngineError(f"batched syscalls: call {done} ({name}) stopped the runner with {r}", pid=pid)
        err = SysError(f"{name} (injected)", -r, pid)
        err.batch_index = done      # which call of the chunk failed, from 0
        raise err
    return results


def _await_trap(task, trap: int):
    """Wait for the runner's breakpoint; returns the registers there.
    Any other signal stop is held back (as Task._await_syscall_stop does)
    and the task resumed: a SIGTRAP of someone else's, merged with ours
    at the breakpoint, resumes into the `jmp` back to it, which traps again."""
    pid = task.pid
    while True:
        st = ptrace.wait(pid)
        if st.exited:
            task.attached = False
            raise EngineError(f"pid {pid} died running batched syscalls ({st!r})", pid=pid)
        if st.signal_stop:
            info = signals.siginfo_at_stop(pid)
            if st.sig == SIGTRAP:
                regs = task.get_regs()
                if task.arch.pc(regs) == trap and struct.unpack_from("<i", info, 8)[0] == task.arch.BATCH_SI_CODE:
                    return regs     # ours; resuming from here with signal 0 discards it
            task.deferred_signals.append(st.sig)
            task.deferred_info.append(info)
        ptrace.cont(pid, 0)
