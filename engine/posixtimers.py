"""POSIX timers (timer_create(2)): same IDs, clocks, notification, signal
values, remaining time and interval.

Dump: /proc/PID/timers lists each timer's ID, signal number, sigev_value,
notification (signal / none / thread, to the process or to a thread ID) and
clock (fs/proc/base.c show_timer); timer_gettime and timer_getoverrun are
injected for the rest.

Restore: the timers are created in the new process in ascending ID order,
before its credentials are dropped (alarm clocks need CAP_WAKE_ALARM then),
with the IDs the program holds in its memory:
* kernels with PR_TIMER_CREATE_RESTORE_IDS (new in 2025; 6.18 has it) take the wanted ID from
  the timer_t timer_create is handed (EBUSY if taken);
* older kernels hand out IDs sequentially from 0 in a new process
  (signal_struct.posix_timer_id / next_posix_timer_id), so missing IDs are
  filled by creating and deleting throw-away timers, at most MAX_FILLERS of
  them; the ID each create returns is checked either way.
They are armed last (arm()), with every signal blocked so a timer that
fires before the process runs stays pending with its own siginfo instead of
being caught by the tracer; finish puts the dumped signal mask back. A
fired one-shot timer whose signal was pending is set to an absolute time
long past (fire_pending): it expires at once and its own signal is queued
again, read back against the image's (engine/signals.py timer_pending
says which pending timer signals can come back).

A timer that notifies one thread (SIGEV_THREAD_ID; glibc's SIGEV_THREAD
timers notify its helper thread so, as vim's do) is created once that
thread exists again: threads come back with their TIDs, before the timers
(engine/build.py), and the kernel accepts a target in the caller's thread
group (good_sigevent).

Not exact, hence refused: a nonzero overrun count of the last delivered
expiry (timer_getoverrun cannot be set), clocks other than the process's
own (another process's CPU clock), a target that is no thread of the
process. Documented limits (README): the time
spent as an image does not count (timers are re-armed relative), a
TIMER_ABSTIME timer comes back relative, and the counter for the next new
ID continues from the highest restored ID.
"""

from __future__ import annotations

import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from . import ptrace
from .errors import EngineError, Refusal

CLOCKS = {0: "REALTIME", 1: "MONOTONIC", 2: "PROCESS_CPUTIME", 3: "THREAD_CPUTIME", 7: "BOOTTIME",
          8: "REALTIME_ALARM", 9: "BOOTTIME_ALARM", 11: "TAI"}
NOTIFY = {"signal": 0, "none": 1, "thread": 2}
SIGEV_THREAD_ID = 4
PR_TIMER_CREATE_RESTORE_IDS = 77
RESTORE_IDS_OFF, RESTORE_IDS_ON = 0, 1
MAX_FILLERS = 4096
ITIMERSPEC = struct.Struct("<qqqq")     # it_interval {sec, nsec}, it_value {sec, nsec}
ALL_SIGNALS = (1 << 64) - 1


def parse(text: str) -> List[dict]:
    """/proc/PID/timers -> [{id, signo, value, notify, tid, clock}], in ID order."""
    out: List[dict] = []
    cur: dict = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        val = val.strip()
        if key == "ID":
            cur = {"id": int(val)}
            out.append(cur)
        elif key == "signal":
            signo, _, value = val.partition("/")
            cur["signo"], cur["value"] = int(signo), int(value, 16)
        elif key == "notify":
            how, _, who = val.partition("/")
            kind, _, num = who.partition(".")
            cur["notify"], cur["tid"], cur["target"] = how, kind == "tid", int(num)
        elif key == "ClockID":
            cur["clock"] = int(val)
    return sorted(out, key=lambda t: t["id"])


def read(pid: int) -> List[dict]:
    from .procfs import read_all
    try:
        return parse(read_all(f"/proc/{pid}/timers").decode())
    except FileNotFoundError:
        return []


def check(pid: int, timers: List[dict]) -> List[Refusal]:
    """What /proc alone shows cannot be restored."""
    out = []
    for t in timers:
        what = f"POSIX timer {t['id']}"
        if not clock_ok(t.get("clock"), pid):
            out.append(Refusal("unsupported-state", f"{what}: clock {t.get('clock')} (another process's CPU clock)"))
        if t.get("notify") not in NOTIFY or (t.get("target") != pid and not (t.get("tid") and _thread_of(pid, t.get("target")))):
            out.append(Refusal("unsupported-state", f"{what}: notifies {t.get('notify')} to "
                               f"{'tid' if t.get('tid') else 'pid'} {t.get('target')}"))
    return out


