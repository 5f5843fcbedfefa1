"""``workload.process``: process-wide state the scenario sets at the start
(after the fds, so a low RLIMIT_NOFILE cannot stop the workload building
them) and checks after the restore: umask, rlimits, signal actions, the
signal mask, pending signals (with their sigqueue values), interval
timers, an alternate signal stack (``altstack``), POSIX timers (``posix_timers``: timer_create, armed; each ID must
still answer, interval exact, remaining time within the itimers'
tolerance), the floating-point rounding mode (``fp_round``) and ``attrs`` (I/O priority, core dump filter, THP disable, child
subreaper, keep-caps, machine-check kill policy, dumpable, NUMA memory
policy, membarrier registration: each compared
with what the process saw before the dump, every one of them whether the
scenario set it or not); and ``threads``: Python threads the workload starts, each blocked
in one call (sleep: a time.sleep loop that counts; read: read(2) on a pipe
the process holds both ends of; regs: the same read(2) made by machine code
holding known values in nine registers and xmm8 across it (x86_64; a raw
read elsewhere); lock: a Lock the main thread holds; cond:
Condition.wait; join: joining a private sleeper thread). After the restore
each thread proves it is the same thread: it runs on with its native id
(gettid) equal to the recorded TID, its pthread_self (read through its
thread pointer: its TLS) the recorded one, and a random value it keeps in
its own frame (its stack) and the count it kept are the ones recorded; a
thread given ``nice`` sets it on itself (setpriority on its TID: nice is
per thread) and must report it again.
``children``: processes the workload forks (a process tree, engine/tree.py),
see :class:`Child`; each is judged after the restore: same pid, parent,
group and session, the value in its own memory, its call's return, and
the exit status its parent's waitpid() collects (a zombie's too); with
``share: [files, fs]`` it is made by clone(CLONE_FILES / CLONE_FS) and
must still share (kcmp) exactly those with the workload - and prove it: a
memfd it opens is open in the workload at that number, a umask it sets is
the workload's. ``leave: [files, fs]``: once its children exist the
workload unshare()s those, so the children sharing them share them with
each other only (kcmp between them; their memfd and umask not the
workload's).
Every child also inherits two anonymous pages (:class:`Memory`): after
the restore a write to the MAP_SHARED one must be seen on both sides, and
a write to the MAP_PRIVATE one (copy on write) only on the writer's.

Expected values come from the scenario, and where the kernel adjusts a
value (the SA_RESTORER libc adds, an itimer's remaining time) from what the
process saw of itself before the dump (the ready file).

Tolerance rule for an itimer's remaining time (getitimer): ITIMER_REAL runs
on wall time and keeps running while the process is frozen or sits in an
image, VIRTUAL and PROF only while it uses CPU; an engine may restore the
remaining time as of the dump. With V0 seen before the dump and E the wall
time since then: V0 - E - 2 s <= value <= V0 + 50 ms, and the interval is
exact.
"""

from __future__ import annotations

import os
import time
# the C module the signal package wraps (as workload.py: no enum, functools,
# collections at every workload start)
import _signal as signal

# resource and threading are imported where used: every workload applies
# and observes this section, few set rlimits or start threads (each import
# costs the exec'd workload's start about ten times more under TCG)
TYPE_CHECKING = False   # annotations only
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from .core import check, within

try:
    from .. import sysapi
except ImportError:  # pragma: no cover - in the guest, ``kinds`` is a top-level package
    import sysapi  # type: ignore[no-redef]

# SIGUSR1 wakes the workload and SIGIO serves dnotify: not for scenarios
SIGNALS = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM", "SIGCHLD", "SIGCONT",
           "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGWINCH") + tuple(f"SIGRTMIN+{i}" for i in range(9))
RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_STACK", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_AS",
           "RLIMIT_NPROC", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_CPU",
           "RLIMIT_SIGPENDING")
ITIMERS = {"real": signal.ITIMER_REAL, "virtual": signal.ITIMER_VIRTUAL, "prof": signal.ITIMER_PROF}
HANDLERS = ("default", "ignore", "libc")
LATE_S, EARLY_S = 0.05, 2.0
BLOCKED_IN = ("sleep", "read", "lock", "cond", "join", "regs")
THREAD_WAKE_S = 10.0
CHILD_IN = ("sleep", "read", "zombie")
CHILD_GROUPS = ("parent", "own")
# workload.process.attrs: kernel attributes a process reads back itself
# (prctl, ioprio_get, /proc/self/coredump_filter, get_mempolicy); the judge
# sees the I/O priority, THP_enabled, the core dump filter and the NUMA
# policy (numa_maps) from outside too (harness/procstate.py).
IOPRIO = ("none", "idle") + tuple(f"{c}:{n}" for c in ("best-effort", "realtime") for n in range(8))
MCE_KILL = {"late": 0, "early": 1}
# personality(2) flags a running process may set without effect on itself (they matter at its next exec)
PERSONALITY = {"addr_no_randomize": 0x0040000, "addr_compat_layout": 0x0200000}
# <fenv.h> FE_* rounding modes: x86_64 (x87 control word bits 10-11), aarch64 (FPCR RMode, bits 22-23)
FP_ROUND = {"upward": {"x86_64": 0x800, "aarch64": 0x400000}, "downward": {"x86_64": 0x400, "aarch64": 0x800000},
            "toward_zero": {"x86_64": 0xc00, "aarch64": 0xc00000}}
CHILD_SHARE = {"files": (sysapi.CLONE_FILES, sysapi.KCMP_FILES), "fs": (sysapi.CLONE_FS, sysapi.KCMP_FS)}


