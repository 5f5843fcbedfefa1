"""Per-process attributes a program can read back, that no other record
carries: dumpable, child subreaper, keep-caps, THP disable, the machine-check
kill policy, the core dump filter and PR_SET_IO_FLUSHER; where the kernel has them, rdtsc
faulting, KSM merge-any and memory-deny-write-execute (OPTIONAL; CPUID
faulting, which this engine does not set back, is refused).

A restored process is a clone3 of the restorer, so without this it would
carry ckpt's values: subreaper off, THP allowed, the default MCE policy and
core dump filter, and - the one that bites - a non-root process would come
back non-dumpable, because the restore's change of credentials resets
dumpable to fs.suid_dumpable (kernel/cred.c commit_creds): its /proc files
owned by root, no ptrace, no core dump for its own user.

Read at the dump by the process itself (prctl PR_GET_*: engine/dump.py's
injected reads, batched with the others) and from /proc (coredump_filter);
applied in the new process by queued prctl calls (with the other process
settings), after its credentials for what credentials reset (dumpable,
keep-caps), and from outside for coredump_filter. What cannot be set back
exactly is refused (deny by default): securebits other than keep-caps, a
THP-disable mode with flags, and dumpable 2 (SUID_DUMP_ROOT, what a change
of credentials gives under fs.suid_dumpable=2: no prctl sets it) where the
restore's own change of credentials would not give it. Per process here: the leader's prctl values are the process's
(dumpable, subreaper, THP and the dump filter belong to the process;
keep-caps and the MCE policy to each thread: the other threads' are not
read, see README "Known limits").
"""

from __future__ import annotations

import os
import struct

from . import autogroup
from .errors import Refusal
from .procfs import self_memo

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_KEEPCAPS = 8
PR_GET_SECUREBITS = 27
PR_MCE_KILL, PR_MCE_KILL_GET = 33, 34
PR_MCE_KILL_CLEAR, PR_MCE_KILL_SET, PR_MCE_KILL_DEFAULT = 0, 1, 2
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42
PR_GET_TSC, PR_SET_TSC, PR_TSC_ENABLE = 25, 26, 1
PR_SET_MDWE, PR_GET_MDWE = 65, 66
PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE = 67, 68
ARCH_GET_CPUID = 0x1011
PR_GET_SPECULATION_CTRL, PR_SET_SPECULATION_CTRL = 52, 53
PR_SPEC_PRCTL, PR_SPEC_ENABLE, PR_SPEC_DISABLE, PR_SPEC_FORCE_DISABLE, PR_SPEC_DISABLE_NOEXEC = 1, 2, 4, 8, 16
SPEC_KEYS = ("spec_store_bypass", "spec_indirect_branch", "spec_l1d_flush")   # PR_SPEC_* 0, 1, 2
# x86 (Linux 5.16): dynamically enabled xstate features (AMX tile data, 18)
# a process must request before its first use; per process, inherited by fork
ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM = 0x1021, 0x1022, 0x1023
PR_SET_IO_FLUSHER = 57
# PR_SET_IO_FLUSHER sets both task flags (include/linux/sched.h PR_IO_FLUSHER,
# Linux 5.6): a userspace block or filesystem daemon (nbd, tcmu-runner, FUSE
# servers) that must not recurse into its own I/O under memory pressure. Read
# from /proc/TID/stat's flags, not PR_GET_IO_FLUSHER: that needs
# CAP_SYS_RESOURCE in the target, which most such processes do not keep.
PF_MEMALLOC_NOIO, PF_LOCAL_THROTTLE = 0x00080000, 0x00100000
PF_IO_FLUSHER = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE
CAP_SYS_RESOURCE = 24
MDWE_FLAGS = 3          # PR_MDWE_REFUSE_EXEC_GAIN, PR_MDWE_NO_INHERIT
SECBIT_KEEP_CAPS = 1 << 4
DEFAULT_COREDUMP_FILTER = 0x33      # what a process without a setting of its own has (fs/exec.c)