def _thread_of(pid: int, tid) -> bool:
    """`tid` is a thread of process `pid` (restored with its TID)."""
    import os
    return isinstance(tid, int) and tid > 0 and os.path.exists(f"/proc/{pid}/task/{tid}")


def clock_ok(clock, pid: int) -> bool:
    """A clock the restored process has too: a fixed one, or a CPU-time clock
    (negative, include/linux/posix-timers.h CPUCLOCK_*) of this process or
    thread, by PID 0 ("self", what CLOCK_PROCESS_CPUTIME_ID becomes: -6) or
    by its own PID, which the restore keeps."""
    if not isinstance(clock, int):
        return False
    if clock >= 0:
        return clock in CLOCKS
    return (clock & 3) != 3 and ~(clock >> 3) in (0, pid)


def describe(timers: List[dict]) -> str:
    if not timers:
        return "none"
    parts = []
    for t in timers:
        armed = "armed" if any(t.get("spec", [0])[2:]) else "disarmed"
        parts.append(f"{t['id']} ({CLOCKS.get(t['clock'], 'CPU clock ' + str(t['clock']))}, {t['notify']} {t['signo']}, {armed})")
    return ", ".join(parts)


def dump(task, scr: int, timers: Optional[List[dict]] = None) -> List[dict]:
    """Injected part: remaining time, interval and overrun of each timer
    (`timers`: read() as the survey read it, the process frozen since: only
    the process itself makes or deletes one). Raises Refusal for a nonzero
    overrun."""
    if timers is None:
        timers = read(task.pid)
    for t in timers:
        task.call("timer_gettime", t["id"], scr)
        t["spec"] = list(ITIMERSPEC.unpack(task.read_mem(scr, ITIMERSPEC.size)))
        t["overrun"] = task.call("timer_getoverrun", t["id"])
        if t["overrun"]:
            raise Refusal("unsupported-state", f"POSIX timer {t['id']} reports an overrun count of "
                          f"{t['overrun']} (timer_getoverrun), which cannot be set again", pid=task.pid)
    return timers


def check_records(timers, pid=None, tids=()) -> bool:
    """Well-formed; a thread target (`target`, when `tid`) is the process
    (`pid`) or one of its restored threads (`tids`)."""
    ok = isinstance(timers, list)
    for t in timers if ok else []:
        try:
            target = t.get("target", pid)
            ok = ok and (not t["tid"] or pid is None or target == pid or target in tids)
            ok = ok and all(isinstance(t[k], int) and not isinstance(t[k], bool)
                            for k in ("id", "signo", "value", "clock")) \
                and t["notify"] in NOTIFY and isinstance(t["tid"], bool) \
                and len(t["spec"]) == 4 and all(isinstance(x, int) for x in t["spec"]) and 0 <= t["id"] <= 0x7FFFFFFF
        except (KeyError, TypeError):
            return False
    return ok


def sigevent(t: dict, pid: int) -> bytes:
    """struct sigevent (64 bytes): sigev_value, sigev_signo, sigev_notify, _tid."""
    notify = NOTIFY[t["notify"]] | (SIGEV_THREAD_ID if t["tid"] else 0)
    target = t.get("target", pid) if t["tid"] else 0
    return struct.pack("<QiiI", t["value"], t["signo"], notify, target).ljust(64, b"\0")


def _fillers_needed(timers: List[dict]) -> int:
    return max(t["id"] for t in timers) + 1 - len(timers) if timers else 0


def validate(timers: List[dict]) -> List[Refusal]:
    """Before the process exists: can this kernel give every timer its ID?"""
    if _fillers_needed(timers) <= MAX_FILLERS:
        return []
    from . import libc
    try:
        libc.syscall(_sys("prctl"), PR_TIMER_CREATE_RESTORE_IDS, 2, 0, 0, 0, name="prctl")
        return []
    except libc.SysError:
        return [Refusal("kernel-missing", f"POSIX timer IDs up to {max(t['id'] for t in timers)}: without "
                        f"PR_TIMER_CREATE_RESTORE_IDS (a 2025 kernel) that takes over {MAX_FILLERS} placeholder timers")]


def _sys(name: str) -> int:
    from .arch import current
    return current().SYS[name]


def restore_ids_supported(task) -> bool:
    """PR_TIMER_CREATE_RESTORE_IDS_GET answers 0 or 1 where the kernel has it."""
    return task.syscall(task.arch.SYS["prctl"], PR_TIMER_CREATE_RESTORE_IDS, 2, 0, 0, 0) in (0, 1)


