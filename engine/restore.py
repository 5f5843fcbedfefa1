"""`ckpt restore`: validate everything, then rebuild the process.

1. Pre-flight, before any process exists: the manifest's sha256 of every
   file (in parallel threads), the JSON structure, the arch/kernel/vdso, the
   PID is free, every fd (handler ``validate``) and mapped file
   (``files.map_validate``), cwd, credentials, rlimits, session.
2. The fds and mapped files are opened in this process (handler
   ``restore``, ``files.map_open``) and moved to numbers the new process
   will not use.
3. A forked *restorer* creates the process with clone3(set_tid=[pid]) (a
   few bytes of machine code: the child only makes raw syscalls), traces it,
   and rebuilds it by syscall injection (see :mod:`engine.build`).
   The restorer then exits, so the process is reparented to init or the
   nearest subreaper; any failure kills the new process (PTRACE_O_EXITKILL
   also covers a crash of the restorer).
"""

from __future__ import annotations

import fcntl
import os
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from . import (autogroup, cgroups, fastjson, fsroot, faults, files, guard, imagecheck, libc, membarrier, mempolicy, pidns, posixtimers, procattrs, procfs, sched,
               seccomp, signals, sud,
               threads, unlinked, vdsoblock)
from .arch import current as current_arch
from .build import build
from .check import _my_creds, creds_of, creds_plan, require_features
from .context import Options, RestoreContext, boot_id
from .errors import EngineError, Refusal, Refusals
from .fds import handler as fd_handler
from .image import ImageReader
from .memory import PageSource, page_file_name

CAP_SYS_RESOURCE = 24
PR_SET_CHILD_SUBREAPER = 36


def _bad(what: str) -> Refusal:
    return Refusal("image-invalid", what)


def _need(d, key, typ, where: str):
    if not isinstance(d, dict) or key not in d:
        raise _bad(f"{where}: missing {key}")
    v = d[key]
    if typ is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise _bad(f"{where}: {key} is not an integer")
    if typ is not int and not isinstance(v, typ):
        raise _bad(f"{where}: {key} is not a {typ.__name__}")
    return v


# -- structure of the records ------------------------------------------------------

_INT = {int}


def check_core(core) -> None:
    """Types of everything build.py reads from core.json."""
    w = "core.json"
    for k in ("pid", "sigmask", "umask", "personality", "brk", "tid_address"):
        _need(core, k, int, w)
    for k in ("comm",):
        _need(core, k, str, w)
    for k in ("regs", "mm", "rseq", "cwd", "session", "creds", "sigactions", "exe", "xstate"):
        _need(core, k, dict, w)
    for k in ("auxv", "robust_list", "rlimits", "sigaltstack", "itimers"):
        _need(core, k, list, w)
    arch = current_arch()
    try:
        arch.normalise_restart(arch.Regs.from_dict(core["regs"]))
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(f"{w}: registers: {e}") from None
    signals.check_record(_need(core, "signals", dict, w))
    if "job_stop" in core:
        from . import jobstop
        if not jobstop.validate(core["job_stop"]) or isinstance(core["job_stop"], bool) \
                or (core["job_stop"] and core.get("threads")):
            raise _bad(f"{w}: job_stop {core['job_stop']!r} is no job-control stop of a single-threaded process")
    if not isinstance(core.get("job_stop_report", False), bool):
        raise _bad(f"{w}: job_stop_report is not a boolean")
    for k in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
              "arg_start", "arg_end", "env_start", "env_end"):
        _need(core["mm"], k, int, f"{w} mm")
    for k in ("pointer", "size", "signature", "flags"):
        _need(core["rseq"], k, int, f"{w} rseq")
    if not sud.check_record(core.get("sud")):
        raise _bad(f"{w}: syscall user dispatch {core.get('sud')!r}")
    _need(core["cwd"], "path", str, f"{w} cwd")
    for k in ("sid", "pgid"):
        _need(core["session"], k, int, f"{w} session")
    # every item a plain int (the JSON scanner's; a bool is not one), n of them
    ints = lambda xs, n=None: (n is None or len(xs) == n) and set(map(type, xs)) <= _INT   # noqa: E731
    if not ints(core["auxv"]) or not ints(core["robust_list"], 2) or not ints(core["sigaltstack"], 3):
        raise _bad(f"{w}: auxv / robust_list / sigaltstack malformed")
    if len(core["rlimits"]) != len(libc.RLIMIT_NAMES) or not all(isinstance(r, list) and ints(r, 2) for r in core["rlimits"]):
        raise _bad(f"{w}: rlimits malformed")
    if len(core["itimers"]) != 3 or not all(isinstance(t, list) and ints(t, 4) for t in core["itimers"]):
        raise _bad(f"{w}: itimers malformed")
    for sig, act in core["sigactions"].items():
        if not sig.isdigit() or not 1 <= int(sig) <= 64 or not isinstance(act, list) or not ints(act, 4):
            raise _bad(f"{w}: sigaction {sig} malformed")
    if core["pid"] <= 0:
        raise _bad(f"{w}: pid {core['pid']}")
    if not sched.check_record(core.get("sched")):
        raise _bad(f"{w}: sched malformed")
    procattrs.older(core.get("attrs"))    # formats 5 to 7
    if not procattrs.check_record(core.get("attrs")):
        raise _bad(f"{w}: attrs malformed")
    core.setdefault("mempolicy", [mempolicy.MPOL_DEFAULT, 0])    # formats 5 and 6
    core.setdefault("membarrier", 0)                             # formats 5 to 9
    if not membarrier.check_record(core["membarrier"]):
        raise _bad(f"{w}: membarrier malformed")
    if not mempolicy.check_record(core["mempolicy"]):
        raise _bad(f"{w}: mempolicy malformed")
    tids = {r.get("tid") for r in core.get("threads", []) if isinstance(r, dict)}
    if not posixtimers.check_records(core.get("posix_timers"), core.get("pid"), tids):
        raise _bad(f"{w}: posix_timers malformed")
    if not seccomp.check_record(core.get("seccomp")):
        raise _bad(f"{w}: seccomp malformed")
    why = threads.check_records(core.get("threads", []))
    if why:
        raise _bad(f"{w}: {why}")
    if core.get("threads"):
        srecs = {core.get("pid"): core["seccomp"]}
        srecs.update((r["tid"], r["seccomp"]) for r in core["threads"])
        if any(r["mode"] == 1 for r in srecs.values()):
            raise _bad(f"{w}: seccomp strict mode in a multi-threaded process (refused at dump)")
        if any(r["mode"] for r in srecs.values()):
            why = seccomp.tree_problem(srecs)
            if why:
                raise _bad(f"{w}: {why}")