def fields(s) -> dict:
    sig = s.Enum(SIGNALS, "a signal the workload allows:")
    return {
        "umask": s.Int(0, 0o777),
        "rlimits": s.Map({r: s.Limits() for r in RLIMITS}),
        "sigactions": s.Map({n: s.Map({"handler": s.Enum(HANDLERS),
                                       "flags": s.List_(s.Enum(tuple(sysapi.SA_FLAGS))),
                                       "mask": s.List_(sig)}, required=("handler",)) for n in SIGNALS}),
        "blocked": s.List_(sig),
        # thread: pending for the main thread alone (pthread_kill), not the process (kill, sigqueue)
        "pending": s.List_(s.Map({"signal": sig, "value": s.Int(0, 2**31 - 1), "thread": s.Bool()},
                                 required=("signal",))),
        "itimers": s.Map({k: s.Map({"value_ms": s.Int(1), "interval_ms": s.Int(0)}, required=("value_ms",))
                          for k in ITIMERS}),
        "threads": s.List_(s.Map({"blocked_in": s.Enum(BLOCKED_IN, "a call a thread can block in:"),
                                  # its own nice value (setpriority on its TID: per thread)
                                  "nice": s.Int(0, 19)},
                                 required=("blocked_in",))),
        "leave": s.List_(s.Enum(tuple(CHILD_SHARE), "what the workload can leave:")),
        # POSIX timers (timer_create), armed: notifying by a blocked signal, or not at all
        "posix_timers": s.List_(s.Map({"clock": s.Enum(tuple(sysapi.CLOCKS)), "signal": sig,
                                       "value_ms": s.Int(1), "interval_ms": s.Int(0)},
                                      required=("clock", "value_ms"))),
        # an alternate signal stack (sigaltstack) of this many bytes, mmap'd
        "altstack": s.Size(),
        # the floating-point rounding mode (fesetround: x87 and SSE on x86_64, FPCR on aarch64)
        "fp_round": s.Enum(tuple(FP_ROUND), "a rounding mode:"),
        "attrs": s.Map({"ioprio": s.Enum(IOPRIO, "an I/O priority (class or class:level):"),
                        "coredump_filter": s.Int(0, 0x1ff), "thp_disable": s.Bool(), "child_subreaper": s.Bool(),
                        "keep_caps": s.Bool(), "mce_kill": s.Enum(tuple(MCE_KILL)), "dumpable": s.Bool(),
                        "mempolicy": s.Enum(tuple(sysapi.MPOL), "a NUMA memory policy (on node 0):"),
                        "membarrier": s.Bool(), "personality": s.Enum(tuple(PERSONALITY), "a personality flag:"),
                        "timer_slack_ns": s.Int(1, 10 ** 9), "no_new_privs": s.Bool(),
                        "oom_score_adj": s.Int(-1000, 1000),
                        # supplementary groups (setgroups), SCHED_BATCH, an allow-all seccomp filter
                        "groups": s.List_(s.Int(1, 2 ** 31 - 1)), "sched_batch": s.Bool(),
                        # real, effective, saved uid and gid (setresuid/setresgid; an effective
                        # uid other than 0 would take the workload's capabilities)
                        "resuid": s.List_(s.Int(0, 2 ** 31 - 1)), "resgid": s.List_(s.Int(0, 2 ** 31 - 1)),
                        # the nice of the session's scheduling autogroup (/proc/self/autogroup)
                        "autogroup_nice": s.Int(0, 19),
                        "seccomp_filter": s.Bool(),
                        # PR_SET_IO_FLUSHER (needs CAP_SYS_RESOURCE), as nbd-client or a FUSE server runs
                        "io_flusher": s.Bool()}),
        "children": s.List_(s.Map({"blocked_in": s.Enum(CHILD_IN, "what a child does:"),
                                   "exit": s.Int(0, 255), "group": s.Enum(CHILD_GROUPS),
                                   "share": s.List_(s.Enum(tuple(CHILD_SHARE), "what a child can share:"))},
                                  required=("blocked_in",))),
        # chroot(2) into this directory (made by a setup step) right before the
        # ready file; the cwd stays the work dir, outside it (see enter_root)
        "chroot": s.Path(),
        # syscall user dispatch on, the selector at BLOCK, calls from one probe
        # page below everything else dispatched (see SyscallDispatch)
        "syscall_dispatch": s.Bool(),
        # the main thread waits in raw rt_sigtimedwait(2) calls, EINTRs counted (raw_wait)
        "raw_wait": s.Bool(),
    }


def validate(p: dict) -> List[tuple]:
    out = []
    for i, t in enumerate(p.get("posix_timers", [])):
        if "signal" in t and t["signal"] not in p.get("blocked", []):
            out.append((f"posix_timers[{i}].signal", f"{t['signal']} must be blocked (it would end the workload)"))
    for i, x in enumerate(p.get("pending", [])):
        if x["signal"] not in p.get("blocked", []):
            out.append((f"pending[{i}]", f"{x['signal']} must be blocked to stay pending"))
        if "value" in x and not x["signal"].startswith("SIGRTMIN"):
            out.append((f"pending[{i}].value", "only real-time signals queue a value"))
        if "value" in x and x.get("thread"):
            out.append((f"pending[{i}].value", "a signal sent to the thread (pthread_kill) carries no value"))
    for i, c in enumerate(p.get("children", [])):
        share = c.get("share", [])
        if len(set(share)) != len(share):
            out.append((f"children[{i}].share", "each at most once"))
        if share and c["blocked_in"] == "zombie":
            out.append((f"children[{i}].share", "a zombie holds no fd table or fs to share"))
    leave = p.get("leave", [])
    if len(set(leave)) != len(leave):
        out.append(("leave", "each at most once"))
    for k in leave:
        if not any(k in c.get("share", []) for c in p.get("children", [])):
            out.append(("leave", f"no child shares the workload's {k}: nothing to leave"))
    return out


def signum(name: str) -> int:
    if name.startswith("SIGRTMIN+"):
        return int(signal.SIGRTMIN) + int(name.split("+")[1])
    return int(getattr(signal, name))     # a SIGNALS name (the schema checked it)


def _handler(name: str) -> int:
    # a libc function as the handler: its address must survive the restore
    # exactly (same mapping), and it is harmless if ever called
    return {"default": 0, "ignore": 1, "libc": sysapi.libc_address("getpid")}[name]


def _limit(v: int) -> int:
    import resource
    return resource.RLIM_INFINITY if v < 0 else v