def _int(raw: bytes) -> int:
    return struct.unpack("<i", raw)[0]


#: (key, syscall, args(scratch), bytes read back or 0 for the result, decoder):
#: engine/dump.py _injected_reads appends these.
READS = [
    ("dumpable", "prctl", lambda scr: (PR_GET_DUMPABLE, 0, 0, 0, 0), 0, None),
    ("child_subreaper", "prctl", lambda scr: (PR_GET_CHILD_SUBREAPER, scr, 0, 0, 0), 4, _int),
    ("securebits", "prctl", lambda scr: (PR_GET_SECUREBITS, 0, 0, 0, 0), 0, None),
    ("thp_disable", "prctl", lambda scr: (PR_GET_THP_DISABLE, 0, 0, 0, 0), 0, None),
    ("mce_kill", "prctl", lambda scr: (PR_MCE_KILL_GET, 0, 0, 0, 0), 0, None),
]
#: Read where this kernel and machine have them (asked once of ckpt itself,
#: the same kernel: a read the kernel refuses would fail the whole dump),
#: else their default is recorded: (key, syscall, args, bytes, decoder, default).
OPTIONAL = [
    # x86 only: rdtsc faulting (PR_TSC_SIGSEGV), as rr and sandboxes set it; per thread
    ("tsc", "prctl", lambda scr: (PR_GET_TSC, scr, 0, 0, 0), 4, _int, PR_TSC_ENABLE),
    # x86 only: CPUID faulting (ARCH_SET_CPUID 0); 1 = cpuid works
    ("cpuid", "arch_prctl", lambda scr: (ARCH_GET_CPUID, 0), 0, None, 1),
    # Linux 6.3: memory-deny-write-execute (systemd MemoryDenyWriteExecute= can use it)
    ("mdwe", "prctl", lambda scr: (PR_GET_MDWE, 0, 0, 0, 0), 0, None, 0),
    # Linux 6.4 with KSM: every mapping mergeable, now and to come
    ("memory_merge", "prctl", lambda scr: (PR_GET_MEMORY_MERGE, 0, 0, 0, 0), 0, None, 0),
    # x86, Linux 5.16: the xstate features it may use (AMX: oneDNN, PyTorch request it
    # at start); a restored process has the restorer's and its first tile instruction
    # would be a SIGILL. 0: not asked (the default's features are always there)
    ("xcomp_perm", "arch_prctl", lambda scr: (ARCH_GET_XCOMP_PERM, scr), 8,
     lambda raw: struct.unpack("<Q", raw)[0], 0),
] + [
    # Speculation control (Linux 4.17, 5.0, 6.2): a process may disable speculative
    # store bypass or indirect branch speculation for itself where the mitigation is
    # in prctl mode (PR_SPEC_PRCTL set); 0 where not asked (PR_SPEC_NOT_AFFECTED)
    (key, "prctl", lambda scr, i=i: (PR_GET_SPECULATION_CTRL, i, 0, 0, 0), 0, None, 0)
    for i, key in enumerate(SPEC_KEYS)
]
_HERE: list = []


def reads() -> list:
    """READS and the OPTIONAL reads this kernel answers (engine/dump.py
    _injected_reads appends these)."""
    if not _HERE:
        import ctypes
        from . import arch, libc
        sys_ = arch.current().SYS
        buf = ctypes.c_uint64(0)     # the widest read (xcomp_perm: 8 bytes)
        for key, name, args, _, _, _ in OPTIONAL:
            if name not in sys_:
                continue
            a = args(ctypes.addressof(buf))
            try:
                libc.syscall(sys_[name], *a)
                _HERE.append(key)
            except libc.SysError:
                pass
        _HERE.append(None)
    return READS + [r[:5] for r in OPTIONAL if r[0] in _HERE]


