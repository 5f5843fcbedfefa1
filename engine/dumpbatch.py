"""A dump's fixed reads in one run: brk, the 62 sigactions, sigaltstack...

One by one, each read the process must make itself (engine/dump.py
_injected_reads: no /proc file shows them) is a ptrace round trip: set the
registers, PTRACE_SYSCALL to the entry stop and to the exit stop, read the
registers back. 69 of them were most of a small process's frozen time
(~9 ms on a host, ~70 ms in a TCG guest). Here the frozen process makes
them all in one go, from a small runner (arch DUMP_BLOB) in a temporary
anonymous mapping: one injected mmap, one run, one injected munmap.

How the run ends is the point. The restore's runner (engine/batch.py)
ends on a breakpoint; at dump time that is unsafe: the int3's SIGTRAP is
forced (kernel/signal.c force_sig_info_to_task), which resets a blocked
or ignored SIGTRAP's action to SIG_DFL, and a SIGTRAP someone else sends
in the instant between the trap and its dequeue merges with ours and is
lost. So the runner's last call is rt_tgsigqueueinfo of a real-time signal
to itself, unblocked for the run (PTRACE_SETSIGMASK), carrying a random
cookie: a queued signal merges with nothing, its delivery stop is the
tracer's "done", and resuming from that stop with signal 0 discards it.
The signal is chosen among those pending nowhere for the task (its own
queue and the shared one), so none of the process's own is delivered in
our place. Any other signal stop during the run is held back as a
one-by-one injection holds it (Task._await_syscall_stop).

If the queueing fails (the user's RLIMIT_SIGPENDING reached between the
SigQ check and the run), the runner falls to a breakpoint; SIGTRAP is
unblocked for the run too and the batch is used only when SIGTRAP is
neither ignored nor pending, so even that breakpoint changes no action
and merges with nothing already queued.

Not used (the caller reads one by one, as before) when: the arch has no
DUMP_BLOB (aarch64 today), CKPT_NO_BATCH=1, the task runs under a seccomp
filter that is not suspended, SIGTRAP is ignored or pending, every
real-time signal is pending, the signal queue is full, or the mmap is
refused (RLIMIT_AS, a memory-deny-write-execute policy). Left behind: the
mapping is unmapped before the dump goes on, so /proc/PID/maps is as it
was; VmPeak of a process at its peak grows by the mapping's 16 KiB.
"""

from __future__ import annotations

import _signal      # not signal: its enums cost ~20 ms at import under TCG
import os
import struct

from . import faults, guard, procfs, ptrace, signals
from .errors import EngineError
from .libc import SysError
from .task import INJECTED

PAGE = 4096
AREA = 4 * PAGE            # runner | table + out buffers + siginfo
ENTRY = 64                 # nr, six args, result (as engine/batch.py)
OUT = 32                   # bytes of each read's out buffer (a sigaction: 32)
SENTINEL = 0x5A5A5A5A5A5A5A5A
SI_QUEUE = -1
SIGTRAP = int(_signal.SIGTRAP)
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
PROT_RWX = 7
_ENTRY_STRUCT = struct.Struct("<8Q")
_PAD = [[0] * (6 - k) for k in range(7)]     # zero arguments after a step's own


def usable(task, status: dict) -> int:
    """The real-time signal the run would end with, or 0 when the batch
    must not be used for this task (see the module's docstring)."""
    if os.environ.get("CKPT_NO_BATCH", "") not in ("", "0") or getattr(task.arch, "DUMP_BLOB", None) is None:
        return 0
    pending = procfs.parse_sigmask(status.get("SigPnd", "0")) | procfs.parse_sigmask(status.get("ShdPnd", "0"))
    ignored = procfs.parse_sigmask(status.get("SigIgn", "0"))
    if (pending | ignored) >> (SIGTRAP - 1) & 1:
        return 0
    try:
        queued, limit = (int(x) for x in status.get("SigQ", "").split("/"))
    except ValueError:
        return 0
    if queued + 1 >= limit:
        return 0
    for sig in range(64, 33, -1):       # glibc keeps 32 and 33 for itself
        if not pending >> (sig - 1) & 1:
            return sig
    return 0


def _place(vmas, size: int, top: int) -> int:
    """The lowest address >= 256 MiB with `size` bytes clear of every
    mapping by at least a page each side: never adjacent, so the kernel
    cannot merge it with (and later split) a mapping of the process's."""
    addr = 0x10000000
    for v in sorted(vmas, key=lambda v: v["start"]):
        s, e = v["start"] - PAGE, v["end"] + PAGE
        if e <= addr:
            continue
        if s >= addr + size:
            break
        addr = e
    if addr + size > top:
        raise EngineError("no room for the dump's batch area")
    return addr