def apply(p: dict) -> None:
    """Set the scenario's process state (the ``opener``)."""
    if "umask" in p:
        os.umask(int(p["umask"]))
    for name, (soft, hard) in (p.get("rlimits") or {}).items():
        import resource
        resource.setrlimit(getattr(resource, name), (_limit(soft), _limit(hard)))
    for name, a in (p.get("sigactions") or {}).items():
        sysapi.sigaction_set(signum(name), _handler(a["handler"]),
                             sysapi.names_to_mask(a.get("flags", []), sysapi.SA_FLAGS),
                             [signum(m) for m in a.get("mask", [])])
    if p.get("blocked"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signum(n) for n in p["blocked"]])
    for x in p.get("pending") or []:
        if x.get("thread"):
            import threading
            signal.pthread_kill(threading.get_ident(), signum(x["signal"]))
        elif "value" in x:
            sysapi.sigqueue(os.getpid(), signum(x["signal"]), int(x["value"]))
        else:
            os.kill(os.getpid(), signum(x["signal"]))
    for name, t in (p.get("itimers") or {}).items():
        signal.setitimer(ITIMERS[name], int(t["value_ms"]) / 1000, int(t.get("interval_ms", 0)) / 1000)
    for i, t in enumerate(p.get("posix_timers") or []):
        h = sysapi.timer_create(sysapi.CLOCKS[t["clock"]], signum(t["signal"]) if "signal" in t else 0, 100 + i)
        sysapi.timer_settime(h, int(t["value_ms"]), int(t.get("interval_ms", 0)))
        _TIMERS.append(h)
    if p.get("attrs"):
        _apply_attrs(p["attrs"])
    if p.get("altstack"):
        size = int(p["altstack"])
        sysapi.sigaltstack_set(sysapi.mmap(size, 3, 0x22, -1, 0), size)     # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    if p.get("fp_round"):
        if _libm().fesetround(FP_ROUND[p["fp_round"]][os.uname().machine]) != 0:
            raise OSError(f"fesetround({p['fp_round']}) failed")
    # Children before the threads (a fork copies only the calling thread).
    if p.get("children"):
        _MEMORY.append(Memory())
    for i, c in enumerate(p.get("children") or []):
        _CHILDREN.append(Child(i, c))
    for ch in _CHILDREN:
        ch.settle()
    if p.get("leave"):
        # The children sharing these keep them, one between them; the workload
        # takes a copy of its own (unshare(2)).
        sysapi.unshare(sum(CHILD_SHARE[k][0] for k in p["leave"]))
    # Last: the threads inherit the mask set above.
    for i, t in enumerate(p.get("threads") or []):
        _THREADS.append(Blocked(i, t["blocked_in"], t.get("nice")))
    for b in _THREADS:
        b.started.wait(THREAD_WAKE_S)
    # after the threads: dispatch is the calling thread's alone
    if p.get("syscall_dispatch"):
        _SUD.append(SyscallDispatch())


# -- threads -------------------------------------------------------------------------

_THREADS: List["Blocked"] = []
_TIMERS: List[int] = []         # the POSIX timers' handles (timer_t), in scenario order


class Blocked:
    """One scenario thread, blocked in its call until wake(). Its proof
    value lives in its own frame; it reports (its TID, the value, what its
    call returned, its count) only once woken."""

    def __init__(self, index: int, how: str, nice: "Optional[int]" = None):
        import threading
        self.index, self.how, self.nice = index, how, nice
        self.started = threading.Event()
        self.stop = threading.Event()
        self.count = 0          # sleep: ticks so far (read by the main thread)
        self.tid = 0
        self.fp: dict = {}
        self.rseq = None
        self.tid_address = 0
        self.value = ""
        self.report: Dict[str, object] = {}
        if how in ("read", "regs"):
            self.rfd, self.wfd = os.pipe()
        if how in ("lock", "cond"):
            self.lock = threading.Lock() if how == "lock" else threading.Condition()
            self.lock.acquire()     # held by the main thread until wake()
            self.flag = False
        if how == "join":
            self.sleeper = threading.Thread(target=self._sleeper, name=f"thr{index}-joined", daemon=True)
            self.sleeper.start()
        self.thread = threading.Thread(target=self._run, name=f"thr{index}-{how}", daemon=True)
        self.thread.start()

    def _sleeper(self) -> None:
        while not self.stop.is_set():
            time.sleep(0.05)

    def _run(self) -> None:
        import threading    # imported by __init__ already: no import machinery runs here
        mine = os.urandom(8).hex()       # on this thread's stack only (a frame local)
        if self.nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, self.nice)    # 0: the calling thread
        # its own name (comm, per thread; Python before 3.14 names none):
        # compared from outside, /proc/PID/task/TID/status
        sysapi.prctl_set_name(f"wl-thr{self.index}")
        # get_ident is pthread_self, read through the thread pointer (its TLS)
        self.tid, self.value, self.ident = threading.get_native_id(), mine, threading.get_ident()
        # per thread, and seen by no /proc file: its FPU control (inherited
        # from the main thread: a scenario's fp_round) and its rseq area
        self.fp, self.rseq, self.tid_address = _fp_now(), sysapi.rseq_area(), sysapi.tid_address()
        self.started.set()
        got: object = None
        try:
            if self.how == "sleep":
                while not self.stop.is_set():
                    time.sleep(0.05)
                    self.count += 1
                got = "stopped"
            elif self.how == "read":
                # read(2) itself (os.read retries an EINTR, PEP 475): a call
                # the freeze interrupted must restart, never fail
                got = sysapi.raw_read(self.rfd, 16)
            elif self.how == "regs":
                # read(2) from machine code holding known values in nine
                # registers and xmm8 across it: a thread's registers exactly
                got = sysapi.reg_probe_read(self.rfd, 16)
            elif self.how == "lock":
                self.lock.acquire()
                self.lock.release()
                got = "acquired"
            elif self.how == "cond":
                with self.lock:
                    while not self.flag:
                        self.lock.wait()
                got = "notified"
            elif self.how == "join":
                self.sleeper.join()
                got = "joined"
        except Exception as e:   # reported, then judged
            got = f"{type(e).__name__}: {e}"
        self.report = {"tid": threading.get_native_id(), "value": mine, "got": got, "count": self.count,
                       "ident": threading.get_ident(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                       "fp": _fp_now(), "rseq": sysapi.rseq_still(self.rseq), "tid_address": sysapi.tid_address()}

    def expected(self) -> str:
        return {"sleep": "stopped", "read": "wake", "lock": "acquired", "cond": "notified",
                "join": "joined", "regs": "wake"}[self.how]

    def wake(self) -> None:
        if self.how in ("read", "regs"):
            os.write(self.wfd, b"wake")
        elif self.how == "lock":
            self.lock.release()
        elif self.how == "cond":
            self.flag = True
            self.lock.notify()
            self.lock.release()
        else:
            self.stop.set()


# -- children (a process tree) -------------------------------------------------------

_CHILDREN: List["Child"] = []
_MEMORY: List["Memory"] = []


class Memory:
    """Two anonymous pages every child inherits: one MAP_SHARED (one
    object: after the restore a write on either side must be seen on the
    other) and one MAP_PRIVATE the workload filled before the forks (copy
    on write: a child's write after the restore must stay its own, and its
    copy must hold the workload's bytes). An engine that restores shared
    memory as copies, or private memory as one object, fails here."""
    SLOT = 64
    DOWN = 2048       # the workload writes for child i at DOWN + i * SLOT, child i for it at i * SLOT

    def __init__(self):
        import mmap
        self.shared = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
        self.private = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)
        self.fill = os.urandom(8).hex()
        self.private[:16] = self.fill.encode()

    @staticmethod
    def _get(m, off: int) -> str:
        return bytes(m[off:off + 16]).decode(errors="replace")

    def child_side(self, index: int, mine: str) -> dict:
        """In child `index`, woken after the restore: what it sees, then its writes."""
        seen = {"seen": self._get(self.shared, self.DOWN + index * self.SLOT), "private": self._get(self.private, 0)}
        self.shared[index * self.SLOT:index * self.SLOT + 16] = mine.encode()
        self.private[:16] = mine.encode()
        return seen

    def token(self, index: int) -> str:
        return f"w{index:03d}" + self.fill[:12]

    def before_wake(self, index: int) -> None:
        off = self.DOWN + index * self.SLOT
        self.shared[off:off + 16] = self.token(index).encode()

    def checks(self, what: str, index: int, value: str, memory: dict) -> List[dict]:
        return [
            check(None, f"{what}: sees this process's write to their MAP_SHARED page", self.token(index),
                  memory.get("seen")),
            check(None, f"{what}: its write to the MAP_SHARED page is seen here", value,
                  self._get(self.shared, index * self.SLOT)),
            check(None, f"{what}: its copy-on-write page held this process's bytes", self.fill, memory.get("private")),
            check(None, f"{what}: its write to its copy-on-write page stays its own", self.fill,
                  self._get(self.private, 0)),
        ]


