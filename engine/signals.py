"""Pending signals: kept pending through the freeze, saved with their
siginfo, queued again in the restored process.

While a task is frozen, signals sent to it are queued (a traced task
queues even ones it ignores); the first injected syscall would dequeue
every unblocked one into a signal-delivery stop, where the tracer can only
drop it or deliver it (running the handler in the middle of the dump). So
right after the freeze every signal is blocked (PTRACE_SETSIGMASK ~0; the
process's own mask is kept in ``task.sigmask``; PTRACE_GETSIGMASK already
answers with the saved mask inside pselect/ppoll/sigsuspend), and only
SIGKILL and SIGSTOP can still be dequeued (SIGSTOP is held back and sent
again, engine/task.py). Before the task is let go its mask is put back: an
original that carries on (check, --leave-running, a refused dump) then
receives every signal that arrived meanwhile from the kernel's own queues,
with its own siginfo.

The image holds both queues as PTRACE_PEEKSIGINFO returns them (the
per-thread one, and the process-wide one with PTRACE_PEEKSIGINFO_SHARED),
each siginfo as its 128 raw bytes, oldest first. A restore queues them
again from inside the new task, with rt_tgsigqueueinfo (per-thread) and
rt_sigqueueinfo (process-wide) injected into it: the kernel refuses a
siginfo with si_code >= 0 or SI_TKILL from another process (it would
impersonate kill()/the kernel), but a task may queue any siginfo to
itself, so si_code, si_pid, si_uid and si_value come back exact. They are
queued with everything blocked; the dumped mask is set at the last stop,
and whatever it leaves unblocked is delivered when the process resumes.
"""

from __future__ import annotations

import ctypes
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from . import guard, procfs, ptrace
from .errors import Refusal

PEEKSIGINFO = 0x4209
PEEKSIGINFO_SHARED = 1
GETSIGINFO = 0x4202
SIGINFO_SIZE = 128
ALL_BLOCKED = (1 << 64) - 1
SIGKILL = 9
SI_TIMER = -2
QUEUES = ("thread", "shared")


class PeekArgs(ctypes.Structure):
    """struct ptrace_peeksiginfo_args (linux/ptrace.h)."""
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


def peek(pid: int, shared: bool) -> List[bytes]:
    """Every siginfo queued for the thread (or the process), oldest first.
    Raises SysError."""
    out: List[bytes] = []
    batch = 32
    buf = (ctypes.c_char * (SIGINFO_SIZE * batch))()
    while True:
        args = PeekArgs(len(out), PEEKSIGINFO_SHARED if shared else 0, batch)
        n = ptrace.request(PEEKSIGINFO, pid, ctypes.addressof(args), ctypes.addressof(buf))
        if n <= 0:
            return out
        raw = bytes(buf[:n * SIGINFO_SIZE])
        out.extend(raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n))


def siginfo_at_stop(pid: int) -> bytes:
    """PTRACE_GETSIGINFO at a signal-delivery stop. Raises SysError."""
    buf = (ctypes.c_char * SIGINFO_SIZE)()
    ptrace.request(GETSIGINFO, pid, None, ctypes.addressof(buf))
    return bytes(buf)


def decode(raw: bytes) -> dict:
    """The fields a reader cares about (the union read as kill/rt/sigqueue:
    si_pid, si_uid, si_value); `raw` (hex) is what a restore queues."""
    signo, errno_, code = struct.unpack_from("<iii", raw, 0)
    pid, uid = struct.unpack_from("<iI", raw, 16)
    value, = struct.unpack_from("<Q", raw, 24)
    return {"signo": signo, "code": code, "errno": errno_, "pid": pid, "uid": uid, "value": value,
            "raw": raw.hex()}


# -- the frozen task -----------------------------------------------------------

def block_all(task) -> None:
    """Keep every signal pending while the task is frozen (see module doc).
    Raises SysError."""
    task.sigmask = ptrace.get_sigmask(task.pid)
    guard.frozen({task.pid: task.sigmask})     # what a guardian puts back if we die
    ptrace.set_sigmask(task.pid, ALL_BLOCKED)


def deliverable_handled(pid: int) -> int:
    """The set of signals pending for thread `pid` (its own queue or the
    process's) that its mask does not block and that have a handler
    (neither SIG_DFL nor SIG_IGN): those get_signal() would run a handler
    for. Read from /proc (SigBlk is the mask in force, also inside
    sigsuspend/ppoll, where PTRACE_GETSIGMASK answers with the saved one),
    so only meaningful before :func:`block_all`. 0 when unreadable."""
    try:
        st = procfs.read_status_fields(f"/proc/{pid}/status", ("SigPnd", "ShdPnd", "SigBlk", "SigCgt"))
        pending = procfs.parse_sigmask(st["SigPnd"]) | procfs.parse_sigmask(st["ShdPnd"])
        return pending & ~procfs.parse_sigmask(st["SigBlk"]) & procfs.parse_sigmask(st["SigCgt"])
    except (OSError, KeyError, ValueError):
        return 0


