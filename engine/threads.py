"""Multi-threaded processes: freeze every thread, save each one's own
state, create each again with its TID, all-or-nothing.

Freeze. Every TID in /proc/PID/task is seized (PTRACE_SEIZE with
PTRACE_O_TRACECLONE) and interrupted, and the list is read again until a
pass finds no new TID: a stopped thread cannot create another, and a
thread created by one that was seized but not yet stopped is attached to
us by the kernel (TRACECLONE) and only its first stop is waited for. A
thread that exits meanwhile is simply gone. Threads created faster than
they can be frozen for MAX_ROUNDS passes are refused (`threads`), every
thread let go. Only once every task is stopped (every thread here, every
member of a tree in engine/tree.py) is the freeze finished
(:func:`finish_freeze`): a thread in an interrupted call takes a pending
handled signal (Task.settle), then each has every signal blocked.

Saved per thread (the leader's are the process record in core.json, the
others are core.json "threads"): TID, registers (fs_base/gs_base: TLS),
xstate (threads-xstate.bin: one file, not one fsync per thread), signal mask, its own pending-signal queue,
interrupted call (same restart logic as the leader: engine/restart.py),
rseq, robust list, clear_child_tid (injected PR_GET_TID_ADDRESS),
sigaltstack, comm, and scheduling attributes (sched_*, affinity, nice and
timer slack are per thread in Linux; engine/sched.py is applied per TID).

Refused (`threads`), because a restore would make them the same: a thread
with other credentials, no_new_privs, personality or namespaces than the leader, one
that does not share the fd table, fs (cwd/umask/root), signal handlers or
SysV semaphore undo list with it (kcmp). Seccomp filters are per thread:
each thread's chain is saved, and which threads share which filter is
checked by engine/seccomp.py share (refused there when it cannot be).

Restore (Builder stage, after the mm and the process-wide state, before
credentials are dropped: clone3 set_tid needs CAP_CHECKPOINT_RESTORE in
the caller; under seccomp filters, see _create_filtered): the leader gets PTRACE_O_TRACECLONE and makes an injected
clone3(CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM, set_tid=[TID]). The new
thread returns at the gadget's syscall exit, but it is ours before it runs
one instruction: auto-attached, it starts in a SIGSTOP stop (the leader was
attached with PTRACE_TRACEME), from which the restorer injects its own
state into it through the same gadget. Each thread's registers go back at
the very end, right before the leader's (Builder.finish). A failure kills
the whole thread group and waits for every thread.
"""

from __future__ import annotations

import ctypes
import os
import _signal      # not signal: signal.py builds its enums at import (enum: ~20 ms of a run under TCG)
import struct
import _thread
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from . import faults, guard, libc, mempolicy, procattrs, ptrace, sched, seccomp, signals, sud
from .errors import EngineError, Refusal
from .libc import SysError
from .task import Task

MAX_ROUNDS = 64
FREEZE_OPTIONS = ptrace.O_TRACESYSGOOD | ptrace.O_TRACECLONE
KCMP = {"fd table (CLONE_FILES)": 2, "fs: cwd, root, umask (CLONE_FS)": 3,
        "signal handlers (CLONE_SIGHAND)": 4, "SysV semaphore undo list (CLONE_SYSVSEM)": 6}
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
PR_GET_TID_ADDRESS = 40
PR_GET_PDEATHSIG = 2
SAME_STATUS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
               "NoNewPrivs")     # not Seccomp: filters are per thread (engine/seccomp.py share)
NS_KINDS = ("net", "uts", "ipc", "mnt", "user", "cgroup", "time", "pid_for_children", "time_for_children")