def check_mm(mm, npage_files: int) -> List[dict]:
    vmas = _need(mm, "vmas", list, "mm.json")
    last = 0
    shmem_sizes: dict = {}      # shared anonymous object (dev, inode) -> its size: one per object
    for v in vmas:
        # every field of the exact type the JSON scanner makes: what the
        # _need calls below pass (a tree's restore made ~11,500 of them);
        # anything else takes them, for their verdict and message
        g = v.get if v.__class__ is dict else None
        if g is None or not (g("start").__class__ is int and g("end").__class__ is int
                             and g("offset").__class__ is int and g("inode").__class__ is int
                             and g("perms").__class__ is str and g("path").__class__ is str
                             and g("kind").__class__ is str and g("dev").__class__ is str
                             and g("flags").__class__ is list and g("pages").__class__ is list):
            _vma_fields(v)
        if v["start"] % 4096 or v["end"] % 4096 or v["end"] <= v["start"] or v["start"] < last:
            raise _bad(f"mm.json: mapping {v['start']:#x}-{v['end']:#x} out of order or unaligned")
        if len(v["perms"]) != 4 or v["kind"] not in ("anon", "shmem", "sysvshm", "file", "special"):
            raise _bad(f"mm.json: mapping {v['start']:#x} has kind {v['kind']!r} perms {v['perms']!r}")
        if v["kind"] == "file":
            _need(v, "file", dict, "mm.json vma")
        if v["kind"] == "sysvshm":
            _need(v, "sysv", dict, "mm.json vma")     # its fields: imagecheck.check_records (engine/sysvshm.py)
        if v["kind"] == "shmem":
            _check_shmem(v, shmem_sizes)
        for run in v["pages"]:
            if (not isinstance(run, list) or len(run) != 4 or not all(isinstance(x, int) for x in run)
                    or run[0] < v["start"] or run[0] + run[1] * 4096 > v["end"] or run[2] >= npage_files):
                raise _bad(f"mm.json: page run {run!r} outside mapping {v['start']:#x}-{v['end']:#x}")
        last = v["end"]
    return vmas


def _check_shmem(v: dict, sizes: dict) -> None:
    """A shared anonymous mapping's object (engine/shmem.py): its size, the
    same for each of its mappings, each inside it at a page offset. An
    image older than format 13 has no size: each mapping was its own
    object, made at its size and offset 0, as that engine did (so one
    object mapped twice is not such an image's)."""
    n = v["end"] - v["start"]
    k = (v["dev"], v["inode"])
    if "shmem_size" not in v:
        if k in sizes:
            raise _bad(f"mm.json: shared memory inode {v['inode']} mapped twice in an image without object sizes")
        v["shmem_size"], v["offset"] = n, 0
    size = v["shmem_size"]
    if (size.__class__ is not int or size <= 0 or size % 4096 or v["offset"] % 4096 or v["offset"] < 0
            or v["offset"] + n > size or sizes.setdefault(k, size) != size):
        raise _bad(f"mm.json: shared memory mapping {v['start']:#x} (offset {v['offset']:#x}, {n} bytes) "
                   f"of an object of {size!r} bytes")