def unblock(task) -> None:
    """Put the process's own mask back (before it is let go)."""
    if getattr(task, "sigmask", None) is not None:
        ptrace.set_sigmask(task.pid, task.sigmask)


def collect(task) -> dict:
    """{"thread": [...], "shared": [...]} of decoded siginfos: both queues,
    plus any signal held back at a delivery stop (SIGSTOP) as a per-thread
    one. SIGKILL is left out (the task is dying). Raises SysError/OSError."""
    # The pending sets first, the queues second: a signal in a set with no
    # queue entry (sent while the queue was full: the kernel keeps the bit
    # and drops the siginfo) is delivered with a zeroed SI_USER siginfo
    # (collect_signal), so that is what it is saved as. Read in this order,
    # a signal arriving in between is in the queue, not synthesised.
    # A queue whose set is empty is not peeked (two ptrace requests less per
    # task, twice per dump): a queued siginfo always has its bit set (the
    # kernel adds both under the siglock and clears the bit with the last
    # entry), so an empty set means an empty queue at the time of the read,
    # and one that arrives after it is one that arrived after the read.
    status = procfs.read_status_fields(f"/proc/{task.pid}/status", ("SigPnd", "ShdPnd"))
    sets = {"thread": procfs.parse_sigmask(status.get("SigPnd", "0")),
            "shared": procfs.parse_sigmask(status.get("ShdPnd", "0"))}
    out = {"thread": [decode(r) for r in peek(task.pid, False)] if sets["thread"] else [],
           "shared": [decode(r) for r in peek(task.pid, True)] if sets["shared"] else []}
    for q in QUEUES:
        if not sets[q]:
            continue        # nothing pending there (most tasks): no bit to look for
        have = {s["signo"] for s in out[q]}
        for sig in range(1, 65):
            if sets[q] >> (sig - 1) & 1 and sig not in have:
                out[q].append(decode(struct.pack("<iii", sig, 0, 0).ljust(SIGINFO_SIZE, b"\0")))
    for raw in getattr(task, "deferred_info", []):
        out["thread"].append(decode(raw))
    for q in QUEUES:
        out[q] = [s for s in out[q] if s["signo"] != SIGKILL]
    return out


def problem(sigs: dict, timers=None) -> Optional[str]:
    """Why these pending signals cannot be restored exactly, or None.
    `timers`: the process's POSIX timers (engine/posixtimers.py), whose
    pending signals may be restorable (timer_pending)."""
    for q in QUEUES:
        for s in sigs[q]:
            if s["code"] == SI_TIMER:
                why = timer_pending(s, q, sigs[q], timers or [])
                if why:
                    return f"signal {s['signo']} of POSIX timer {s['pid']} is pending: {why}"
    return None


def timer_pending(s: dict, q: str, queue: list, timers: list) -> Optional[str]:
    """Why the pending SI_TIMER signal `s` (in queue `q`, among `queue`)
    cannot come back, or None. It can when its timer is a one-shot that
    has fired (interval and remaining time 0): the restore fires the
    recreated timer again at once (posixtimers.arm), and the kernel queues
    the very same signal, the timer's own. Queued again by hand it would be
    a plain signal (the timer could queue a second one; the kernel would not
    drop it when the timer is set again). A periodic timer counts the
    expiries it misses while its signal waits (the signal's si_overrun once
    taken), and that count cannot be read without taking it."""
    t = next((t for t in timers if t["id"] == s["pid"]), None)   # si_tid: the timer's ID
    if t is None:
        return "no such timer (deleted since it fired)"
    if t["spec"][0] or t["spec"][1]:
        return ("the timer is periodic: the expiries it counts while its signal waits (si_overrun) cannot "
                "be read without taking the signal")
    if t["spec"][2] or t["spec"][3]:
        return "the timer was set again since"
    if (t["signo"], t["value"]) != (s["signo"], s["value"]) or t["notify"] != "signal" \
            or (q == "thread") != bool(t["tid"]):
        return "its siginfo is not the timer's"
    if s["uid"]:        # si_overrun
        return f"it carries an overrun count of {s['uid']}"
    if sum(1 for o in queue if o["signo"] == s["signo"]) > 1:
        return "another signal of its number is queued with it (their order would change)"
    return None