def tids(pid: int) -> List[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


def children_of(pid: int) -> List[int]:
    """Children of every thread of `pid` (a child's parent is the thread
    that forked it). Here, not in engine/tree.py: every dump asks, and only
    a tree's needs that module (its import is a small process's cost)."""
    from .procfs import read_all
    out: List[int] = []
    for tid in tids(pid):
        try:
            data = read_all(f"/proc/{pid}/task/{tid}/children")
        except OSError:
            continue
        out.extend(int(x) for x in data.split())
    return sorted(set(out))


def has_children(pid: int) -> bool:
    return bool(children_of(pid))


def _tracer(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- freeze --------------------------------------------------------------------

def freeze(pid: int, options: int = FREEZE_OPTIONS, auto_attached: bool = False,
           finish: bool = True, leader: Optional[Task] = None) -> List[Task]:
    """Seize and stop every thread of `pid`: [leader, other threads by TID].
    `options`/`auto_attached`/`leader` (stopped already, not finished):
    engine/tree.py (PTRACE_O_TRACEFORK, a child the kernel attached to us,
    leaders stopped side by side). `finish`: :func:`finish` them once all
    are stopped (False: the caller does, once every process of a tree is).
    Raises Refusal (every thread already seized is let go)."""
    if leader is None:
        leader = Task.seize(pid, options, auto_attached=auto_attached, finish=False)
    tasks = {pid: leader}
    try:
        for _ in range(MAX_ROUNDS):
            faults.point("dump.freeze")
            new = [t for t in tids(pid) if t not in tasks]
            if not new:
                out = [leader] + [tasks[t] for t in sorted(tasks) if t != pid]
                if finish:
                    finish_freeze(out)
                return out
            # every new thread interrupted before the first is waited for:
            # their stops overlap instead of taking turns
            started = [(tid, _begin_thread(tid, options)) for tid in new]
            failed = None
            for tid, how in started:
                try:
                    t = _finish_thread(pid, tid, how, options)
                except BaseException as e:   # noqa: BLE001 - every started one is finished first
                    failed = failed or e
                    continue
                if t is not None:
                    tasks[tid] = t
            if failed is not None:
                raise failed
        raise Refusal("threads", f"threads kept being created faster than they could be frozen "
                      f"({MAX_ROUNDS} passes over /proc/{pid}/task)", pid=pid)
    except BaseException:
        try:
            _stragglers(pid, tasks)
        finally:
            release(list(tasks.values()))
        raise


def finish_freeze(tasks: List[Task]) -> None:
    """Every task stopped: each takes the pending signals it was about to
    run a handler for over an interrupted call (Task.settle: with all of
    them stopped, no other can take a shared one meanwhile, and the handler
    does not run yet, so nothing new is created), then blocks every signal
    and gets its arch's after-seize treatment. Raises Refusal/SysError (the
    caller lets every task go)."""
    for t in tasks:
        t.settle()
    for t in tasks:
        t.finish_freeze()


def _gone(pid: int, tid: int) -> bool:
    """The thread has exited (or is past the point of no return)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _begin_thread(tid: int, options: int = FREEZE_OPTIONS):
    """A thread's freeze begun: ("started", Task.begin_seize's result) or
    ("failed", the exception), for _finish_thread()."""
    try:
        return ("started", Task.begin_seize(tid, options))
    except (Refusal, SysError) as e:
        return ("failed", e)


def _finish_thread(pid: int, tid: int, how, options: int = FREEZE_OPTIONS) -> Optional[Task]:
    """The frozen thread, or None when it exited meanwhile."""
    me = _thread.get_native_id()
    kind, got = how
    try:
        if kind == "failed":
            raise got
        return Task.finish_seize(got, tgid=pid, finish=False)
    except Refusal as r:
        if r.reason == "no-such-process":
            return None      # exited before it could be frozen: not part of the process any more
        if r.reason == "ptraced" and _tracer(tid) == me:
            return _adopt_clone(pid, tid, options)
        if r.reason == "ptraced" and _gone(pid, tid):
            return None      # PTRACE_SEIZE answers EPERM for a task that is exiting (exit_state set)
        raise Refusal(r.reason, f"thread {tid}: {r.detail}", pid=pid) from None
    except SysError as e:
        if e.errno == 3 and _gone(pid, tid):     # ESRCH: exited between the seize and the interrupt
            for _ in range(100):                  # a traced zombie thread waits for its tracer
                st = ptrace.wait_nohang(tid)
                if st is None or st.exited:
                    break
                time.sleep(0.001)
            return None
        raise


def _adopt_clone(pid: int, tid: int, options: int = FREEZE_OPTIONS) -> Optional[Task]:
    """A thread created by one we had seized (PTRACE_O_TRACECLONE): ours
    already, in its first stop or about to be."""
    try:
        return Task.seize(tid, options, auto_attached=True, tgid=pid, finish=False)
    except Refusal as r:
        if r.reason == "no-such-process":
            return None
        raise


def _stragglers(pid: int, tasks: dict) -> None:
    """On the way out of a refused freeze: threads the kernel attached to us
    (TRACECLONE) that the scan had not reached yet, so they are let go too."""
    me = _thread.get_native_id()
    for tid in tids(pid):
        if tid not in tasks and _tracer(tid) == me:
            try:
                t = _adopt_clone(pid, tid)
            except (Refusal, SysError):
                continue
            if t is not None:
                tasks[tid] = t


def release(tasks: List[Task]) -> None:
    """Let every thread go (registers back, mask back, detach); best effort."""
    for t in reversed(tasks):
        if t.attached:
            try:
                t.release()
            except SysError:
                pass


def kill(tasks: List[Task]) -> None:
    """SIGKILL the process and wait for every traced thread (a traced
    thread stays a zombie until its tracer waits for it, and the leader's
    own exit is reported only after all the others)."""
    if not tasks:
        return
    tgid = tasks[0].tgid
    # Every thread, not only those with a Task: one the kernel attached to
    # us (a restore's clone3, TRACECLONE) before it got its Task is a traced
    # zombie until we wait for it, and the leader's exit waits for it.
    others = (set(tids(tgid)) | {t.pid for t in tasks[1:]}) - {tgid}
    try:
        os.kill(tgid, _signal.SIGKILL)
    except ProcessLookupError:
        pass
    for t in tasks[1:]:
        t.close()
    for tid in sorted(others):
        while True:
            try:
                st = ptrace.wait(tid)
            except SysError:
                break       # not traced by us, or already waited for
            if st.exited:
                break
    for t in tasks[1:]:
        t.attached = False
    tasks[0].kill()


# -- survey and dump -----------------------------------------------------------

def _status(pid: int, tid: int) -> dict:
    from .procfs import read_status_fields
    return read_status_fields(f"/proc/{pid}/task/{tid}/status", SAME_STATUS)


def kcmp(pid1: int, pid2: int, kind: int) -> int:
    from .arch import current
    return libc.syscall(current().SYS["kcmp"], pid1, pid2, kind, 0, 0, name="kcmp", pid=pid2)


def _personality(pid: int, tid: int) -> str:
    fd = os.open(f"/proc/{pid}/task/{tid}/personality", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 64).decode().strip()
    finally:
        os.close(fd)


def leader_view(pid: int) -> dict:
    """What sameness_problems() compares every thread with, read once per
    dump (the leader is frozen: none of it changes meanwhile)."""
    view = {"status": _status(pid, pid), "ns": {}}
    try:
        view["personality"] = _personality(pid, pid)
    except OSError:
        view["personality"] = None
    for ns in NS_KINDS:
        try:
            view["ns"][ns] = os.readlink(f"/proc/{pid}/task/{pid}/ns/{ns}")
        except OSError:
            view["ns"][ns] = None
    return view


def sameness_problems(pid: int, tid: int, lead: Optional[dict] = None, mine: Optional[dict] = None) -> List[str]:
    """What thread `tid` does not share with the leader, though a restore
    would make it shared. `lead`: leader_view(pid), when already read;
    `mine`: the thread's SAME_STATUS fields, when already read (frozen:
    its credentials change only by its own call)."""
    out = []
    if lead is None:
        lead = leader_view(pid)
    mine, lead_status = _status(pid, tid) if mine is None else mine, lead["status"]
    for k in SAME_STATUS:
        if mine.get(k, "") != lead_status.get(k, ""):
            out.append(f"{k} {mine.get(k, '')!r} (leader: {lead_status.get(k, '')!r})")
    for what, kind in KCMP.items():
        try:
            if kcmp(pid, tid, kind) != 0:
                out.append(f"its own {what}")
        except SysError as e:
            out.append(f"kcmp {what}: {e.message}")
    lead_p = lead["personality"]
    if lead_p is not None:
        try:
            mine_p = _personality(pid, tid)
        except OSError:
            mine_p = None
        if mine_p is not None and mine_p != lead_p:
            out.append(f"personality {mine_p} (leader: {lead_p})")
    for ns in NS_KINDS:
        theirs = lead["ns"][ns]
        if theirs is None:
            continue
        try:
            if os.readlink(f"/proc/{pid}/task/{tid}/ns/{ns}") != theirs:
                out.append(f"its own {ns} namespace")
        except FileNotFoundError:
            # a live thread's: one it unshared (CLONE_NEWPID/NEWTIME) that no child entered yet
            if ns.endswith("_for_children") and os.path.exists(f"/proc/{pid}/task/{tid}"):
                out.append(f"its own {ns} namespace (unshared, no child in it yet)")
        except OSError:
            continue
    return out


def thread_state(task: Task, leader: Task, vmas: List[dict], seccomp_mode: Optional[int] = None) -> dict:
    """One non-leader thread's record (its xstate is written separately).
    seccomp_mode: the thread's mode as survey() read it, frozen (only the
    thread itself, or a TSYNC of another of its frozen threads, changes
    it): not read from its status again."""
    from .dump import SCRATCH, _rseq, _scratch, refuse_pdeath_signal, robust_list, task_sigmask
    tid, pid = task.pid, task.tgid
    faults.point("dump.thread")
    task.syscall_ip = leader.syscall_ip
    from .procfs import read_all
    comm = read_all(f"/proc/{pid}/task/{tid}/comm").decode().rstrip("\n")
    rec = {"tid": tid, "comm": comm, "regs": task.image_regs.to_dict(), "sigmask": task_sigmask(task),
           "rseq": _rseq(task), "robust_list": robust_list(tid), "sched": sched.dump(tid), "sud": task.sud,
           "seccomp": seccomp.dump(tid, seccomp.thread_mode(pid, tid) if seccomp_mode is None else seccomp_mode)}
    pre = getattr(task, "prefetched_thread", None)
    if pre is not None:
        pre = dict(pre)
        refuse_pdeath_signal(pid, tid, pre.pop("pdeath_signal"))
        rec.update(pre)
        rec.setdefault("mempolicy", [mempolicy.MPOL_DEFAULT, 0])
        return rec
    scr = _scratch(task, vmas)
    saved = task.read_mem(scr, SCRATCH)
    try:
        task.call("sigaltstack", 0, scr)
        sp, flags, size = struct.unpack("<Qi4xQ", task.read_mem(scr, 24))
        rec["sigaltstack"] = [sp, flags, size]
        task.call("prctl", PR_GET_TID_ADDRESS, scr, 0, 0, 0)
        rec["tid_address"] = struct.unpack("<Q", task.read_mem(scr, 8))[0]
        task.call("prctl", PR_GET_PDEATHSIG, scr, 0, 0, 0)
        pdeath = struct.unpack("<i", task.read_mem(scr, 4))[0]
        for key, name, args, nbytes, decode in mempolicy.reads() + procattrs.thread_reads():
            r = task.call(name, *args(scr))
            rec[key] = decode(task.read_mem(scr, nbytes)) if nbytes else r
    finally:
        task.write_mem(scr, saved)
    refuse_pdeath_signal(pid, tid, pdeath)
    rec.setdefault("mempolicy", [mempolicy.MPOL_DEFAULT, 0])
    return rec


def prefetch(others: List[Task], leader: Task, vmas: List[dict]) -> None:
    """thread_state()'s injected reads (sigaltstack, tid address, pdeath signal) for
    every thread side by side (task.syscall_each: two round trips for all
    the threads, not two per thread). Only when each thread's scratch
    memory is its own (no overlap between them); on any failure nothing is
    kept and thread_state() reads them one by one (and fails in context)."""
    from .dump import SCRATCH, _scratch, put_back_scratch
    from .task import syscall_each
    if leader.syscall_ip is None or len(others) < 2:
        return
    if _prefetch_batched(others, leader, vmas):
        return
    ready = []
    for t in others:
        try:
            ready.append([t, _scratch(t, vmas), None])
        except Refusal:
            return
    spans = sorted((scr, scr + SCRATCH) for _, scr, _ in ready)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return
    for r in ready:
        r[0].syscall_ip = leader.syscall_ip
    try:
        for r in ready:
            r[2] = r[0].read_mem(r[1], SCRATCH)
    except (EngineError, SysError, OSError):
        return
    got = []
    try:
        res = syscall_each([(t, t.arch.SYS["sigaltstack"], (0, scr)) for t, scr, _ in ready])
        if any(res):
            return
        alts = [list(struct.unpack("<Qi4xQ", t.read_mem(scr, 24))) for t, scr, _ in ready]
        res = syscall_each([(t, t.arch.SYS["prctl"], (PR_GET_TID_ADDRESS, scr, 0, 0, 0)) for t, scr, _ in ready])
        if any(res):
            return
        tids = [struct.unpack("<Q", t.read_mem(scr, 8))[0] for t, scr, _ in ready]
        res = syscall_each([(t, t.arch.SYS["prctl"], (PR_GET_PDEATHSIG, scr, 0, 0, 0)) for t, scr, _ in ready])
        if any(res):
            return
        got = [{"sigaltstack": a, "tid_address": tid_address,
                "pdeath_signal": struct.unpack("<i", t.read_mem(scr, 4))[0]}
               for a, tid_address, (t, scr, _) in zip(alts, tids, ready)]
        for key, name, args, nbytes, decode in mempolicy.reads() + procattrs.thread_reads():
            res = syscall_each([(t, t.arch.SYS[name], args(scr)) for t, scr, _ in ready])
            if any(r < 0 for r in res) or (nbytes and any(res)):
                return
            for g, (t, scr, _), r in zip(got, ready, res):
                g[key] = decode(t.read_mem(scr, nbytes)) if nbytes else r
    except (EngineError, SysError, OSError):
        return
    finally:
        put_back_scratch(ready)
    for (t, _, _), g in zip(ready, got):
        t.prefetched_thread = g


_BATCH_STATUS = ("SigPnd", "ShdPnd", "SigIgn", "SigQ", "Tgid", "Uid")
# ...and sameness_problems' fields, from the same read of the file (~20 us a thread)
_PREFETCH_STATUS = _BATCH_STATUS + tuple(k for k in SAME_STATUS if k not in _BATCH_STATUS)


def _thread_steps() -> list:
    """thread_state()'s injected reads as engine/dumpbatch.py steps."""
    return [("sigaltstack", "sigaltstack", lambda out: (0, out), 24,
             lambda raw: list(struct.unpack("<Qi4xQ", raw))),
            ("tid_address", "prctl", lambda out: (PR_GET_TID_ADDRESS, out, 0, 0, 0), 8,
             lambda raw: struct.unpack("<Q", raw)[0]),
            ("pdeath_signal", "prctl", lambda out: (PR_GET_PDEATHSIG, out, 0, 0, 0), 4,
             lambda raw: struct.unpack("<i", raw)[0])] + mempolicy.reads() + procattrs.thread_reads()
    # set_mempolicy, keep-caps, the MCE policy and rdtsc faulting are per thread