def thread_reads() -> list:
    """The per-thread values engine/threads.py reads from every other
    thread, to compare with the leader's (same_as_leader)."""
    keys = {k: f"thread_{k}" for k in ("securebits", "mce_kill", "tsc") + SPEC_KEYS}
    return [(keys[r[0]],) + tuple(r[1:]) for r in reads() if r[0] in keys]


def same_as_leader(rec: dict, lead, tid: int) -> None:
    """A thread's keep-caps, machine-check kill policy and rdtsc faulting
    are its own (kernel: securebits in its credentials, PF_MCE_* and
    TIF_NOTSC in its task), and the restore sets the leader's before the
    threads are cloned: one that differs from the leader's would come back
    with the leader's. Refused (`threads`); the values are popped from
    `rec`. Raises Refusal.

    But the machine-check kill policy: a thread's own is kept in `rec`
    ("mce_kill") and set by the thread itself after its clone
    (queue_thread). QEMU asks for early kill on its vCPU threads only."""
    got = {k: rec.pop(f"thread_{k}") for k in ("securebits", "mce_kill", "tsc") + SPEC_KEYS if f"thread_{k}" in rec}
    if lead is None:
        return
    if "mce_kill" in got and got["mce_kill"] != lead.get("mce_kill"):
        rec["mce_kill"] = got.pop("mce_kill")
    want = {"securebits": SECBIT_KEEP_CAPS if lead.get("keep_caps") else 0, "mce_kill": lead.get("mce_kill"),
            "tsc": lead.get("tsc"), **{k: lead.get(k, 0) for k in SPEC_KEYS}}
    names = {"securebits": "securebits (keep-caps)", "mce_kill": "machine-check kill policy",
             "tsc": "rdtsc faulting (PR_SET_TSC)", "spec_store_bypass": "speculative store bypass control",
             "spec_indirect_branch": "indirect branch speculation control", "spec_l1d_flush": "L1D flush control"}
    differ = [f"{names[k]} {v} (the leader's {want[k]})" for k, v in got.items() if v != want[k]]
    if differ:
        raise Refusal("threads", "differs from the leader in " + ", ".join(differ)
                      + ": restored with the leader's")


_READ = object()


def _task_flags(pid: int) -> dict:
    """{tid: /proc/PID/task/TID/stat flags} of every thread."""
    from .procfs import parse_stat
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{name}/stat") as f:
                out[int(name)] = parse_stat(f.read())["flags"]
        except (FileNotFoundError, ProcessLookupError):
            pass        # exited meanwhile: the thread survey says so
    return out


def io_flusher(pid: int, flags: dict) -> int:
    """1 when the process is an I/O flusher (PR_SET_IO_FLUSHER), else 0.
    The flag is each thread's own and a clone copies it (kernel/fork.c keeps
    it in the new task's flags): the restore sets the leader's before the
    threads are cloned, so a thread whose flag differs would come back with
    the leader's. Refused (`threads`). `flags`: _task_flags(pid). Raises
    Refusal."""
    lead = int(flags.get(pid, 0) & PF_IO_FLUSHER == PF_IO_FLUSHER)
    differ = sorted(t for t, f in flags.items() if int(f & PF_IO_FLUSHER == PF_IO_FLUSHER) != lead)
    if differ:
        raise Refusal("threads", f"thread {differ[0]} is {'not ' if lead else ''}an I/O flusher "
                      f"(PR_SET_IO_FLUSHER) and the leader is{'' if lead else ' not'}: restored with the "
                      "leader's", pid=pid)
    return lead


PR_SCHED_CORE, PR_SCHED_CORE_GET = 62, 0
PIDTYPE_PID = 0


