"""`ckpt dump` and `ckpt check`: freeze, pre-flight, save, release.

Order (DESIGN.md invariants): freeze with PTRACE_SEIZE + INTERRUPT; survey
every piece of state and every fd, collecting ALL refusals; on any refusal,
put the registers back and detach (the target carries on as before, the
partial image is removed); otherwise write the image into DIR.partial,
commit it (rename to DIR), and only then kill the target (or let it go with
--leave-running).
"""

from __future__ import annotations

import os
import struct
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from . import cgroups, cow, creds, faults, fsroot, pdeath, files, landlock, libc, pidns, membarrier, mlockfuture, mempolicy, posixtimers, procattrs, procfs, sched, seccomp, signals, threads, timens, unlinked
from .arch import current as current_arch
from .check import Survey, preflight, require_features, target_checks
from .context import DumpContext, Options, boot_id
from .errors import EngineError, Refusal, Refusals
from .fds._dups import leader_map
from .fds._sys import O_ASYNC
from .fds._util import async_owner
from .image import ImageWriter
from .memory import PAGE, PageDumper
from .task import Task

SCRATCH = 512
PR_GET_TID_ADDRESS = 40
PR_GET_PDEATHSIG = 2
SIGNALS = [s for s in range(1, 65) if s not in (9, 19)]   # all but SIGKILL, SIGSTOP
MM_FIELDS = ("start_code", "end_code", "start_data", "end_data", "start_brk",
             "start_stack", "arg_start", "arg_end", "env_start", "env_end")


# -- injected state ------------------------------------------------------------

def _syscall_in_vdso(task: Task, vmas: List[dict]) -> int:
    """Address of a `syscall` instruction in the target's [vdso]: injection
    jumps there, so nothing is written into the target's code."""
    for v in vmas:
        if v["path"] == "[vdso]":
            code = task.read_mem(v["start"], v["end"] - v["start"])
            i = task.arch.find_syscall(code)
            if i >= 0:
                return v["start"] + i
    # A process that unmapped its vdso (zdtm vdso02): the instruction's
    # bytes anywhere in its readable executable memory (libc's own
    # syscall wrappers); nothing after it runs (every injected call stops
    # at the syscall's exit and the registers are set again).
    for v in vmas:
        if v["perms"].startswith("r") and v["perms"][2] == "x" and v["path"] not in ("[vsyscall]",):
            for off in range(v["start"], v["end"], 1 << 16):
                try:    # 8 bytes past the chunk: an instruction across its end
                    code = task.read_mem(off, min((1 << 16) + 8, v["end"] - off))
                except (OSError, EngineError):
                    break
                i = task.arch.find_syscall(code)
                if i >= 0:
                    return off + i
    raise Refusal("unsupported-state", "no syscall instruction in its [vdso] or executable memory to inject "
                  "through", pid=task.pid)


def _scratch(task: Task, vmas: List[dict]) -> int:
    """Scratch memory for injected syscalls' out-parameters: below the
    target's stack pointer past the red zone (arch RED_ZONE: 128 bytes on
    x86_64, ABI 3.2.2), inside its stack mapping; saved before use and put
    back after."""
    rsp = task.arch.stack_pointer(task.orig_regs)
    addr = (rsp - task.arch.RED_ZONE - SCRATCH) & ~15
    for v in vmas:
        if v["start"] <= rsp < v["end"] and addr >= v["start"] and "w" in v["perms"]:
            return addr
    for v in vmas:   # an odd stack pointer: any private writable anonymous mapping
        if v.get("kind") == "anon" and v["perms"].startswith("rw") and v["end"] - v["start"] >= SCRATCH:
            return v["start"]
    raise Refusal("unsupported-state", "no writable memory for syscall injection", pid=task.pid)


