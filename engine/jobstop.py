"""A job-control stopped process (state T: ^Z'd shell job, SIGSTOP): dumped
as it is and restored stopped by the same signal.

What is there to carry (kernel/signal.c): the group is stopped
(SIGNAL_STOP_STOPPED) by one signal, which every thread keeps in its
jobctl stop mask and the group in group_exit_code: a tracer seizing it sees
that signal in its PTRACE_EVENT_STOP, the parent's waitpid(WUNTRACED) in
WSTOPSIG. Pending signals stay pending until a SIGCONT (nothing runs a
handler while stopped, so the freeze does not settle one: engine/task.py).

Dump: the seize finds the group stop (engine/task.py records its signal);
every injected call resumes the task from it, and when let go (check,
--leave-running, a refusal) __ptrace_unlink re-arms the stop because the
group is still SIGNAL_STOP_STOPPED, without a new report to the parent
(task_participate_group_stop: no JOBCTL_STOP_CONSUME): the original is
stopped again with the same signal, nothing else seen.

The parent. A stop is reported to the parent once: its waitpid(WUNTRACED)
takes group_exit_code (kernel/exit.c wait_task_stopped), and a SIGCHLD
(CLD_STOPPED) is sent unless the parent ignores it or set SA_NOCLDSTOP.
A shell has taken both long before (bash marks the job Stopped); a parent
that has not sees them still. The parent PID is not carried, so for the
root of a dump this does not arise; for a tree member, whose parent is
restored too, the dump asks the frozen parent with an injected
waitid(P_PID, child, WSTOPPED|WNOHANG|WNOWAIT) - which takes nothing, and
sees the group's stop state whatever ckpt's trace of the child
(task_stopped_code without ptrace reads SIGNAL_STOP_STOPPED and
group_exit_code) - and the parent's pending SIGCHLD is in its image
anyway. At restore the child's stop reports again; right after it, before
the parent is let go, an injected waitid in the parent takes the report
when the original's was taken, and the SIGCHLD the stop sent is taken
back (rt_sigtimedwait) when the parent's image had none pending (one
pending merges with it: a standard signal is queued once).

Refused: several threads (each would have to be brought to the group stop
under the restorer's trace); a process group that would be orphaned once
restored - no member with a parent in the same session outside the group
(the root's parent is not carried: it becomes init): the kernel sends an
orphaned group with a stopped member SIGHUP and SIGCONT (kill_orphaned_pgrp)
the moment it becomes so, when the restorer exits. A ^Z'd job dumped
alone, without its shell, is such a group: restoring it would kill it.

Restore (Builder.finish, before the gadget goes): the stop is made again
by the kernel itself, so everything it sets is what it sets: the stop
signal's action is put to SIG_DFL for a moment (a SIGTSTP handler, as less
and vim have, would otherwise run), every other signal blocked (the
image's pending ones must wait for the SIGCONT, as they did), the signal
sent by an injected tgkill, and the task let on from that call's exit
stop: it dequeues the signal (a signal-delivery stop, passed on), and
get_signal()'s default action stops the group (a group-stop trap, which
PTRACE_GETSIGINFO tells from a delivery stop by EINVAL). Then the action
goes back by an injected call and the mask by PTRACE_SETSIGMASK, and the
detach leaves it stopped. SIGTSTP, SIGTTIN and SIGTTOU are discarded by
the kernel in an orphaned process group (a stopped job there would have
been sent SIGHUP and SIGCONT when it became orphaned): then the task runs
on into the gadget's int3 instead, and the restore is refused
(`unsupported-state`) - only SIGSTOP would stop it, and it would report
another signal.
"""

from __future__ import annotations

import _signal
import os
import struct

from .errors import EngineError, Refusal

SIGSTOP = _signal.SIGSTOP
NAMES = {_signal.SIGSTOP: "SIGSTOP", _signal.SIGTSTP: "SIGTSTP", _signal.SIGTTIN: "SIGTTIN",
         _signal.SIGTTOU: "SIGTTOU"}
ALL_BUT_UNBLOCKABLE = ((1 << 64) - 1) & ~(1 << (_signal.SIGKILL - 1)) & ~(1 << (_signal.SIGSTOP - 1))


def describe(sig: int) -> str:
    return f"stopped by {NAMES.get(sig, sig)} (job control): restored stopped by the same signal"