def _prefetch_batched(others: List[Task], leader: Task, vmas: List[dict]) -> bool:
    """prefetch() by engine/dumpbatch.py runs: one area per thread, all in
    one mapping the leader makes (one injected mmap, one munmap: the
    threads share the address space), every thread's three reads in one
    run of its own, the runs side by side. False when the batch cannot be
    used for every thread (dumpbatch.usable: each thread's own pending set
    and queue) or the mapping is refused: the caller goes on as before.
    True once tried: a thread whose run failed has no prefetched_thread
    and is read one by one by thread_state(). Raises only when the mapping
    could not be unmapped (the process must never go on with it)."""
    from . import dumpbatch
    from .procfs import read_status_fields
    runs = []
    try:
        for t in others:
            st = read_status_fields(f"/proc/{t.tgid}/task/{t.pid}/status", _PREFETCH_STATUS)
            t.prefetched_status = {k: st[k] for k in SAME_STATUS if k in st}
            sig = dumpbatch.usable(t, st)
            if not sig:
                return False
            runs.append(dumpbatch.Run(t, vmas, st, sig, _thread_steps()))
    except (OSError, ValueError):
        return False
    size = dumpbatch.AREA * len(runs)
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD)   # no ^C while the threads run our code
    try:
        try:
            base = dumpbatch._place(vmas, size, leader.arch.TASK_SIZE)
            got = leader.syscall(leader.arch.SYS["mmap"], base, size, dumpbatch.PROT_RWX,
                                 dumpbatch.MAP_PRIVATE | dumpbatch.MAP_ANONYMOUS | dumpbatch.MAP_FIXED_NOREPLACE,
                                 (1 << 64) - 1, 0)
        except (EngineError, SysError, OSError):
            return False
        if -4096 < got < 0:
            return False
        try:
            if got != base:         # a kernel without MAP_FIXED_NOREPLACE put it elsewhere
                return False
            for i, r in enumerate(runs):
                r.area = base + i * dumpbatch.AREA
            for r, values in dumpbatch.run_all(runs):
                r.task.prefetched_thread = {step[0]: values[step[0]] for step in _thread_steps()}
        finally:
            for r in runs:
                r.area = None       # one munmap for all of them, here
            r = leader.syscall(leader.arch.SYS["munmap"], got, size)
            if -4096 < r < 0:
                raise SysError("munmap (injected)", -r, leader.pid)
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
    return True