class Run:
    """One task's batched reads: map(), start(), finish(), unmap()."""

    def __init__(self, task, vmas, status: dict, sig: int, steps: list):
        self.task, self.vmas, self.steps, self.sig = task, vmas, steps, sig
        self.tgid = int(status.get("Tgid", task.pid))
        self.uid = int(status.get("Uid", "0").split()[0])
        self.cookie = int.from_bytes(os.urandom(8), "little")
        self.area = None
        self.mask = None
        self.mlock_future = None

    # Each step: (key, syscall name, args(out buffer address), bytes read back or 0, decode)
    def map(self) -> bool:
        """The area, by one injected mmap; False when it cannot be had."""
        from . import mlockfuture
        t = self.task
        addr = _place(self.vmas, AREA, t.arch.TASK_SIZE)
        before = mlockfuture.vmlck(t.pid)
        got = t.syscall(t.arch.SYS["mmap"], addr, AREA, PROT_RWX, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                        (1 << 64) - 1, 0)
        if -4096 < got < 0:
            return False
        if got != addr:     # a kernel without MAP_FIXED_NOREPLACE put it elsewhere
            self.area = got
            self.unmap()
            return False
        self.area = addr
        # A mapping made in the frozen process, nothing written yet: what
        # mlockall(MCL_FUTURE) does to it is the process's flags, without
        # the two injected calls of a page mapped for just that.
        self.mlock_future = mlockfuture.judge(t.pid, addr, before)
        return True

    def _layout(self) -> bytes:
        """The table (one entry a step, then the ending rt_tgsigqueueinfo),
        the steps' zeroed out buffers and the siginfo, packed in place into
        one buffer (made for every member of a tree: ~85 entries each)."""
        n = len(self.steps)
        table = self.area + PAGE
        out = table + (n + 1) * ENTRY
        info = out + n * OUT
        sys_ = self.task.arch.SYS
        raw = bytearray((n + 1) * ENTRY + n * OUT + 128)
        pack = _ENTRY_STRUCT.pack_into
        for i, (_, name, args, _, _) in enumerate(self.steps):
            a = [v & 0xFFFFFFFFFFFFFFFF for v in args(out + i * OUT)]
            a += _PAD[len(a)]
            pack(raw, i * ENTRY, sys_[name], a[0], a[1], a[2], a[3], a[4], a[5], SENTINEL)
        pack(raw, n * ENTRY, sys_["rt_tgsigqueueinfo"], self.tgid, self.task.pid, self.sig, info, 0, 0, SENTINEL)
        # siginfo: signo, errno, code, (pad), si_pid, si_uid, si_value
        struct.pack_into("<iiiiIIQ", raw, (n + 1) * ENTRY + n * OUT, self.sig, 0, SI_QUEUE, 0, self.tgid, self.uid,
                         self.cookie)
        return bytes(raw)

    def start(self) -> None:
        """The runner and its table into the area, the task on its way."""
        t = self.task
        for _, name, _, _, _ in self.steps:
            faults.point(t.fault_name, t.arch.SYS[name])
        # Through /proc/PID/mem: a ptrace write into an executable mapping
        # keeps the instruction cache coherent (see engine/gadget.py).
        os.pwrite(t.mem_fd(), t.arch.DUMP_BLOB, self.area)
        t.write_mem(self.area + PAGE, self._layout())
        mask = ptrace.get_sigmask(t.pid)
        regs = t.orig_regs.copy()
        t.arch.set_batch(regs, self.area, self.area + PAGE, len(self.steps))
        ptrace.set_sigmask(t.pid, mask & ~(1 << (self.sig - 1)) & ~(1 << (SIGTRAP - 1)))
        self.mask = mask
        try:
            t.set_regs(regs)
            ptrace.cont(t.pid, 0)
        except BaseException:
            self._put_back()
            raise

    def _put_back(self) -> None:
        t = self.task
        if t.attached and self.mask is not None:
            ptrace.set_sigmask(t.pid, self.mask)
            t.set_regs(t.resume_regs)
        self.mask = None

    def finish(self):
        """Wait for the run's end; the reads' values by key (None: the run
        could not end by its signal, nothing read). Raises
        SysError for a read that failed (as one-by-one injection would),
        EngineError when the run did not end as it must."""
        t, arch = self.task, self.task.arch
        done_pc, trap_pc = self.area + arch.DUMP_DONE_PC, self.area + arch.DUMP_TRAP_PC
        try:
            while True:
                st = ptrace.wait(t.pid)
                if st.exited:
                    t.attached = False
                    raise EngineError(f"pid {t.pid} died running the dump's batched reads ({st!r})", pid=t.pid)
                if st.signal_stop:
                    info = signals.siginfo_at_stop(t.pid)
                    regs = t.get_regs()
                    pc = arch.pc(regs)
                    _, _, code, _, spid, _, value = struct.unpack_from("<iiiiIIQ", info)
                    if st.sig == self.sig and pc == done_pc and code == SI_QUEUE and spid == self.tgid \
                            and value == self.cookie:
                        ended = arch.retval(regs)     # 0: queued (its result not stored yet)
                        break       # ours: resuming with signal 0 discards it
                    if st.sig == SIGTRAP and pc == trap_pc and code == arch.BATCH_SI_CODE:
                        ended = arch.retval(regs)     # the queueing failed: why
                        break
                    t.deferred_signals.append(st.sig)
                    t.deferred_info.append(info)
                ptrace.cont(t.pid, 0)
        finally:
            self._put_back()
        INJECTED["round_trips"] += 1
        INJECTED["batched_calls"] += len(self.steps) + 1
        n = len(self.steps)
        table = self.area + PAGE
        raw = t.read_mem(table, n * ENTRY + ENTRY + n * OUT)
        results = [struct.unpack_from("<q", raw, i * ENTRY + 56)[0] for i in range(n)]
        if ended != 0:
            return None     # the queue filled up since the SigQ check: read one by one
        if SENTINEL in [r & 0xFFFFFFFFFFFFFFFF for r in results]:
            raise EngineError("the dump's batched reads stopped before their end", pid=t.pid)
        got: dict = {"sigactions": {}, "itimers": [None, None, None]}
        base = (n + 1) * ENTRY
        for i, (key, name, _, nbytes, decode) in enumerate(self.steps):
            r = results[i]
            if -4096 < r < 0 and nbytes >= 0:     # -1: the raw result, a failure is the answer
                raise SysError(f"{name} (injected)", -r, t.pid)
            value = decode(raw[base + i * OUT:base + i * OUT + nbytes]) if nbytes > 0 else r
            if isinstance(key, tuple):
                got[key[0]][key[1]] = value
            else:
                got[key] = value
        return got

    def unmap(self) -> None:
        """The area gone (one injected munmap); raises if it stays: the
        process must never go on with it."""
        t = self.task
        if self.area is None or not t.attached:
            return
        r = t.syscall(t.arch.SYS["munmap"], self.area, AREA)
        if -4096 < r < 0:
            raise SysError("munmap (injected)", -r, t.pid)
        self.area = None