def _vma_fields(v) -> None:
    for k in ("start", "end", "offset", "inode"):
        _need(v, k, int, "mm.json vma")
    for k in ("perms", "path", "kind", "dev"):
        _need(v, k, str, "mm.json vma")
    _need(v, "flags", list, "mm.json vma")
    _need(v, "pages", list, "mm.json vma")


def check_fd_records(recs) -> None:
    if not isinstance(recs, list):
        raise _bad("fds.json is not a list")
    seen = set()
    for r in recs:
        fd = _need(r, "fd", int, "fds.json")
        _need(r, "kind", str, "fds.json")
        _need(r, "cloexec", bool, "fds.json")
        if fd < 0 or fd in seen:
            raise _bad(f"fds.json: fd {fd} repeated or negative")
        seen.add(fd)
    for r in recs:
        if "dup_of" in r and r["dup_of"] not in seen:
            raise _bad(f"fds.json: fd {r['fd']} is a dup of missing fd {r['dup_of']}")


# -- pre-flight --------------------------------------------------------------------

MAP_VERDICTS = "_map_verdicts"      # ctx.shared: the pre-flight's verdict on each mapped file's record
# ctx.shared: map_key -> an fd of a Prepared still open, a mapped file's
# (not a ghost's: files.writer_file shares those) opened and its content
# checked once per restore. A tree's members map the same libraries: each
# member gets a dup of that open (its own number) instead of opening,
# fstat'ing and hashing it again (~4 files x 50 members). One open file
# under every member's mapping is what fork made of them too.
MAP_OPENED = "_map_opened"