def survey(s, leader: Task, others: List[Task], state: Optional[dict]) -> List[dict]:
    """Check and read every non-leader thread into the survey `s`; returns
    their records (empty when one was refused)."""
    pid = leader.pid
    if not others:
        s.ok("threads", "process", "single-threaded")
        return []
    s.ok("threads", "process", f"{len(others) + 1} threads: {pid} " + " ".join(str(t.pid) for t in others))
    modes = {}
    for t in others:
        try:
            modes[t.pid] = seccomp.thread_mode(pid, t.pid)
            if modes[t.pid]:
                seccomp.suspend(t, ptrace.O_TRACECLONE)    # before anything is injected into it
        except Refusal as r:
            s.refuse("seccomp", "credentials", Refusal(r.reason, f"thread {t.pid}: {r.detail}"))
            return []
        except OSError as e:
            s.refuse(f"thread {t.pid}", "process", Refusal("unsupported-state", f"thread {t.pid} unreadable: {e}"))
            return []
    if state is not None:
        prefetch(others, leader, s.vmas)
    recs = []
    lead = leader_view(pid)
    for t in others:
        what = f"thread {t.pid}"
        probs = sameness_problems(pid, t.pid, lead, getattr(t, "prefetched_status", None))
        # Refusals under the names the leader's use ("threads", "interrupted
        # syscall", "pending signals"): stable labels for `ckpt survey`.
        if probs:
            s.refuse("threads", "process", Refusal("threads", f"thread {t.pid} differs from the leader: " + "; ".join(probs)))
            continue
        if t.restart_problem:
            s.refuse("interrupted syscall", "process", Refusal("unsupported-state", f"thread {t.pid}: {t.restart_problem}"))
            continue
        try:
            rec = thread_state(t, leader, s.vmas, modes[t.pid])
            procattrs.same_as_leader(rec, (state or {}).get("attrs"), t.pid)
        except Refusal as r:
            s.refuse(what, "process", Refusal(r.reason, f"thread {t.pid}: {r.detail}"))
            continue
        except (SysError, OSError) as e:
            s.refuse(what, "process", Refusal("unsupported-state", f"thread {t.pid} unreadable: {e}"))
            continue
        try:
            sigs = pending(t, rec, state)
        except Refusal as r:
            s.refuse("pending signals", "signals", Refusal(r.reason, f"thread {t.pid}: {r.detail}"))
            continue
        except (SysError, OSError) as e:
            s.refuse("pending signals", "signals", Refusal("unsupported-state", f"thread {t.pid}: pending signals unreadable: {e}"))
            continue
        s.ok(what, "process", f"comm {rec['comm']!r}, mask {rec['sigmask']:#x}, fs_base "
             f"{rec['regs'].get('fs_base', rec['regs'].get('tpidr', 0)):#x}, tid address {rec['tid_address']:#x}, "
             f"pending {signals.describe(sigs)}")
        recs.append(rec)
    if state is not None and len(recs) == len(others) and (state["seccomp"]["mode"] or any(modes.values())):
        try:
            n = _share_seccomp(leader, others, state, recs, s.vmas)
        except Refusal as r:
            s.refuse("seccomp", "credentials", r)
            return []
        s.ok("seccomp per thread", "credentials", f"{len(recs) + 1} threads, "
             f"{len({f['node'] for r in [state] + recs for f in r['seccomp']['filters']})} distinct filter(s), "
             f"sharing checked by {n} TSYNC probe(s)")
    return recs