def create(b, timers: List[dict]) -> None:
    """Create every timer with its ID, disarmed (Builder stage)."""
    if not timers:
        return
    task, pid = b.task, b.pid
    exact = restore_ids_supported(task)
    if not exact and _fillers_needed(timers) > MAX_FILLERS:
        raise Refusal("kernel-missing", f"POSIX timer IDs up to {max(t['id'] for t in timers)} need "
                      "PR_TIMER_CREATE_RESTORE_IDS (a 2025 kernel) or too many placeholder timers", pid=pid)
    if exact:
        b.call("prctl", PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0)
    try:
        for t in sorted(timers, key=lambda t: t["id"]):
            ev = b.put(sigevent(t, pid), 0)
            idp = b.put(struct.pack("<i", t["id"]), 64)
            while True:
                b.call("timer_create", t["clock"], ev, idp)
                got = struct.unpack("<i", task.read_mem(idp, 4))[0]
                if got == t["id"]:
                    break
                if exact or got > t["id"]:
                    raise EngineError(f"timer_create gave POSIX timer ID {got}, not {t['id']}", pid=pid)
                b.call("timer_delete", got)     # a placeholder for an ID the process had deleted
    finally:
        if exact:
            # Else the program's own later timer_create calls would read
            # their ID from whatever its timer_t holds.
            b.call("prctl", PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0)


def arm(b, timers: List[dict]) -> None:
    """Arm the timers: the last thing before the registers go back. Every
    signal stays blocked until then (Builder.finish sets the dumped mask).
    A one-shot timer whose signal was pending is fired again (fire_pending)."""
    armed = [t for t in timers if t["spec"][2] or t["spec"][3]]
    fired = pending_fired(b.job.core, b.pid)
    if not armed and not fired:
        return
    ptrace.set_sigmask(b.pid, ALL_SIGNALS)
    for t in armed:
        b.call("timer_settime", t["id"], 0, b.put(ITIMERSPEC.pack(*t["spec"])), 0)
    if fired:
        fire_pending(b, timers, fired)


SI_TIMER = -2
TIMER_ABSTIME = 1
SYS_PRIVATE = slice(32, 36)     # siginfo _timer._sys_private: the kernel's, cleared before user space sees it


def pending_fired(core: dict, pid: int) -> dict:
    """{timer ID: (queue, tid, raw siginfo)} of the SI_TIMER signals the
    image has pending (engine/signals.py timer_pending let only a fired
    one-shot timer's through)."""
    out = {}
    recs = [(pid, core.get("signals") or {})] + [(r["tid"], r.get("signals") or {}) for r in core.get("threads", [])]
    for tid, sigs in recs:
        for q in ("thread", "shared"):
            for sig in sigs.get(q, []):
                if sig.get("code") == SI_TIMER:
                    out[sig["pid"]] = (q, tid, sig["raw"])
    return out


def fire_pending(b, timers: List[dict], fired: dict) -> None:
    """Each fired one-shot timer set to an absolute time long past: it
    expires at once and the kernel queues its own signal (the timer's
    siginfo, dropped as the original's would be if the timer is set or
    deleted before it is taken). Every signal is blocked; its queue is
    then read back until the signal is there, and compared with the
    image's siginfo. Raises EngineError."""
    from . import signals
    by_id = {t["id"]: t for t in timers}
    for tid_ in sorted(fired):
        t = by_id.get(tid_)
        if t is None or any(t["spec"]):
            raise EngineError(f"a pending signal of POSIX timer {tid_}, which is no fired one-shot timer", pid=b.pid)
        b.call("timer_settime", tid_, TIMER_ABSTIME, b.put(ITIMERSPEC.pack(0, 0, 0, 1)), 0)
    import time
    deadline = time.monotonic() + 2.0
    for tid_, (q, tid, raw) in sorted(fired.items()):
        want = bytearray(bytes.fromhex(raw))
        want[SYS_PRIVATE] = bytes(4)
        while True:
            got = [bytearray(r) for r in signals.peek(b.pid if q == "shared" else tid, q == "shared")]
            for r in got:
                r[SYS_PRIVATE] = bytes(4)
            if bytes(want) in [bytes(r) for r in got]:
                break
            if time.monotonic() > deadline:
                raise EngineError(f"POSIX timer {tid_} fired again did not queue its signal as it was "
                                  f"(queue of {tid}: {[bytes(r[:32]).hex() for r in got]})", pid=b.pid)
            time.sleep(0.001)