def _stat(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return {"state": rest[0], "ppid": int(rest[1]), "pgid": int(rest[2]), "sid": int(rest[3])}


class Child:
    """One scenario child, forked after the fds (it inherits them: one
    open file description each, shared with the parent). It says hello on
    its report pipe (its pid, group, and a random value it keeps only in its
    memory), then: `sleep` ticks in a select() on its wake pipe, `read`
    blocks in read() on it, `zombie` exits at once and is not reaped. Woken
    after the restore, it reports again (pid, parent, the value, its ticks)
    and exits with `exit`; the parent's waitpid() must see that status."""

    def __init__(self, index: int, spec: dict):
        self.index, self.how = index, spec["blocked_in"]
        self.code = int(spec.get("exit", 10 + index))
        self.own_group = spec.get("group") == "own"
        self.share = list(spec.get("share") or [])
        wake_r, self.wake_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        flags = sum(CHILD_SHARE[w][0] for w in self.share)
        pid = sysapi.clone_process(flags) if flags else os.fork()
        # A shared fd table is one table: a close on either side closes for both.
        mine = "files" not in self.share
        if pid == 0:
            code = 99
            try:
                if mine:
                    os.close(self.wake_w)
                    os.close(self.rep_r)
                code = self._child(wake_r, rep_w)
            finally:
                os._exit(code)
        if mine:
            os.close(wake_r)
            os.close(rep_w)
        self.pid = pid
        self.hello: Dict[str, object] = {}

    def _child(self, wake: int, rep: int) -> int:
        import json
        import select
        if self.own_group:
            os.setpgid(0, 0)
        mine = os.urandom(8).hex()      # in this process's memory only
        os.write(rep, (json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "value": mine}) + "\n").encode())
        if self.how == "zombie":
            return self.code
        ticks = 0
        if self.how == "sleep":
            while not select.select([wake], [], [], 0.05)[0]:
                ticks += 1
        got = os.read(wake, 16).decode()
        probe = {}
        memory = _MEMORY[0].child_side(self.index, mine) if _MEMORY else {}
        if "files" in self.share:       # open in the workload too, at this number
            probe["fd"] = os.memfd_create(self.probe_name())
        if "fs" in self.share:          # the workload's umask too
            os.umask(self.probe_umask())
            probe["umask"] = self.probe_umask()
        os.write(rep, (json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "value": mine, "ticks": ticks,
                                   "got": got, "probe": probe, "memory": memory}) + "\n").encode())
        return self.code

    def probe_name(self) -> str:
        return f"crucible-share-{self.index}"

    def probe_umask(self) -> int:
        return 0o027 + self.index % 8 * 0o100

    def _line(self, seconds: float) -> dict:
        import json
        import select
        buf = b""
        deadline = time.monotonic() + seconds
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rep_r], [], [], left)[0]:
                return {"error": f"no report within {seconds} s ({buf!r})"}
            chunk = os.read(self.rep_r, 4096)
            if not chunk:
                return {"error": f"report pipe closed ({buf!r})"}
            buf += chunk
        return json.loads(buf)

    def settle(self) -> None:
        """The hello, and for a zombie its death (it stays unreaped)."""
        self.hello = self._line(THREAD_WAKE_S)
        if self.how == "zombie":
            deadline = time.monotonic() + THREAD_WAKE_S
            while _stat(self.pid)["state"] != "Z" and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            time.sleep(0.1)     # in its call


def _child_checks(p: dict, seen: dict, phase: str) -> List[dict]:
    out = []
    recs = seen.get("children") or []
    me = os.getpid()
    left = p.get("leave") or []
    if phase == "inspect":
        for ch, r in zip(_CHILDREN, recs):
            what = f"child {ch.index} ({ch.how})"
            try:
                st = _stat(r["pid"])
            except OSError as e:
                out.append(check(None, f"{what}: exists", r["pid"], f"{e.strerror}"))
                continue
            out.append(check(None, f"{what}: its parent is this process", me, st["ppid"]))
            out.append(check(None, f"{what}: process group", r["pgid"], st["pgid"]))
            out.append(check(None, f"{what}: session", os.getsid(0), st["sid"]))
            out.append(check(None, f"{what}: a zombie" if ch.how == "zombie" else f"{what}: alive",
                             ch.how == "zombie", st["state"] == "Z"))
            if ch.how != "zombie":
                for name, (_, kind) in CHILD_SHARE.items():
                    try:
                        same = sysapi.kcmp(me, r["pid"], kind) == 0
                    except OSError as e:
                        same = f"kcmp: {e.strerror}"
                    out.append(check(None, f"{what}: shares this process's {name} (kcmp)",
                                     name in ch.share and name not in left, same))
        # what the workload left: one table or fs between the children sharing it
        for name in left:
            holders = [(ch, r) for ch, r in zip(_CHILDREN, recs) if name in ch.share]
            for (a, ra), (b, rb) in zip(holders, holders[1:]):
                try:
                    same = sysapi.kcmp(ra["pid"], rb["pid"], CHILD_SHARE[name][1]) == 0
                except OSError as e:
                    same = f"kcmp: {e.strerror}"
                out.append(check(None, f"children {a.index} and {b.index}: share one {name} (kcmp)", True, same))
    elif phase == "mutate":
        umask = os.umask(0)
        os.umask(umask)
        for ch in _CHILDREN:
            if ch.how != "zombie" and _MEMORY:
                _MEMORY[0].before_wake(ch.index)
        for ch in _CHILDREN:
            if ch.how != "zombie" and "fs" not in ch.share:
                os.write(ch.wake_w, b"wake")
        for ch, r in zip(_CHILDREN, recs):
            what = f"child {ch.index} ({ch.how})"
            if ch.how != "zombie":
                if "fs" in ch.share:     # one at a time: their umasks are one
                    os.write(ch.wake_w, b"wake")
                rep = ch._line(THREAD_WAKE_S)
                out.append(check(None, f"{what}: getpid() is the recorded pid", r["pid"], rep.get("pid")))
                out.append(check(None, f"{what}: getppid() is this process", me, rep.get("ppid")))
                out.append(check(None, f"{what}: the value in its memory", r["value"], rep.get("value")))
                out.append(check(None, f"{what}: its call returned", "wake", rep.get("got")))
                if ch.how == "sleep":
                    out.append(check(None, f"{what}: it ticked", True, int(rep.get("ticks") or 0) > 0))
                out += _probe_checks(ch, what, rep.get("probe") or {}, umask, left)
                if _MEMORY:
                    out += _MEMORY[0].checks(what, ch.index, r["value"], rep.get("memory") or {})
            try:
                _, status = os.waitpid(r["pid"], 0)
                got = os.WEXITSTATUS(status) if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}"
            except ChildProcessError as e:
                got = f"waitpid: {e.strerror}"
            out.append(check(None, f"{what}: waitpid() status", ch.code, got))
    return out