def _share_seccomp(leader: Task, others: List[Task], state: dict, recs: List[dict], vmas: List[dict]) -> int:
    """engine/seccomp.py share() over the whole thread group, its probes'
    scratch memory below the leader's stack pointer (saved and put back)."""
    from .dump import _scratch
    pid = leader.pid
    order = [int(t) for t in os.listdir(f"/proc/{pid}/task")]     # readdir walks the thread list
    tasks = {pid: leader}
    tasks.update((t.pid, t) for t in others)
    srecs = {pid: state["seccomp"]}
    srecs.update((r["tid"], r["seccomp"]) for r in recs)
    if sorted(order) != sorted(srecs):
        raise Refusal("threads", f"threads changed while frozen: {sorted(order)}", pid=pid)
    scr = _scratch(leader, vmas)
    saved = leader.read_mem(scr, seccomp.PROBE_BYTES)
    try:
        return seccomp.share(tasks, srecs, order, scr)
    finally:
        leader.write_mem(scr, saved)


def pending(task: Task, rec: dict, state: Optional[dict]) -> dict:
    """The thread's own pending queue (the shared one is the leader's
    record). Raises Refusal, SysError."""
    from .dump import pending_signals
    view = {"sigmask": rec["sigmask"], "sigactions": (state or {}).get("sigactions", {}),
            "posix_timers": (state or {}).get("posix_timers", [])}
    sigs = pending_signals(task, view)
    return {"thread": sigs["thread"], "shared": []}