def core_sched_cookie(tids) -> int:
    """The first of `tids` (threads of one process) that has a core
    scheduling cookie (PR_SCHED_CORE, Linux 5.14, SMT machines: which tasks
    may share a core, a guard against SMT side channels), else 0. Nothing
    gives a new task a cookie of its own or shares one the way the
    original's were, so such a process is refused (`unsupported-state`):
    restored without it, its threads would share cores with anything. Read
    from outside (PR_SCHED_CORE_GET of another task needs ptrace read
    access, which the tracer has); where the kernel has no core scheduling
    or the machine no SMT the call fails and no task can have one."""
    import ctypes
    from . import arch, libc
    nr = arch.current().SYS["prctl"]
    cookie = ctypes.c_uint64(0)
    for tid in tids:
        try:
            libc.syscall(nr, PR_SCHED_CORE, PR_SCHED_CORE_GET, tid, PIDTYPE_PID, ctypes.addressof(cookie))
        except libc.SysError:
            return 0        # EINVAL: no CONFIG_SCHED_CORE; ENODEV: no SMT (ESRCH: gone, the survey says so)
        if cookie.value:
            return tid
    return 0


def _core_cookie_why(tids) -> str:
    tid = core_sched_cookie(sorted(tids))
    return (f"thread {tid} has a core scheduling cookie (PR_SCHED_CORE): which tasks may share an SMT "
            "core is not restored") if tid else ""


def own_io_flusher() -> int:
    """ckpt's own (what a clone of it has)."""
    if "io_flusher" not in _OWN:
        from .procfs import parse_stat
        with open(f"/proc/self/task/{os.getpid()}/stat") as f:
            _OWN["io_flusher"] = int(parse_stat(f.read())["flags"] & PF_IO_FLUSHER == PF_IO_FLUSHER)
    return _OWN["io_flusher"]


def can_set_io_flusher() -> bool:
    """ckpt may call PR_SET_IO_FLUSHER (CAP_SYS_RESOURCE in its effective set)."""
    from .procfs import self_status
    return bool(int(self_status().get("CapEff", "0"), 16) >> CAP_SYS_RESOURCE & 1)


def dump(pid: int, got: dict, autogroup_nice=_READ) -> dict:
    """The record, from the injected reads in `got` (their keys are
    removed) and /proc. Raises Refusal(unsupported-state). `autogroup_nice`:
    as the survey read it (autogroup.read), else read here."""
    vals = {k: got.pop(k) for k, *_ in READS}
    vals.update({r[0]: got.pop(r[0], r[5]) for r in OPTIONAL})
    why = []
    if vals["securebits"] & ~SECBIT_KEEP_CAPS:
        why.append(f"securebits {vals['securebits']:#x} (only keep-caps can be set back)")
    if vals["thp_disable"] not in (0, 1):
        why.append(f"THP disable mode {vals['thp_disable']:#x}")
    if vals["cpuid"] != 1:
        why.append("CPUID faulting (ARCH_SET_CPUID 0), which is not restored")
    if vals["tsc"] not in (1, 2) or vals["mdwe"] & ~MDWE_FLAGS or vals["memory_merge"] not in (0, 1):
        why.append(f"TSC mode {vals['tsc']}, MDWE flags {vals['mdwe']:#x}, memory merge {vals['memory_merge']}")
    flags = _task_flags(pid)       # every thread's, once: the I/O flusher mark and the cookies
    why += [w for w in (_core_cookie_why(flags),) if w]
    if why:
        raise Refusal("unsupported-state", "; ".join(why), pid=pid)
    with open(f"/proc/{pid}/coredump_filter") as f:
        cdf = int(f.read().strip(), 16)
    return {"dumpable": vals["dumpable"], "child_subreaper": int(bool(vals["child_subreaper"])),
            "keep_caps": int(bool(vals["securebits"] & SECBIT_KEEP_CAPS)), "thp_disable": vals["thp_disable"],
            "mce_kill": vals["mce_kill"], "coredump_filter": cdf, "tsc": vals["tsc"], "mdwe": vals["mdwe"],
            "memory_merge": vals["memory_merge"],
            "autogroup_nice": autogroup.read(pid) if autogroup_nice is _READ else autogroup_nice,
            "xcomp_perm": vals["xcomp_perm"], "mlock_future": got.pop("mlock_future", 0),
            "io_flusher": io_flusher(pid, flags),
            **{k: vals[k] for k in SPEC_KEYS}}