def _probe_checks(ch: "Child", what: str, probe: dict, umask: int, left: List[str]) -> List[dict]:
    """What a child sharing this process's fd table or fs did, seen here;
    then undone (the memfd closed, the umask put back). What this process
    left must not be seen here."""
    out = []
    if "files" in ch.share and "files" in left:
        fd = probe.get("fd")
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except (OSError, TypeError):
            link = None
        out.append(check(None, f"{what}: the memfd it opened is not open here", True,
                         link != f"/memfd:{ch.probe_name()} (deleted)"))
    elif "files" in ch.share:
        fd = probe.get("fd")
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            os.close(fd)
        except (OSError, TypeError) as e:
            link = f"fd {fd}: {getattr(e, 'strerror', e)}"
        out.append(check(None, f"{what}: the memfd it opened is open here", f"/memfd:{ch.probe_name()} (deleted)",
                         link))
    if "fs" in ch.share:
        now = os.umask(umask)
        want = umask if "fs" in left else ch.probe_umask()
        out.append(check(None, f"{what}: the umask it set is " + ("not " if "fs" in left else "") +
                         "this process's", f"{want:04o}", f"{now:04o}"))
    return out


def _thread_checks(p: dict, seen: dict, phase: str) -> List[dict]:
    out = []
    recs = seen.get("threads") or []
    if phase == "inspect":
        try:
            now = sorted(int(t) for t in os.listdir("/proc/self/task"))
        except OSError:
            now = []
        out.append(check(None, "threads: every recorded TID is a thread of this process",
                         sorted(r["tid"] for r in recs), sorted(r["tid"] for r in recs if r["tid"] in now)))
        for b, r in zip(_THREADS, recs):
            out.append(check(None, f"thread {b.index} ({b.how}): still blocked", True, b.thread.is_alive()))
            if b.how == "sleep":
                # it went on sleeping and counting: at least one tick after the restore
                c0 = b.count
                deadline = time.monotonic() + 2.0
                while b.count == c0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                out.append(check(None, f"thread {b.index} (sleep): counts on", True, b.count > c0 >= r["count"]))
    elif phase == "mutate":
        for b in _THREADS:
            b.wake()
        for b, r in zip(_THREADS, recs):
            b.thread.join(THREAD_WAKE_S)
            rep = b.report
            what = f"thread {b.index} ({b.how})"
            out.append(check(None, f"{what}: woke and finished", True, not b.thread.is_alive() and bool(rep)))
            out.append(check(None, f"{what}: native id (gettid) is the recorded TID", r["tid"], rep.get("tid")))
            out.append(check(None, f"{what}: the value in its own frame", r["value"], rep.get("value")))
            # its thread pointer (TLS): pthread_self is its own, not another thread's
            out.append(check(None, f"{what}: pthread_self (its thread pointer)", r.get("ident"), rep.get("ident")))
            out.append(check(None, f"{what}: its own nice value", r.get("nice"), rep.get("nice")))
            out.append(check(None, f"{what}: its rounding mode and 1/3, 1/10, -1/3 (its FPU control)", r.get("fp"),
                             rep.get("fp")))
            # clear_child_tid (PR_GET_TID_ADDRESS): what a pthread_join of it waits on
            out.append(check(None, f"{what}: its clear_child_tid address", hex(r.get("tid_address") or 0),
                             hex(rep.get("tid_address") or 0)))
            area = r.get("rseq")
            out.append(check(None, f"{what}: its rseq registration",
                             "unknown" if area is None else "registered" if area[0] else "none", rep.get("rseq")))
            out.append(check(None, f"{what}: its call returned", b.expected(), rep.get("got")))
    return out


def status() -> Dict[str, str]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _ioprio_value(name: str) -> int:
    cls, _, level = name.partition(":")
    return sysapi.IOPRIO_CLASSES[cls] << 13 | int(level or 0)


def local_unmet(sc: dict) -> str:
    """Why this host cannot set up the scenario's process ("" when it can):
    the guests' root has every capability, a host's root may not (this one
    lacks CAP_SYS_RESOURCE)."""
    a = ((sc.get("workload") or {}).get("process") or {}).get("attrs") or {}
    if a.get("io_flusher"):
        with open("/proc/self/status") as f:
            eff = int(next(l for l in f if l.startswith("CapEff:")).split()[1], 16)
        if not eff >> 24 & 1:
            return "io_flusher: PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which this host's root lacks"
    return ""