def preflight(reader: ImageReader, core: dict, vmas: List[dict], fdrecs: List[dict],
              ctx: RestoreContext, tree_member: bool = False) -> None:
    """Everything that can be refused before a process exists; raises
    Refusal / Refusals with all that was found."""
    pid = core["pid"]
    refusals: List[Refusal] = []

    def add(r: Refusal) -> None:
        refusals.append(r if r.pid is not None else r.with_pid(pid))

    if not _pid_free(pid):
        add(Refusal("pid-in-use", f"PID {pid} is held by {_comm(pid)}"))
    for rec in core.get("threads", []):
        if not _pid_free(rec["tid"]):
            add(Refusal("pid-in-use", f"TID {rec['tid']} (a thread) is held by {_comm(rec['tid'])}"))
    theirs = vdsoblock.block(vmas)
    if theirs:
        if reader.manifest.get("kernel") != os.uname().release:
            add(Refusal("unsupported-mapping", f"the vdso of kernel {reader.manifest.get('kernel')} "
                        f"({vdsoblock.describe(theirs)}) cannot be provided by kernel {os.uname().release}"))
        else:
            why = vdsoblock.misfit(theirs, vdsoblock.own())
            if why:
                add(Refusal("unsupported-mapping", why))
    try:
        plan = creds_plan(core["creds"], _my_creds())
        core["_creds_plan"] = plan
    except (Refusal, KeyError, TypeError) as e:
        add(e if isinstance(e, Refusal) else _bad(f"credentials record: {e}"))
    eff = int(procfs.self_status().get("CapEff", "0"), 16)
    if not (eff >> CAP_SYS_RESOURCE) & 1:
        try:
            mine = procfs.self_limits()
        except (OSError, ValueError):
            mine = []
        for i, (cur, mx) in enumerate(core["rlimits"]):
            mycur, mymax = mine[i] if i < len(mine) else libc.get_rlimit(0, i)
            if mx > mymax:
                add(Refusal("capability", f"RLIMIT_{libc.RLIMIT_NAMES[i]} hard limit {mx} is above ckpt's "
                            f"{mymax}; raising it needs CAP_SYS_RESOURCE"))
    for r in sched.validate(core["sched"]) + posixtimers.validate(core["posix_timers"]) + \
            seccomp.validate(next((r for r in [core["seccomp"]] + [t["seccomp"] for t in core.get("threads", [])]
                                   if r["mode"]), core["seccomp"])) + procattrs.validate(core["attrs"], core.get("_creds_plan", "")) + \
            mempolicy.validate(core["mempolicy"]) + cgroups.validate(core.get("cgroups")) + \
            fsroot.validate(core.get("root")) + \
            [r for t in core.get("threads", []) if t.get("mempolicy", core["mempolicy"]) != core["mempolicy"]
             for r in mempolicy.validate(t["mempolicy"])]:
        add(r)
    cwd = core["cwd"]
    if isinstance(cwd.get("removed"), dict):
        why = unlinked.missing_parent(cwd["removed"]["path"])
        if why:
            add(Refusal("file-missing", f"cannot recreate the removed working directory: {why}", path=cwd["path"]))
    else:
        try:
            st = os.stat(cwd["path"])
            if ctx.same_node and (st.st_dev, st.st_ino) != (cwd.get("dev"), cwd.get("ino")):
                add(Refusal("file-changed", "working directory replaced", path=cwd["path"]))
        except OSError as e:
            add(Refusal("file-missing", f"working directory: {e.strerror}", path=cwd["path"]))
    from . import sessionids
    sess = core["session"]
    my_sid = os.getsid(0)
    if tree_member:
        pass    # judged with the whole tree (engine/tree_restore.py)
    elif ctx.options.tty and sess["sid"] != pid and sess["pgid"] == pid:
        pass    # a shell job restored with --tty: it joins ckpt's session (build.py setpgid(0, 0))
    else:
        why = sessionids.restore_problem(pid, sess["sid"], sess["pgid"], my_sid, os.getpgid(0), os.getsid)
        if why:
            add(Refusal("unsupported-state", why))
    if not tree_member:
        r = autogroup.refusal((core.get("attrs") or {}).get("autogroup_nice"), sess["sid"], pid, False)
        if r is not None:
            add(r)
    for rec in fdrecs:
        if "dup_of" in rec or "ofd_of" in rec:
            continue
        mod = fd_handler(rec["kind"])
        if mod is None:
            add(Refusal("unsupported-fd", f"no handler for kind {rec['kind']} here", fd=rec["fd"]))
            continue
        try:
            faults.point("restore.validate", rec["kind"])
            mod.validate(rec, ctx)
        except Refusal as r:
            add(r)
    # Each mapped file's record (and the exe's) judged once per restore:
    # a tree's members map the same files (the same record, the same
    # verdict, given again to each member that has it). Only the
    # pre-flight's checks: the content is checked on the fd opened for the
    # members (files.map_open; once a restore: MAP_OPENED).
    verdicts = ctx.shared.setdefault(MAP_VERDICTS, {})
    seen = set()
    for rec, point in [(v["file"], True) for v in vmas if v["kind"] == "file"] + [(core["exe"], False)]:
        key = record_key(rec)
        if point:       # the exe is judged even when a mapping has its record (refused for each, as before)
            if key in seen:
                continue
            seen.add(key)
        if key not in verdicts:
            try:
                if point:
                    faults.point("restore.map_validate")
                files.map_validate(rec, ctx)
                verdicts[key] = None
            except Refusal as r:
                verdicts[key] = r
        if verdicts[key] is not None:
            r = verdicts[key]
            add(r.with_pid(pid) if r.pid is not None and r.pid != pid else r)
    if refusals:
        _content_refusals(fdrecs, vmas, core, ctx, refusals, add)
        raise refusals[0] if len(refusals) == 1 else Refusals(refusals)


def _content_refusals(fdrecs: List[dict], vmas: List[dict], core: dict, ctx, refusals: List[Refusal], add) -> None:
    """The restore is refused already: look at the content of the files the
    pre-flight passed too, so that one run names every changed file. (The
    pre-flight checks no content: a file's bytes are hashed from the very fd
    the restore opens, files.check_identity; a restore that goes ahead
    hashes each once.) Opened read-only, regular files only; nothing else."""
    import stat
    done = {r.fd for r in refusals if r.fd is not None} | {r.path for r in refusals if r.path}
    fd_idents = [(rec["file"], rec["fd"]) for rec in fdrecs if rec.get("kind") == "regular" and
                 isinstance(rec.get("file"), dict) and "dup_of" not in rec and "ofd_of" not in rec]

    def name_every_fd():
        # a file changed or gone is so for every fd the process opened it by
        # (each its own open), each named: the pre-flight names every fd it
        # refuses, the content check below each file once
        by_path = {r.path: r for r in refusals if r.path and r.reason in ("file-changed", "file-missing")}
        for ident, fd in fd_idents:
            r = by_path.get(ident.get("path"))
            if r is not None and fd not in done:
                done.add(fd)
                add(Refusal(r.reason, r.detail, pid=core["pid"], fd=fd, path=r.path))

    name_every_fd()
    checked = fd_idents + [(v["file"]["file"], None) for v in vmas if v.get("kind") == "file" and
                           isinstance(v.get("file"), dict) and isinstance(v["file"].get("file"), dict)]
    if isinstance(core.get("exe"), dict) and isinstance(core["exe"].get("file"), dict):
        checked.append((core["exe"]["file"], None))
    for ident, fd in checked:
        path = ident.get("path")
        if fd in done or path in done or not isinstance(path, str) or not ident.get("sha256") or \
                not isinstance(ident.get("mode"), int) or not stat.S_ISREG(ident["mode"]):
            continue
        done.add(path)
        try:
            opened = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            continue        # the pre-flight saw it (missing, unreachable) or it went since: not this one's to say
        try:
            files.check_identity(ident, ctx, fd=fd, pid=core["pid"], opened=opened)
        except Refusal as r:
            done.add(fd)
            add(r)
        finally:
            os.close(opened)
    name_every_fd()