def describe(rec: dict) -> str:
    out = [f"dumpable {rec['dumpable']}", f"core dump filter {rec['coredump_filter']:#x}"]
    for k, text in (("child_subreaper", "child subreaper"), ("keep_caps", "keep-caps"), ("thp_disable", "THP disabled")):
        if rec[k]:
            out.append(text)
    if rec["mce_kill"] != PR_MCE_KILL_DEFAULT:
        out.append(f"MCE kill {'early' if rec['mce_kill'] == 1 else 'late'}")
    for k, text in (("tsc", "rdtsc faults (PR_TSC_SIGSEGV)"), ("mdwe", "memory-deny-write-execute"),
                    ("memory_merge", "KSM merge-any")):
        if rec[k] != (PR_TSC_ENABLE if k == "tsc" else 0):
            out.append(text)
    if rec.get("xcomp_perm"):
        out.append(f"xstate permission {rec['xcomp_perm']:#x}")
    if rec.get("io_flusher"):
        out.append("I/O flusher (PR_SET_IO_FLUSHER)")
    if rec.get("mlock_future"):
        out.append("mlockall(MCL_FUTURE" + (" | MCL_ONFAULT)" if rec["mlock_future"] & 4 else ")"))
    return ", ".join(out)


def older(rec) -> None:
    """A format 5 to 7 record: what it did not carry was restored as the default."""
    if isinstance(rec, dict):
        for key, *_, default in OPTIONAL:
            if key != "cpuid":
                rec.setdefault(key, default)


def check_record(rec) -> bool:
    """Structure of core.json "attrs" (restore's check_core)."""
    try:
        ok = rec["dumpable"] in (0, 1, 2) and rec["child_subreaper"] in (0, 1) and rec["keep_caps"] in (0, 1) \
            and rec["thp_disable"] in (0, 1) and rec["mce_kill"] in (0, 1, 2)
        ok = ok and rec["tsc"] in (1, 2) and rec["mdwe"] in (0, 1, 3) and rec["memory_merge"] in (0, 1)
        cdf = rec["coredump_filter"]
        ok = ok and rec.get("mlock_future", 0) in (0, 2, 6)
        ok = ok and rec.get("io_flusher", 0) in (0, 1)      # absent before it was carried      # MCL_FUTURE [| MCL_ONFAULT]; absent before
        ok = ok and all(isinstance(rec.get(k, 0), int) and 0 <= rec.get(k, 0) < 64 for k in SPEC_KEYS)
        xp = rec.get("xcomp_perm", 0)        # absent before it was carried
        ok = ok and isinstance(xp, int) and not isinstance(xp, bool) and 0 <= xp < 1 << 64
        ag = rec.get("autogroup_nice")     # absent before it was carried, None without autogroups
        ok = ok and (ag is None or (isinstance(ag, int) and not isinstance(ag, bool) and -20 <= ag <= 19))
        return ok and isinstance(cdf, int) and not isinstance(cdf, bool) and 0 <= cdf < 1 << 32
    except (KeyError, TypeError):
        return False