XSTATE_FILE = "threads-xstate.bin"


def pack_xstate(tasks: List[Task], recs: List[dict]) -> bytes:
    """Every thread's xstate blob end to end, in record order; each record
    gets its blob's size."""
    blobs = []
    for t, rec in zip(tasks, recs):
        blob = t.get_xstate()
        rec["xstate_size"] = len(blob)
        blobs.append(blob)
    return b"".join(blobs)


def unpack_xstate(reader, recs: List[dict]) -> dict:
    """{tid: xstate blob}. Raises Refusal(image-invalid) when the sizes do
    not add up to the file."""
    if not recs:
        return {}
    data = reader.read_bytes(XSTATE_FILE)
    out, off = {}, 0
    for r in recs:
        n = r.get("xstate_size")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0 or off + n > len(data):
            raise Refusal("image-invalid", f"{XSTATE_FILE}: thread {r.get('tid')} size {n!r}")
        out[r["tid"]] = data[off:off + n]
        off += n
    if off != len(data):
        raise Refusal("image-invalid", f"{XSTATE_FILE}: {len(data) - off} bytes beyond the last thread's")
    return out


# -- restore -------------------------------------------------------------------

def check_records(recs) -> Optional[str]:
    """Why core.json "threads" is malformed, or None."""
    if not isinstance(recs, list):
        return "threads is not a list"
    ints = lambda xs, n: isinstance(xs, list) and len(xs) == n and all(
        isinstance(x, int) and not isinstance(x, bool) for x in xs)
    from .arch import current
    seen = set()
    for r in recs:
        try:
            if not isinstance(r["tid"], int) or r["tid"] <= 0 or r["tid"] in seen:
                return f"thread TID {r.get('tid')!r}"
            seen.add(r["tid"])
            if not isinstance(r["comm"], str) or not isinstance(r["sigmask"], int) \
                    or not isinstance(r["tid_address"], int):
                return f"thread {r['tid']}: comm/sigmask/tid_address"
            if not ints(r["robust_list"], 2) or not ints(r["sigaltstack"], 3):
                return f"thread {r['tid']}: robust_list/sigaltstack"
            if not all(isinstance(r["rseq"][k], int) for k in ("pointer", "size", "signature", "flags")):
                return f"thread {r['tid']}: rseq"
            if not sched.check_record(r["sched"]):
                return f"thread {r['tid']}: sched"
            if not sud.check_record(r.get("sud")):
                return f"thread {r['tid']}: syscall user dispatch"
            if not mempolicy.check_record(r.get("mempolicy", [0, 0])):
                return f"thread {r['tid']}: mempolicy"
            if r.get("mce_kill", 2) not in (0, 1, 2) or isinstance(r.get("mce_kill"), bool):
                return f"thread {r['tid']}: machine-check kill policy"
            r.setdefault("seccomp", {"mode": 0, "filters": []})    # formats before the per-thread record
            if not seccomp.check_record(r["seccomp"]):
                return f"thread {r['tid']}: seccomp"
            signals.check_record(r["signals"])
            current().normalise_restart(current().Regs.from_dict(r["regs"]))
        except Refusal as e:
            return f"thread {r.get('tid')}: {e.detail}"
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return f"thread {r.get('tid') if isinstance(r, dict) else r!r}: {e}"
    return None


CLONE_PTRACE = 0x2000
OWN_STATE_SLOT = 2048    # bytes of the batch area each thread's own-state batch gets (create)


