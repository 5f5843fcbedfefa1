"""The workload: a process that holds the fds a scenario describes, and
afterwards checks every one of them from its own side.

Runs in the guest (stdlib only, Python >= 3.9), as a script::

    python3 workload.py spawn SPEC [--setup] [--before-dump] [--exec] [--ready-file]
                                       # start `run` detached, wait for ready, print it
    python3 workload.py run SPEC       # the workload itself (what gets dumped)
    python3 workload.py signal PID VERDICT SECONDS [--snap PROOF] [--phases P,..]
                                       # (snapshot from outside,) SIGUSR1, wait for the verdict
    python3 workload.py snap PID PROOF # everything /proc shows of PID, and its proof (JSON)
    python3 workload.py pidstate PID [--gone-within SECONDS [--unlink PATH]]
                                       # does PID run, and what is it (after
                                       # waiting up to SECONDS for it to exit;
                                       # PATH removed first, if there)
    python3 workload.py kill PID...    # SIGKILL workloads (and only workloads)

``run`` opens every fd at the number the scenario gives, writes a *ready*
file (what it observed of itself: flags, offsets, wds, ports... and its
proof of continuation, see :class:`Proof`) and sleeps in ``sigtimedwait``,
waking every tick to advance its counter. On SIGUSR1 — in the restored
process, or in the original after a refused or --leave-running dump — it
re-reads the spec and the ready file *from disk* (not from its memory, which
the engine restored; the harness puts its own copy of the ready file back
first), derives what each fd must show from the seeded model of the
scenario, runs the check phases the request names, and writes a JSON
verdict ``{ok, checks: [...], proof}``.
"""

from __future__ import annotations

# The exec'd workload (``run``, through workload_run.py) imports only what
# ``run`` needs: under TCG every module costs about ten times its host
# import time, and the workload starts once per scenario. What only the
# harness's helpers or a failure need is imported where it is used
# (:func:`_sibling`, traceback, hashlib); the agent imports those once for
# its forks (:data:`PRELOAD`). tests/test_harness_kinds.py holds the list
# of modules the run path must not import.
import ctypes
import errno
import fcntl
import gc
import os
import stat
import struct
import sys
import time
# the C module the signal package wraps: the same calls and numbers, without
# signal's enums (enum, functools and collections imported at every start)
import _signal as signal

TYPE_CHECKING = False   # annotations only: typing is ~2 ms of imports
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

try:
    from . import jsonio, kinds, seeded, sysapi, world
except ImportError:  # pragma: no cover - in the guest, run as a script
    import jsonio  # type: ignore[no-redef]
    import kinds  # type: ignore[no-redef]
    import seeded  # type: ignore[no-redef]
    import sysapi  # type: ignore[no-redef]
    import world  # type: ignore[no-redef]

#: the exec'd workload's script (next to this file): it imports this module
RUN_SCRIPT = "workload_run.py"
#: the harness modules (and stdlib ones) only the helper subcommands or a
#: failure use: harness/agent.py imports them before it forks its scripts
PRELOAD = ("procstate", "memstate", "warmfork", "json")


def _sibling(name: str):
    """The harness module ``name`` (``harness.NAME`` on the host, the
    top-level ``NAME`` in the guest's flat layout), imported on first use."""
    full = f"{__package__}.{name}" if __package__ else name
    __import__(full)
    return sys.modules[full]


def _sha256(data: bytes):
    """hashlib.sha256 without hashlib, whose import loads OpenSSL's
    libcrypto (a large library to map and relocate at every workload start):
    CPython's own sha256 module, hashlib's fallback too (_sha256 up to 3.11,
    _sha2 since 3.12)."""
    try:
        from _sha256 import sha256
    except ImportError:
        try:
            from _sha2 import sha256
        except ImportError:
            from hashlib import sha256
    return sha256(data)

TMP_FD_BASE = 500       # fds are built above this, then moved to their numbers (< 500)
MARK = world.MARK
PROT = {"r": 1, "rw": 3}          # PROT_READ, PROT_READ|PROT_WRITE
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
PHASES = ("inspect", "consume", "mutate")     # of a check (fdkinds)
WITNESS = "witness"       # in the control dir: the counter, mapped shared (Proof)
REQUEST = "request.json"  # in the control dir: which phases the next check runs
#: set by harness/agent.py in the fork that calls this module's main: spawn
#: may then start the workload warm (harness/warmfork.py)
AGENT_FORK = False
#: how this workload started: "exec" (a new python3) or "warm" (a fork of the
#: agent, harness/warmfork.py); in the ready file
START = "exec"


def write_json(path: str, obj: Any) -> None:
    """Atomic: a reader sees the whole file or none (rename(2))."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        jsonio.dump_indented(obj, f)       # json.dump(obj, f, indent=1, default=str)
    os.rename(tmp, path)


def own_fds() -> List[int]:
    """This process's open fds, without the one listdir used to read them."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
            out.append(int(name))
        except OSError:
            pass
    return sorted(out)


def observe(fd: int) -> Dict[str, Any]:
    """What a process can see of one of its fds without touching its data."""
    st = os.fstat(fd)
    try:
        pos = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        pos = None       # ESPIPE: pipes, sockets, most anon inodes
    return {"fmt": stat.S_IFMT(st.st_mode), "flags": fcntl.fcntl(fd, fcntl.F_GETFL),
            "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
            "pos": pos, "link": os.readlink(f"/proc/self/fd/{fd}"), "owner": _owner(fd)}