ZOMBIE_WAIT = 3.0   # seconds


def _pid_free(pid: int) -> bool:
    """True when no task holds `pid`. A zombie (the dumped process, killed,
    not yet reaped by its parent - PID 1 can be slow) is given ZOMBIE_WAIT
    seconds to go away."""
    deadline = time.monotonic() + ZOMBIE_WAIT
    nap = 0.001     # short at first: a reaper usually acts within a few ms
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = procfs.parse_stat(f.read())["state"]
        except (OSError, ValueError):
            return not os.path.exists(f"/proc/{pid}")
        if state not in ("Z", "X") or time.monotonic() > deadline:
            return False
        time.sleep(nap)
        nap = min(nap * 2, 0.02)


def _comm(pid: int) -> str:
    try:
        st = procfs.Proc(pid).stat()
        if st["state"] in ("Z", "X"):
            return f"a zombie ({st['comm']}) its parent {st['ppid']} has not reaped"
        return st["comm"]
    except (Refusal, OSError, ValueError):
        return "another process"


# -- opening in the restorer ---------------------------------------------------------

class Prepared:
    """fds opened in the restorer for the new process: fd records, mapped
    files, the exe and the cwd, each moved to a number that no fd of the
    process (of any member of a tree: `avoid`) has. The new process gets
    them with ckpt's fd table, and each record's file is dup3'd onto its
    own number in turn: one sitting on a number a record uses would be
    overwritten before its own dup3, or before the build used it.

    Not above every number used, as they were: a process holding fds at
    the top of its RLIMIT_NOFILE (valgrind keeps its own in the last ten
    below the limit, a program may dup2 onto 1023) left no number above
    them (F_DUPFD EINVAL), after the dump had killed it. The lowest free
    ones are taken instead."""

    def __init__(self, avoid=()) -> None:
        self.fd_of_rec: Dict[int, int] = {}      # target fd number -> restorer fd
        self.map_fd: Dict[str, int] = {}         # file record key + mode -> restorer fd
        self.exe_fd = -1
        self.cwd_fd = -1
        self._owned: List[int] = []
        self.avoid = frozenset(avoid)
        self._next = 3

    def keep(self, fd: int) -> int:
        # F_DUPFD, never dup2 onto a number: it cannot close a file ckpt
        # holds. One landing on an avoided number is closed, and the search
        # goes on above it.
        n = self._next
        while True:
            while n in self.avoid:
                n += 1
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, n)
            if new not in self.avoid:
                break
            os.close(new)
            n = new + 1
        self._owned.append(new)
        self._next = new + 1
        return new

    def close(self) -> None:
        for fd in self._owned:
            try:
                os.close(fd)
            except OSError:
                pass
        self._owned.clear()


def record_key(rec) -> str:
    """A file record as a key: equal keys, the very same record (repr tells
    every JSON value and type apart: 1, 1.0, True, "1"), so one verdict
    and one open serve both. A record equal but for the order of its keys
    gets a key of its own (it is only judged or opened again): repr is half
    the cost of a sorted JSON text, and a tree restore makes ~2,400 keys."""
    return repr(rec)


def map_key(rec: dict, writable: bool) -> str:
    return record_key(rec) + ("/rw" if writable else "/ro")