def handled_on_resume(sigs: dict, mask: int, sigactions: dict) -> List[int]:
    """Pending signals whose handler runs as soon as the process resumes:
    not blocked by `mask`, with a handler that is a function (not SIG_DFL
    or SIG_IGN)."""
    out = []
    for q in QUEUES:
        for s in sigs[q]:
            n = s["signo"]
            act = sigactions.get(str(n)) or [0]
            if not mask >> (n - 1) & 1 and act[0] not in (0, 1) and n not in out:
                out.append(n)
    return out


def describe(sigs: dict) -> str:
    parts = []
    for q in QUEUES:
        for s in sigs[q]:
            parts.append(f"{s['signo']}({q}, code {s['code']}, from pid {s['pid']})")
    return ", ".join(parts) or "none"


# -- sigactions ----------------------------------------------------------------

ACTION_SIGNALS = [s for s in range(1, 65) if s not in (9, 19)]   # all but SIGKILL, SIGSTOP


def own_actions() -> dict:
    """This process's own sigactions, {"SIG": [handler, flags, restorer,
    mask]} in the kernel's struct layout (as a dump reads them by injection).
    A process cloned from this one without CLONE_SIGHAND or
    CLONE_CLEAR_SIGHAND starts with exactly these (kernel/fork.c
    copy_sighand copies the table), so a restore sets only the entries the
    image has differently (engine/build.py)."""
    from . import libc
    from .arch import current
    nr = current().SYS["rt_sigaction"]
    buf = ctypes.create_string_buffer(32)
    out = {}
    for sig in ACTION_SIGNALS:
        ctypes.memset(buf, 0, 32)
        libc.syscall(nr, sig, 0, ctypes.addressof(buf), 8, name="rt_sigaction")
        out[str(sig)] = list(struct.unpack("<QQQQ", buf.raw))
    return out


def cleared_actions() -> dict:
    """The sigactions of a process cloned from this one with
    CLONE_CLEAR_SIGHAND (gadget.clone_with_pid), in own_actions' form:
    kernel/signal.c flush_signal_handlers(t, 0) sets every handler but an
    ignored one to SIG_DFL and every flags, restorer and mask to 0. Which
    are ignored: /proc/self/status SigIgn, read now (one file instead of
    62 rt_sigaction calls: each ~10x dearer under TCG). Call it just
    before the clone. Raises OSError."""
    from .procfs import read_all
    for line in read_all("/proc/self/status").splitlines():
        if line.startswith(b"SigIgn:"):
            ign = int(line.split()[1], 16)
            break
    else:
        raise OSError(0, "no SigIgn line in /proc/self/status")
    return {str(sig): [1 if ign >> (sig - 1) & 1 else 0, 0, 0, 0] for sig in ACTION_SIGNALS}


# -- the image -----------------------------------------------------------------

def check_record(rec) -> None:
    """Raises Refusal(image-invalid) for a malformed "signals" record."""
    def bad(what: str) -> Refusal:
        return Refusal("image-invalid", f"core.json signals: {what}")
    if not isinstance(rec, dict):
        raise bad("not an object")
    for q in QUEUES:
        items = rec.get(q, [])
        if not isinstance(items, list):
            raise bad(f"{q} is not a list")
        for s in items:
            raw = s.get("raw") if isinstance(s, dict) else None
            try:
                data = bytes.fromhex(raw) if isinstance(raw, str) else b""
            except ValueError:
                data = b""
            if len(data) != SIGINFO_SIZE:
                raise bad(f"{q} entry without a {SIGINFO_SIZE}-byte siginfo")
            signo = struct.unpack_from("<i", data)[0]
            if not 1 <= signo <= 64 or signo == SIGKILL:
                raise bad(f"{q} entry for signal {signo}")


def requeue(task, put, rec: dict) -> int:
    """Queue the image's pending signals in the restored task (all blocked
    meanwhile; the caller sets the final mask at the last stop). `put`
    copies bytes into the task and returns their address. Returns how many
    were queued. Raises SysError/EngineError."""
    if not rec:
        return 0
    ptrace.set_sigmask(task.pid, ALL_BLOCKED)
    n = 0
    for q in QUEUES:
        for s in rec.get(q, []):
            raw = bytes.fromhex(s["raw"])
            signo, _, code = struct.unpack_from("<iii", raw)
            if code == SI_TIMER:
                continue        # its timer queues it again (posixtimers.arm)
            addr = put(raw)
            # A task may queue any siginfo to itself only: each thread's own
            # queue is refilled from inside that thread (tgid, its tid).
            tgid = getattr(task, "tgid", task.pid)
            if q == "shared":
                task.call("rt_sigqueueinfo", tgid, signo, addr)
            else:
                task.call("rt_tgsigqueueinfo", tgid, task.pid, signo, addr)
            n += 1
    return n