def _apply_attrs(a: dict) -> None:
    if "ioprio" in a:
        sysapi.ioprio_set(_ioprio_value(a["ioprio"]))
    if "coredump_filter" in a:
        with open("/proc/self/coredump_filter", "w") as f:
            f.write(f"{a['coredump_filter']:#x}")
    for key, option in (("thp_disable", "set_thp_disable"), ("child_subreaper", "set_child_subreaper"),
                        ("keep_caps", "set_keepcaps"), ("dumpable", "set_dumpable")):
        if key in a:
            sysapi.prctl(option, int(a[key]))
    if "mce_kill" in a:
        sysapi.prctl("mce_kill", 1, MCE_KILL[a["mce_kill"]])    # PR_MCE_KILL_SET
    if "io_flusher" in a:      # before the threads: they inherit it
        sysapi.prctl("set_io_flusher", int(a["io_flusher"]))
    if a.get("membarrier"):     # registered for private expedited barriers, as liburcu is
        if sysapi.membarrier_private_expedited(register=True):
            raise OSError("membarrier registration failed")
    if "oom_score_adj" in a:    # as systemd's OOMScoreAdjust= starts a service
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(int(a["oom_score_adj"])))
    if "groups" in a:           # as a service started with SupplementaryGroups=
        os.setgroups([int(g) for g in a["groups"]])
    if "autogroup_nice" in a:   # as a session leader reniced with renice -g would run
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(int(a["autogroup_nice"])))
    if "resgid" in a:           # as a daemon keeping an unprivileged group to switch to
        os.setresgid(*[int(g) for g in a["resgid"]])
    if "resuid" in a:           # as a daemon keeping an unprivileged user to switch to later
        os.setresuid(*[int(u) for u in a["resuid"]])
    if a.get("sched_batch"):    # as chrt -b 0 would start it
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    if a.get("seccomp_filter"):     # last: as a sandboxed service runs (systemd SystemCallFilter=)
        sysapi.seccomp_allow_all()
    if "personality" in a:      # as setarch -R would start it
        sysapi.personality(PERSONALITY[a["personality"]])
    if "timer_slack_ns" in a:
        sysapi.prctl("set_timerslack", int(a["timer_slack_ns"]))
    if a.get("no_new_privs"):   # as a sandboxed service runs (systemd NoNewPrivileges=)
        sysapi.prctl("set_no_new_privs", 1)
    if "mempolicy" in a:        # as numactl --interleave=0 etc. would start it
        sysapi.set_mempolicy(sysapi.MPOL[a["mempolicy"]], 0 if a["mempolicy"] == "local" else 1)


def _autogroup_nice() -> int:
    """"/autogroup-N nice V"; empty in the root task group (nice 0); -1
    without autogroups (no file)."""
    try:
        with open("/proc/self/autogroup") as f:
            text = f.read().split()
    except OSError:
        return -1
    return int(text[-1]) if text else 0


def _attrs_now() -> dict:
    with open("/proc/self/coredump_filter") as f:
        cdf = int(f.read().strip(), 16)
    with open("/proc/self/oom_score_adj") as f:
        oom = int(f.read())
    return {"ioprio": sysapi.ioprio_get(), "coredump_filter": cdf, "thp_disable": sysapi.prctl("get_thp_disable"),
            "child_subreaper": sysapi.child_subreaper(), "keep_caps": sysapi.prctl("get_keepcaps"),
            "mce_kill": sysapi.prctl("mce_kill_get"), "dumpable": sysapi.prctl("get_dumpable"),
            "mempolicy": "%d:%x" % sysapi.get_mempolicy(),
            "membarrier": int(sysapi.membarrier_private_expedited() == 0),
            "personality": sysapi.personality(), "timer_slack_ns": sysapi.prctl("get_timerslack"),
            "no_new_privs": sysapi.prctl("get_no_new_privs"), "oom_score_adj": oom,
            "groups": sorted(os.getgroups()), "autogroup_nice": _autogroup_nice(), "resuid": list(os.getresuid()), "resgid": list(os.getresgid()),
            "sched_batch": int(os.sched_getscheduler(0) == os.SCHED_BATCH),
            "seccomp_filter": int(status().get("Seccomp") == "2"), "io_flusher": _io_flusher()}


PF_IO_FLUSHER = 0x00080000 | 0x00100000     # PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE (include/linux/sched.h)


def _io_flusher() -> str:
    """"all", "none" or "mixed": which of the process's threads are I/O
    flushers (PR_SET_IO_FLUSHER sets both task flags; a thread's own, copied
    by clone). From /proc/self/task/*/stat (PR_GET_IO_FLUSHER would need
    CAP_SYS_RESOURCE and tells only the calling thread's)."""
    seen = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                flags = int(f.read().rsplit(")", 1)[1].split()[6])
        except FileNotFoundError:
            continue
        seen.add(flags & PF_IO_FLUSHER == PF_IO_FLUSHER)
    return "mixed" if len(seen) > 1 else "all" if True in seen else "none"


def _libm():
    import ctypes
    return ctypes.CDLL("libm.so.6")


def _fp_now() -> dict:
    """The rounding mode as libm reads it (x86_64: the x87 control word) and
    as the arithmetic uses it (a division by the SSE unit, or the FPCR):
    1/3, 1/10 and -1/3 from values the compiler cannot fold. 1/3 alone tells
    only upward from the rest (the bits past its mantissa, 0101..., round
    down to nearest too): 1/10 (1001...: nearest rounds up) tells nearest
    from downward and toward zero, -1/3 downward from toward zero."""
    one, three, ten = float(len("x")), float(len("xyz")), float(len("x" * 10))
    return {"mode": _libm().fegetround(), "third": [(one / three).hex(), (one / ten).hex(), (-one / three).hex()]}


def _attrs_wanted(a: dict) -> dict:
    conv = {"ioprio": _ioprio_value, "mce_kill": MCE_KILL.get, "personality": PERSONALITY.get,
            "groups": lambda g: sorted(int(x) for x in g),
            "resuid": lambda ids: [int(x) for x in ids], "resgid": lambda ids: [int(x) for x in ids],
            "mempolicy": lambda m: f"{sysapi.MPOL[m]}:{0 if m == 'local' else 1:x}",
            "io_flusher": lambda v: "all" if v else "none"}
    return {k: conv[k](v) if k in conv else int(v) for k, v in a.items()}


# -- the root directory, syscall user dispatch, the main thread's raw wait -----------

_ROOT_NOW: List[list] = []      # / as the process saw it right before leave_root


def enter_root(rel: str) -> list:
    """chroot(2) into `rel` (relative to the cwd, the work dir, which stays
    the cwd: outside the new root, as chroot leaves it). Returns [dev, ino]
    of / as seen from inside now. From here until leave_root only relative
    paths reach the harness's files (a path's ".." from the cwd never
    passes the new root)."""
    os.chroot(rel)
    st = os.stat("/")
    return [st.st_dev, st.st_ino]