def prepare(core: dict, vmas: List[dict], fdrecs: List[dict], ctx: RestoreContext,
            avoid=None, shared_ofd=None) -> Prepared:
    """Open everything the new process needs, in this process. In a tree
    (engine/tree_restore.py): on numbers no member uses (`avoid`: one
    table is forked to every member), and an "ofd_of" record takes
    `shared_ofd(rec)`, another member's already opened file."""
    p = Prepared(avoid if avoid is not None else [r["fd"] for r in fdrecs])
    try:
        for rec in fdrecs:
            if "ofd_of" in rec:
                p.fd_of_rec[rec["fd"]] = shared_ofd(rec)
                continue
            if "dup_of" in rec:
                continue
            mod = fd_handler(rec["kind"])
            faults.point("restore.fd", rec["kind"])
            rfd = mod.restore(rec, ctx)
            p.fd_of_rec[rec["fd"]] = p.keep(rfd)
            if rfd not in ctx.shared.get("_close_after_restore", []):
                os.close(rfd)
        for rec in fdrecs:
            if "dup_of" in rec:
                p.fd_of_rec[rec["fd"]] = p.fd_of_rec[rec["dup_of"]]
        opened = ctx.shared.setdefault(MAP_OPENED, {})
        for v in vmas:
            if v["kind"] != "file":
                continue
            writable = files.map_writable(v)
            key = map_key(v["file"], writable)
            if key not in p.map_fd:
                if key in opened:
                    p.map_fd[key] = p.keep(opened[key])
                    continue
                faults.point("restore.map_open")
                fd = files.map_open(v["file"], ctx, writable)
                p.map_fd[key] = p.keep(fd)
                os.close(fd)
                if "ghost" not in v["file"]:
                    opened[key] = p.map_fd[key]
        faults.point("restore.exe_open")
        key = map_key(core["exe"], False)
        if key in opened:
            p.exe_fd = p.keep(opened[key])
        else:
            fd = files.map_open(core["exe"], ctx, False)
            p.exe_fd = p.keep(fd)
            os.close(fd)
            if "ghost" not in core["exe"]:
                opened[key] = p.exe_fd
        if isinstance(core["cwd"].get("removed"), dict):
            # shared with an fd on the same removed directory; closed by files.close_shared
            p.cwd_fd = p.keep(unlinked.restore_dir(core["cwd"]["removed"], ctx))
        else:
            fd = os.open(core["cwd"]["path"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            p.cwd_fd = p.keep(fd)
            os.close(fd)
    except Refusal as e:
        p.close()
        if e.reason not in ("file-changed", "file-missing"):
            raise
        # a file's content is first checked here, on the fd opened for the
        # process, and the first changed one stops the restore: name them all
        found = [e]
        _content_refusals(fdrecs, vmas, core, ctx, found, found.append)
        if len(found) == 1:
            raise
        raise Refusals(found) from e
    except BaseException:
        p.close()
        raise
    return p


# -- the restorer process ------------------------------------------------------------

def clock_offsets(meta, same_node: bool) -> dict:
    """The time namespace offsets the restored process needs (engine/timens.py);
    raises Refusal (image-invalid, or no namespace can be made here)."""
    from . import timens
    if isinstance(meta, dict) and not timens.check_record(meta.get("clocks")):
        raise Refusal("image-invalid", "manifest meta: clocks is not {monotonic, boottime} in ns")
    if isinstance(meta, dict) and not timens.check_offsets(meta.get("timens")):
        raise Refusal("image-invalid", "manifest meta: timens is not {monotonic, boottime} offsets in ns")
    offs = timens.offsets(meta, same_node)
    r = timens.refusal(offs)
    if r is not None:
        raise r
    return offs


def _run_restorer(job, builder=None, clocks=None) -> dict:
    """Fork the restorer, which creates and rebuilds the process (`builder`,
    default build.build; engine/tree_restore.py for a tree), reports on a
    pipe and exits. Returns its report; raises what it raised."""
    faults.point("restore.fork")
    parent = os.getpid()
    born = time.monotonic()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        code = 0
        try:
            guard.become_worker(parent)     # stops (killing the new process) if ckpt dies
            from .placement import pin
            pin()       # the restorer and what it builds on one CPU (engine/placement.py)
            for one in (getattr(job, "jobs", None) or {0: job}).values():
                if getattr(one, "pages", None) is not None:
                    one.pages.keep_from_children()      # not copied into the new process's clone
            if clocks:      # before any process is made: each is born in the namespace
                from .timens import enter
                enter(clocks)
            from .task import INJECTED
            INJECTED.update(round_trips=0, batched_calls=0)     # this restore's only
            from .profiling import run as profiled
            out = {"ok": True, "pid": profiled("restore", builder or build, job)}
            out["injected"] = dict(INJECTED)    # ptrace round trips, batched calls (engine/batch.py)
            import sys
            cow = sys.modules.get(__name__.rsplit(".", 1)[0] + ".cow")     # a tree's only: not imported for one process
            if cow is not None and any(cow.STATS.values()):
                out["cow"] = dict(cow.STATS)
        except Refusal as e:
            out = {"ok": False, "type": "refusal", **e.as_dict()}
            code = 3
        except EngineError as e:
            out = {"ok": False, "type": "error", "message": e.message, "errno": e.errno}
            code = 4
        except BaseException as e:   # noqa: BLE001 - reported to the parent, never swallowed
            import traceback
            out = {"ok": False, "type": "error", "message": f"restorer crashed: {e!r}\n{traceback.format_exc()}",
                   "errno": None}
            code = 4
        try:
            os.write(w, fastjson.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    # The restorer's copy of the pages is the only one needed now: it frees
    # them as it writes them (memory.PageSource.drop). A tree's: each member's.
    for one in (getattr(job, "jobs", None) or {0: job}).values():
        if getattr(one, "pages", None) is not None:
            one.pages.drop()
    chunks = []
    # Until EOF or the restorer's exit: a clone it made but had not yet
    # given PTRACE_O_EXITKILL outlives a SIGKILLed restorer, stopped, and
    # holds the write end (it is a copy of the restorer).
    import select
    status = None
    while True:
        ready, _, _ = select.select([r], [], [], 0.05)
        if ready:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
            continue
        got, st = os.waitpid(child, os.WNOHANG)
        if got:
            status = st
            os.set_blocking(r, False)
            try:
                chunks.append(os.read(r, 1 << 20))
            except BlockingIOError:
                pass
            break
    os.close(r)
    if status is None:
        os.waitpid(child, 0)
    try:
        out = fastjson.loads(b"".join(chunks) or b"{}")
    except ValueError:
        out = {}
    if not out:
        _kill_unadopted(job, born)
    if out.get("ok"):
        return out
    if out.get("type") == "refusal":
        raise Refusal(out["reason"], out.get("detail", ""), pid=out.get("pid"), fd=out.get("fd"),
                      path=out.get("path"))
    raise EngineError(out.get("message") or "the restorer died without a report", errno=out.get("errno"))


def _kill_unadopted(job, born: float) -> None:
    """The restorer died without a report (SIGKILLed): a new process it had
    cloned but not yet given PTRACE_O_EXITKILL (between clone3 and its first
    stop) outlives it, stopped, with the image's PID. Kill it: a process
    with that PID born since the restorer's fork is that clone."""
    pids = [job.core["pid"]] if hasattr(job, "core") else [m["pid"] for m in getattr(job, "members", [])[:1]]
    boot_ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    since = uptime - (time.monotonic() - born) - 0.05
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[19]) / boot_ticks >= since and fields[0] in ("t", "T"):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


class _system_errors_as_engine_errors:
    """A system call that fails where no handler expected it is a clean
    EngineError (exit 4, errno kept), never a Python traceback: the handlers
    turn the failures they foresee into refusals, this catches the rest.
    (A class, not contextlib.contextmanager: contextlib costs every restore
    ~50 ms under TCG.)"""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if typ is not None and issubclass(typ, OSError):
            raise EngineError(f"{self.what}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
                              errno=e.errno) from e
        return False


class Job:
    """Everything the restorer needs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _room_for_fds() -> None:
    """ckpt's soft RLIMIT_NOFILE raised to its hard one: ckpt holds a copy
    of every fd of the process (of a whole tree) at once, and its numbers
    may lie above ckpt's soft limit (a server started with a higher one;
    a login shell gives ckpt 1024). With 2000 fds, the restore failed
    after the dump had killed the process. The new process, a clone of
    ckpt, gets its own limits back from the image (Builder.limits)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def restore(directory: str, options: Options, pidfile: Optional[str] = None) -> dict:
    """Restore the process imaged in `directory`. Returns {pid, restore_ms}.
    Raises Refusal / Refusals before any process exists; a failure after the
    process exists kills it (EngineError); the image is never modified."""
    t0 = time.monotonic()
    procfs.forget_self()
    require_features()
    pidns.check_not_init(os.getpid(), "restores")
    _room_for_fds()
    reader = ImageReader(directory)
    try:
        out = _restore(reader, options, t0)
    finally:
        reader.close()
    if pidfile:
        write_pidfile(pidfile, out["pid"])
    res = {"pid": out["pid"], "restore_ms": round((time.monotonic() - t0) * 1000, 2)}
    if "injected" in out:
        res["injected"] = out["injected"]
    if "members" in out:
        res["members"] = out["members"]
    for k in ("cow_shared_bytes", "cow_rewritten_pages"):     # a tree's (engine/cow.py)
        if k in out:
            res[k] = out[k]
    if "foreground" in out:     # a foreground shell job: the CLI waits for it (engine/fds/tty.py)
        res["foreground"] = out["foreground"]
    return res


def _restore(reader: ImageReader, options: Options, t0: float) -> dict:
    reader.check_arch()
    reader.verify(threads=2)   # before any process exists; every file read once, kept in memory
    faults.point("restore.verified")
    if "tree.json" in reader.files:
        from .tree_restore import restore_tree
        return restore_tree(reader, options, None, t0)
    core = reader.read_json("core.json")
    mm = reader.read_json("mm.json")
    fdrecs = reader.read_json("fds.json")
    check_core(core)
    npf = _need(mm, "page_files", int, "mm.json")
    vmas = check_mm(mm, npf)
    check_fd_records(fdrecs)
    imagecheck.check_records(reader, core, vmas, fdrecs)
    imagecheck.check_all_used(reader, imagecheck.used_files(core, vmas, fdrecs, npf))
    xstate = reader.read_bytes("xstate.bin")
    imagecheck.check_xstate(core, xstate)
    thread_xstate = threads.unpack_xstate(reader, core.get("threads", []))
    for tid, blob in thread_xstate.items():
        imagecheck.check_xstate({"xstate": {}}, blob, f"{threads.XSTATE_FILE} thread {tid}")
    meta = reader.manifest.get("meta") or {}
    same_node = isinstance(meta, dict) and meta.get("boot_id") == boot_id()
    pidns.check_restore(meta, reader.manifest.get("format"), same_node)
    clocks = clock_offsets(meta, same_node)
    pid = core["pid"]
    ctx = RestoreContext(options=options, image=reader, same_node=same_node, records=fdrecs, pid=pid)
    segs = None
    if any(v["kind"] == "sysvshm" for v in vmas):
        from . import sysvshm       # System V segments: checked with the rest, made after (below)
        segs = sysvshm.segments([(pid, v) for v in vmas if v["kind"] == "sysvshm"])
    with _system_errors_as_engine_errors("restore pre-flight"), imagecheck.malformed_as_invalid("pre-flight"):
        if segs:
            _with_more(lambda: preflight(reader, core, vmas, fdrecs, ctx), sysvshm.preflight(segs, {pid}))
        else:
            preflight(reader, core, vmas, fdrecs, ctx)
    faults.point("restore.preflighted")
    pages = PageSource([reader.data(page_file_name(i)) for i in range(npf)],
                       [reader.lease_fd(page_file_name(i)) for i in range(npf)])
    prepared = made = None
    try:
        for v in vmas:
            pages.check_runs(v["pages"])
        with _system_errors_as_engine_errors("opening the process's files"), \
                imagecheck.malformed_as_invalid("opening the process's files"):
            prepared = prepare(core, vmas, fdrecs, ctx)
        job = Job(core=core, vmas=vmas, fdrecs=fdrecs, xstate=xstate, thread_xstate=thread_xstate, pages=pages,
                  prepared=prepared, ctx=ctx)
        imagecheck.process_creation_hook()
        foreground = _foreground_job(fdrecs, options)
        if segs:
            with _system_errors_as_engine_errors("System V segments"):
                made = sysvshm.materialize(segs, {pid: pages})   # removed again if the restore fails
        try:
            out = _run_restorer(job, clocks=clocks)
        except BaseException:
            if made is not None:
                made.undo()
            raise
        if foreground:
            out["foreground"] = {"tty": foreground, "pgid": out["pid"]}     # its own group (build.py setpgid)
        # The process is back: what handlers hold until then (a TCP
        # connection's network lock) can go.
        for hook in ctx.shared.pop("_after_restore", []):
            hook()
        return out
    finally:
        if prepared is not None:
            prepared.close()
        files.close_shared(ctx)
        pages.close()


def _with_more(check, more: List[Refusal]) -> None:
    """Run the pre-flight `check`; raise what it refused together with
    `more` (refusals found beside it), all in one report."""
    found: List[Refusal] = []
    try:
        check()
    except Refusal as r:
        found.append(r)
    except Refusals as rs:
        found.extend(rs.refusals)
    found += more
    if found:
        raise found[0] if len(found) == 1 else Refusals(found)


def _foreground_job(fdrecs: List[dict], options: Options) -> Optional[str]:
    """A shell job that was its terminal's foreground group, restored with
    --tty: ckpt becomes the child subreaper first, so the process (a
    tree's members) is its child once the restorer exits (its group is not
    orphaned: job control works), and the --tty terminal is returned: ckpt
    waits for the job (engine/fds/tty.py wait_foreground)."""
    if not options.tty or not any(r.get("kind") == "tty" and r.get("outside") and r.get("fg_own") for r in fdrecs):
        return None
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise EngineError("prctl(PR_SET_CHILD_SUBREAPER)", errno=ctypes.get_errno())
    from .fds.tty import tty_path
    return tty_path(options.tty)


def write_pidfile(pidfile: str, pid: int) -> None:
    """The restored PID into `pidfile`, never through a symlink: a fresh
    temporary name made with O_EXCL|O_NOFOLLOW next to it, renamed over it
    (rename replaces a symlink, it does not follow it)."""
    tmp = f"{pidfile}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{pid}\n".encode())
        finally:
            os.close(fd)
        os.rename(tmp, pidfile)
    except OSError as e:
        raise EngineError(f"restored pid {pid}, but cannot write the pidfile {pidfile}: {e.strerror}",
                          errno=e.errno) from e