def injected_state(task: Task, vmas: List[dict], seen: Optional[dict] = None) -> dict:
    """State only the process itself can report (no /proc file for it).
    `seen`: what the survey read of the frozen process ("status", for its
    credentials; "timers", its /proc timers list), each read here when
    not given."""
    if task.syscall_ip is None:
        task.syscall_ip = _syscall_in_vdso(task, vmas)
    scr = _scratch(task, vmas)
    saved = task.read_mem(scr, SCRATCH)
    pre = getattr(task, "prefetched", None)
    if pre is not None:
        # read side by side with the other members' (prefetch_injected)
        out = dict(pre)
        try:
            _after_reads(task, scr, vmas, out, seen)
        finally:
            task.write_mem(scr, saved)
        return out
    from .dumpbatch import read as batched
    try:
        # Read now, not the survey's copy: a signal queued since the freeze
        # must not be the one the batch unblocks to end its run (dumpbatch.usable).
        status = procfs.Proc(task.pid).status()
        got = batched(task, vmas, status, _batched_reads(task, status))
    except BaseException:
        task.write_mem(scr, saved)
        raise
    if got is not None:
        try:
            _after_reads(task, scr, vmas, got, seen)
        finally:
            task.write_mem(scr, saved)
        return got
    out: dict = {"sigactions": {}, "itimers": [None, None, None]}
    try:
        # One by one, the very reads the batch makes (_injected_reads).
        for key, name, args, nbytes, decode in _injected_reads():
            r = task.call(name, *args(scr))
            value = decode(task.read_mem(scr, nbytes)) if nbytes else r
            if isinstance(key, tuple):
                out[key[0]][key[1]] = value
            else:
                out[key] = value
        _after_reads(task, scr, vmas, out, seen)
    finally:
        task.write_mem(scr, saved)
    return out


def _after_reads(task: Task, scr: int, vmas: List[dict], out: dict, seen: Optional[dict] = None) -> None:
    """What is read with the scratch after the fixed reads: POSIX timers, and
    the mappings' own NUMA policies (asked from inside only where
    numa_maps cannot tell)."""
    seen = seen or {}
    timers = seen.get("timers")
    out["posix_timers"] = posixtimers.dump(task, scr, None if timers is None else [dict(t) for t in timers])
    # refused: a restore would leave its sandbox (probed by the batched reads, when they were made)
    ids = seen.get("status")
    landlock.check(task, ids if ids is not None else procfs.Proc(task.pid).status(), out.pop(landlock.PROBE_KEY, None))
    if out.get("mlock_future") is None:      # not told by the batched reads' own area
        out["mlock_future"] = mlockfuture.probe(task)
    out.setdefault("mempolicy", [mempolicy.MPOL_DEFAULT, 0])
    if "membarrier" not in out:     # a kernel without MEMBARRIER_CMD_GET_REGISTRATIONS
        out["membarrier"] = membarrier.probe(task)
    mempolicy.vma_policies(task, scr, vmas, out["mempolicy"][0])


def refuse_pdeath_signal(pid: int, tid: int, sig: int) -> None:
    """PR_SET_PDEATHSIG is per thread, shown by no /proc file and not
    inherited by fork: the restored task would go on without it (not killed
    when its parent dies), or, set again under a parent that is not the
    original one, get it when the restorer exits. Not restored yet: refused."""
    if sig:
        who = "" if tid == pid else f"thread {tid} "
        raise Refusal("unsupported-state", f"{who}has a parent-death signal (PR_SET_PDEATHSIG {sig}), "
                      "which is not restored", pid=pid)


def _unpack_sigaction(raw: bytes) -> list:
    return list(struct.unpack("<QQQQ", raw))     # handler, flags, restorer, mask


def _unpack_stack_t(raw: bytes) -> list:
    # stack_t: void *ss_sp; int ss_flags; (4 bytes padding) size_t ss_size
    return list(struct.unpack("<Qi4xQ", raw))


_FIXED_READS: list = []


def _injected_reads() -> list:
    """injected_state()'s fixed reads as (key, syscall, args(scratch), bytes
    read back from the scratch or 0 for the return value, decoder), in its order.
    The first 70 are the same for every process: made once per run (a
    tree's survey asks once per member)."""
    if not _FIXED_READS:
        _FIXED_READS.extend(_fixed_reads())
    return _FIXED_READS + procattrs.reads() + mempolicy.reads() + membarrier.reads()


