"""Rebuild a process from a verified image (runs in the forked restorer).

The new process starts as a clone3(set_tid=[pid]) copy of the restorer that
stopped itself (see arch CLONE3_TRAMPOLINE). Everything else is done by
injecting syscalls into it (ENGINE-NOTES "Restore"), in this order:

  gadget area in a hole of the dumped layout: a page with `syscall; int3`
  and the stages' scratch, then (x86_64) the batch runner and its table
  rseq unregistered (else unmapping its area kills the task; the same batch)
  everything but the gadget and the vdso block unmapped
  vdso block moved to the dumped address (mremap)
  PR_SET_MM_MAP: mm fields, auxv, exe (EBUSY while the old exe is mapped)
  every mapping mmap'ed (files through the fds the restorer opened), pages
  written with process_vm_writev, madvise flags, final mprotect
  cwd, umask, comm, personality, signals, sigaltstack, timers, tid address,
  robust list, session; the other threads cloned with their TIDs and their
  own state (engine/threads.py); fds dup3'ed to their numbers, all others closed;
  fd handlers' finish(); rlimits; POSIX timers created; seccomp installed
  (suspended for the tracer); credentials; rseq registered; scheduling,
  affinity, oom_score_adj, timer slack; POSIX timers armed (signals blocked)
  munmap(gadget), and at its syscall-exit stop: xstate and the registers
  PTRACE_DETACH.
Calls that need no decision in between are queued in Builder.pending and
run as one batch inside the process (engine/batch.py; Builder.call runs
what is queued first): the unmaps; the vdso moves, PR_SET_MM_MAP, mmaps and
names; the madvise/mprotect calls with process_state's; the fd installs;
each thread's own settings.
"""

from __future__ import annotations

import os
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from . import cgroups, creds, faults, fsroot, pdeath, libc, membarrier, mempolicy, posixtimers, procattrs, procfs, ptrace, sched, seccomp, signals, threads, vdsoblock
from .arch import current as current_arch
from .batch import Batch, Data
from .gadget import HANDLER_SCRATCH, _free_gap, _maps, clone_with_pid, gadget_size, place_gadget  # noqa: F401
from .check import MADVISE_FLAGS
from .errors import EngineError, Refusal
from .fds import handler as fd_handler
from .fds._util import restore_async
from .libc import SysError
from .task import Task

PAGE = 4096
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_DROPPABLE = 0x08     # a mapping type like MAP_PRIVATE (Linux 6.11, uapi mman-common.h)
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x100000
PROT = {"r": 1, "w": 2, "x": 4}
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PR_SET_NAME, PR_SET_MM, PR_SET_MM_MAP, PR_SET_NO_NEW_PRIVS = 15, 35, 14, 38
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0
RSEQ_FLAG_UNREGISTER = 1
SS_ONSTACK, SS_DISABLE = 1, 2
VDSO_NAMES = ("[vvar]", "[vvar_vclock]", "[vdso]")


def _vdso_maps(pid: int) -> List[dict]:
    """The [vvar]/[vdso] entries of /proc/PID/maps (parse_maps of just those
    lines: the new process is still a copy of the restorer, ~150 lines of
    maps, and each parsed line costs under TCG)."""
    from .procfs import parse_maps
    with open(f"/proc/{pid}/maps") as f:
        lines = [ln for ln in f.read().splitlines() if ln.endswith(VDSO_NAMES)]
    return [v for v in parse_maps("\n".join(lines)) if v["path"] in VDSO_NAMES]
PARALLEL_MIN = 32 << 20   # bytes of pages worth splitting between two writer threads
TEST_FAIL_ENV = "CKPT_TEST_FAIL_AT"   # honoured only when tests set it (see _maybe_fail)


def _maybe_fail(stage: str) -> None:
    """Test hook: simulate a failure after the process exists, to prove it
    is killed and nothing is left behind."""
    if os.environ.get(TEST_FAIL_ENV) == stage:
        raise EngineError(f"failure injected at stage {stage!r} ({TEST_FAIL_ENV})")


def prot_of(perms: str) -> int:
    return sum(PROT[c] for c in perms[:3] if c in PROT)