def create(b) -> None:
    """Builder stage: clone every saved thread with its TID into the
    process being rebuilt and give it its own state. The thread Builders
    are kept in b.threads (killed with the process on any failure).

    Every clone3 in one batch run by the leader (engine/batch.py), each
    with CLONE_PTRACE: the new thread is ours, traced with a SIGSTOP
    pending, before it runs one instruction (kernel/fork.c
    ptrace_init_task), and the leader makes no event stop per clone (as
    with PTRACE_O_TRACECLONE). The threads' own settings then run side by
    side, each thread its own slot of the batch area (one address space)."""
    recs = b.job.core.get("threads") or []
    if not recs:
        return
    if b.job.core["seccomp"]["mode"] or any(r["seccomp"]["mode"] for r in recs):
        _create_filtered(b, recs)
    else:
        _create_batched(b, recs)
    _own_states(b)


def _create_batched(b, recs: List[dict]) -> None:
    from .batch import Data
    size = ctypes.sizeof(b.arch.CloneArgs)
    index = []
    for rec in recs:
        default = rec["sched"].get("default_timerslack_ns")
        if default and default != b.timerslack:
            # The clone's default slack is the creator's current one (kernel/fork.c).
            b.pending.add("prctl", sched.PR_SET_TIMERSLACK, default, 0, 0, 0)
            b.timerslack = default

        def place(addr: int, tid: int = rec["tid"]) -> bytes:
            args = b.arch.CloneArgs(flags=THREAD_FLAGS | CLONE_PTRACE, exit_signal=0, set_tid=addr + size,
                                    set_tid_size=1)
            return ctypes.string_at(ctypes.addressof(args), size) + struct.pack("<i", tid) + bytes(4)
        index.append(b.pending.add("clone3", Data(bytes(size + 8), place=place), size))
    try:
        got = b.flush()
    except SysError as e:
        if e.errno == 17:   # EEXIST
            taken = [r["tid"] for r in recs if not os.path.exists(f"/proc/{b.pid}/task/{r['tid']}")][:1]
            raise Refusal("pid-in-use", f"TID {taken[0] if taken else '?'} was taken before its thread could "
                          "be restored", pid=b.pid) from None
        raise SysError("clone3 (injected, CLONE_THREAD)", e.errno, b.pid) from None
    for rec, i in zip(recs, index):
        if got[i] != rec["tid"]:
            raise Refusal("pid-in-use", f"thread came back as TID {got[i]}, not {rec['tid']}", pid=b.pid)
    for rec in recs:
        _adopt(b, b, rec)


def _adopt(b, creator, rec: dict, extra_options: int = 0):
    """The Builder of the thread `creator` just cloned for `rec`."""
    from .build import Builder
    t = Task.adopt(rec["tid"], extra_options)
    faults.point("restore.thread")
    t.tgid = b.pid
    tb = Builder(b.job, t)
    tb.use_gadget(b.gadget, b.gadget_size)
    tb.rec = rec
    tb.timerslack = creator.timerslack      # a clone's current slack is its creator's
    # One signal table (CLONE_SIGHAND): what the leader's builder knows
    # of it holds for the thread's batch too (engine/batch.py trap_safe).
    tb.inherited_actions = b.inherited_actions
    tb.signals_queued = b.signals_queued
    b.threads.append(tb)
    return tb


def _create_filtered(b, recs: List[dict]) -> None:
    """create() for a process whose threads hold seccomp filters: each
    filter the threads share is installed once, by one thread, and the
    threads sharing it are cloned from that one afterwards (seccomp.plan),
    so that which threads share which filters - what a later TSYNC sees -
    is as it was; every thread's chain is then read back, and the sharing
    checked by the dump's probes. Every clone is PTRACE_O_SUSPEND_SECCOMP'd
    (inherited from its creator, kept by adopt), so the filters judge none
    of the restorer's injected calls."""
    seccomp.suspend(b.task, ptrace.O_EXITKILL)
    srecs = {b.pid: b.job.core["seccomp"]}
    srecs.update((r["tid"], r["seccomp"]) for r in recs)
    by_tid = {r["tid"]: r for r in recs}
    builders = {b.pid: b}
    size = ctypes.sizeof(b.arch.CloneArgs)
    filters = [f for r in srecs.values() for f in r["filters"]]
    area = area_size = 0
    if filters:
        area, area_size = seccomp.map_area(b, filters)
    try:
        for step in seccomp.plan([b.pid] + [r["tid"] for r in recs], srecs):
            if step[0] == "install":
                seccomp.install_one(builders[step[1]], area, step[2])
                continue
            creator, rec = builders[step[1]], by_tid[step[2]]
            default = rec["sched"].get("default_timerslack_ns")
            if default and default != creator.timerslack:
                # The clone's default slack is its creator's current one (kernel/fork.c).
                creator.call("prctl", sched.PR_SET_TIMERSLACK, default, 0, 0, 0)
                creator.timerslack = default
            addr = creator.scratch
            args = b.arch.CloneArgs(flags=THREAD_FLAGS | CLONE_PTRACE, exit_signal=0, set_tid=addr + size,
                                    set_tid_size=1)
            creator.put(ctypes.string_at(ctypes.addressof(args), size) + struct.pack("<i", rec["tid"]) + bytes(4))
            try:
                got = creator.call("clone3", addr, size)
            except SysError as e:
                if e.errno == 17:   # EEXIST
                    raise Refusal("pid-in-use", f"TID {rec['tid']} was taken before its thread could be restored",
                                  pid=b.pid) from None
                raise
            if got != rec["tid"]:
                raise Refusal("pid-in-use", f"thread came back as TID {got}, not {rec['tid']}", pid=b.pid)
            builders[got] = _adopt(b, creator, rec, seccomp.O_SUSPEND_SECCOMP)
    finally:
        if area:
            b.call("munmap", area, area_size)
    for tid, rec in srecs.items():
        seccomp.read_back(b.pid, tid, rec)
    # Which threads share which filter, read back by the dump's probes.
    order = [int(t) for t in os.listdir(f"/proc/{b.pid}/task")]
    b.flush()
    try:
        seccomp.check_sharing({t: tb.task for t, tb in builders.items()}, srecs, order, b.scratch, hidden_ok=True)
    except Refusal as r:
        raise EngineError(f"seccomp filter sharing reads back otherwise than saved: {r.detail}", pid=b.pid) from None
    b.seccomp_done = True