def survey(s, task, ctx, others, state=None) -> None:
    """The dump's verdict on a stopped process (`task`: its leader)."""
    sig = task.job_stop
    if not sig:
        return
    name = NAMES.get(sig, sig)
    if _queued_now(s.status, sig):
        # The restore's own stop would dequeue it; the SIGCONT that ends the
        # stop discards every queued stop signal anyway (prepare_signal).
        s.refuse("job control", "process", Refusal(
            "unsupported-state", f"stopped by job control ({name}) with another {name} pending"))
        return
    if others:
        s.refuse("job control", "process", Refusal(
            "unsupported-state", f"stopped by job control ({name}) with {len(others) + 1} threads: only a "
            "single-threaded stopped process is restored stopped"))
        return
    keeper = _group_keeper(task.pid, ctx)
    if keeper is None and sig == _signal.SIGSTOP and _group_keeper(task.pid, ctx, now=True) is None:
        # Orphaned already (zdtm vdso02: a session leader's SIGSTOPped
        # child in its group): the restore orphans nothing, so no
        # transition for the kernel to SIGHUP; SIGSTOP (no other stop
        # signal) stops a task of an orphaned group (get_signal).
        s.ok("job control", "process", describe(sig) + "; its process group is orphaned already, as it "
             "will be once restored")
        return
    if keeper is None:
        s.refuse("job control", "process", Refusal(
            "unsupported-state", f"stopped by job control ({name}), and its process group would be orphaned once restored "
            "(no member's parent in its session outside the group: the dumped process's own parent "
            "is not restored): the kernel sends an orphaned group with a stopped member SIGHUP and "
            "SIGCONT. Dump it with the shell that runs it (a tree), or continue it first"))
        return
    s.ok("job control", "process", describe(sig) + f"; its group is kept from being orphaned by "
         f"{keeper[0]}'s parent {keeper[1]}")