F_SETSIG, F_GETSIG, F_GETOWN_EX = 10, 11, 16       # fcntl(2)


def _owner(fd: int) -> Any:
    """[owner type, owner, signal] (F_GETOWN_EX, F_GETSIG): where SIGIO,
    SIGURG and lease breaks go; None where the fd can have none (O_PATH)."""
    try:
        typ, pid = struct.unpack("ii", fcntl.fcntl(fd, F_GETOWN_EX, bytes(8)))
        return [typ, pid, fcntl.fcntl(fd, F_GETSIG)]
    except OSError:
        return None


def setup_model(spec: dict, phases=("setup",)) -> world.Model:
    model = world.Model()
    for phase in phases:
        for step in spec.get(phase) or []:
            model.apply(step)
    return model


# -- run -------------------------------------------------------------------------

def open_all(spec: dict, ctx: kinds.Ctx) -> List[dict]:
    """Open every fd entry and move it to its number, in each kind's
    OPEN_ORDER (an epoll registration is keyed by the target's fd number, a
    dup needs its original at its number)."""
    entries = ctx.entries
    order = sorted(range(len(entries)), key=lambda i: kinds.open_order(entries[i]))
    recs = []
    for idx in order:
        e = entries[idx]
        kind = kinds.module_of(e)
        made = kind.opener(e, ctx)
        # lift them all first: a temporary fd may sit on another one's number
        for o in made:
            high = fcntl.fcntl(o.tmp, fcntl.F_DUPFD, TMP_FD_BASE)
            os.close(o.tmp)
            o.tmp = high
        for o in made:
            high = o.tmp
            # dup2 with inheritable=False is dup3(O_CLOEXEC): the scenario decides
            os.dup2(high, o.target, inheritable=not e.get("cloexec", False))
            os.close(high)
            if hasattr(kind, "finish"):
                kind.finish(e, o.target)
            if "owner_signal" in e:       # owned, as a program setting up SIGIO/SIGURG does
                fcntl.fcntl(o.target, fcntl.F_SETOWN, os.getpid())
                fcntl.fcntl(o.target, F_SETSIG, int(e["owner_signal"]))
            if e.get("held_outside"):
                # the same open file, in a process outside the tree: a boundary the engine must see
                outside = __import__(kinds.__name__ + ".outside", fromlist=["spawn"])
                ctx.helpers.append(outside.spawn(lambda ready: ready(), keep=o.target))
            recs.append({"fd": o.target, "kind": kind.KIND, "entry": idx, "role": o.role,
                         "extra": o.extra})
    return recs


def map_all(spec: dict, model: world.Model, helpers: Optional[List[int]] = None) -> List[dict]:
    helpers = [] if helpers is None else helpers
    out = []
    for m in spec.get("mmaps") or []:
        length = int(m["length"])
        if "anon" in m:
            if m.get("apart"):
                # two halves alike in all /proc shows, two mappings all the same
                addr, _ = sysapi.mmap_apart(length)
                if sysapi.mremap_errno(addr, length, length + os.sysconf("SC_PAGE_SIZE")) != errno.EFAULT:
                    raise RuntimeError(f"the kernel merged the two halves at {addr:#x}: no pair kept apart here")
            else:
                addr = sysapi.mmap(length, PROT["rw"], (MAP_SHARED if m.get("shared") else MAP_PRIVATE) | MAP_ANONYMOUS,
                                   -1, 0)
            sysapi.poke(addr, seeded.data(int(m.get("seed", 0)), 0, length))
            if m.get("outside"):
                # the same object in a process outside the dump (fork shares it), holding no fd
                outside = __import__(kinds.__name__ + ".outside", fromlist=["spawn"])
                helpers.append(outside.spawn(lambda ready: ready(), keep=-1))
            for a in m.get("advise") or []:
                sysapi.madvise(addr, length, sysapi.MADVISE[a])
            rec = {"addr": addr, "length": length}
            if m.get("split"):
                # the middle third read-only: one object, three mappings (offsets 0, N, 2N)
                third = length // 3 // 65536 * 65536
                sysapi.mprotect(addr + third, third, PROT["r"])
                rec["split"] = third
            if m.get("twice"):
                rec["twice"] = sysapi.mremap_twice(addr, length)
            out.append(rec)
            continue
        if m.get("sysv"):
            shmid, addr = sysapi.shm_attach(length)
            sysapi.poke(addr, seeded.data(int(m.get("seed", 0)), 0, length))
            sysapi.shm_remove(shmid)       # it lives while attached: nothing outlives the workload
            out.append({"addr": addr, "length": length, "shmid": shmid})
            continue
        shared = bool(m.get("shared"))
        prot = PROT[m.get("prot", "r")]
        flags = os.O_RDWR if shared and prot == 3 else os.O_RDONLY
        fd = os.open(m["file"], flags)
        try:
            addr = sysapi.mmap(length, prot, MAP_SHARED if shared else MAP_PRIVATE, fd, int(m.get("offset", 0)))
        finally:
            os.close(fd)     # the mapping keeps the file; no fd the scenario did not ask for
        if m.get("dirty"):
            d = m["dirty"]
            sysapi.poke(addr + int(d.get("offset", 0)), seeded.data(int(d.get("seed", 0)), 0, int(d["bytes"])))
        for a in m.get("advise") or []:
            sysapi.madvise(addr, length, sysapi.MADVISE[a])
        out.append({"addr": addr, "length": length, "ino": model.lookup(m["file"])})
    return out