def leave_root() -> None:
    """Before the check, which reads the harness's files by absolute path:
    note / as seen now (checker compares it), then chroot(2) back to the
    real root, reached from the cwd by "..": it lies outside the jail, so
    ".." climbs to the real / without meeting the jail's root."""
    st = os.stat("/")
    _ROOT_NOW.append([st.st_dev, st.st_ino])
    os.chroot("/".join([".."] * 64))


class RawWait:
    """The main thread's wait for the harness's wake-up as raw
    rt_sigtimedwait(2) calls (CPython's sigtimedwait retries an EINTR, so
    an interrupted call that fails instead of restarting would go unseen):
    every call that fails EINTR is counted; nothing in the scenario
    interrupts it, so after a restore the count must be 0."""

    NR = {"x86_64": 128, "aarch64": 137}
    EAGAIN, EINTR = 11, 4

    def __init__(self):
        self.eintr = 0

    def setup(self, signo: int, seconds: float) -> None:
        import ctypes
        libc = ctypes.CDLL(sysapi.LIBC, use_errno=True)
        self._call = libc.syscall
        self._call.restype = ctypes.c_long
        self._errno = ctypes.get_errno
        self._nr = ctypes.c_long(self.NR[os.uname().machine])
        self._set = ctypes.c_uint64(1 << (signo - 1))
        self._info = ctypes.create_string_buffer(128)
        self._ts = (ctypes.c_long * 2)(int(seconds), int(seconds % 1 * 1e9))
        self._args = (ctypes.byref(self._set), self._info, ctypes.byref(self._ts), ctypes.c_long(8))

    def wait(self) -> int:
        """The signal taken, or 0 (the timeout, an EINTR)."""
        got = self._call(self._nr, *self._args)
        if got > 0:
            return got
        if self._errno() == self.EINTR:
            self.eintr += 1
        return 0


RAW_WAIT = RawWait()


class SyscallDispatch:
    """Syscall user dispatch (prctl PR_SET_SYSCALL_USER_DISPATCH) on the
    main thread, its selector byte at BLOCK the whole time: a call is
    dispatched (SIGSYS, the call not made) when made from outside
    [offset, offset + len). That range is everything above one probe page
    mapped at the lowest address a process may map (vm.mmap_min_addr), so
    every call of the process is allowed but the probe's: the probe is
    getpid from that page, its argument left in the first argument
    register. Dispatched, getpid returns the call number (x86_64: the
    kernel rolls rax back to it) or its argument (aarch64: x0 rolled back);
    made, the pid. SIGSYS has a handler that counts. The check: with the
    selector at BLOCK the probe is dispatched (and SIGSYS counted once), at
    ALLOW it runs (the selector is the byte the kernel reads); then BLOCK
    again."""

    CODE = {"x86_64": bytes.fromhex("b827000000" "0f05" "c3"),          # mov eax, 39; syscall; ret
            "aarch64": bytes.fromhex("881580d2" "010000d4" "c0035fd6")}  # mov x8, 172; svc 0; ret
    GETPID_NR = {"x86_64": 39, "aarch64": 172}
    ARG = 0x5A5A
    PR_SET_SYSCALL_USER_DISPATCH, ON, ALLOW, BLOCK = 59, 1, 0, 1

    def __init__(self):
        import ctypes
        machine = os.uname().machine
        with open("/proc/sys/vm/mmap_min_addr") as f:
            low = max(int(f.read()), 4096)
        page = 4096
        # MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE, PROT_READ|WRITE, then READ|EXEC
        libc = ctypes.CDLL(sysapi.LIBC, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        addr = libc.mmap(low, page, 3, 0x22 | 0x100000, -1, 0)
        if addr != low:
            raise OSError(ctypes.get_errno(), f"the probe page at {low:#x}: {os.strerror(ctypes.get_errno())}")
        ctypes.memmove(addr, self.CODE[machine], len(self.CODE[machine]))
        if libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(page), 5) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of the probe page")
        self.page = addr
        self.probe = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(addr)
        self.selector = ctypes.c_ubyte(self.BLOCK)
        self.sigsys = [0]

        def on_sigsys(_sig, _frame):
            self.sigsys[0] += 1
        signal.signal(signal.SIGSYS, on_sigsys)
        self.offset = addr + page
        self.length = (1 << 64) - 1 - self.offset
        if libc.prctl(self.PR_SET_SYSCALL_USER_DISPATCH, ctypes.c_ulong(self.ON), ctypes.c_ulong(self.offset),
                      ctypes.c_ulong(self.length), ctypes.c_void_p(ctypes.addressof(self.selector))) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"PR_SET_SYSCALL_USER_DISPATCH: {os.strerror(e)}")
        self.dispatched = {"x86_64": self.GETPID_NR["x86_64"], "aarch64": self.ARG}[machine]

    def facts(self) -> dict:
        return {"page": self.page, "offset": self.offset, "selector": self.selector.value}

    def _probe(self, sel: int) -> list:
        """[what getpid returned, SIGSYS handled] with the selector at `sel`."""
        self.selector.value = sel
        before = self.sigsys[0]
        got = self.probe(self.ARG)
        for _ in range(3):      # the handler runs between bytecodes, soon after the call returns
            time.sleep(0)
        return [got, self.sigsys[0] - before]

    def checks(self, seen: dict) -> List[dict]:
        out = [check(None, "syscall dispatch selector byte (BLOCK)", seen["selector"], self.selector.value)]
        out.append(check(None, "getpid from outside the allowed range, selector BLOCK: dispatched "
                         "([rolled-back value, SIGSYS taken])", [self.dispatched, 1], self._probe(self.BLOCK)))
        out.append(check(None, "the same getpid, selector ALLOW: made ([pid, SIGSYS taken])",
                         [os.getpid(), 0], self._probe(self.ALLOW)))
        self.selector.value = self.BLOCK
        return out


_SUD: List["SyscallDispatch"] = []


def observe(p: dict) -> dict:
    """What the process sees of the state before the dump (``extras``)."""
    return {"sigactions": {n: sysapi.sigaction_get(signum(n)) for n in (p.get("sigactions") or {})},
            "blocked": status()["SigBlk"],
            "itimers": {n: list(signal.getitimer(ITIMERS[n])) for n in (p.get("itimers") or {})},
            "threads": [{"how": b.how, "tid": b.tid, "value": b.value, "count": b.count, "ident": b.ident,
                         "fp": b.fp, "rseq": b.rseq, "tid_address": b.tid_address,
                         "nice": b.nice if b.nice is not None else os.getpriority(os.PRIO_PROCESS, b.tid)}
                        for b in _THREADS],
            "children": [dict(c.hello, how=c.how, share=c.share) for c in _CHILDREN],
            "attrs": _attrs_now() if p.get("attrs") else {},
            "fp": _fp_now() if p.get("fp_round") else {},
            "altstack": list(sysapi.sigaltstack_get()) if p.get("altstack") else [],
            "posix_timers": [[h] + list(sysapi.timer_gettime(h)) for h in _TIMERS],
            "syscall_dispatch": _SUD[0].facts() if _SUD else None,
            "at": time.time()}