class Builder:
    """Rebuilds one process by syscall injection. Each stage raises
    SysError/EngineError (or Refusal); build() kills the process then."""

    VDSO_NAMES = VDSO_NAMES

    def __init__(self, job, task: Task):
        self.job = job
        self.task = task
        self.arch = task.arch
        self.pid = task.pid
        self.gadget = 0
        self.gadget_size = PAGE
        self.scratch = 0
        self.batch_blob = 0     # the batch runner (engine/batch.py), 0: none
        self.batch_area = 0     # its table
        self.batch_size = 0
        self.pending = Batch(self)      # calls of the current stages, run by flush()
        self.signals_queued = False     # the image's pending signals are queued (batch.trap_safe)
        self.page_bytes = 0             # written by map_steps
        self.timerslack: Optional[int] = None   # its current slack when known (set_timerslack)
        self.threads: List["Builder"] = []   # the other threads' builders (engine/threads.py)
        # The process's sigaction table as it is now, when known (a clone of
        # the restorer made with CLONE_CLEAR_SIGHAND: signals.cleared_actions()).
        self.inherited_actions: Optional[dict] = None
        # Its [vvar]/[vdso] blocks as place_gadget read them, until move_vdso
        # queues their move (None: unknown, read /proc/PID/maps).
        self.vdso_now: Optional[List[dict]] = None
        self.session_done = False
        self.seccomp_done = False       # its filters installed with its threads (engine/threads.py create)
        # A tree member created with CLONE_FILES / CLONE_FS (engine/tree_restore.py):
        # its fd table / cwd and umask are its parent's, restored once, there.
        self.files_shared = False
        self.fs_shared = False
        # Mappings a tree member has in place before its build stages
        # (their starts), and the page bytes written into them (engine/cow.py).
        self.in_place: set = set()
        self.page_bytes_early = 0
        self.cgroups_now = None     # its cgroups when not ckpt's (cgroups.enter)

    # -- helpers ---------------------------------------------------------------
    def call(self, name: str, *args: int) -> int:
        """One call injected now, after the calls still queued."""
        if self.pending:
            self.flush()
        return self.task.call(name, *args)

    def set_timerslack(self, ns: int) -> None:
        """Before it clones a thread or forks a member: the new task's
        default slack is its creator's current one (kernel/fork.c); not
        set again when it already holds it."""
        if ns != self.timerslack:
            self.call("prctl", sched.PR_SET_TIMERSLACK, ns, 0, 0, 0)
            self.timerslack = ns

    def flush(self) -> list:
        """Run the calls queued in self.pending (engine/batch.py)."""
        return self.pending.run()

    def use_gadget(self, addr: int, size: int) -> None:
        """The gadget area at `addr` (mapped by place_gadget, in this
        process or the one it was forked/cloned from)."""
        self.gadget, self.gadget_size = addr, size
        self.scratch = addr + 64
        # The page's upper half is the fd handlers' scratch (finish()).
        self.task.scratch = addr + HANDLER_SCRATCH
        self.task.syscall_ip = addr
        if size > PAGE:
            self.batch_blob = addr + PAGE
            self.batch_area = addr + PAGE + 64
            self.batch_size = size - PAGE - 64

    def put(self, data: bytes, off: int = 0) -> int:
        """Copy `data` into the gadget page's scratch area; returns its address.
        Queued calls that point into the scratch run first."""
        if off + len(data) > HANDLER_SCRATCH - 64:
            raise EngineError("scratch overflow", pid=self.pid)
        if self.pending.uses_scratch:
            self.flush()
        self.task.write_mem(self.scratch + off, data)
        return self.scratch + off

    # -- stages ------------------------------------------------------------------
    def make_gadget(self) -> None:
        place_gadget(self, [(v["start"], v["end"]) for v in self.job.vmas])

    def unregister_rseq(self) -> None:
        # The clone inherited the restorer's rseq registration (kernel/fork.c
        # rseq_fork); once its area is unmapped, the next return to user
        # space would fail rseq_update_cpu_node_id() and SIGSEGV the task.
        # Queued: the first call of the batch that unmaps it.
        conf = ptrace.get_rseq(self.pid)
        if conf["pointer"]:
            self.pending.add("rseq", conf["pointer"], conf["size"], RSEQ_FLAG_UNREGISTER, conf["signature"])

    def clear_address_space(self) -> None:
        """Queued (a single process: one batch with the vdso moves and the
        mmaps; a tree's root runs it before it forks)."""
        keep = [(self.gadget, self.gadget + self.gadget_size)]
        keep += [(v["start"], v["end"]) for v in self._vdso()]
        addr = 0
        for s, e in sorted(keep) + [(self.arch.TASK_SIZE, self.arch.TASK_SIZE)]:
            if s > addr:
                self.pending.add("munmap", addr, s - addr)
            addr = max(addr, e)

    def _vdso(self) -> List[dict]:
        if self.vdso_now is None:
            self.vdso_now = _vdso_maps(self.pid)
        return self.vdso_now

    def move_vdso(self) -> None:
        # glibc cached vdso function addresses in the dumped memory: the vdso
        # must sit where it was. mremap of [vdso] is supported (it updates
        # mm->context.vdso: arch/x86/entry/vdso/vma.c vdso_mremap).
        # Pieces it had unmapped (valgrind drops the [vdso], zdtm vdso02
        # all) are unmapped, the rest moved as one block (engine/vdsoblock.py).
        now = self._vdso()
        self.vdso_now = None    # moved (or unmapped) by what is queued below
        want = vdsoblock.block(self.job.vmas)
        why = vdsoblock.misfit(want, now)
        if why:
            raise Refusal("unsupported-mapping", why, pid=self.pid)
        keep = {v["path"] for v in want}
        for v in now:
            if v["path"] not in keep:
                self.pending.add("munmap", v["start"], v["end"] - v["start"])
        now = [v for v in now if v["path"] in keep]
        if not want:
            return
        if now[0]["start"] == want[0]["start"]:
            return
        lo, hi = now[0]["start"], now[-1]["end"]
        wlo, whi = want[0]["start"], want[-1]["end"]
        if lo < whi and wlo < hi:
            # Overlapping move: park the block in a free spot first.
            busy = [(v["start"], v["end"]) for v in self.job.vmas] + [(lo, hi), (self.gadget, self.gadget + self.gadget_size)]
            tmp = _free_gap(busy, hi - lo)
            self._mremap_block(now, tmp - lo)
            self.flush()
            now = _vdso_maps(self.pid)
            lo = now[0]["start"]
        self._mremap_block(now, wlo - lo)

    def _mremap_block(self, vmas: List[dict], delta: int) -> None:
        for v in vmas:
            size = v["end"] - v["start"]
            self.pending.add("mremap", v["start"], size, size, MREMAP_MAYMOVE | MREMAP_FIXED, v["start"] + delta)

    def set_mm(self) -> None:
        # prctl(PR_SET_MM, PR_SET_MM_MAP) (kernel/sys.c prctl_set_mm_map):
        # code/data/brk/stack/arg/env boundaries, saved auxv and the exe
        # file, all at once. Replacing the exe fails with EBUSY while the old
        # one is still mapped, hence after clear_address_space().
        core = self.job.core
        m = core["mm"]
        auxv = struct.pack(f"<{len(core['auxv'])}Q", *core["auxv"])
        aux_addr = self.put(auxv, 256)
        exe = self.job.prepared.exe_fd
        st = struct.pack("<11QQII", m["start_code"], m["end_code"], m["start_data"], m["end_data"],
                         m["start_brk"], m["brk"], m["start_stack"], m["arg_start"], m["arg_end"],
                         m["env_start"], m["env_end"], aux_addr, len(auxv), exe)
        # Queued (the vdso moves and mappings go in the same batch): the
        # struct and auxv stay in the scratch until the batch ran.
        addr = self.put(st, 0)
        self.pending.add("prctl", PR_SET_MM, PR_SET_MM_MAP, addr, len(st), 0)
        self.pending.uses_scratch = True

    def mmap_args(self, v: dict) -> tuple:
        """(flags, prot, final, force, fd, offset) of mapping v's mmap: prot
        is what it is mapped with, final what mprotect gives it once its
        pages are in (force: they go in through /proc/PID/mem)."""
        from .files import map_writable
        from .restore import map_key
        kind = v["kind"]
        final = prot_of(v["perms"])
        shared = v["perms"][3] == "s"
        flags = MAP_FIXED_NOREPLACE | (MAP_SHARED if shared else MAP_PRIVATE)
        if "dp" in v["flags"]:
            flags = MAP_FIXED_NOREPLACE | MAP_DROPPABLE   # implies nr, dd, wf (mm/mmap.c do_mmap)
        if "gd" in v["flags"]:
            flags |= MAP_GROWSDOWN
        if "nr" in v["flags"]:
            flags |= MAP_NORESERVE
        fd, off = -1, 0
        # Writable first (pages go in with process_vm_writev, then the
        # final mprotect), but only where the original was accounted
        # (VmFlags "ac": it was writable once; mprotect keeps VM_ACCOUNT):
        # mapping a never-writable VMA writable would add VM_ACCOUNT and
        # let it merge with a neighbour the original was kept apart from
        # (mm/vma.c is_mergeable_vma compares vm_flags). Those get their
        # final protection at once, and pages through /proc/PID/mem.
        force = False
        prot = 3
        if kind == "file":
            fd = self.job.prepared.map_fd[map_key(v["file"], map_writable(v))]
            off = v["offset"]
            if shared:
                prot = final
        else:
            flags |= MAP_ANONYMOUS
        if not shared and "ac" not in v["flags"]:
            prot, force = final, True
        return flags, prot, final, force, fd, off

    def map_all(self) -> int:
        """mmap every dumped mapping at its address; returns page bytes written."""
        for _ in self.map_steps():
            self.flush()
        return self.page_bytes

    def map_steps(self):
        """map_all in steps (a generator: each yield leaves calls queued for
        the caller to run, engine/batch.py): the mmaps and names of every
        mapping, after the calls queued before (vdso moves, PR_SET_MM_MAP);
        then the memory shared with an earlier member of a tree (its owner's
        mapping exists by then), the pages, and madvise and the final
        mprotect queued (process_state's calls join them). A mapping in
        place already (in_place: a tree member's, engine/cow.py) is neither
        mapped nor written again; its name, madvise and mprotect follow."""
        total = self.page_bytes_early
        later = []      # (mapping, force, prot, final)
        shared_later = []
        apart = kept_apart(self.job.vmas, self.in_place)
        ends_in_place = {e for v in self.job.vmas if v["start"] in self.in_place for e in (v["start"], v["end"])}
        # Shared anonymous memory in parts (split, a part unmapped, mapped
        # twice): one object made at its size, each part mapped from it
        # once the other mappings exist (engine/shmem.py). Until then a
        # placeholder holds each part's place.
        parts = []
        if any(v["kind"] == "shmem" for v in self.job.vmas):
            from . import shmem
            parts = [vs for vs in shmem.objects(v for v in self.job.vmas if not v.get("tree_shared")).values()
                     if not shmem.whole(vs)]
        placeheld = {v["start"] for vs in parts for v in vs}
        for v in self.job.vmas:
            kind = v["kind"]
            if kind == "special":
                continue
            faults.point("restore.map", kind)
            start, size = v["start"], v["end"] - v["start"]
            flags, prot, final, force, fd, off = self.mmap_args(v)
            if start in placeheld:
                self.pending.add("mmap", start, size, 0, MAP_FIXED_NOREPLACE | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
                                 expect=(start, f"mapping {start:#x} landed at {{got:#x}}"))
                later.append((v, force, prot, final))
                continue
            if kind == "sysvshm":
                # A System V segment, made (or found intact) by ckpt with its
                # pages before the process (engine/sysvshm.py): attached by id.
                from .sysvshm import attach_call
                nr, args, prot = attach_call(self.arch, v)
                self.pending.add("shmat", *args, nr=nr, expect=(start, f"System V segment {args[0]} attached at "
                                                                    f"{{got:#x}}, not {start:#x}"))
                later.append((v, False, prot, final))
                continue
            if v.get("tree_shared"):
                # Memory shared with another member of a process tree, built
                # before this one: the same object (engine/tree_restore.py).
                shared_later.append((v, flags & ~MAP_ANONYMOUS))
                continue
            if start not in self.in_place:
                # beside a mapping in place (its anon_vma made already), a
                # mapping set apart is made inaccessible first: mapped alike,
                # it would merge into that one at once and share its anon_vma
                lone = start in apart and bool({start, v["end"]} & ends_in_place)
                self.pending.add("mmap", start, size, 0 if lone else prot, flags, fd, off,
                                 expect=(start, f"mapping {start:#x} landed at {{got:#x}}"))
                if start in apart:
                    self.pending.add("madvise", start, size, apart[start][0])
                if lone:
                    self.pending.add("mprotect", start, size, prot)
            self._name(v)
            later.append((v, force, prot, final))
        yield
        for vs in parts:
            self._map_parts(vs)
        # A step of its own: a tree's members run each step side by side,
        # so every member's parts exist before any member maps them from
        # its owner (map_shared below), whatever order they are built in.
        yield
        bare = []
        for v in bare_apart(self.job.vmas, apart, self.in_place):
            # its anon_vma: one page written as it reads, dropped below (a
            # file page past the file's end reads as nothing: left as it is)
            try:
                self.task.write_mem(v["start"], self.task.read_mem(v["start"], PAGE))
            except (OSError, EngineError):
                continue
            bare.append(v)
        if shared_later:
            from .tree_restore import map_shared     # a tree's only (its import costs a restore ~25 ms under TCG)
            for v, flags in shared_later:
                total += map_shared(self, v, flags)
                if v["pages"]:
                    # a part of the object no earlier member's mapping carried
                    total += self._write_pages(v["pages"], False)
                    self.call("mprotect", v["start"], v["end"] - v["start"], prot_of(v["perms"]))
        writes = [(v, force) for v, force, _, _ in later
                  if v["pages"] and v["start"] not in self.in_place and v["kind"] != "sysvshm"]
        from .uffdfill import AnonFill     # private anonymous memory by UFFDIO_COPY, when worth it
        fill = AnonFill.open(self, [v for v, force in writes if not force])
        leftover = []
        try:
            for v, force in writes:
                mine = fill is not None and not force and fill.covers(v["start"], v["end"] - v["start"])
                total += self._write_pages(v["pages"], force, fill if mine else None)
        finally:
            if fill is not None:
                leftover = fill.close()
        if leftover:
            total += self.job.pages.write_runs(self.pid, leftover)
        for v in bare:
            self.pending.add("madvise", v["start"], PAGE, MADV_DONTNEED)
        for v, force, prot, final in later:
            start, size = v["start"], v["end"] - v["start"]
            if start in apart:
                self.pending.add("madvise", start, size, apart[start][1])
            for f in v["flags"]:
                if f in MADVISE_FLAGS:
                    self.pending.add("madvise", start, size, MADVISE_FLAGS[f])
            if prot != final:
                self.pending.add("mprotect", start, size, final)
        self.page_bytes = total

    def _name(self, v: dict) -> None:
        """The name a mapping was given (PR_SET_VMA_ANON_NAME: "[anon:NAME]",
        on shared anonymous memory "[anon_shmem:NAME]"), queued."""
        for prefix in ("[anon:", "[anon_shmem:"):
            if v["path"].startswith(prefix):
                name = v["path"][len(prefix):-1].encode() + b"\0"
                self.pending.add("prctl", PR_SET_VMA, PR_SET_VMA_ANON_NAME, v["start"], v["end"] - v["start"],
                                 Data(name))

    def _map_parts(self, vs: list) -> None:
        """One shared anonymous object (made by mmap at its size, wherever
        the kernel finds room: every other mapping and each part's
        placeholder are in place), each part moved over its placeholder by
        mremap(old_size 0): a second mapping of the same pages at the part's
        offset, made as the original's was (the object's own vm_ops, not a
        file mapping's). The object's own mapping goes."""
        size = vs[0]["shmem_size"]
        tmp = self.call("mmap", 0, size, 3, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        try:
            for v in vs:
                start, n = v["start"], v["end"] - v["start"]
                got = self.call("mremap", tmp + v["offset"], 0, n, MREMAP_MAYMOVE | MREMAP_FIXED, start)
                if got != start:
                    raise EngineError(f"shared memory part {start:#x} landed at {got:#x}", pid=self.pid)
                self._name(v)
        finally:
            self.call("munmap", tmp, size)

    def _write_pages(self, runs: list, force: bool, fill=None) -> int:
        """Pages into the new process (`fill`: by UFFDIO_COPY, engine/uffdfill.py).
        Large regions are split between two threads: most of the cost is
        the kernel allocating (and for process_vm_writev zeroing) the new
        pages, which then happens on two CPUs (both run without the GIL)."""
        pages = self.job.pages
        if force:
            return pages.write_runs(self.pid, runs, self.task.mem_fd())
        nbytes = sum(r[1] for r in runs) * PAGE
        if nbytes < PARALLEL_MIN or len(runs) < 2:
            return pages.write_runs(self.pid, runs, fill=fill)
        half, acc = len(runs), 0
        for i, r in enumerate(runs):
            acc += r[1] * PAGE
            if acc >= nbytes // 2:
                half = i + 1
                break
        # engine/parallel.py, not concurrent.futures: its import (logging...)
        # cost a restore ~7-14 ms
        from . import parallel
        from .placement import spread
        parts = [part for part in (runs[:half], runs[half:]) if part]
        got = [0] * len(parts)

        def job(i: int, _) -> None:
            got[i] = pages.write_runs(self.pid, parts[i], None, fill)
        with spread():
            parallel.run(len(parts), job, 2)
        return sum(got)

    def process_state(self) -> None:
        """Queued (one batch with map_all's madvise/mprotect calls,
        engine/batch.py); the caller runs them, then sets the mask."""
        core = self.job.core
        q = self.pending.add
        if not self.fs_shared:
            q("fchdir", self.job.prepared.cwd_fd)
            q("umask", core["umask"])
        q("personality", core["personality"])
        q("prctl", PR_SET_NAME, Data(core["comm"].encode()[:15] + b"\0"), 0, 0, 0)
        self.set_sigactions(core["sigactions"])
        sp, ssflags, size = core["sigaltstack"]
        if ssflags & SS_DISABLE:
            sp, ssflags, size = 0, SS_DISABLE, 0
        q("sigaltstack", Data(struct.pack("<Qi4xQ", sp, ssflags & ~SS_ONSTACK, size)), 0)
        for which, t in enumerate(core["itimers"]):
            if any(t):
                q("setitimer", which, Data(struct.pack("<qqqq", *t)), 0)
        procattrs.queue(self, core["attrs"])
        mempolicy.queue(self, core["mempolicy"])
        membarrier.queue(self, core["membarrier"])
        q("set_tid_address", core["tid_address"])
        head, length = core["robust_list"]
        if head:
            q("set_robust_list", head, length)
        if not self.session_done:   # a tree member's was set when it was created (engine/tree_restore.py)
            sess = core["session"]
            if sess["sid"] == self.pid:
                q("setsid")
            elif sess["pgid"] == self.pid:
                q("setpgid", 0, 0)
            elif sess["pgid"] == 0:
                pass        # the kernel's group, inherited from the restorer (engine/sessionids.py)
            else:
                q("setpgid", 0, sess["pgid"])

    def set_sigactions(self, acts: dict) -> None:
        """Only the actions that differ from what the process holds now
        (`inherited_actions`: the restorer's table as the clone cleared it;
        None: unknown, set them all). Setting an action to the value it
        already has changes nothing (no pending signal exists yet to be
        discarded), so a C program's restore injects a handful of
        rt_sigaction calls instead of 62."""
        have = self.inherited_actions
        for sig, act in sorted(acts.items(), key=lambda x: int(x[0])):
            if have is not None and have.get(sig) == list(act):
                continue
            handler, flags, restorer, mask = act
            # Queued: a SIGTRAP action other than the default ends batching
            # for this process (batch.trap_safe), this batch included.
            self.pending.add("rt_sigaction", int(sig), Data(struct.pack("<QQQQ", handler, flags, restorer, mask)), 0, 8)
            if have is not None:
                have[sig] = list(act)

    def install_fds(self) -> None:
        self.queue_fds()
        self.flush()
        self.finish_fds()

    def queue_fds(self) -> None:
        """install_fds' dup3 and close_range calls, queued."""
        if self.files_shared:
            return      # the table is its parent's, installed by the first member holding it
        prep = self.job.prepared
        keep = set()
        for rec in self.job.fdrecs:
            flags = os.O_CLOEXEC if rec["cloexec"] else 0
            self.pending.add("dup3", prep.fd_of_rec[rec["fd"]], rec["fd"], flags)
            keep.add(rec["fd"])
        lo = 0
        for fd in sorted(keep) + [1 << 32]:
            if fd > lo:
                self.pending.add("close_range", lo, min(fd - 1, 0xFFFFFFFF), 0)
            lo = fd + 1

    def finish_fds(self) -> None:
        """Once the fds are in place: each handler's finish(), O_ASYNC owners."""
        if self.files_shared:
            return
        recs = [r for r in self.job.fdrecs if "dup_of" not in r and "ofd_of" not in r]
        # A kind whose finish puts the file itself in place (a live
        # process's pidfd) goes first: another's finish (an epoll instance
        # registering its targets) must find the real file at that number.
        recs.sort(key=lambda r: not getattr(fd_handler(r["kind"]), "FINISH_FIRST", False))
        for rec in recs:
            mod = fd_handler(rec["kind"])
            fin = getattr(mod, "finish", None)
            if fin is not None:
                faults.point("restore.fd_finish", rec["kind"])
                fin(rec, self.job.ctx, self.task)
            if rec.get("async"):
                try:
                    restore_async(rec, self.pid)
                except OSError as e:
                    raise EngineError(f"pid {self.pid} fd {rec['fd']}: restoring its O_ASYNC owner: "
                                      f"{e.strerror or e}", pid=self.pid, errno=e.errno) from e

    def creds(self) -> None:
        """no_new_privs queued (the caller runs it, engine/batch.py); other
        credentials than ckpt's by creds.apply (calls made in turn, the
        queue first), then read back."""
        core = self.job.core
        if core["creds"].get("no_new_privs") == "1":
            self.pending.add("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if core.get("_creds_plan") in (None, "same"):
            return
        creds.apply(self)
        creds.verify(self.pid, core["creds"])

    def limits(self) -> None:
        """Only the limits the process does not hold already, read in one
        /proc/PID/limits (as the dump reads them) instead of 16 prlimit
        calls; where that file cannot be parsed, one prlimit each."""
        try:
            have = [tuple(x) for x in procfs.parse_limits(procfs.read_all(f"/proc/{self.pid}/limits").decode())]
        except (OSError, ValueError):
            have = []
        for i, (cur, mx) in enumerate(self.job.core["rlimits"]):
            if (have[i] if i < len(have) else libc.get_rlimit(self.pid, i)) != (cur, mx):
                libc.set_rlimit(self.pid, i, cur, mx)

    def register_rseq(self) -> None:
        """Queued."""
        core = self.job.core
        r = core["rseq"]
        if r["pointer"]:
            self.pending.add("rseq", r["pointer"], r["size"], 0, r["signature"])

    def finish(self) -> None:
        """Unmap the gadget; at that syscall's exit stop, install the dumped
        xstate and registers; detach."""
        if self.job.core.get("job_stop"):
            # Stopped by job control: stopped again by the same signal
            # while the gadget is still there (engine/jobstop.py).
            from . import jobstop
            jobstop.stop_again(self)
        self.call("munmap", self.gadget, self.gadget_size)
        self.let_go()

    def let_go(self) -> None:
        """finish() once the gadget is unmapped (a tree unmaps every
        member's side by side, engine/tree_restore.py)."""
        regs = self.arch.Regs.from_dict(self.job.core["regs"])
        self.arch.normalise_restart(regs)
        # The dumped mask only now (blocked since posixtimers.arm() and
        # pending_signals()): a timer that fired meanwhile is pending with
        # its own siginfo; what the mask leaves unblocked is delivered as
        # the process resumes. (Set once: it was set again after the xstate,
        # one ptrace request per process for nothing.)
        ptrace.set_sigmask(self.pid, self.job.core["sigmask"])
        try:
            self.task.set_xstate(self.job.xstate)
        except (SysError, ValueError) as e:
            raise Refusal("cpu-mismatch", f"this CPU rejects the saved xstate ({getattr(e, 'message', e)})", pid=self.pid) from None
        faults.point("restore.phase", "registers")
        threads.finish(self)    # the other threads go first, the leader right after
        faults.point("restore.phase", "release")
        self.task.sud = self.job.core.get("sud")    # syscall user dispatch: after every injected call
        self.task.release(regs)

    def pending_signals(self) -> None:
        """Queue the image's pending signals from inside the task (exact
        siginfo, engine/signals.py), with every signal blocked until finish()."""
        core = self.job.core
        self.signals_queued = True      # nothing batched from here on (batch.trap_safe)
        signals.requeue(self.task, self.put, core.get("signals") or {})
        interval, value = core["itimers"][0][:2], core["itimers"][0][2:]
        ignored = core["sigactions"].get("14", [0])[0] == 1 and not core["sigmask"] >> 13 & 1
        if any(interval) and not any(value) and not ignored:
            # (An ignored SIGALRM was dropped and its timer is dead for good.)
            self._expired_itimer(interval)

    def _expired_itimer(self, interval) -> None:
        """A periodic ITIMER_REAL that expired while the process was frozen
        with SIGALRM blocked: the kernel rearms it only when its SIGALRM is
        dequeued (posixtimer_rearm_itimer), so it was dumped as value 0,
        interval I, SIGALRM pending - and setitimer with value 0 disarms.
        Arm it for 1 us instead and let it expire now, with every signal
        still blocked: the same state (its SIGALRM merges with the pending
        one, or is the pending one)."""
        ptrace.set_sigmask(self.pid, signals.ALL_BLOCKED)
        self.call("setitimer", 0, self.put(struct.pack("<qqqq", interval[0], interval[1], 0, 1)), 0)
        for _ in range(1000):
            self.call("getitimer", 0, self.scratch + 512)
            if not any(struct.unpack("<qq", self.task.read_mem(self.scratch + 512 + 16, 16))):
                return
        raise EngineError("the expired interval timer did not expire again", pid=self.pid)


MADV_DONTNEED, MADV_DONTFORK, MADV_DOFORK = 4, 10, 11


def kept_apart(vmas: List[dict], in_place=()) -> Dict[int, tuple]:
    """{start: (madvise before its pages, madvise after)} of the mappings
    the kernel would merge into the one before, though the original kept
    them apart: private mappings alike in all but their anonymous memory's
    anon_vma (a forked child's inherited mapping and one it made beside it:
    mm/vma.c merges neither a new mapping nor a change into a mapping
    cloned from a parent, nor two with different anon_vmas). Mapped one
    after the other they merged (found by the generator in warm-forked
    workloads). Each is set apart by a VM_DONTCOPY unlike its neighbour's
    while its pages go in, so each gets an anon_vma of its own, then given
    its flag back: the merge is then refused as in the original. Every
    other one of a run, so that no two neighbours are set apart alike.
    One of the two may have no pages (one the child mapped and never
    wrote): bare_apart gives it an anon_vma too. A mapping in place already
    (in_place: a tree member's, mapped before its forks or kept from its
    parent, engine/cow.py) is not mapped here: its neighbour is set apart
    instead (a parent's mapping its child shares, and one of its own it
    mapped beside it after the fork); two in place were set apart when
    they were mapped (cow.before_fork)."""
    out: Dict[int, tuple] = {}
    for i in range(1, len(vmas)):
        prev, v = vmas[i - 1], vmas[i]
        if prev["end"] != v["start"] or prev["start"] in out or not _alike(prev, v):
            continue
        if v["start"] not in in_place:
            out[v["start"]] = _toggle(v)
        elif prev["start"] not in in_place and not (
                i >= 2 and vmas[i - 2]["start"] in out and vmas[i - 2]["end"] == prev["start"]
                and _alike(vmas[i - 2], prev)):
            out[prev["start"]] = _toggle(prev)
    return out


def _toggle(v: dict) -> tuple:
    return (MADV_DOFORK, MADV_DONTFORK) if "dc" in v["flags"] else (MADV_DONTFORK, MADV_DOFORK)


def bare_apart(vmas: List[dict], apart: Dict[int, tuple], in_place=()) -> List[dict]:
    """The mappings of the pairs kept_apart keeps apart that have no pages
    to write: nothing would give them an anon_vma, and a mapping without
    one merges into a neighbour that has one (mm/vma.c
    is_mergeable_anon_vma) when its flag is given back: a forked child's
    inherited mapping and one it mapped beside it but never wrote were two
    mappings, restored as one. One page of each is written as it reads
    while it is set apart (its own anon_vma) and dropped again
    (MADV_DONTNEED: the anon_vma stays, the page goes)."""
    out: List[dict] = []
    for a, b in zip(vmas, vmas[1:]):
        if a["end"] == b["start"] and (b["start"] in apart or a["start"] in apart) and _alike(a, b):
            out += [v for v in (a, b) if not v.get("pages") and v["start"] not in in_place
                    and all(v is not x for x in out)]
    return out


def _alike(a: dict, b: dict) -> bool:
    """What the kernel's merge compares (mm/vma.c is_mergeable_vma), both
    private, one at least with pages to write (what makes an anon_vma: two
    without were apart for another reason)."""
    if a["kind"] != b["kind"] or a["kind"] not in ("anon", "file") or a["perms"] != b["perms"] or \
            a["perms"][3] != "p" or sorted(a["flags"]) != sorted(b["flags"]) or a["path"] != b["path"] or \
            not (a.get("pages") or b.get("pages")) or a.get("tree_shared") or b.get("tree_shared"):
        return False
    if a["kind"] == "file":
        return a.get("file") == b.get("file") and b["offset"] == a["offset"] + (a["end"] - a["start"])
    return True


def build(job) -> int:
    """Create and rebuild the process; returns its PID once it runs on its
    own. On any failure the new process is killed and reaped."""
    arch = current_arch()
    pid = job.core["pid"]
    sched.before_clone(job.core["sched"])   # the child's default timer slack
    inherited = signals.cleared_actions()   # what the clone starts with (CLONE_CLEAR_SIGHAND)
    child, first_ip = clone_with_pid(pid, arch)
    task = Task.adopt(child)
    task.syscall_ip = first_ip
    b = Builder(job, task)
    b.inherited_actions = inherited
    try:
        faults.point("restore.phase", "created")
        _maybe_fail("clone")
        _check_xstate(task, job.core)
        faults.point("restore.phase", "gadget")
        b.make_gadget()
        b.unregister_rseq()
        faults.point("restore.phase", "unmap")
        b.clear_address_space()
        rebuild(b)
        if any(v["kind"] == "sysvshm" for v in job.vmas):
            from .sysvshm import seal
            seal(job.vmas)      # a removed segment removed again, now that it is attached
        _maybe_fail("final")
        faults.point("restore.phase", "finish")
        b.finish()
    except BaseException:
        threads.kill([task] + [tb.task for tb in b.threads])
        raise
    return child


def rebuild(b: Builder) -> None:
    """Every stage after the address space is cleared, up to (not
    including) finish(): shared by build() and the members of a process
    tree (engine/tree_restore.py, which runs rebuild_early of every member
    before any member's rebuild_late)."""
    rebuild_early(b)
    rebuild_late(b)


def rebuild_early(b: Builder) -> None:
    """The stages that use the files the restorer opened for the process
    (exe, mappings, cwd: in its fd table above every dumped fd), up to its
    threads."""
    for _ in rebuild_early_steps(b):
        b.flush()


def rebuild_early_steps(b: Builder):
    """rebuild_early as a generator: each yield leaves b's calls queued,
    for the caller to run (a tree runs every member's side by side,
    engine/batch.py run_each)."""
    cgroups.enter(b.pid, b.job.core.get("cgroups"), b.cgroups_now)   # first: pages, threads and the affinity land in it
    faults.point("restore.phase", "vdso")
    b.move_vdso()
    faults.point("restore.phase", "mm")
    b.set_mm()
    yield from b.map_steps()
    _maybe_fail("mapped")
    faults.point("restore.phase", "process_state")
    b.process_state()
    yield
    ptrace.set_sigmask(b.pid, b.job.core["sigmask"])
    creds.audit_early(b)    # before the threads: they inherit the loginuid; only the process writes its own
    faults.point("restore.phase", "threads")
    threads.create(b)   # before creds(): clone3 set_tid needs CAP_CHECKPOINT_RESTORE
    _maybe_fail("threads")


def rebuild_late(b: Builder) -> None:
    """From the fds on: install_fds closes every fd the dump did not
    record, the restorer's opened files too (in a tree, those of every
    member sharing the table)."""
    for _ in rebuild_late_steps(b):
        b.flush()


def rebuild_late_steps(b: Builder):
    """rebuild_late as a generator (as rebuild_early_steps: a tree runs
    every member's batches side by side): the fd installs; the
    credentials, keep-caps/dumpable and rseq in one batch."""
    job, pid = b.job, b.pid
    faults.point("restore.phase", "fds")
    b.queue_fds()
    yield
    b.finish_fds()
    faults.point("restore.phase", "limits")
    b.limits()          # prlimit on another uid's process needs CAP_SYS_RESOURCE: before creds()
    faults.point("restore.phase", "posix_timers")
    posixtimers.create(b, job.core["posix_timers"])   # alarm clocks need CAP_WAKE_ALARM: before creds()
    faults.point("restore.phase", "seccomp")
    seccomp.install(b, job.core["seccomp"])   # needs CAP_SYS_ADMIN or no_new_privs: before creds()
    fsroot.enter(b)     # after every open by path in it; CAP_SYS_CHROOT: before creds()
    faults.point("restore.phase", "creds")
    b.creds()
    if b.threads:
        # Each thread's own ids (threads.creds) before dumpable and
        # keep-caps are set: a change of ids resets dumpable.
        b.flush()
        threads.creds(b)
    procattrs.after_creds(b, job.core["attrs"])
    pdeath.restore(b)       # after the credentials: a change of ids clears it
    faults.point("restore.phase", "rseq")
    b.register_rseq()
    yield
    faults.point("restore.phase", "signals")
    b.pending_signals()     # before anything (seccomp) could forbid rt_tgsigqueueinfo
    faults.point("restore.phase", "sched")
    sched.apply(pid, job.core["sched"])
    procattrs.outside(pid, job.core["attrs"])
    b.timerslack = None
    threads.late_state(b)
    faults.point("restore.phase", "arm_timers")
    posixtimers.arm(b, job.core["posix_timers"])   # last: see posixtimers
    procattrs.last(b, job.core["attrs"])     # memory-deny-write-execute, once nothing is mapped any more


def _check_xstate(task: Task, core: dict) -> None:
    # What "fits" is per machine (arch xstate_mismatch): XSAVE features and
    # size on x86_64; regset sizes and SVE/SME vector-length settings on aarch64.
    why = task.arch.xstate_mismatch(task.arch.xstate_features(task.get_xstate()), core.get("xstate") or {})
    if why:
        raise Refusal("cpu-mismatch", why, pid=task.pid)