def record_extras(recs: List[dict]) -> None:
    """Facts a kind needs later that only the kernel knows now (wd numbers,
    ports, readiness): observed by the process itself, saved in the ready file."""
    for r in recs:
        extras = getattr(kinds.KINDS[r["kind"]], "extras", None)
        if extras:
            extras(r)


class Proof:
    """Proof of continuation: a secret that exists only in this process's
    memory (its hash goes in the ready file) and a counter that advances
    every tick while the process runs.

    Each tick also stores the counter in a *witness*: a file in the control
    dir mapped shared, so the value at the instant of the freeze outlives the
    process without an fd or a syscall. After a restore the counter must
    continue from the witness; a fresh start (new secret) or an image older
    than the dump (smaller counter) cannot pass. The harness reads both
    straight out of memory (procstate.proof); the workload also presents
    them in its verdict.
    """

    #: seconds. The harness's snapshot of the process must fall between two
    #: ticks (procstate.quiet_snapshot), and a whole snapshot takes 30-90 ms
    #: in a TCG guest (more with many fds or a loaded host): at 0.05 s most
    #: first tries straddled a tick and the snapshot was taken up to three
    #: times over, before the dump and again after the restore. Any tick
    #: proves continuation: the image older than the dump that the
    #: older-image mutant restores is still ticks behind the witness.
    TICK = 0.25
    #: seconds: a quiet workload's ticks before its quiet sleep. The
    #: snapshot waits for that sleep (harness/memstate.py), never falls
    #: between these ticks: at TICK they cost every quiet scenario 0.5 s
    #: before the dump
    QUIET_TICK = 0.01

    def __init__(self, ctldir: str, witness: bool, quiet: int = 0):
        self.secret = ctypes.create_string_buffer(os.urandom(32), 32)
        self.counter = ctypes.c_uint64(0)
        self.witness = 0
        #: ticks before the quiet sleep (0: never quiet); see quiet_facts
        self.quiet = quiet
        if not witness:
            # --leave-running: the original goes on ticking after the dump, so a
            # witness file would no longer match the image's copy of it
            return
        path = os.path.join(ctldir, WITNESS)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 4096)
            self.witness = sysapi.mmap(4096, PROT["rw"], MAP_SHARED, fd, 0)
        finally:
            os.close(fd)     # the mapping keeps the file; no extra fd in the dumped table
        self.witness_word = ctypes.c_uint64.from_address(self.witness)

    def tick(self) -> None:
        self.counter.value += 1
        if self.witness:
            self.witness_word.value = self.counter.value

    def public(self) -> dict:
        out = {"secret_sha256": _sha256(self.secret.raw).hexdigest(),
               "secret_addr": ctypes.addressof(self.secret), "secret_len": 32,
               "counter_addr": ctypes.addressof(self.counter), "witness": WITNESS if self.witness else None}
        if self.quiet:
            out["quiet"] = dict(quiet_facts(), after=self.quiet)
        return out

    def present(self) -> dict:
        return {"secret": self.secret.raw.hex(), "counter": self.counter.value}


BRK_NR = {"x86_64": 12, "aarch64": 214}


def quiet_facts() -> dict:
    """Where this thread's errno and rseq area are: the bytes of a quiet
    workload that change without it running (harness/memstate.py). The
    rseq area is found by asking the kernel (sysapi.rseq_area)."""
    libc = ctypes.CDLL(sysapi.LIBC, use_errno=True)
    libc.__errno_location.restype = ctypes.c_void_p
    out = {"errno": libc.__errno_location(), "rseq": None, "rseq_len": 0}
    area = sysapi.rseq_area()
    if area is None:
        # registered, but not where this looks: memstate then leaves the memory
        # unjudged (on both sides alike) rather than judge bytes the kernel writes
        out["rseq_unknown"] = True
    elif area[0]:
        out.update(rseq=area[0], rseq_len=area[1])
    return out