def _fixed_reads() -> list:
    steps = [("brk", "brk", lambda scr: (0,), 0, None)]
    for sig in SIGNALS:
        steps.append((("sigactions", str(sig)), "rt_sigaction", lambda scr, s=sig: (s, 0, scr, 8), 32,
                      _unpack_sigaction))
    steps.append(("sigaltstack", "sigaltstack", lambda scr: (0, scr), 24, _unpack_stack_t))
    steps.append(("tid_address", "prctl", lambda scr: (PR_GET_TID_ADDRESS, scr, 0, 0, 0), 8,
                  lambda raw: struct.unpack("<Q", raw)[0]))
    steps.append(("pdeath_signal", "prctl", lambda scr: (PR_GET_PDEATHSIG, scr, 0, 0, 0), 4,
                  lambda raw: struct.unpack("<i", raw)[0]))
    for which in (0, 1, 2):   # ITIMER_REAL, VIRTUAL, PROF
        steps.append((("itimers", which), "getitimer", lambda scr, w=which: (w, scr), 32,
                      lambda raw: list(struct.unpack("<qqqq", raw))))
    return steps


def _batched_reads(task: Task, status: dict) -> list:
    """_injected_reads() and what else rides in the same batched run (not
    made one by one: those have their own injection)."""
    return _injected_reads() + landlock.reads(task.pid, status)


PREFETCH_STATUS = ("Seccomp", "SigPnd", "ShdPnd", "SigIgn", "SigQ", "Tgid", "Uid", "CapEff")


def prefetch_injected(tasks: List[Task]) -> None:
    """injected_state()'s fixed reads (brk, the 62 sigactions, sigaltstack,
    tid address, interval timers) of several frozen processes (a tree's
    members) side by side: task.syscall_each, one round trip per read for
    all of them instead of one per member. Every sigaction is read: a
    SIG_DFL action keeps the flags, mask and restorer it was set with,
    which the process can read back and which act for SIGCHLD
    (SA_NOCLDSTOP, SA_NOCLDWAIT) - /proc's SigCgt/SigIgn do not show them.
    Members under seccomp filters (suspended later, by _survey_frozen) or
    without a vdso syscall or scratch memory are left to injected_state(),
    as is everything when a read fails (it fails there again, in context)."""
    from .task import syscall_each
    from .dumpbatch import read_each
    cand = []
    for task in tasks:
        try:
            proc = procfs.Proc(task.pid)
            # the fields the batch decides by (dumpbatch.usable, Run,
            # landlock.reads), not all ~55 parsed: one per member of a tree
            status = procfs.read_status_fields(proc.path("status"), PREFETCH_STATUS)
            if seccomp.mode_of(status):
                continue
            vmas = proc.maps()
            if task.syscall_ip is None:
                task.syscall_ip = _syscall_in_vdso(task, vmas)
            cand.append((task, vmas, status))
        except (Refusal, OSError, libc.SysError):
            continue
    # Each member's reads in one run of its own (engine/dumpbatch.py)...
    batched = read_each(cand, _batched_reads) if len(cand) > 1 else {}
    ready = []
    for task, vmas, _ in cand:
        if task.pid in batched:
            task.prefetched = batched[task.pid]
            continue
        # ...or, where that cannot be, one round trip per read for all of them.
        try:
            scr = _scratch(task, vmas)
            ready.append((task, scr, task.read_mem(scr, SCRATCH)))
        except (Refusal, OSError, libc.SysError):
            continue
    if len(ready) < 2:
        return      # nothing to overlap
    got: dict = {t.pid: {"sigactions": {}, "itimers": [None, None, None]} for t, _, _ in ready}
    try:
        for key, name, args, nbytes, decode in _injected_reads():
            res = syscall_each([(t, t.arch.SYS[name], args(scr)) for t, scr, _ in ready])
            if any(-4096 < r < 0 or (nbytes and r != 0) for r in res):
                return
            for (t, scr, _), r in zip(ready, res):
                value = decode(t.read_mem(scr, nbytes)) if nbytes else r
                if isinstance(key, tuple):
                    got[t.pid][key[0]][key[1]] = value
                else:
                    got[t.pid][key] = value
    except (EngineError, libc.SysError, OSError):
        return
    finally:
        put_back_scratch(ready)
    for t, _, _ in ready:
        t.prefetched = got[t.pid]


def put_back_scratch(ready: list) -> None:
    """Each (task, scratch address, saved bytes) gets its stack memory back,
    every one even if one fails; that failure is raised: a task must never
    go on with its memory changed."""
    failed = None
    for t, scr, saved in ready:
        try:
            t.write_mem(scr, saved)
        except (EngineError, libc.SysError, OSError) as e:
            failed = failed or e
    if failed is not None:
        raise failed