def queue(b, rec: dict) -> None:
    """With the other process settings (Builder.process_state's batch):
    what the clone has as the restorer's and no credential change resets."""
    q = b.pending.add
    # Set where the image's value is not the clone's, which is ckpt's own
    # (inherited across fork: a ckpt started with THP disabled, a
    # non-default MCE policy, rdtsc faulting or KSM merge-any gave them to
    # every process it restored)
    if rec["thp_disable"] != _own("thp_disable"):
        q("prctl", PR_SET_THP_DISABLE, rec["thp_disable"], 0, 0, 0)
    if rec["child_subreaper"]:
        q("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if rec["mce_kill"] != _own("mce_kill"):
        if rec["mce_kill"] == PR_MCE_KILL_DEFAULT:
            q("prctl", PR_MCE_KILL, PR_MCE_KILL_CLEAR, 0, 0, 0)
        else:
            q("prctl", PR_MCE_KILL, PR_MCE_KILL_SET, rec["mce_kill"], 0, 0)
    if rec["tsc"] != _own("tsc"):     # before the threads are cloned: they inherit it
        q("prctl", PR_SET_TSC, rec["tsc"], 0, 0, 0)
    if rec["memory_merge"] != _own("memory_merge"):
        q("prctl", PR_SET_MEMORY_MERGE, rec["memory_merge"], 0, 0, 0)
    for bit in _xcomp_missing(rec):     # before the xstate that may hold the feature's state is set
        q("arch_prctl", ARCH_REQ_XCOMP_PERM, bit)
    for which, value in _spec_changes(rec):     # before the threads are cloned: they inherit it
        q("prctl", PR_SET_SPECULATION_CTRL, which, value, 0, 0)
    if rec.get("io_flusher", 0) != own_io_flusher():    # before the threads (they inherit it) and the
        q("prctl", PR_SET_IO_FLUSHER, rec.get("io_flusher", 0), 0, 0, 0)   # credentials (CAP_SYS_RESOURCE)


def queue_thread(tb, rec: dict) -> None:
    """A thread's own machine-check kill policy, queued in its own batch
    (threads._own_state): the clone has the leader's (kernel/fork.c keeps
    PF_MCE_* in the new task's flags)."""
    if "mce_kill" in rec:
        tb.pending.add("prctl", PR_MCE_KILL, PR_MCE_KILL_SET, rec["mce_kill"], 0, 0)


_OWN: dict = self_memo({})     # per operation (engine/procfs.py)
_OWN_GET = {"thp_disable": (PR_GET_THP_DISABLE, 0), "mce_kill": (PR_MCE_KILL_GET, PR_MCE_KILL_DEFAULT),
            "memory_merge": (PR_GET_MEMORY_MERGE, 0)}


def _own(key: str) -> int:
    """ckpt's own value of a READS/OPTIONAL prctl attribute (what a clone of
    it has); the default where the kernel has no such call."""
    if key not in _OWN:
        import ctypes
        from . import arch, libc
        nr = arch.current().SYS["prctl"]
        try:
            if key == "tsc":
                out = ctypes.c_int(PR_TSC_ENABLE)
                libc.syscall(nr, PR_GET_TSC, ctypes.addressof(out), 0, 0, 0)
                _OWN[key] = out.value
            else:
                _OWN[key] = libc.syscall(nr, _OWN_GET[key][0], 0, 0, 0, 0)
        except libc.SysError:
            _OWN[key] = PR_TSC_ENABLE if key == "tsc" else _OWN_GET[key][1]
    return _OWN[key]


def _own_spec(which: int) -> int:
    """ckpt's own PR_GET_SPECULATION_CTRL (what a clone of it has); 0 where not asked."""
    from . import arch, libc
    try:
        return libc.syscall(arch.current().SYS["prctl"], PR_GET_SPECULATION_CTRL, which, 0, 0, 0)
    except libc.SysError:
        return 0


def _spec_changes(rec: dict) -> list:
    """(which, value) to PR_SET_SPECULATION_CTRL: where the process could
    set it (PR_SPEC_PRCTL) and its state is not the clone's."""
    out = []
    for which, key in enumerate(SPEC_KEYS):
        v = rec.get(key, 0)
        if not v & PR_SPEC_PRCTL:
            continue
        state = v & (PR_SPEC_ENABLE | PR_SPEC_DISABLE | PR_SPEC_FORCE_DISABLE | PR_SPEC_DISABLE_NOEXEC)
        if state and state != _own_spec(which) & ~PR_SPEC_PRCTL:
            out.append((which, state))
    return out


def last(b, rec: dict) -> None:
    """The restore's last injected call: memory-deny-write-execute forbids
    what the restore itself may still do (an executable mapping made
    writable, a runner area mapped rwx)."""
    if rec.get("mlock_future"):     # engine/mlockfuture.py: none of the restore's own mappings locked
        b.call("mlockall", rec["mlock_future"])
    if rec["mdwe"]:
        b.call("prctl", PR_SET_MDWE, rec["mdwe"], 0, 0, 0)


def _xcomp(code: int) -> int:
    """ckpt's own ARCH_GET_XCOMP_* mask (0 where there is none)."""
    import ctypes
    from . import arch, libc
    nr = arch.current().SYS.get("arch_prctl")
    if nr is None:
        return 0
    v = ctypes.c_uint64(0)
    try:
        libc.syscall(nr, code, ctypes.addressof(v))
    except libc.SysError:
        return 0
    return v.value


def _xcomp_missing(rec: dict) -> list:
    """The xstate feature bits the process was permitted and a clone of
    ckpt is not (each asked for with ARCH_REQ_XCOMP_PERM)."""
    want = rec.get("xcomp_perm", 0)
    if not want:
        return []
    more = want & ~_xcomp(ARCH_GET_XCOMP_PERM)
    return [b for b in range(64) if more >> b & 1]


def validate(rec: dict, creds_plan: str) -> list:
    """What is refused before the process exists."""
    out = []
    missing = _xcomp_missing(rec)
    if missing and [b for b in missing if not _xcomp(ARCH_GET_XCOMP_SUPP) >> b & 1]:
        out.append(Refusal("cpu-mismatch", f"the process was permitted xstate features {missing} "
                           "(ARCH_REQ_XCOMP_PERM: AMX) that this CPU or kernel does not support"))
    if rec.get("io_flusher", 0) != own_io_flusher() and not can_set_io_flusher():
        out.append(Refusal("capability", "the process is an I/O flusher (PR_SET_IO_FLUSHER): setting it "
                           "needs CAP_SYS_RESOURCE, which ckpt lacks here"))
    return out + _validate_dumpable(rec, creds_plan)


def _validate_dumpable(rec: dict, creds_plan: str) -> list:
    if rec["dumpable"] != 2:
        return []
    here = suid_dumpable()
    if creds_plan == "setid" and here == 2:
        return []
    return [Refusal("unsupported-state", "dumpable 2 (SUID_DUMP_ROOT) comes back only from a change of "
                    f"credentials under fs.suid_dumpable=2; here fs.suid_dumpable={here} and the credentials "
                    + ("change" if creds_plan == "setid" else "do not change"))]


def suid_dumpable() -> int:
    try:
        with open("/proc/sys/fs/suid_dumpable") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


def after_creds(b, rec: dict) -> None:
    """Once the credentials are the process's: keep-caps (a setuid clears
    it) and dumpable (any change of ids, or of capabilities to fewer, sets
    fs.suid_dumpable: set 0 or 1 always; 2 is what that change gave,
    validate() made sure, read back). Queued (engine/batch.py; the read
    back checked as the batch runs)."""
    if rec["keep_caps"]:
        b.pending.add("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0)
    if rec["dumpable"] != 2:
        b.pending.add("prctl", PR_SET_DUMPABLE, rec["dumpable"], 0, 0, 0)
        return
    b.pending.add("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0, expect=(2, "dumpable came back {got}, not 2"))


def outside(pid: int, rec: dict) -> None:
    """From the restorer: the core dump filter (mm flags), read back; a
    session leader's autogroup nice (engine/autogroup.py)."""
    autogroup.restore(pid, rec.get("autogroup_nice"))
    path = f"/proc/{pid}/coredump_filter"
    with open(path) as f:
        now = int(f.read().strip(), 16)
    if now != rec["coredump_filter"]:
        with open(path, "w") as f:
            f.write(f"{rec['coredump_filter']:#x}")
        with open(path) as f:
            now = int(f.read().strip(), 16)
        if now != rec["coredump_filter"]:
            from .errors import EngineError
            raise EngineError(f"coredump_filter {rec['coredump_filter']:#x} became {now:#x}", pid=pid)