def run(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = jsonio.load(f)
    # SIGUSR1 stays blocked and is taken by sigtimedwait: no lost wake-up, and
    # the process sleeps in one plain syscall while it is dumped.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    sigio = [0]

    def on_sigio(_sig, _frame):  # dnotify delivers SIGIO, whose default action kills
        sigio[0] += 1
    signal.signal(signal.SIGIO, on_sigio)
    helpers: List[int] = []     # outside peers, reported even when opening fails (so they get killed)
    try:
        proof = Proof(spec["ctldir"], spec.get("witness", True), int(spec.get("quiet") or 0))
        os.chdir(spec["workdir"])
        ctx = kinds.Ctx(spec["workdir"], setup_model(spec), entries=spec.get("fds") or [], sigio=sigio,
                        helpers=helpers)
        recs = open_all(spec, ctx)
        for r in recs:
            r["obs"] = observe(r["fd"])
        record_extras(recs)
        maps = map_all(spec, ctx.model, ctx.helpers)
        proc = spec.get("process") or {}
        kinds.PROCESS.apply(proc)      # after the fds: a low RLIMIT_NOFILE must not stop them
        ready = {"pid": os.getpid(), "recs": recs, "fds": own_fds(), "mmaps": maps,
                 "helpers": ctx.helpers, "cwd": os.getcwd(), "process": kinds.PROCESS.observe(proc),
                 "proof": proof.public(), "start": START, "rseq": sysapi.rseq_area()}
        ready_path = spec["ready"]
        if proc.get("chroot"):
            # the last thing before the ready file (the harness's snapshot of
            # /proc follows it), which is then reached from the cwd
            ready_path = os.path.relpath(ready_path)
            ready["process"]["root"] = kinds.PROCESS.enter_root(proc["chroot"])
        if proc.get("raw_wait"):
            kinds.PROCESS.RAW_WAIT.setup(signal.SIGUSR1, Proof.TICK)
    except Exception:
        import traceback
        write_json(spec["ready"], {"pid": os.getpid(), "helpers": helpers, "error": traceback.format_exc()})
        return 1
    # The harness snapshots /proc as soon as the ready file is there, while
    # this loop runs: keep it from changing the memory map (no collector
    # runs, no arena comes or goes) from before the ready file on.
    gc.collect()
    gc.disable()
    write_json(ready_path, ready)
    wait_for = {signal.SIGUSR1}
    raw = kinds.PROCESS.RAW_WAIT if proc.get("raw_wait") else None
    # a quiet workload's program break right before and right after its
    # quiet sleep: nothing in between moves it (the kernel keeps it; /proc
    # shows it only page-rounded, as the [heap] mapping's end)
    brk = [0, 0]
    if proof.quiet:
        # brk(2) itself: libc's sbrk(0) answers from its own copy in memory
        call = ctypes.CDLL(None).syscall
        call.restype = ctypes.c_void_p
        nr = ctypes.c_long(BRK_NR[os.uname().machine])
        zero = ctypes.c_void_p(0)

        def sbrk(_: int) -> int:
            return call(nr, zero)
    while True:
        if proof.quiet and proof.counter.value >= proof.quiet:
            # quiet from here on: one sleep with no timeout, nothing else
            # runs until the harness's SIGUSR1 (harness/memstate.py)
            brk[0] = sbrk(0)
            got = signal.sigwaitinfo(wait_for)
            brk[1] = sbrk(0)
        elif raw is not None:
            if raw.wait() == signal.SIGUSR1:
                break
            proof.tick()
            continue
        else:
            got = signal.sigtimedwait(wait_for, Proof.QUIET_TICK if proof.quiet else Proof.TICK)
        # CPython returns an empty siginfo (signo 0), not None, when the wait
        # was interrupted (EINTR: a ptrace freeze) after its deadline passed
        if got is not None and got.si_signo == signal.SIGUSR1:
            break
        proof.tick()
    if proc.get("chroot"):
        kinds.PROCESS.leave_root()      # the check reads the harness's files by absolute path
    gc.enable()
    try:
        with open(os.path.join(spec["ctldir"], REQUEST)) as f:
            phases = tuple(jsonio.load(f).get("phases") or PHASES)
    except (OSError, ValueError):
        phases = PHASES
    try:
        verdict = verify(spec_path, sigio, phases)
        if proof.quiet:
            verdict["checks"].append(kinds.check(None, "program break (brk(0)) across the quiet sleep",
                                                 hex(brk[0] or 0), hex(brk[1] or 0)))
            verdict["ok"] = verdict["ok"] and brk[0] == brk[1]
    except Exception:
        import traceback
        verdict = {"ok": False, "error": traceback.format_exc(), "checks": []}
    verdict["proof"] = proof.present()
    verdict["phases"] = list(phases)
    write_json(spec["verdict"], verdict)
    return 0


# -- verify -------------------------------------------------------------------------

def common_checks(rec: dict) -> List[dict]:
    fd, obs = rec["fd"], rec["obs"]
    now = observe(fd)
    # the offset exactly, O_APPEND or not: O_APPEND moves it to the end at
    # each write, but until then it stays where the process left it
    out = [kinds.check(fd, "kind (S_IFMT)", obs["fmt"], now["fmt"]),
           kinds.check(fd, "flags (F_GETFL)", oct(obs["flags"]), oct(now["flags"])),
           kinds.check(fd, "close-on-exec", obs["cloexec"], now["cloexec"]),
           kinds.check(fd, "offset", obs["pos"], now["pos"]),
           kinds.check(fd, "owner and signal (F_GETOWN_EX, F_GETSIG)", obs.get("owner"), now["owner"])]
    link = obs["link"]
    if link.startswith("anon_inode:"):
        # the whole type (anon_inode:[eventfd] is not anon_inode:[timerfd]);
        # anon inodes carry no inode number in the name
        out.append(kinds.check(fd, "object type", link, now["link"]))
    elif link.startswith(("pipe:", "socket:")):
        # pipe:[INODE] / socket:[INODE]: inode numbers are new after a restore
        out.append(kinds.check(fd, "object type", link.split("[")[0], now["link"].split("[")[0]))
    return out


def mmap_checks(spec: dict, ready: dict, model: world.Model) -> List[dict]:
    out = []
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else "", parts[4], int(parts[2], 16)))
    for m, rec in zip(spec.get("mmaps") or [], ready["mmaps"]):
        addr, length = rec["addr"], rec["length"]
        what = f"mmap {m.get('file', 'anon')} at {addr:#x}"
        if m.get("apart"):
            # each half one mapping, the seam between them still there: an
            # mremap across it fails EFAULT (ENOMEM: one mapping, which the
            # inaccessible page after it keeps from growing)
            half = length // 2
            halves = [next((x for x in maps if x[0] == a and x[1] == a + half), None) for a in (addr, addr + half)]
            out.append(kinds.check(None, what + ": two mappings, one per half",
                                   [f"{a:x}-{a + half:x}" for a in (addr, addr + half)],
                                   [f"{h[0]:x}-{h[1]:x}" if h else "none" for h in halves]))
            err = sysapi.mremap_errno(addr, length, length + os.sysconf("SC_PAGE_SIZE"))
            out.append(kinds.check(None, what + ": an mremap across the seam of the halves fails",
                                   "EFAULT", errno.errorcode.get(err, str(err))))
            length = half           # the rest is checked on the first half, then the bytes of both
        if rec.get("split") or rec.get("twice"):
            out.extend(_check_parts(what, m, rec, maps))
            continue
        hit = next((x for x in maps if x[0] <= addr and addr + length <= x[1]), None)
        if hit is None:
            out.append(kinds.check(None, what + ": mapped", True, False))
            continue
        if m.get("sysv"):
            # the same segment: its id (the mapping's inode number), removed, attached once, its bytes
            what = f"sysv segment {rec['shmid']} at {addr:#x}"
            out.append(kinds.check(None, what + ": permissions", "rws", hit[2][:2] + hit[2][3]))
            out.append(kinds.check(None, what + ": id", str(rec["shmid"]), hit[4]))
            st = sysapi.shm_stat(rec["shmid"])
            out.append(kinds.check(None, what + ": IPC_STAT", {"key": 0, "mode": sysapi.SHM_DEST | 0o600,
                                                               "size": length, "nattch": 1}, st))
            out.append(kinds.bytes_check(None, what + ": contents", bytes(seeded.data(int(m.get("seed", 0)), 0, length)),
                                         sysapi.peek(addr, length)))
            continue
        perms = ("rw" if m.get("prot", "r") == "rw" or "anon" in m else "r-") + ("s" if m.get("shared") else "p")
        out.append(kinds.check(None, what + ": permissions", perms, hit[2][:2] + hit[2][3]))
        if "anon" in m:
            length = rec["length"]
            expected = seeded.data(int(m.get("seed", 0)), 0, length)
        else:
            expected = bytearray(model.content(rec["ino"]).read(int(m.get("offset", 0)), length))
            if m.get("dirty"):
                d = m["dirty"]
                o = int(d.get("offset", 0))
                expected[o:o + int(d["bytes"])] = seeded.data(int(d.get("seed", 0)), 0, int(d["bytes"]))
            out.append(kinds.check(None, what + ": file deleted", model.nlink(rec["ino"]) == 0,
                                     hit[3].endswith(" (deleted)")))
        out.append(kinds.bytes_check(None, what + ": contents", bytes(expected), sysapi.peek(addr, length)))
    return out