def robust_list(pid: int) -> List[int]:
    head = libc.ctypes.c_uint64()
    size = libc.ctypes.c_uint64()
    a = current_arch()
    libc.syscall(a.SYS["get_robust_list"], pid, libc.ctypes.addressof(head), libc.ctypes.addressof(size),
                 name="get_robust_list", pid=pid)
    return [head.value, size.value]


def process_state(task: Task, s: Survey, ctx=None) -> dict:
    proc = s.proc
    st = s.stat
    status = s.status
    pid = task.pid
    mm = {k: st[k] for k in MM_FIELDS}
    # as preflight found it (frozen: no thread of it can chdir), else read now
    cwd_path, cst = s.memo["cwd"] if "cwd" in s.memo else (proc.readlink("cwd"), os.stat(proc.path("cwd")))
    state = {
        "pid": pid,
        "comm": proc.read("comm").rstrip("\n"),
        "regs": task.image_regs.to_dict(),
        "sigmask": task_sigmask(task),
        "rseq": _rseq(task),
        "sud": task.sud,        # syscall user dispatch, read at the freeze (engine/sud.py)
        "mm": mm,
        "auxv": procfs.parse_auxv(proc.read_bytes("auxv")),
        "robust_list": robust_list(pid),
        "rlimits": s.memo["limits"] if "limits" in s.memo else procfs.parse_limits(proc.read("limits"))[:len(libc.RLIMIT_NAMES)],
        "umask": int(status.get("Umask", "0022"), 8),
        "personality": int(proc.read("personality").strip(), 16),
        "cwd": _cwd_record(cwd_path, cst),
        "session": {"sid": st["session"], "pgid": st["pgrp"]},
        "exit_signal": st.get("exit_signal", 17),
        # as preflight read them (the process is frozen; read again when it did not get that far)
        "creds": s.memo["creds"] if "creds" in s.memo else creds.record(status, pid),
        "cgroups": s.memo["cgroups"] if "cgroups" in s.memo else cgroups.dump(pid),
    }
    root = fsroot.dump(pid)
    if root is not None:
        state["root"] = root
    state["sched"] = sched.dump(pid)
    state["seccomp"] = seccomp.dump(pid, seccomp.mode_of(status))
    state.update(injected_state(task, s.vmas, {"status": status, "timers": s.memo.get("timers")}))
    sig = pdeath.dump(pid, state.pop("pdeath_signal"), st["ppid"], ctx)
    if sig:
        state["pdeath_signal"] = sig
    state["attrs"] = procattrs.dump(pid, state, *([s.memo["autogroup"]] if "autogroup" in s.memo else []))
    state["mm"]["brk"] = state["brk"]
    return state


def _cwd_record(path: str, st: os.stat_result) -> dict:
    """A removed working directory is recreated at restore (engine.unlinked)."""
    rec = {"path": path, "dev": st.st_dev, "ino": st.st_ino}
    if unlinked.is_unlinked(path, st):
        rec["removed"] = unlinked.dir_record(path, st)
    return rec


def task_sigmask(task: Task) -> int:
    """The process's own mask (every signal is blocked while it is frozen,
    engine/signals.py)."""
    from . import ptrace
    return task.sigmask if task.sigmask is not None else ptrace.get_sigmask(task.pid)


def _rseq(task: Task) -> dict:
    from . import ptrace
    try:
        return ptrace.get_rseq(task.pid)
    except libc.SysError as e:
        if e.errno == 5:   # EIO: kernel < 5.13 has no GET_RSEQ_CONFIGURATION
            raise Refusal("kernel-missing", "PTRACE_GET_RSEQ_CONFIGURATION (Linux 5.13)", pid=task.pid) from None
        raise


# -- mappings ------------------------------------------------------------------

def exe_vma(proc: procfs.Proc) -> dict:
    path = proc.readlink("exe")
    st = os.stat(proc.path("exe"))
    return {"start": 0, "end": 0, "offset": 0, "perms": "r--p", "path": path,
            "dev": f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", "inode": st.st_ino,
            "map_files": proc.path("exe")}


def map_records(s: Survey, ctx: DumpContext) -> dict:
    """files.map_dump for every file mapping and the exe, refusals collected
    into the survey. Returns {vma start (or "exe"): record}."""
    recs: dict = {}
    for v in s.vmas:
        if v["kind"] != "file":
            continue
        try:
            recs[v["start"]] = files.map_dump(s.pid, v, ctx)
        except Refusal as r:
            s.refuse(f"mapping {v['start']:x}-{v['end']:x} {v['path']}", "mapping", r)
    try:
        recs["exe"] = files.map_dump(s.pid, exe_vma(s.proc), ctx)
        s.ok("exe", "file", s.proc.readlink("exe"))
    except Refusal as r:
        s.refuse("exe", "file", r)
    return recs