def _own_states(b) -> None:
    from .batch import run_each
    for tb in b.threads:
        _own_state(tb, tb.rec)
    slots = max(1, b.batch_size // OWN_STATE_SLOT) if b.batch_area else 1
    for k in range(0, len(b.threads), slots):
        group = b.threads[k:k + slots]
        for j, tb in enumerate(group):
            if tb.batch_area:
                tb.batch_area += j * OWN_STATE_SLOT
                tb.batch_size = OWN_STATE_SLOT if slots > 1 else tb.batch_size
        try:
            run_each(group)
        finally:
            for tb in group:
                tb.use_gadget(b.gadget, b.gadget_size)    # the whole area again for later batches
    for tb in b.threads:
        # Everything blocked until finish(): a signal dequeued at an injection
        # stop could only be dropped or delivered mid-restore.
        ptrace.set_sigmask(tb.pid, signals.ALL_BLOCKED)


def _own_state(tb, rec: dict) -> None:
    from .batch import Data
    from .build import PR_SET_NAME, SS_DISABLE, SS_ONSTACK
    q = tb.pending.add      # one batch, run by the thread itself (engine/batch.py)
    q("prctl", PR_SET_NAME, Data(rec["comm"].encode()[:15] + b"\0"), 0, 0, 0)
    sp, ssflags, size = rec["sigaltstack"]
    if ssflags & SS_DISABLE:
        sp, ssflags, size = 0, SS_DISABLE, 0
    q("sigaltstack", Data(struct.pack("<Qi4xQ", sp, ssflags & ~SS_ONSTACK, size)), 0)
    q("set_tid_address", rec["tid_address"])
    head, length = rec["robust_list"]
    if head:
        q("set_robust_list", head, length)
    # rseq in the same batch (not one injected call more per thread at
    # late_state): the mm is complete by now, and a CLONE_VM clone starts
    # unregistered, so nothing else touches the area before it is ours.
    r = rec["rseq"]
    if r["pointer"]:
        q("rseq", r["pointer"], r["size"], 0, r["signature"])
    # The clone has the leader's NUMA policy (set with the process state):
    # a thread's own, where it has another (formats before 9: the leader's).
    mempolicy.queue_thread(tb, rec.get("mempolicy", tb.job.core["mempolicy"]), tb.job.core["mempolicy"])
    procattrs.queue_thread(tb, rec)


def creds(b) -> None:
    """Credentials are per thread in the kernel (glibc's setxid broadcast
    is user space): each thread drops them itself."""
    for tb in b.threads:
        tb.creds()
        tb.flush()


def late_state(b) -> None:
    """Own pending signals, scheduling: the leader's stages, per thread
    (its rseq is registered with its own state, _own_state)."""
    for tb in b.threads:
        own = tb.rec["signals"].get("thread", [])
        if own:     # nothing to queue: its mask is all-blocked since _own_state already
            signals.requeue(tb.task, tb.put, {"thread": own})
        sched.apply(tb.pid, tb.rec["sched"])


def finish(b) -> None:
    """Each thread's xstate, mask and registers, then let it go (called
    once the gadget is unmapped, right before the leader is released)."""
    for tb in b.threads:
        regs = b.arch.Regs.from_dict(tb.rec["regs"])
        b.arch.normalise_restart(regs)
        try:
            tb.task.set_xstate(b.job.thread_xstate[tb.pid])
        except (SysError, ValueError) as e:
            raise Refusal("cpu-mismatch", f"thread {tb.pid}: this CPU rejects the saved xstate "
                          f"({getattr(e, 'message', e)})", pid=b.pid) from None
        ptrace.set_sigmask(tb.pid, tb.rec["sigmask"])
        tb.task.sud = tb.rec.get("sud")     # put by release(), after every injected call
        tb.final_regs = regs
    for tb in b.threads:
        tb.task.release(tb.final_regs)