def _check_parts(what: str, m: dict, rec: dict, maps: list) -> List[dict]:
    """Shared anonymous memory in parts, one object: each part where it was
    with its protection and offset, the same inode under every part, its
    bytes; a write through one mapping of a page read through the other."""
    addr, length = rec["addr"], rec["length"]
    want = []       # (start, end, perms, offset)
    if rec.get("split"):
        n = rec["split"]
        want += [(addr, addr + n, "rw-s", 0), (addr + n, addr + 2 * n, "r--s", n),
                 (addr + 2 * n, addr + length, "rw-s", 2 * n)]
    else:
        want.append((addr, addr + length, "rw-s", 0))
    if rec.get("twice"):
        want.append((rec["twice"], rec["twice"] + length, "rw-s", 0))
    by_start = {x[0]: x for x in maps}
    got = [by_start.get(a) for a, _, _, _ in want]
    out = [kinds.check(None, what + ": its parts (start, end, perms, offset)",
                       [f"{a:x}-{b:x} {p} {o:x}" for a, b, p, o in want],
                       [f"{x[0]:x}-{x[1]:x} {x[2]} {x[5]:x}" if x else "none" for x in got])]
    inodes = {x[4] for x in got if x}
    out.append(kinds.check(None, what + ": one object under every part", 1, len(inodes)))
    expected = bytes(seeded.data(int(m.get("seed", 0)), 0, length))
    out.append(kinds.bytes_check(None, what + ": contents", expected, sysapi.peek(addr, length)))
    if rec.get("twice"):
        dup = rec["twice"]
        out.append(kinds.bytes_check(None, what + ": contents of its second mapping", expected,
                                     sysapi.peek(dup, length)))
        old = sysapi.peek(addr, 8)
        sysapi.poke(addr, b"\xa5" * 8)
        seen = sysapi.peek(dup, 8)
        sysapi.poke(addr, old)
        out.append(kinds.check(None, what + ": a write through the first mapping is read through the second",
                               (b"\xa5" * 8).hex(), seen.hex()))
    return out