def expected_pending(p: dict) -> List[list]:
    """``[signo, value]`` in the order sigtimedwait hands them out: the
    thread's own queue before the process's (dequeue_signal), in each
    lowest number first; a standard signal once however often it was
    raised; each real-time one as often as it was queued, in queue order."""
    out = []
    for mine in (True, False):
        seen = set()
        for x in sorted((x for x in p.get("pending") or [] if bool(x.get("thread")) == mine),
                        key=lambda x: signum(x["signal"])):
            n = signum(x["signal"])
            if n < signal.SIGRTMIN:
                if n in seen:
                    continue
                seen.add(n)
            out.append([n, int(x.get("value", 0))])
    return out


def checker(p: dict, seen: dict, phase: str) -> List[dict]:
    """Verify after the restore (``seen``: :func:`observe` before the dump)."""
    out = _thread_checks(p, seen, phase) if p.get("threads") else []
    if p.get("children"):
        out += _child_checks(p, seen, phase)
    if phase == "inspect":
        st = status()
        if p.get("chroot"):
            out.append(check(None, "root directory seen from inside (stat / : device, inode) is the chroot's",
                             seen.get("root"), _ROOT_NOW[0] if _ROOT_NOW else None))
        if p.get("syscall_dispatch"):
            out += _SUD[0].checks(seen["syscall_dispatch"]) if _SUD else \
                [check(None, "syscall user dispatch set up", True, False)]
        if p.get("raw_wait"):
            out.append(check(None, "the main thread's raw waits (rt_sigtimedwait) that failed EINTR", 0,
                             RAW_WAIT.eintr))
        if "umask" in p:
            out.append(check(None, "umask", f"{int(p['umask']):04o}", st.get("Umask")))
        if p.get("altstack"):
            out.append(check(None, "alternate signal stack (sigaltstack: address, flags, size)", seen["altstack"],
                             list(sysapi.sigaltstack_get())))
        if p.get("fp_round"):
            now = _fp_now()
            want = FP_ROUND[p["fp_round"]][os.uname().machine]
            out.append(check(None, "rounding mode (fegetround) as set", hex(want), hex(now["mode"])))
            out.append(check(None, "1/3, 1/10, -1/3 rounded as before the dump (float.hex)", seen["fp"]["third"],
                             now["third"]))
        if p.get("attrs"):
            now = _attrs_now()
            want = _attrs_wanted(p["attrs"])
            for k in sorted(now):
                # every attribute as the process saw it before the dump; those
                # the scenario set, as it set them
                out.append(check(None, f"process attribute {k}", seen["attrs"][k], now[k]))
                if k in want:
                    out.append(check(None, f"process attribute {k} as set", want[k], now[k]))
        for name, (soft, hard) in (p.get("rlimits") or {}).items():
            import resource
            out.append(check(None, f"{name} (soft, hard)", [_limit(soft), _limit(hard)],
                             list(resource.getrlimit(getattr(resource, name)))))
        for name, a in (p.get("sigactions") or {}).items():
            now = sysapi.sigaction_get(signum(name))
            flags = sysapi.names_to_mask(a.get("flags", []), sysapi.SA_FLAGS)
            out.append(check(None, f"{name} action: handler address", hex(_handler(a["handler"])),
                             hex(now["handler"])))
            out.append(check(None, f"{name} action: flags", hex(seen["sigactions"][name]["flags"]), hex(now["flags"])))
            out.append(check(None, f"{name} action: flags asked for are set", hex(flags), hex(now["flags"] & flags)))
            out.append(check(None, f"{name} action: mask",
                             hex(sysapi.sigset_bits(signum(m) for m in a.get("mask", []))), hex(now["mask"])))
        if p.get("blocked"):
            out.append(check(None, "signal mask (SigBlk)", seen["blocked"], st.get("SigBlk")))
            bits = int(st.get("SigBlk", "0"), 16)
            want = [signum(n) for n in p["blocked"]]
            out.append(check(None, "the scenario's signals are blocked", sorted(want),
                             sorted(n for n in want if bits >> (n - 1) & 1)))
        if p.get("pending") is not None:
            pend = int(st.get("SigPnd", "0"), 16) | int(st.get("ShdPnd", "0"), 16)
            # SIGUSR1 is the harness's own wake-up, not the scenario's
            out.append(check(None, "pending signals (SigPnd | ShdPnd)",
                             sorted({s for s, _ in expected_pending(p)}),
                             [n for n in range(1, 65) if pend >> (n - 1) & 1 and n != signal.SIGUSR1]))
        for i, t in enumerate(p.get("posix_timers") or []):
            h, v0, i0 = seen["posix_timers"][i]
            try:
                value, interval = sysapi.timer_gettime(h)
            except OSError as e:
                out.append(check(None, f"posix timer {i}: timer_gettime on its ID {h}", "ok", e.strerror))
                continue
            out.append(check(None, f"posix timer {i}: interval (s)", i0, interval))
            elapsed = time.time() - seen["at"]
            out.append(within(None, f"posix timer {i}: value (s): V0 - elapsed - 2 s .. V0 + 50 ms",
                              v0 - elapsed - EARLY_S, v0 + LATE_S, value))
        for name, t in (p.get("itimers") or {}).items():
            value, interval = signal.getitimer(ITIMERS[name])
            v0, i0 = seen["itimers"][name]
            out.append(check(None, f"itimer {name}: interval (s)", i0, interval))
            out.append(check(None, f"itimer {name}: interval as asked (ms)", int(t.get("interval_ms", 0)),
                             round(interval * 1000)))
            elapsed = time.time() - seen["at"]
            out.append(within(None, f"itimer {name}: value (s): V0 - elapsed - 2 s .. V0 + 50 ms",
                              v0 - elapsed - EARLY_S, v0 + LATE_S, value))
    elif phase == "consume" and p.get("pending") is not None:
        sigs = [signum(n) for n in p.get("blocked", [])]
        got = []
        while len(got) < 64:
            signo, _code, value = sysapi.sigtimedwait_now(sigs)
            if not signo:
                break
            got.append([signo, value if signo >= signal.SIGRTMIN else 0])
        out.append(check(None, "pending signals taken by sigtimedwait ([signo, value], in order)",
                         expected_pending(p), got))
    return out