def _stat(pid: int):
    """(ppid, pgrp, session) from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[2]), int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def _group_keeper(pid: int, ctx, now: bool = False):
    """(member, its parent) of `pid`'s process group whose parent is in the
    session but not the group once restored (kernel/exit.c
    will_become_orphaned_pgrp), or None: orphaned. The dump's root gets a
    parent outside (init), every other member of the tree its own again;
    processes outside the dump keep theirs. now: as it is now (the root
    with its own parent)."""
    me = _stat(pid)
    if me is None:
        return None
    _, pgrp, sid = me
    root = ctx.tree_root if ctx.tree_root is not None else pid
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        q = int(name)
        st = _stat(q)
        if st is None or st[1] != pgrp or (q == root and not now):
            continue
        parent = _stat(st[0])
        if parent is not None and parent[2] == sid and parent[1] != pgrp:
            return q, st[0]
    return None


WAITID = {"x86_64": 247, "aarch64": 95}
P_PID, WNOHANG, WSTOPPED, WNOWAIT = 1, 1, 2, 0x01000000
CLD_STOPPED = 5


def report_pending(parent_task, child: int, vmas) -> bool:
    """Whether `child`'s stop report waits for its (frozen) parent: an
    injected waitid(WNOWAIT) in the parent, which takes nothing. Raises
    EngineError."""
    from .dump import _scratch, put_back_scratch
    t = parent_task
    scr = _scratch(t, vmas)
    saved = t.read_mem(scr, 128)
    try:
        r = t.syscall(WAITID[t.arch.MACHINE], P_PID, child, scr, WSTOPPED | WNOHANG | WNOWAIT, 0)
        info = t.read_mem(scr, 128)
    finally:
        put_back_scratch([(t, scr, saved)])
    if r != 0:
        raise EngineError(f"waitid for the stop report of {child} (injected): {r}", pid=t.pid)
    signo, _, code, _, spid, _, status = struct.unpack_from("<iiiiiii", info)
    if spid == 0:
        return False
    if spid != child or code != CLD_STOPPED:
        raise EngineError(f"waitid for the stop report of {child}: pid {spid} code {code}", pid=t.pid)
    return True


def tree_reports(members) -> None:
    """engine/tree.py, every member surveyed: each stopped member (not the
    root) gets `job_stop_report` in its state from its parent."""
    by_pid = {m.pid: m for m in members}
    for m in members[1:]:
        if m.zombie or m.state is None or not m.state.get("job_stop"):
            continue
        parent = by_pid.get(m.ppid)
        if parent is None or parent.zombie:
            continue
        try:
            from . import procfs
            m.state["job_stop_report"] = report_pending(parent.tasks[0], m.pid, procfs.Proc(parent.pid).maps())
        except (EngineError, Refusal, OSError) as e:
            m.survey.refuse("job control", "process", Refusal(
                "process-tree", f"whether parent {m.ppid} has taken its stop report could not be read: "
                f"{getattr(e, 'detail', None) or e}"))


def restore_report(parent_b, child: int, child_core: dict) -> None:
    """engine/tree_restore.py, right after `child` stopped again and before
    its parent (Builder `parent_b`) is let go: the parent's view of the
    stop made as it was - its report taken when the original's was, the
    SIGCHLD the stop sent taken back when the image had none pending."""
    if not child_core.get("job_stop_report", True):
        r = parent_b.task.syscall(WAITID[parent_b.arch.MACHINE], P_PID, child, parent_b.put(bytes(128), 256),
                                  WSTOPPED | WNOHANG, 0)
        if r != 0:
            raise EngineError(f"taking the stop report of {child} in its parent (injected waitid): {r}",
                              pid=parent_b.pid)
    core = parent_b.job.core
    act = core["sigactions"].get(str(SIGCHLD), [0, 0, 0, 0])
    sends = act[0] != 1 and not act[1] & SA_NOCLDSTOP
    if sends and not _pending(core, SIGCHLD):
        from .tree_restore import _take_sigchld
        _take_sigchld(parent_b)


SIGCHLD = 17
SA_NOCLDSTOP = 1


def _queued_now(status: dict, sig: int) -> bool:
    """Pending in either queue (/proc/PID/status SigPnd, ShdPnd)."""
    return any(int(status.get(k, "0") or "0", 16) >> (sig - 1) & 1 for k in ("SigPnd", "ShdPnd"))


def _pending(core: dict, sig: int) -> bool:
    """Pending in the image's process-wide queue, where the stop's SIGCHLD
    goes (PIDTYPE_TGID) and merges. Refused when only the thread's own
    queue has it: rt_sigtimedwait would take that one first."""
    queued = {q: any(struct.unpack_from("<i", bytes.fromhex(e["raw"]))[0] == sig
                     for e in (core.get("signals") or {}).get(q, [])) for q in ("thread", "shared")}
    if queued["thread"] and not queued["shared"]:
        raise Refusal("unsupported-state", f"a SIGCHLD pending in its own thread's queue: the one a restored "
                      "child's stop sends could not be told from it", pid=core.get("pid"))
    return queued["shared"]


def validate(sig) -> bool:
    return sig in (0, None) or sig in NAMES


def stop_again(b) -> None:
    """Builder `b` (engine/build.py), every stage done but finish's: make the
    process group-stopped by the image's signal, as the module doc says.
    Raises Refusal (an orphaned group discarded the signal) or EngineError."""
    from . import ptrace
    sig = b.job.core["job_stop"]
    pid = b.pid
    act = b.job.core["sigactions"].get(str(sig))
    default = sig == SIGSTOP or act is None or act[0] == 0
    if not default:
        b.call("rt_sigaction", sig, b.put(struct.pack("<QQQQ", 0, 0, 0, 0)), 0, 8)
    ptrace.set_sigmask(pid, ALL_BUT_UNBLOCKABLE & ~(1 << (sig - 1)))
    b.call("kill", pid, sig)       # single-threaded: to this task
    ptrace.cont(pid, 0)              # from the kill's exit stop to the dequeue
    st = ptrace.wait(pid)
    if not (st.stopped and st.sig == sig and _has_siginfo(pid)):
        raise EngineError(f"stopping it again: expected the delivery of signal {sig}, got {st!r}", pid=pid)
    ptrace.cont(pid, sig)            # its default action: the group stop
    st = ptrace.wait(pid)
    if st.stopped and st.sig == sig and not _has_siginfo(pid):
        pass                         # the group-stop trap (no siginfo)
    elif st.stopped and st.sig == _signal.SIGTRAP:
        # Discarded (an orphaned process group): it ran on into the gadget's int3.
        raise Refusal("unsupported-state", f"stopped by {NAMES.get(sig, sig)}, which the kernel discards here: "
                      "its process group would be orphaned (restore it with --tty inherit from a shell, "
                      "or continue it before the dump)", pid=pid)
    else:
        raise EngineError(f"stopping it again: expected a group stop by signal {sig}, got {st!r}", pid=pid)
    if not default:
        handler, flags, restorer, mask = act
        b.call("rt_sigaction", sig, b.put(struct.pack("<QQQQ", handler, flags, restorer, mask)), 0, 8)


def _has_siginfo(pid: int) -> bool:
    """A signal-delivery stop has a siginfo; a group-stop trap of a task
    attached without PTRACE_SEIZE has none (EINVAL)."""
    import ctypes
    from . import ptrace
    from .libc import SysError
    buf = ctypes.create_string_buffer(128)
    try:
        ptrace.request(ptrace.GETSIGINFO, pid, None, ctypes.addressof(buf))
        return True
    except SysError as e:
        if e.errno == 22:
            return False
        raise