def verify(spec_path: str, sigio: List[int], phases: Tuple[str, ...] = ()) -> dict:
    """Check every fd against the scenario and the ready file; never raises
    for a failed check (it becomes ``ok: false`` with what differed)."""
    with open(spec_path) as f:
        spec = jsonio.load(f)
    with open(spec["ready"]) as f:
        ready = jsonio.load(f)
    model = setup_model(spec, ("setup", "before_dump"))
    entries = spec.get("fds") or []
    ctx = kinds.Ctx(spec["workdir"], model, entries=entries, recs=ready["recs"],
                    helpers=ready["helpers"], sigio=sigio)
    checks = [kinds.check(None, "pid", ready["pid"], os.getpid()),
              kinds.check(None, "cwd", ready["cwd"], os.getcwd()),
              kinds.check(None, "open fds", ready["fds"], own_fds())]
    if "rseq" in ready:     # the main thread's rseq area still registered (no /proc file shows it)
        area = ready["rseq"]
        checks.append(kinds.check(None, "rseq registration of the main thread",
                                  "unknown" if area is None else "registered" if area[0] else "none",
                                  sysapi.rseq_still(area)))
    broken = set()
    for rec in ready["recs"]:
        try:
            checks += common_checks(rec)
        except OSError as e:
            checks.append(kinds.check(rec["fd"], "fd exists", True, f"{e.strerror} (errno {e.errno})"))
            broken.add(rec["entry"])
    order = sorted(range(len(entries)), key=lambda i: kinds.check_order(entries[i]))
    proc = spec.get("process") or {}
    for phase in phases or PHASES:
        try:
            checks += kinds.PROCESS.checker(proc, ready.get("process") or {}, phase)
        except Exception as exc:
            checks.append({"fd": None, "what": f"{phase} process", "expected": "no error",
                           "got": f"{type(exc).__name__}: {exc}", "ok": False})
        for idx in order:
            if idx in broken:
                continue
            e = entries[idx]
            recs = [r for r in ready["recs"] if r["entry"] == idx]
            try:
                checks += kinds.module_of(e).checker(e, recs, ctx, phase)
            except Exception as exc:  # a check that blows up is a failed check, with why
                checks.append({"fd": recs[0]["fd"] if recs else None, "what": f"{phase} {kinds.kind_of(e)}",
                               "expected": "no error", "got": f"{type(exc).__name__}: {exc}", "ok": False})
    try:
        checks += mmap_checks(spec, ready, model)
    except Exception as exc:
        checks.append({"fd": None, "what": "mmaps", "expected": "no error", "got": repr(exc), "ok": False})
    return {"ok": all(c["ok"] for c in checks), "pid": os.getpid(), "checks": checks}


# -- the harness's helpers ------------------------------------------------------

class Waiter:
    """Sleep until something may have changed: a file landed in ``directory``
    (inotify: write_json's rename, a create) or ``pid`` exited (a pidfd),
    or at most the given seconds. The helpers below looked every 20 ms
    instead, and under TCG each look (a stat, /proc/PID/stat) took CPU from
    the one vCPU the process being waited for runs on. Every wake-up only
    means "look again": the callers' checks are as before, so a missed
    event costs a timeout, never a wrong answer."""

    def __init__(self, directory: Optional[str], pid: Optional[int] = None):
        self.fds: List[int] = []
        self.pidfd: Optional[int] = None
        if directory is not None:
            try:
                fd = sysapi.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
                self.fds.append(fd)
                f = sysapi.IN_FLAGS
                sysapi.inotify_add_watch(fd, directory, f["IN_MOVED_TO"] | f["IN_CREATE"] | f["IN_CLOSE_WRITE"])
            except OSError:
                self.close()        # no events: the timeouts alone, as polling
        if pid is not None and hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
                self.fds.append(self.pidfd)
            except OSError:
                pass            # gone already, or no pidfds: the callers look anyway

    def wait(self, seconds: float) -> None:
        import select
        if seconds <= 0:
            return
        if not self.fds:
            time.sleep(min(seconds, 0.02))
            return
        ready, _, _ = select.select(self.fds, [], [], seconds)
        for fd in ready:
            if fd == self.pidfd:
                # it exited: readable for good, so stop watching it (the
                # callers see the exit themselves)
                self.fds.remove(fd)
                os.close(fd)
                self.pidfd = None
            else:
                try:
                    while os.read(fd, 65536):
                        pass
                except BlockingIOError:
                    pass

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds, self.pidfd = [], None


#: the longest a waiter sleeps without an event (a missed one costs this)
WAIT_MAX = 0.25


