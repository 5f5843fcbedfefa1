"""A seized, frozen task: registers, memory, and syscall injection.

Syscalls are *injected*: the task's registers are pointed at an existing
``syscall`` instruction (in its [vdso] for a dump, in a gadget page for a
restore), it is resumed with PTRACE_SYSCALL to the syscall-entry stop and
again to the exit stop, and the result register is read back (ENGINE-NOTES "Dump"). Nothing
but the registers is changed; :meth:`Task.release` puts them back.
"""

from __future__ import annotations

import _signal      # not signal: its enums cost ~20 ms at import under TCG, ~14 us per pthread_sigmask
import os
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from . import arch as _arch
from . import faults, guard, libc, ptrace, restart, rseqcs, signals, sud
from .errors import EngineError, Refusal
from .libc import SysError

# Injected syscalls since this process started: ptrace round trips, and the
# calls run by engine/batch.py's runner (the restorer reports them,
# engine/restore.py; bench/compare.py records them).
INJECTED = {"round_trips": 0, "batched_calls": 0}

# Signals whose default action is a group stop (kernel/signal.c sig_kernel_stop).
JOB_STOP_SIGNALS = frozenset({_signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU})


class Task:
    """One ptrace-stopped thread. Create with :meth:`seize` (dump) or
    :meth:`adopt` (a restore child stopped by PTRACE_TRACEME + SIGSTOP)."""

    def __init__(self, pid: int):
        self.arch = _arch.current()
        self.pid = pid
        self.tgid = pid     # the process a thread belongs to (engine/threads.py)
        self.syscall_ip: Optional[int] = None
        self.scratch: Optional[int] = None      # address of writable scratch memory
        self.deferred_signals: List[int] = []   # signals that arrived while frozen
        self.deferred_info: List[bytes] = []    # their siginfo (engine/signals.py)
        self.sigmask: Optional[int] = None      # the process's own mask while all are blocked
        self.pre_freeze: Optional[dict] = None  # /proc/PID/syscall+stack before (engine/restart.py)
        self.restart_problem: Optional[str] = None
        self.settled = 0        # pending signals taken at the end of the freeze (settle)
        self.job_stop = 0       # the stop signal of a job-control stopped task (group stop), else 0
        self.attached = True
        self.sud: Optional[dict] = None     # syscall user dispatch release() puts back (engine/sud.py)
        self._mem_fd: Optional[int] = None
        self.fault_name = "dump.syscall"       # "restore.syscall" once adopted (engine/faults.py)
        self.orig_regs = self.get_regs()
        # What release() puts back by default. Normally the registers as
        # read; an arch's after_seize() hook may adjust it (aarch64: the
        # syscall a restart must re-execute, see arch/aarch64.py).
        self.resume_regs = self.orig_regs
        # What an image saves (x86_64/aarch64 image_regs: a restart_syscall
        # given back its original call).
        self.image_regs = self.orig_regs

    # -- attaching -----------------------------------------------------------
    @classmethod
    def seize(cls, pid: int, options: int = ptrace.O_TRACESYSGOOD, auto_attached: bool = False,
              tgid: Optional[int] = None, finish: bool = True) -> "Task":
        """PTRACE_SEIZE + PTRACE_INTERRUPT and wait for the interrupt stop.
        `auto_attached`: a thread already ours (PTRACE_O_TRACECLONE on the
        thread that created it, engine/threads.py): only its first stop is
        waited for. `finish`: also :meth:`settle` and :meth:`finish_freeze`
        it now; False leaves the task exactly as the kernel stopped it (its
        own mask, nothing injected) for a freeze of several tasks to finish
        once all are stopped (engine/threads.py). Raises Refusal(ptraced |
        no-such-process | unsupported-state)."""
        return cls.finish_seize(cls.begin_seize(pid, options, auto_attached), tgid, finish)

    @classmethod
    def begin_seize(cls, pid: int, options: int = ptrace.O_TRACESYSGOOD, auto_attached: bool = False):
        """seize()'s first half: seized and interrupted, not waited for, so
        that several tasks stop side by side (engine/threads.py, tree.py);
        every result goes to finish_seize(), even when another failed.
        Raises as seize()."""
        # Before the freeze: at the ptrace stop the kernel stack no longer
        # shows which call a restart_syscall(2) restarts.
        pre = restart.snapshot(pid)
        if not auto_attached:
            try:
                ptrace.seize(pid, options)
            except SysError as e:
                if e.errno == 1:     # EPERM: someone else traces it (or we may not)
                    raise Refusal("ptraced", "PTRACE_SEIZE refused (EPERM): already traced", pid=pid) from None
                if e.errno == 3:
                    raise Refusal("no-such-process", "exited before it could be frozen", pid=pid) from None
                raise
            try:
                ptrace.interrupt(pid)
            except BaseException:
                try:
                    ptrace.detach(pid, 0)
                except SysError:
                    pass
                raise
        return (pid, pre)

    @classmethod
    def finish_seize(cls, started, tgid: Optional[int] = None, finish: bool = True) -> "Task":
        """seize()'s second half: wait for the interrupt stop of a task
        begin_seize() started. Raises as seize(); the task is let go then."""
        pid, pre = started
        task = None
        job_stop = 0
        try:
            while True:
                st = ptrace.wait(pid)
                if st.exited:
                    raise Refusal("no-such-process", "exited while being frozen", pid=pid)
                if st.event_stop:
                    if st.sig != _signal.SIGTRAP:
                        if st.sig not in JOB_STOP_SIGNALS:
                            ptrace.detach(pid, 0)
                            raise Refusal("unsupported-state", f"a group stop by signal {st.sig}", pid=pid)
                        # A group stop (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU):
                        # job-control stopped. A seized task is resumed from
                        # it for every injected call, and goes back to it when
                        # let go (__ptrace_unlink re-arms the stop while the
                        # group's SIGNAL_STOP_STOPPED holds); the image
                        # carries the signal (engine/jobstop.py).
                        job_stop = st.sig
                    break
                # Any other ptrace stop consumes the pending interrupt
                # (kernel/signal.c ptrace_stop: "any trap clears pending
                # STOP trap"), so it is asked for again before the task goes
                # on: else a thread creating threads in a loop would stop
                # at each PTRACE_EVENT_CLONE and never at the interrupt.
                ptrace.interrupt(pid)
                if st.signal_stop:
                    # A signal raced with the freeze: deliver it now (it
                    # arrived before the checkpoint); the interrupt stops
                    # the task right after.
                    ptrace.cont(pid, st.sig)
                    continue
                ptrace.cont(pid, 0)
            task = cls(pid)
            task.job_stop = job_stop
            if tgid is not None:
                task.tgid = tgid
            task.pre_freeze = pre
            if finish:
                task.settle()
                task.finish_freeze()
            return task
        except Refusal:
            if task is not None and task.attached:
                # settle() found the task stopped by job control or gone
                try:
                    ptrace.detach(pid, 0)
                except SysError:
                    pass
            raise
        except BaseException:
            try:
                if task is not None:
                    signals.unblock(task)
                ptrace.detach(pid, 0)
            except SysError:
                pass
            raise

    # -- the end of a freeze ------------------------------------------------------
    SETTLE_ROUNDS = 3
    SETTLE_WAIT = 2.0      # seconds for one delivery stop (TCG guests are slow)

    def settle(self) -> int:
        """Let the task take the pending signals whose handler it was about
        to run, before anything is read or injected; returns how many.

        A task stopped by PTRACE_INTERRUPT is inside get_signal(), which
        takes the ptrace trap before it dequeues anything: a signal that
        woke it from a call, or arrived while it was stopped, is still
        pending, and the kernel's restart decision for the interrupted call
        (EINTR for the handler, or re-execute) is only taken once it is
        dequeued. On aarch64 do_signal() has already rewound pc/x0 and keeps
        the -ERESTARTxxx code only in a local variable (arch/aarch64.py), so
        no new process could take that decision again. Resumed from this
        stop, the task dequeues the signal into a signal-delivery stop; it is
        passed on with a PTRACE_INTERRUPT queued first, so the kernel, still
        in the same do_signal(), sets up the handler's frame with the right
        outcome of the call (and the mask sigsuspend/ppoll saved) and the
        task stops again before the handler's first instruction: the
        handler runs after the restore (or when an original is let go),
        exactly once. Nothing the program can observe differs: it is what
        would have happened a moment later without the checkpoint.

        Only when the task is in an interrupted call (arch
        interrupted_call) and a pending signal is unblocked by its own mask
        and has a handler (/proc SigCgt), with every task of the freeze
        stopped (no other thread can take a shared one meanwhile). At most
        SETTLE_ROUNDS signals; what is left stays pending (the task is then
        at a handler's entry, no longer in a call). Raises Refusal
        (no-such-process: a default action killed it; unsupported-state:
        a stop signal stopped it), SysError."""
        n = 0
        probe = getattr(self.arch, "interrupted_call", None)
        if self.job_stop:
            # Stopped: nothing runs a handler before a SIGCONT; what is
            # pending stays pending, in the image and in the original.
            probe = None
        while n < self.SETTLE_ROUNDS and probe is not None and probe(self) \
                and signals.deliverable_handled(self.pid):
            held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD)
            try:
                self._deliver_one()
            finally:
                _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
            n += 1
            self.orig_regs = self.resume_regs = self.image_regs = self.get_regs()
        self.settled = n
        return n

    def _deliver_one(self) -> None:
        ptrace.cont(self.pid, 0)
        delivered = False
        deadline = time.monotonic() + self.SETTLE_WAIT
        while True:
            st = ptrace.wait_nohang(self.pid)
            if st is None:
                if time.monotonic() < deadline:
                    time.sleep(0.0005)
                    continue
                # No delivery stop: the signal was gone (it cannot be, with
                # every thread stopped); the task runs on: stop it again.
                ptrace.interrupt(self.pid)
                deadline = float("inf")
                continue
            if st.exited:
                self.attached = False
                raise Refusal("no-such-process", "exited while taking a pending signal during the freeze",
                              pid=self.pid)
            if st.event_stop:
                if st.sig != _signal.SIGTRAP:
                    raise Refusal("unsupported-state", "the process was stopped by job control "
                                  f"(signal {st.sig}) during the freeze; continue it first", pid=self.pid)
                if delivered or deadline == float("inf"):
                    return
                # The interrupt stop itself again (a trap queued before we
                # resumed it): go on to the dequeue.
                ptrace.cont(self.pid, 0)
                continue
            # The signal-delivery stop (or any other): stop right after.
            ptrace.interrupt(self.pid)
            ptrace.cont(self.pid, st.sig if st.signal_stop else 0)
            delivered = delivered or st.signal_stop

    def finish_freeze(self) -> None:
        """The rest of the freeze, once settled: every signal blocked (kept
        pending), the arch's after_seize hook, the registers an image saves,
        an rseq critical section aborted (engine/rseqcs.py: before any call
        is injected, whose return to user space would clear its rseq_cs)."""
        section = rseqcs.inspect(self)
        self.sud = sud.freeze(self)     # off for the injected calls; release() puts it back
        signals.block_all(self)
        hook = getattr(self.arch, "after_seize", None)
        if hook is not None:
            hook(self)
        try:
            self.image_regs = self.arch.image_regs(self)
        except (ValueError, KeyError) as e:
            self.image_regs = self.orig_regs
            self.restart_problem = f"stopped inside restart_syscall(2), which cannot be resumed in a new process: {e}"
        if section is not None:
            rseqcs.abort(self, section)

    @classmethod
    def adopt(cls, pid: int, extra_options: int = 0) -> "Task":
        """Take over a child stopped by PTRACE_TRACEME + kill(SIGSTOP); it is
        killed if the tracer dies (PTRACE_O_EXITKILL). `extra_options`: more
        ptrace options in the same request (a tree member's TRACEFORK)."""
        st = ptrace.wait(pid)
        if not (st.stopped and st.sig == _signal.SIGSTOP):
            raise EngineError(f"restore child {pid}: unexpected first stop {st!r}", pid=pid)
        ptrace.set_options(pid, ptrace.O_TRACESYSGOOD | ptrace.O_EXITKILL | extra_options)
        task = cls(pid)
        task.fault_name = "restore.syscall"
        return task

    # -- registers ---------------------------------------------------------------
    # Layout and extra register sets are per machine (engine/arch): x86_64
    # has NT_PRSTATUS + NT_X86_XSTATE; aarch64 has NT_PRSTATUS + the syscall
    # number (NT_ARM_SYSTEM_CALL) and a blob of FP/SIMD, TLS, PAC... regsets.
    def get_regs(self):
        """Raises SysError."""
        return self.arch.get_regs(self.pid)

    def set_regs(self, regs) -> None:
        """Raises SysError."""
        self.arch.set_regs(self.pid, regs)

    def get_xstate(self) -> bytes:
        """The extended register state as the image stores it. Raises SysError."""
        return self.arch.get_xstate(self.pid, self)

    def set_xstate(self, data: bytes) -> None:
        """Raises SysError when the kernel rejects it (another CPU), Refusal
        for state this machine's module cannot restore exactly."""
        self.arch.set_xstate(self.pid, data)

    # -- injection -------------------------------------------------------------
    def _resume_to_syscall_stop(self) -> None:
        ptrace.syscall(self.pid, 0)
        self._await_syscall_stop()

    def _await_syscall_stop(self) -> None:
        """Wait for the next syscall stop of a task already resumed with
        PTRACE_SYSCALL (resuming it again past any other stop)."""
        while True:
            st = ptrace.wait(self.pid)
            if st.syscall_stop:
                return
            if st.exited:
                self.attached = False
                raise EngineError(f"pid {self.pid} died during syscall injection ({st!r})", pid=self.pid)
            if st.signal_stop:
                # Only SIGSTOP/SIGKILL (all else is blocked, engine/signals.py).
                # Held back, not lost: re-sent when the task is released,
                # and saved as pending in an image.
                self.deferred_signals.append(st.sig)
                try:
                    self.deferred_info.append(signals.siginfo_at_stop(self.pid))
                except SysError:
                    pass
            # event stops (a late PTRACE_INTERRUPT or group stop): step on.
            ptrace.syscall(self.pid, 0)

    def syscall(self, nr: int, *args: int) -> int:
        """Run syscall `nr` in the task; return its raw result (-errno on
        failure). The task is left at the syscall-exit stop."""
        if self.syscall_ip is None:
            raise EngineError("no syscall instruction known in the target", pid=self.pid)
        faults.point(self.fault_name, nr)
        INJECTED["round_trips"] += 1
        # No ^C (KeyboardInterrupt) between here and the registers put back:
        # raised while the task runs, it would leave nothing to unwind with.
        held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD)
        try:
            self._inject_regs(nr, args)
            self._resume_to_syscall_stop()   # entry
            self._resume_to_syscall_stop()   # exit
            ret = self.arch.retval(self.get_regs())
            if self.fault_name == "dump.syscall":
                # Its own registers back at once: between two injections the
                # target is then always safe to let go, even by a tracer that
                # dies (the kernel detaches it as it is).
                self.set_regs(self.resume_regs)
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
        return ret

    def _inject_regs(self, nr: int, args) -> None:
        regs = self.orig_regs.copy()
        self.arch.set_syscall(regs, self.syscall_ip, nr, args)
        self.set_regs(regs)

    def call(self, name: str, *args: int) -> int:
        """syscall by name; raises SysError on a negative result."""
        r = self.syscall(self.arch.SYS[name], *args)
        if -4096 < r < 0:
            raise SysError(f"{name} (injected)", -r, self.pid)
        return r

    # -- memory ----------------------------------------------------------------
    def mem_fd(self) -> int:
        """An O_RDWR fd on /proc/PID/mem (writes there are forced: FOLL_FORCE)."""
        return self._mem()

    def _mem(self) -> int:
        if self._mem_fd is None:
            self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._mem_fd

    def read_mem(self, addr: int, n: int) -> bytes:
        """Bytes of the task's memory; /proc/PID/mem (which can force access
        to PROT_NONE pages) when process_vm_readv cannot."""
        if n <= libc.SMALL_READ:
            got = libc.vm_read_small(self.pid, addr, n)
            if got is not None:
                return got
        buf = bytearray(n)
        try:
            got = libc.vm_readv(self.pid, [(libc.buffer_address(buf), n)], [(addr, n)])
            if got == n:
                return bytes(buf)
        except SysError:
            pass
        return os.pread(self._mem(), n, addr)

    def write_mem(self, addr: int, data: bytes) -> None:
        n = len(data)
        buf = bytearray(data)
        try:
            if libc.vm_writev(self.pid, [(libc.buffer_address(buf), n)], [(addr, n)]) == n:
                return
        except SysError:
            pass
        if os.pwrite(self._mem(), data, addr) != n:
            raise EngineError(f"short write into pid {self.pid} at {addr:#x}", pid=self.pid)

    # -- leaving ---------------------------------------------------------------
    def close(self) -> None:
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None

    def release(self, regs=None) -> None:
        """Put the registers back (the dumped ones, or `regs`) and detach;
        signals held back while frozen are delivered again."""
        self.close()
        if not self.attached:
            return
        self.set_regs(regs if regs is not None else self.resume_regs)
        hook = getattr(self.arch, "before_release", None)
        if hook is not None:
            hook(self)      # aarch64: live SVE state captured at seize
        signals.unblock(self)
        if self.sud is not None:
            sud.put(self.pid, self.sud)
        first = self.deferred_signals[0] if self.deferred_signals else 0
        ptrace.detach(self.pid, first)
        self.attached = False
        for sig in self.deferred_signals[1:]:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the task and consume its exit notification (which reaps
        it when the tracer is also its parent)."""
        self.close()
        try:
            os.kill(self.pid, _signal.SIGKILL)
        except ProcessLookupError:
            self.attached = False
            return
        while True:
            try:
                st = ptrace.wait(self.pid)
            except SysError:
                break
            if st.exited:
                break
        self.attached = False


def syscall_each(calls) -> list:
    """Task.syscall for several tasks (frozen dump targets, or processes a
    restore builds: a tree's members), one (task, nr, args)
    each, run side by side: every task is sent to its syscall-entry stop
    before the first is waited for, then on to the exit stops, so the
    tasks' runs and the tracer's waits overlap instead of taking turns (a
    tree's 50 members: 50 round trips in flight, not 50 in a row). Each
    dump target has its own registers back after, a process being restored
    is left at the syscall-exit stop (as Task.syscall leaves each).
    Returns the raw results in order. Every task that was started is driven
    to its exit stop before the first failure is raised."""
    for task, nr, _ in calls:
        if task.syscall_ip is None:
            raise EngineError("no syscall instruction known in the target", pid=task.pid)
    for task, nr, _ in calls:
        faults.point(task.fault_name, nr)
        INJECTED["round_trips"] += 1
    results: list = [None] * len(calls)
    error: Optional[BaseException] = None
    # No ^C between the registers set and put back (as in Task.syscall).
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD)
    try:
        going = []
        for i, (task, nr, args) in enumerate(calls):
            try:
                task._inject_regs(nr, args)
                ptrace.syscall(task.pid, 0)
                going.append(i)
            except BaseException as e:     # noqa: BLE001 - the started ones are finished first
                error = e
                break
        for phase in ("entry", "exit"):
            still = []
            for i in going:
                task = calls[i][0]
                try:
                    task._await_syscall_stop()
                    if phase == "entry":
                        ptrace.syscall(task.pid, 0)
                    else:
                        results[i] = task.arch.retval(task.get_regs())
                        if task.fault_name == "dump.syscall":
                            task.set_regs(task.resume_regs)
                    still.append(i)
                except BaseException as e:  # noqa: BLE001 - the others are finished first
                    error = error or e
            going = still
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
    if error is not None:
        raise error
    return results