def dump_memory(pid: int, s: Survey, recs: dict, dumper: PageDumper, shm=None) -> List[dict]:
    """The mappings' records, their pages queued in `dumper`. `shm`: a
    tree's shmem.Pages (the object ranges earlier members carry)."""
    out = []
    own_shm = None
    if shm is None and any(v["kind"] == "shmem" for v in s.vmas):
        from .shmem import Pages
        shm = own_shm = Pages()
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for v in s.vmas:
            kind = v["kind"]
            rec = {k: v[k] for k in ("start", "end", "perms", "offset", "dev", "inode", "path", "flags")}
            rec["kind"] = kind
            rec["pages"] = []
            npages = (v["end"] - v["start"]) // PAGE
            force_mem = "r" not in v["perms"]
            keep = None
            private = v["perms"][3] == "p"
            if kind == "file":
                rec["file"] = recs[v["start"]]
            if kind == "sysvshm":
                # the segment's row (engine/sysvshm.py); its pages once, in the mapping marked "data"
                rec["sysv"] = v["sysv"]
            if kind == "shmem":
                # its data, once per object range in the dump (engine/shmem.py)
                rec["shmem_size"] = v["shmem_size"]
                runs = shm.runs(v, PAGE)
            elif kind == "sysvshm" and v["sysv"]["data"]:
                runs = [[v["start"], npages]]
            elif "dp" in v["flags"]:
                # A droppable mapping's pages may vanish (read as zeros) at
                # any moment, and its users must cope: glibc's vDSO
                # getrandom state reseeds from a zeroed page. It is the
                # one memory whose copy would be wrong: two processes (the
                # original goes on after a dump with --leave-running, or is
                # restored twice) would draw the same random bytes. The
                # kernel wipes it on fork (VM_WIPEONFORK) for that reason.
                runs = []
            elif kind == "anon" or (kind == "file" and private):
                raw = os.pread(pm, npages * 8, v["start"] // PAGE * 8)
                runs = procfs.pagemap_runs(raw, v["start"], anon_only=(kind == "file"), page=PAGE)
                if runs and not force_mem:
                    # Pages shared copy-on-write (with a parent, a child) read without
                    # pinning them, which would unshare them (engine/cow.py unpinned_runs)
                    keep = cow.unpinned_runs(raw, v["start"], kind == "file")
            else:
                runs = []
            if keep:
                four = [[a, n, 0, 0] for a, n in runs]
                rec["pages"] = sorted(dumper.add([r[:2] for r in cow.subtract(four, keep)]) +
                                      dumper.add([r[:2] for r in cow.intersect(four, keep)], force_mem=True))
            elif runs:
                rec["pages"] = dumper.add(runs, force_mem=force_mem)
            rec["pages_bytes"] = sum(r[1] for r in rec["pages"]) * PAGE
            faults.point("dump.memory", kind)
            out.append(rec)
    finally:
        os.close(pm)
        if own_shm is not None:
            own_shm.close()
    return out


def dump_fds(s: Survey, ctx: DumpContext, shared: Optional[Dict[int, list]] = None,
             point: str = "dump.fd") -> List[dict]:
    """One record per fd: a dup names its leader (the lowest fd on the same
    open file description); in a tree, an open file description an earlier
    member holds (`shared`: leader fd -> [pid, fd]) is that member's."""
    infos = [info for info, _, _ in s.fds]
    leaders = leader_map(s.pid, infos) if infos else {}
    shared = shared or {}
    out = []
    for info, kind, mod in s.fds:
        common = {"fd": info.fd, "kind": kind, "flags": info.flags, "pos": info.pos,
                  "cloexec": info.cloexec, "link": info.link}
        lead = leaders.get(info.fd, info.fd)
        if lead in shared:
            rec = {"ofd_of": shared[lead]}
        elif lead != info.fd:
            rec = {"dup_of": lead}
        else:
            faults.point(point, kind)
            rec = mod.dump(info, ctx)
            if info.owner is not None:    # its open file's owner and signal (check._check_owner), O_ASYNC or not
                rec["async"] = info.owner
            elif info.flags & O_ASYNC:
                rec["async"] = async_owner(info)
        rec.update(common)
        _restore_would_accept(rec, info)
        out.append(rec)
    return out


def _restore_would_accept(rec: dict, info) -> None:
    """Restore rejects a record holding a NUL or a path that is not plain
    (engine/imagecheck.py) - after a dump has killed the process. So a
    handler that made one fails the dump here, the target untouched: a
    dotted socket name once went through this way."""
    from . import imagecheck
    if imagecheck._any_bad(rec):
        try:
            imagecheck._explain_strings_and_paths(rec, f"fd {info.fd}")
        except Refusal as e:
            raise EngineError(f"the record of fd {info.fd} ({info.link}) would be rejected by restore: "
                              f"{e.detail}", pid=info.pid) from None


# -- entry points --------------------------------------------------------------

def _survey_frozen(pid: int, task: Task, ctx: DumpContext, proc: procfs.Proc):
    maps = None     # preflight's too: nothing is injected before it reads them
    try:
        maps = proc.maps()
        # Before the fd handlers' classify(), which may inject syscalls
        # (found already by a tree's prefetch_injected: the same frozen
        # process, the same instruction; not searched for again).
        if task.syscall_ip is None:
            task.syscall_ip = _syscall_in_vdso(task, maps)
    except Refusal:
        pass    # refused again, with the other findings, by injected_state()
    suspend = None
    status = proc.status()
    if seccomp.mode_of(status):
        try:
            seccomp.suspend(task)       # before anything is injected
        except Refusal as r:
            suspend = r
    s = preflight(pid, ctx, proc, maps, status)
    if suspend is not None:
        s.refuse("seccomp", "credentials", suspend)
        return s, None, {}
    state = None
    try:
        state = process_state(task, s, ctx)
        s.ok("registers", "cpu", task.arch.describe_cpu_state(task.orig_regs, task.get_xstate()))
        s.ok("signals", "signals", f"mask {state['sigmask']:#x}, {sum(1 for a in state['sigactions'].values() if a[0])} handlers")
        s.ok("process attributes", "process", procattrs.describe(state["attrs"]))
        s.ok("memory policy", "memory", mempolicy.describe(state["mempolicy"]))
        s.ok("membarrier", "memory", membarrier.describe(state["membarrier"]))
        aborted = getattr(task, "rseq_aborted", None)
        s.ok("rseq", "process", ("registered" if state["rseq"]["pointer"] else "none") + (
             f"; the critical section the freeze interrupted continues at its abort handler {aborted:#x}, "
             "as after any preemption" if aborted is not None else ""))
        s.ok("sigaltstack", "signals", "disabled" if state["sigaltstack"][1] & 2 else
             f"{state['sigaltstack'][2]} bytes at {state['sigaltstack'][0]:#x}")
        armed = [w for w, t in zip(("real", "virtual", "prof"), state["itimers"]) if any(t)]
        s.ok("interval timers", "timers", ", ".join(armed) or "none armed")
        s.ok("mm fields", "memory", f"brk {state['brk']:#x} (start {state['mm']['start_brk']:#x}), "
             f"{len(state['auxv']) // 2} auxv entries")
        s.ok("rlimits", "process", f"{len(state['rlimits'])} limits")
        s.ok("umask/comm/personality", "process",
             f"umask {state['umask']:03o}, comm {state['comm']!r}, personality {state['personality']:#x}")
        s.ok("tid address / robust list", "process",
             f"{state['tid_address']:#x} / {state['robust_list'][0]:#x}")
        # what the restore would refuse of it from ckpt's own state (its nice,
        # oom_score_adj, capabilities), judged here too: not after the kill
        for r in sched.validate(state["sched"]) or [None]:
            if r is None:
                s.ok("scheduling", "process", sched.describe(state["sched"]))
            else:
                s.refuse("scheduling", "process", r)
        s.ok("posix timers", "timers", posixtimers.describe(state["posix_timers"]))
        s.ok("seccomp", "credentials", seccomp.describe(state["seccomp"]))
    except Refusal as r:
        s.refuse("process state", "process", r)
    _survey_signals_and_restart(s, task, state)
    trecs = threads.survey(s, task, ctx.threads, state)
    if state is not None:
        state["threads"] = trecs
    if task.job_stop:
        from . import jobstop
        jobstop.survey(s, task, ctx, ctx.threads, state)
        if state is not None:
            state["job_stop"] = task.job_stop
    recs = map_records(s, ctx)
    return s, state, recs


def _survey_signals_and_restart(s: Survey, task: Task, state) -> None:
    if task.restart_problem:
        s.refuse("interrupted syscall", "process", Refusal("unsupported-state", task.restart_problem))
    try:
        sigs = signals.collect(task)
    except (libc.SysError, OSError) as e:
        s.refuse("pending signals", "signals", Refusal("unsupported-state", f"pending signals unreadable: {e}"))
        return
    why = signals.problem(sigs, (state or {}).get("posix_timers")) or _handler_problem(task, state, sigs)
    if why:
        s.refuse("pending signals", "signals", Refusal("unsupported-state", why))
    else:
        s.ok("pending signals", "signals", signals.describe(sigs))


def _handler_problem(task: Task, state, sigs: dict):
    """aarch64 only: registers already rewound onto an interrupted call
    (arch rewound_call) no longer say whether a handler must make it fail
    with EINTR; x86_64 leaves that choice to the kernel at restore. A
    signal pending at the end of the freeze was taken then (Task.settle):
    this is one that arrived afterwards."""
    rewound = getattr(task.arch, "rewound_call", None)
    if state is None or rewound is None or not rewound(task):
        return None
    hit = signals.handled_on_resume(sigs, state["sigmask"], state["sigactions"])
    if hit:
        return (f"signal {hit[0]} with a handler arrived while the frozen process was being read, over an "
                "interrupted system call: whether the call must then fail with EINTR is lost on this architecture")
    return None


def pending_signals(task: Task, state: dict) -> dict:
    """The pending signals as late as possible before the image is
    committed (what arrives after that dies with the original, as for any
    process that is killed). Raises Refusal, SysError."""
    sigs = signals.collect(task)
    why = signals.problem(sigs, state.get("posix_timers")) or _handler_problem(task, state, sigs)
    if why:
        raise Refusal("unsupported-state", why, pid=task.pid)
    return sigs


def _on_release(ctx: DumpContext, killed: bool) -> None:
    """Run what fd handlers left to undo once the target is killed or let
    go (ctx.shared["_on_release"]: callables taking `killed`), each once,
    last registered first: e.g. a TCP socket held in repair mode, and the
    network lock around it (kept when the original is killed). Raises
    EngineError, after running them all, when a let-go target could not be
    put back as it was."""
    first = None
    for hook in reversed(ctx.shared.pop("_on_release", [])):
        try:
            hook(killed)
        except OSError as e:
            first = first or e
    if first is not None and not killed:
        raise EngineError(f"putting the target's sockets back after the dump: {first}", errno=first.errno)


def dump(pid: int, directory: str, options: Options) -> dict:
    """Checkpoint `pid` (and, when it has children, its tree: engine/tree.py)
    into `directory`; see _dump_one. A child forked while a single process
    was being frozen makes it a tree: it is dumped again as one."""
    procfs.forget_self()
    if options.leave_running:
        from .guard import ckpt_pid
        pidns.check_not_init(ckpt_pid(), "leaves running")
    try:
        return _dump_one(pid, directory, options)
    except (Refusal, Refusals) as e:
        if _became_tree(pid, e.refusals if isinstance(e, Refusals) else [e]):
            from . import tree
            return tree.dump(pid, directory, options)
        raise


def _became_tree(pid: int, refusals) -> bool:
    return bool(refusals) and all(r.reason == "process-tree" for r in refusals) and threads.has_children(pid)


def _dump_one(pid: int, directory: str, options: Options) -> dict:
    """Checkpoint `pid` into `directory`. Returns {pid, image, pages_bytes,
    mappings, fds, frozen_ms, durable_ms, total_ms, left_running}. Raises Refusal /
    Refusals (target resumed untouched, no image left), UsageError (bad
    pid/dir), EngineError."""
    t0 = time.monotonic()
    require_features()
    arch = current_arch()
    proc = target_checks(pid)
    if threads.has_children(pid):
        from . import tree      # a tree's only: its import is a small process's cost
        return tree.dump(pid, directory, options)
    with ImageWriter(directory) as img:
        ctx = DumpContext(pid=pid, options=options, image=img, boot_id=boot_id())
        tasks = threads.freeze(pid)
        task = tasks[0]
        ctx.task, ctx.threads = task, tasks[1:]
        t_frozen = time.monotonic()
        dumper = PageDumper(pid, img)
        try:
            faults.point("dump.frozen")
            s, state, recs = _survey_frozen(pid, task, ctx, proc)
            if s.refusals:
                raise s.refusals[0] if len(s.refusals) == 1 else Refusals(s.refusals)
            faults.point("dump.surveyed")
            xstate = task.get_xstate()
            # its size too: restore checks xstate.bin against it before any process exists
            state["xstate"] = dict(arch.xstate_features(xstate), bytes=len(xstate))
            img.write_bytes("xstate.bin", xstate)
            if ctx.threads:
                img.write_bytes(threads.XSTATE_FILE, threads.pack_xstate(ctx.threads, state["threads"]))
            state["exe"] = recs["exe"]
            fdrecs = dump_fds(s, ctx)
            vmas = dump_memory(pid, s, recs, dumper)
            dumper.run()
            img.write_json("mm.json", {"vmas": vmas, "page_files": dumper.nfiles})
            img.write_json("fds.json", fdrecs)
            # Pending signals last, once the bulk of the image is on disk: a
            # signal that arrives after this read dies with the original. A
            # process left running keeps its signals itself: it does not
            # wait for the disk (its frozen time must not pay for fsync).
            if not options.leave_running:
                img.sync_files()
            faults.point("dump.signals")
            state["signals"] = pending_signals(task, state)
            for t, rec in zip(ctx.threads, state["threads"]):
                rec["signals"] = threads.pending(t, rec, state)
            img.write_json("core.json", state)
            meta = {"pid": pid, "comm": state["comm"], "boot_id": ctx.boot_id, "pages_bytes": dumper.total,
                    "namespaces": pidns.record(), **timens.meta(s.memo.get("timens"))}
            faults.point("dump.release")
            if options.leave_running:
                # Everything is read: let it go before the fsyncs of commit.
                _on_release(ctx, killed=False)
                threads.release(tasks)
                t1 = time.monotonic()
                img.commit(meta)
                t_durable = time.monotonic()
            else:
                # Kill only once the image is safely in place.
                img.commit(meta)
                t_durable = time.monotonic()
                threads.kill(tasks)
                _on_release(ctx, killed=True)
                t1 = time.monotonic()
        except BaseException:
            dumper.close()
            try:
                _on_release(ctx, killed=False)
            finally:
                threads.release(tasks)
            raise
    return {"pid": pid, "image": img.final, "pages_bytes": dumper.total, "mappings": len(vmas),
            "threads": len(tasks), "signals_taken": sum(t.settled for t in tasks),
            "fds": len(fdrecs), "frozen_ms": round((t1 - t_frozen) * 1000, 2),
            # from the start until the committed image is on stable storage
            "durable_ms": round((t_durable - t0) * 1000, 2),
            "total_ms": round((time.monotonic() - t0) * 1000, 2), "left_running": bool(options.leave_running)}


def check(pid: int, options: Options, tree_ok: bool = True) -> dict:
    """Dry run: every fd and every piece of state with its verdict. Writes
    nothing; the target is left running exactly as before. With children,
    the whole tree (engine/tree.py) unless `tree_ok` is False (ckpt survey:
    one process frozen at a time; the children are then `process-tree`)."""
    procfs.forget_self()
    require_features()
    current_arch()
    proc = target_checks(pid)
    if tree_ok and threads.has_children(pid):
        from . import tree
        return tree.check(pid, options)
    res = _check_one(pid, proc, options)
    if tree_ok and not res["ok"] and _became_tree(pid, [Refusal(r["reason"]) for r in res["refusals"]]):
        from . import tree
        return tree.check(pid, options)     # a child was forked during the freeze
    return res


def _check_one(pid: int, proc, options: Options) -> dict:
    ctx = DumpContext(pid=pid, options=options, image=None, boot_id=boot_id())
    tasks = threads.freeze(pid)
    task = tasks[0]
    ctx.task, ctx.threads = task, tasks[1:]
    try:
        s, _, _ = _survey_frozen(pid, task, ctx, proc)
    finally:
        threads.release(tasks)
    return {"pid": pid, "ok": not s.refusals, "items": s.items,
            "refusals": [r.as_dict() for r in s.refusals]}