def spawn(spec_path: str, phases: List[str] = ()) -> int:
    """Start ``run`` in a new session with stdio on /dev/null and no other fds,
    wait for its ready file, print it (JSON) and return; the workload lives on
    (re-parented to init, or to the harness when it is a subreaper).

    ``phases`` may hold ``setup`` (world steps before the start) and
    ``before_dump`` (after ready): one command instead of three, which
    matters under TCG where every python3 start costs about a second; and
    ``exec``: never start it warm; ``ready_file``: the ready line also
    holds the ready file's bytes as read (``ready_file``, latin-1: the
    harness keeps that copy without another request to the guest for it);
    ``snap``: it also holds the harness's snapshot of the workload from
    outside (``snap``: procstate.quiet_snapshot, as ``workload.py snap``
    takes it), after the before_dump steps.
    In a fork of the agent the workload is
    a fork of the agent's warm seed become ``run`` without an exec
    (harness/warmfork.py), else this process's child, a new ``python3 -S
    workload_run.py run SPEC MARK``; the ready line's ``start`` says which
    (``cold_why``: why not warm).
    """
    import json
    warmfork = _sibling("warmfork")
    cold = "exec requested (CRUCIBLE_WARM_WORKLOAD=0)" if "exec" in phases else \
        ("" if warmfork.agent_fork(globals()) else "not in a fork of the agent")
    cold = cold or warmfork.why_cold()
    with open(spec_path) as f:
        spec = json.load(f)
    for p in (spec["ready"], spec["verdict"]):
        if os.path.exists(p):
            os.unlink(p)
    if "setup" in phases:
        try:
            world.apply_phase(spec, "setup")
        except world.WorldError as e:
            print(json.dumps({"error": f"setup step failed: {e}", "step": "setup"}))
            return 1
    # -S: no site (not needed: stdlib and the harness only), a third of
    # the start-up, which costs about a second under TCG; workload_run.py:
    # this module from its cached bytecode, not compiled as the script
    argv = warmfork.workload_argv(os.path.join(os.path.dirname(os.path.abspath(__file__)), RUN_SCRIPT), spec_path,
                                  MARK)
    for stream in (sys.stdout, sys.stderr):   # nothing buffered may be written twice
        stream.flush()
    own = True      # the workload is this process's child (not the warm seed's)
    if not cold:
        try:
            child = warmfork.ask_seed(argv, spec_path)
            own = False
        except warmfork.Cold as e:
            cold = str(e)
    if own:
        child = os.fork()
    if own and child == 0:  # pragma: no cover - child
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 65536)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    deadline = time.monotonic() + float(spec.get("ready_timeout", 30))
    waiter = Waiter(os.path.dirname(spec["ready"]), child)
    while time.monotonic() < deadline:
        if os.path.exists(spec["ready"]):
            waiter.close()
            with open(spec["ready"], "rb") as f:
                raw = f.read()
            ready = json.loads(raw)
            if "error" not in ready and "before_dump" in phases:
                try:
                    world.apply_phase(spec, "before_dump")
                except world.WorldError as e:
                    ready = dict(ready, error=f"before_dump step failed: {e}", step="before_dump")
            if "error" not in ready and "snap" in phases:
                # the harness's snapshot before the dump, here: one request and
                # one fork of the agent fewer than a ``snap`` of its own
                ready["snap"] = _sibling("procstate").quiet_snapshot(int(ready["pid"]), ready.get("proof") or {})
            if cold:
                ready["cold_why"] = cold
            if "ready_file" in phases:
                ready["ready_file"] = raw.decode("latin-1")     # every byte as one character
            print(json.dumps(ready))
            return 1 if "error" in ready else 0
        if own:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                print(json.dumps({"pid": child, "error": f"workload exited before ready (status {status:#x})"}))
                return 1
        elif _gone(child):
            print(json.dumps({"pid": child, "error": "workload exited before ready (forked by the warm seed)"}))
            return 1
        waiter.wait(min(WAIT_MAX, deadline - time.monotonic()))
    print(json.dumps({"pid": child, "error": "workload not ready in time"}))
    return 1