def read(task, vmas, status: dict, steps: list):
    """The steps' values by key from one batched run, or None when the
    batch cannot be used here (the caller reads one by one)."""
    sig = usable(task, status)
    if not sig:
        return None
    run = Run(task, vmas, status, sig, steps)
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD)   # no ^C while the task runs our code
    try:
        if not run.map():
            return None
        try:
            run.start()
            out = run.finish()
            if out is not None:
                out["mlock_future"] = run.mlock_future
            return out
        finally:
            run.unmap()
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)


def read_each(items: list, steps: list) -> dict:
    """read() for several frozen processes (a tree's members, each its own
    address space) side by side: one mmap each (task.syscall_each), every
    runner started before the first is waited for, one munmap each.
    `items`: (task, vmas, status); `steps` a list, or a function of
    (task, status) giving each its own. Returns {pid: values} for the members
    read so; the others (a read failed, a member died...) are left to the
    caller, who reads them one by one and meets the failure again in
    context. Raises only when an area could not be unmapped: a process
    must never go on, or be imaged, with it."""
    from . import mlockfuture
    from .task import syscall_each
    runs = []
    for task, vmas, status in items:
        sig = usable(task, status)
        if sig:
            runs.append(Run(task, vmas, status, sig, steps(task, status) if callable(steps) else steps))
    if not runs:
        return {}
    got: dict = {}
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD)
    try:
        try:
            places = [_place(r.vmas, AREA, r.task.arch.TASK_SIZE) for r in runs]
            before = [mlockfuture.vmlck(r.task.pid) for r in runs]
            res = syscall_each([(r.task, r.task.arch.SYS["mmap"],
                                 (a, AREA, PROT_RWX, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                                  (1 << 64) - 1, 0)) for r, a in zip(runs, places)])
        except (EngineError, SysError, OSError):
            return {}       # syscall_each drove every started call to its end: nothing is mapped by a failed one
        for r, got_at in zip(runs, res):
            if not -4096 < got_at < 0:
                r.area = got_at         # unmapped below whatever happens
        for r, a, b in zip(runs, places, before):
            if r.area == a:             # as in Run.map: the fresh area tells mlockall(MCL_FUTURE)
                r.mlock_future = mlockfuture.judge(r.task.pid, a, b)
        for r, values in run_all([r for r, a in zip(runs, places) if r.area == a]):
            if values is not None:
                values["mlock_future"] = r.mlock_future
            got[r.task.pid] = values
        _unmap_each([r for r in runs if r.area is not None])
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
    return got


def run_all(runs: list) -> list:
    """Every run (its area mapped) started, then each waited for, side by
    side; [(run, values)] of those that ended with their values. A run
    that cannot start or end is left out: its task is read one by one by
    the caller, who meets the failure again in context."""
    started, out = [], []
    for r in runs:
        try:
            r.start()
            started.append(r)
        except (EngineError, SysError, OSError):
            pass
    for r in started:
        try:
            values = r.finish()
        except (EngineError, SysError, OSError):
            continue
        if values is not None:
            out.append((r, values))
    return out


def _unmap_each(runs: list) -> None:
    from .task import syscall_each
    live = [r for r in runs if r.task.attached]
    res = syscall_each([(r.task, r.task.arch.SYS["munmap"], (r.area, AREA)) for r in live])
    for r, x in zip(live, res):
        if -4096 < x < 0:
            raise SysError("munmap (injected)", -x, r.task.pid)
        r.area = None