def _gone(pid: int) -> bool:
    """Has ``pid`` (not this process's child) exited: gone, or a zombie?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _run_warm(argv: List[str], spec_path: str) -> None:  # pragma: no cover - the child; returns only to exec
    """Become the exec'd workload (harness/warmfork.py) and run; return
    (to exec it instead) when something cannot be made identical."""
    global START
    # traceback only on a failure: imported here it cost every warm start
    # ~0.15 s under TCG (linecache, tokenize, textwrap, contextlib) and put
    # those modules in every image the engine dumps and restores
    warmfork = _sibling("warmfork")
    try:
        warmfork.become(argv)
    except warmfork.Cold:
        return          # nothing of the workload ran yet: the exec starts it afresh
    except BaseException:   # noqa: BLE001 - a bug of the warm start: said in the ready file, not hidden by an exec
        import traceback
        with open(spec_path) as f:
            ready = jsonio.load(f)["ready"]
        write_json(ready, {"pid": os.getpid(), "helpers": [], "error": "warm start: " + traceback.format_exc()})
        os._exit(1)
    START = "warm"
    code = 1
    try:
        code = run(spec_path)
    except BaseException:   # noqa: BLE001 - as the interpreter's top level would print it
        import traceback
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:   # noqa: BLE001
            code = 120
    os._exit(code)


pidstate = world.pidstate


def pidstate_after_exit(pid: int, seconds: float) -> dict:
    """pidstate(pid) once it no longer runs, or after ``seconds``. A
    process that wrote its verdict and returned still has to finish exiting
    (interpreter teardown, every thread's exit): on a slow guest (aarch64
    under TCG) that outlasts the next command, and a look at once would
    call a process that is on its way out still running."""
    deadline = time.monotonic() + seconds
    waiter = None
    try:
        while True:
            st = pidstate(pid)
            if not st["exists"] or time.monotonic() >= deadline:
                return st
            if waiter is None:
                waiter = Waiter(None, pid)
                continue        # it may have exited before its pidfd was taken
            waiter.wait(min(WAIT_MAX, deadline - time.monotonic()))
    finally:
        if waiter is not None:
            waiter.close()


def send_and_wait(pid: int, verdict_path: str, seconds: float, snap: Optional[dict] = None,
                  phases: Optional[List[str]] = None, ready: Optional[Tuple[str, bytes]] = None,
                  pidfile: Optional[str] = None) -> dict:
    """SIGUSR1 to ``pid`` and wait for its verdict; reports whether it lives.
    With ``snap`` (the published proof addresses), first take the harness's
    snapshot of the process from outside, before it runs its checks.
    First (the harness's requests of their own before): ``ready`` (path,
    bytes) written, ``pidfile`` read (its text as ``pidfile``, None if
    there is none)."""
    import json
    out: Dict[str, Any] = {}
    if ready is not None:
        with open(ready[0], "wb") as f:
            f.write(ready[1])
    if pidfile is not None:
        try:
            with open(pidfile) as f:
                out["pidfile"] = f.read()
        except (OSError, ValueError):
            out["pidfile"] = None
    if snap is not None:
        out["snap"] = _sibling("procstate").quiet_snapshot(pid, snap)
    request = os.path.join(os.path.dirname(verdict_path), REQUEST)
    write_json(request, {"phases": list(phases or PHASES)})
    waiter = Waiter(os.path.dirname(verdict_path), pid)     # before the signal: no event can come first
    try:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return {**out, "signalled": False, "verdict": None, **pidstate(pid)}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if os.path.exists(verdict_path):
                with open(verdict_path) as f:
                    return {**out, "signalled": True, "verdict": json.load(f), **pidstate(pid)}
            if not pidstate(pid)["exists"]:
                break
            waiter.wait(min(WAIT_MAX, deadline - time.monotonic()))
    finally:
        waiter.close()
    # one last look: the verdict may have landed just as the process exited
    if os.path.exists(verdict_path):
        with open(verdict_path) as f:
            return {**out, "signalled": True, "verdict": json.load(f), **pidstate(pid)}
    return {**out, "signalled": True, "verdict": None, **pidstate(pid)}


def workloads_under(root: str) -> List[int]:
    """Every running workload whose spec lies under ``root``: also one an
    engine started on its own (a fresh start under a PID nobody reported)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if MARK.encode() in argv and any(a.startswith(root.encode() + b"/") for a in argv):
            out.append(int(name))
    return out


def kill_workloads(pids: List[int]) -> List[int]:
    """SIGKILL each PID that is a workload (its cmdline has the mark); never anything else."""
    killed = []
    for pid in pids:
        if pidstate(pid)["workload"]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def main(argv: List[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "run" and len(argv) >= 2:
        return run(argv[1])
    if cmd == "seed" and len(argv) == 3:     # the warm seed (harness/warmfork.py start_seed)
        _sibling("warmfork").serve_seed(int(argv[1]), int(argv[2]), _run_warm)
        return 1
    import json     # the helpers' output (the agent has it imported)
    if cmd == "spawn" and len(argv) >= 2:
        return spawn(argv[1], [a.lstrip("-").replace("-", "_") for a in argv[2:]])
    if cmd == "signal" and len(argv) >= 4:
        opts = dict(zip(argv[4::2], argv[5::2]))
        snap = json.loads(opts["--snap"]) if "--snap" in opts else None
        phases = opts["--phases"].split(",") if "--phases" in opts else None
        ready = None
        if "--ready" in opts:
            import base64
            ready = (opts["--ready"], base64.b64decode(opts["--ready-b64"]))
        print(json.dumps(send_and_wait(int(argv[1]), argv[2], float(argv[3]), snap, phases, ready=ready,
                                       pidfile=opts.get("--pidfile"))))
        return 0
    if cmd == "snap" and len(argv) == 3:
        print(json.dumps(_sibling("procstate").quiet_snapshot(int(argv[1]), json.loads(argv[2]))))
        return 0
    if cmd == "pidstate" and len(argv) == 2:
        print(json.dumps(pidstate(int(argv[1]))))
        return 0
    if cmd == "pidstate" and len(argv) in (4, 6) and argv[2] == "--gone-within" and argv[4:5] in ([], ["--unlink"]):
        if len(argv) == 6:
            # the original's verdict, read already: gone before the restored
            # process writes its own (one request: an exec'd rm was ~0.1 s
            # under TCG, the first exec after a revert translating ld.so and libc)
            try:
                os.unlink(argv[5])
            except FileNotFoundError:
                pass
        print(json.dumps(pidstate_after_exit(int(argv[1]), float(argv[3]))))
        return 0
    if cmd == "kill":
        print(json.dumps(kill_workloads([int(p) for p in argv[1:]])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
