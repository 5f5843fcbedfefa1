"""Pre-flight: everything about a process that decides whether it can be
dumped, gathered with the target frozen and nothing written.

`preflight()` returns a :class:`Survey`: verdict items for ``ckpt check``,
all refusals found (a dump refuses on any), the FdInfo of every fd with its
handler, and the mappings with their kinds. Used by both dump and check.
"""

from __future__ import annotations

import os
from .plainclass import dataclass, field
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

from . import fds as fdkinds
from . import autogroup, fstype, lsm, pidfd, pidns, posixtimers, procattrs, procfs, sysvsem, unlinked, vdsoblock
from .context import DumpContext
from .errors import EngineError, Refusal, UsageError

SPECIAL_MAPPINGS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")
SHMEM_NAMES = ("/dev/zero (deleted)", "[anon_shmem")
# VmFlags (proc(5), fs/proc/task_mmu.c show_smap_vma_flags) the restore
# reproduces: from the mmap protection/flags, from madvise, or inherent.
KNOWN_FLAGS = {"rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "gd", "ac", "nr", "sd",
               "dc", "de", "dd", "hg", "nh", "mg", "wf", "ar", "dp"}
# "dp": VM_DROPPABLE (Linux 6.11, mmap MAP_DROPPABLE): glibc >= 2.41 keeps
# its vDSO getrandom state in such a mapping, so every process of a Debian 13
# guest has one. Recreated with MAP_DROPPABLE, its pages not copied (see
# dump.dump_memory).
MADVISE_FLAGS = {"dc": 10, "dd": 16, "hg": 14, "nh": 15, "mg": 12, "wf": 18}   # MADV_*
FLAG_NAMES = {"lo": "mlock()ed", "lf": "mlock(MLOCK_ONFAULT)", "ht": "hugetlb", "pf": "PFN map",
              "io": "I/O memory", "mm": "mixed map", "um": "userfaultfd (missing)",
              "uw": "userfaultfd (wp)", "ui": "userfaultfd (minor)", "ss": "shadow stack",
              "sl": "sealed (mseal)", "dw": "denywrite", "bt": "arm64 BTI", "mt": "arm64 MTE",
              "gu": "guard regions"}
# the *_for_children ones: a process that called unshare(CLONE_NEWPID | CLONE_NEWTIME) and has not forked
# since would fork into its own namespace once restored
NS_KINDS = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup", "time", "pid_for_children", "time_for_children")


@dataclass
class Survey:
    pid: int
    items: List[dict] = field(default_factory=list)
    refusals: List[Refusal] = field(default_factory=list)
    fds: List[Any] = field(default_factory=list)          # (FdInfo, kind, module)
    vmas: List[dict] = field(default_factory=list)        # maps entries + "kind", "flags"
    proc: Optional[procfs.Proc] = None
    stat: dict = field(default_factory=dict)
    status: Dict[str, str] = field(default_factory=dict)
    maps: Optional[List[dict]] = None                     # preflight's `maps`
    # what preflight read that the dump records too (the process is frozen:
    # read once, e.g. "cgroups": its cgroups.dump record)
    memo: Dict[str, Any] = field(default_factory=dict)

    def ok(self, what: str, kind: str, detail: str = "") -> None:
        self.items.append({"what": what, "kind": kind, "verdict": "ok", "detail": detail})

    def refuse(self, what: str, kind: str, r: Refusal) -> None:
        if r.pid is None:
            r = r.with_pid(self.pid)
        self.refusals.append(r)
        self.items.append({"what": what, "kind": kind, "verdict": "refused", "detail": r.message})


# -- before freezing -----------------------------------------------------------

def ancestors(pid: int) -> List[int]:
    """pid and its ancestors up to PID 1."""
    chain = []
    while pid > 0 and pid not in chain:
        chain.append(pid)
        try:
            pid = procfs.Proc(pid).stat()["ppid"]
        except (Refusal, OSError, ValueError):
            break
    return chain


def target_checks(pid: int) -> procfs.Proc:
    """Checks needing no freeze. Raises UsageError (no such PID) or the one
    Refusal that makes freezing pointless (kernel thread, zombie, self,
    ptraced)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise UsageError(f"bad PID {pid!r}")
    proc = procfs.Proc(pid)
    try:
        st = proc.stat()
    except Refusal:
        raise UsageError(f"no process with PID {pid}") from None
    if st.get("flags", 0) & procfs.PF_KTHREAD:     # kthreadd too; not "PID 2", a process in a child pid namespace
        raise Refusal("kernel-thread", f"{st['comm']} is a kernel thread", pid=pid)
    if st["state"] in ("Z", "X"):
        raise Refusal("zombie", f"{st['comm']} has exited and waits to be reaped", pid=pid)
    if pid in ancestors(os.getpid()):
        what = "itself" if pid == os.getpid() else "its own ancestor"
        raise Refusal("self", f"ckpt would have to freeze {what}", pid=pid)
    if pid == 1:
        # Not an ancestor when ckpt entered the namespace from outside (docker
        # exec, nsenter): killing it at the end of the dump would kill every
        # process of the namespace, ckpt too, and clone3 set_tid cannot make a
        # PID 1 again but by starting a new namespace.
        raise Refusal(pidns.REASON, f"{st['comm']} is PID 1, the init of ckpt's pid namespace: a restore cannot "
                      "make a process PID 1 of this namespace again, and the dump's kill would end the namespace",
                      pid=pid)
    tracer = int(proc.status().get("TracerPid", "0") or 0)
    if tracer:
        raise Refusal("ptraced", f"traced by pid {tracer}", pid=pid)
    return proc


# -- with the target frozen ----------------------------------------------------

_MINE: dict = procfs.self_memo({})


def _my_ns(ns: str) -> Optional[str]:
    """ckpt's own namespace link (None: unreadable), read once per process
    (ckpt never changes namespace; a tree's survey asks once per member)."""
    key = (os.getpid(), ns)
    if key not in _MINE:
        try:
            _MINE[key] = os.readlink(f"/proc/self/ns/{ns}")
        except OSError:
            _MINE[key] = None
    return _MINE[key]


def _my_root() -> os.stat_result:
    key = (os.getpid(), "/")
    got = _MINE.get(key)
    if got is None:
        got = _MINE[key] = os.stat("/")
    return got


def _check_process(s: Survey, ctx: Optional[DumpContext] = None) -> None:
    st, status, proc, pid = s.stat, s.status, s.proc, s.pid
    # Threads are frozen and judged one by one (engine/threads.py survey).
    kids = proc.children()
    tree = ctx.tree_pids if ctx is not None and ctx.tree_root is not None else frozenset()
    if kids and all(k in tree for k in kids):
        s.ok("children", "process", f"{len(kids)} in the tree: " + " ".join(map(str, kids[:8])))
    elif kids:
        # Only when judged alone (ckpt survey): `ckpt check -t` and dump take the tree.
        s.refuse("children", "process", Refusal("process-tree", f"children {kids[:8]} (judged alone; "
                                                "`ckpt check -t PID` judges the tree)"))
    else:
        s.ok("children", "process", "none")
    # Pending signals are saved (engine/signals.py): judged with the task
    # frozen, in dump._survey_signals_and_restart.
    timers = s.memo["timers"] = posixtimers.read(pid)      # the dump's list of them too
    for r in posixtimers.check(pid, timers):
        s.refuse("posix timers", "timers", r)
    if not st.get("tty_nr", 0):
        s.ok("session", "session", f"sid {st['session']} pgid {st['pgrp']}, no controlling terminal")
    nice = s.memo["autogroup"] = autogroup.read(pid)     # the dump's record of it too
    r = autogroup.refusal(nice, st["session"], pid, st["session"] in tree)
    if r is not None:
        s.refuse("autogroup", "process", r)
    # Namespaces: a restore recreates the process in the restorer's ones,
    # but a time namespace of its own, made again with its offsets.
    differ = []
    from . import timens
    try:
        offs = s.memo["timens"] = timens.of(pid)
        if offs is not None:
            s.ok("time namespace", "process", f"its own, offsets {timens.describe(offs)}: made again at restore")
    except Refusal as r:
        differ.append(f"time ({r.detail})")
    except OSError:
        pass
    for ns in NS_KINDS:
        if ns in ("time", "time_for_children"):
            continue
        mine = _my_ns(ns)
        if mine is None:
            continue
        try:
            theirs = proc.readlink(f"ns/{ns}")
        except Refusal:
            if not ns.endswith("_for_children"):
                raise
            # ENOENT of a live (frozen) process: a namespace it unshared and
            # that no child has entered yet (nothing to read a link from)
            theirs = None
        except OSError:
            continue
        if mine != theirs:
            differ.append(ns if theirs else f"{ns} (a new one it unshared, no child in it yet)")
    if differ:
        s.refuse("namespaces", "process", Refusal("unsupported-state", f"in other namespaces than ckpt: {', '.join(differ)}"))
    root = os.stat(proc.path("root"))
    myroot = _my_root()
    if (root.st_dev, root.st_ino) != (myroot.st_dev, myroot.st_ino) or proc.readlink("root") != "/":
        from . import fsroot
        try:
            s.ok("root", "fs", f"chrooted to {fsroot.dump(pid)['path']}: chrooted again at restore")
        except Refusal as r:
            s.refuse("root", "fs", r)
    cwd = proc.readlink("cwd")
    cst = os.stat(proc.path("cwd"))
    s.memo["cwd"] = (cwd, cst)      # the dump's record of it (engine/dump.py process_state)
    if unlinked.is_unlinked(cwd, cst):
        s.ok("cwd", "fs", f"{cwd}: removed, recreated and removed again at restore")
    elif cwd.endswith(" (deleted)"):
        s.refuse("cwd", "fs", Refusal("unsupported-state", "its working directory was deleted", path=cwd))
    else:
        s.ok("cwd", "fs", cwd)
    if ctx is None or ctx.tree_root is None:
        _check_outside_sharing(s)       # a tree's members: engine/tree.py, all at once
    if st.get("exit_signal", 17) != 17:
        # clone(2) with another termination signal: a restore made with
        # clone3(exit_signal=SIGCHLD) would notify its parent differently.
        s.refuse("exit signal", "process", Refusal("unsupported-state", f"exit signal {st['exit_signal']}, not SIGCHLD"))
    _check_creds(s)
    try:
        from . import cgroups
        s.memo["cgroups"] = cgroups.dump(pid)
    except Refusal as r:
        s.refuse("cgroups", "process", r)
    try:
        if tree:
            # the semaphore table once for the whole tree, every member frozen by now
            if ctx.shared.get(SEM_KEY) is None:
                ctx.shared[SEM_KEY] = sysvsem.snapshot()
            sysvsem.check(pid, ctx.shared[SEM_KEY])
        else:
            sysvsem.check(pid)
    except Refusal as r:
        s.refuse("SysV semaphores", "process", r)
    try:
        lsm.check(pid)
    except Refusal as r:
        s.refuse("security label", "process", r)



def _check_outside_sharing(s: Survey) -> None:
    """Memory, the fd table or fs shared with another process (CLONE_VM,
    CLONE_FILES, CLONE_FS without CLONE_THREAD; engine/sharing.py): the
    restored process would have its own."""
    from . import sharing
    try:
        found = sharing.outside([s.pid])
    except EngineError as e:       # Refusal kernel-missing too
        s.refuse("sharing", "process", e if isinstance(e, Refusal) else
                 Refusal("sharing-peer-outside", f"kcmp: {e.message}"))
        return
    for _, kind, other in found:
        s.refuse("sharing", "process", Refusal("sharing-peer-outside", f"shares its {sharing.WHAT[kind]} with pid "
                                              f"{other} ({sharing.comm(other)}): a restore would give it its own"))
    if not found:
        s.ok("sharing", "process", "memory, fd table and fs its own")


CAP_SYS_RESOURCE = 24


def _check_restore_env(s: Survey, tree_member: bool = False, shell_job: bool = False) -> None:
    """What `ckpt restore` run here, as this ckpt is, would refuse on an
    unchanged machine; refused now, while the target is unharmed (a dump
    restore refuses loses the process):

    * a hard rlimit above ckpt's own: raising it needs CAP_SYS_RESOURCE;
    * a session that is neither the target's own nor ckpt's: the restored
      process could join neither."""
    eff = int(procfs.self_status().get("CapEff", "0"), 16)
    if not (eff >> CAP_SYS_RESOURCE) & 1 and s.stat.get("flags", 0) & procattrs.PF_IO_FLUSHER == procattrs.PF_IO_FLUSHER:
        s.refuse("I/O flusher", "process", Refusal(
            "capability", "the process is an I/O flusher (PR_SET_IO_FLUSHER): restoring it needs "
            "CAP_SYS_RESOURCE, which ckpt lacks"))
    if not (eff >> CAP_SYS_RESOURCE) & 1:
        from . import libc
        try:
            theirs = s.memo["limits"] = procfs.parse_limits(s.proc.read("limits"))[:len(libc.RLIMIT_NAMES)]
        except (OSError, ValueError, Refusal):
            theirs = []
        try:
            mine = procfs.self_limits()
        except (OSError, ValueError):
            mine = []
        for i, (_, mx) in enumerate(theirs):
            mymax = mine[i][1] if i < len(mine) else libc.get_rlimit(0, i)[1]
            if mx > mymax:
                s.refuse(f"rlimit {libc.RLIMIT_NAMES[i]}", "process", Refusal(
                    "capability", f"RLIMIT_{libc.RLIMIT_NAMES[i]} hard limit {mx} is above ckpt's {mymax}; "
                    "restoring it needs CAP_SYS_RESOURCE (run ckpt with limits at least as high)"))
    sid, pgid = s.stat.get("session"), s.stat.get("pgrp")
    if sid is None or tree_member:
        return      # a tree member's session and group: engine/tree.py
    if shell_job and pgid == s.pid:
        # a job of some shell: `ckpt restore --tty` puts it in the session of
        # the shell that runs the restore (engine/fds/tty.py), as criu does
        return
    from .guard import ckpt_session
    from .sessionids import dump_problem
    why = dump_problem(s.pid, sid, pgid, ckpt_session(), os.getsid)
    if why:
        s.refuse("session", "session", Refusal("unsupported-state", why))


def creds_of(status: Dict[str, str], pid="self") -> dict:
    from . import creds
    return creds.record(status, pid)


def creds_plan(creds: dict, mine: dict) -> str:
    """How a restore gets the target's credentials from the restorer's
    (engine/creds.py): "same", "setid", "set", or raises Refusal."""
    from . import creds as _creds
    return _creds.plan(creds, mine)


def _my_creds() -> dict:
    """ckpt's own credentials record, made once per process (ckpt never
    changes its own; a tree's survey asks once per member). Do not modify."""
    key = (os.getpid(), "creds")
    got = _MINE.get(key)
    if got is None:
        from . import selfstate
        status = procfs.self_status()
        # what a clone of ckpt would keep of its own (engine/selfstate.py): creds.plan refuses it
        got = _MINE[key] = {**creds_of(status), "inherited": selfstate.problems(status)}
    return got


def _check_creds(s: Survey) -> None:
    creds = creds_of(s.status, s.pid)
    s.memo["creds"] = creds
    mine = _my_creds()
    try:
        plan = creds_plan(creds, mine)
        s.ok("credentials", "credentials", f"uid {creds['uid'][0]} gid {creds['gid'][0]} ({plan})")
    except Refusal as r:
        s.refuse("credentials", "credentials", r)


def classify_vma(vma: dict) -> str:
    """anon | shmem | sysvshm | file | special, or raises Refusal(unsupported-mapping)."""
    path = vma["path"]
    shared = vma["perms"][3] == "s"
    if path in SPECIAL_MAPPINGS:
        return "special"
    if path.startswith("/SYSV"):
        # System V shared memory: judged and restored by engine/sysvshm.py
        # (whole attaches, no attacher outside the dump; same IPC namespace)
        return "sysvshm"
    if vma["inode"] == 0 and (path == "" or path in ("[heap]", "[stack]") or path.startswith("[anon:")):
        if shared:
            raise Refusal("unsupported-mapping", "shared mapping without an inode", path=path)
        return "anon"
    if path.startswith(SHMEM_NAMES):
        if not shared:
            raise Refusal("unsupported-mapping", "private mapping of shared anonymous memory", path=path)
        return "shmem"
    if path.startswith("[") or path.startswith("/[") or not path.startswith("/"):
        raise Refusal("unsupported-mapping", f"kernel-provided mapping {path}", path=path)
    return "file"


def _check_mapped_fs(map_files: str, path: str, known: Optional[dict] = None, key=None) -> None:
    """A mapped file is judged by its filesystem before anything else: a
    mapping of a pseudo filesystem's file (sysfs binary attributes, ...)
    shows kernel memory, not stored bytes (engine/fstype.py). `known`:
    magics already asked, by `key` (the maps line's dev, inode and path:
    one inode, one filesystem; a tree's members map the same files, the
    statfs of a map_files link costs ~70 us)."""
    fs = known.get(key) if known is not None else None
    if fs is None:
        fs = fstype.magic(map_files)
        if known is not None:
            known[key] = fs
    if fstype.pseudo(fs):
        raise Refusal("pseudo-file", f"mapping of a file on the {fstype.name(fs)} pseudo filesystem: "
                      "kernel state, not stored bytes", path=path)
    if fstype.handle(fs):
        raise Refusal("unsupported-mapping", f"mapping of a {fstype.name(fs)} object", path=path)


SEM_KEY = "tree:sysvsem"          # ctx.shared: a tree's snapshot of the SysV semaphores (sysvsem.snapshot)
MAPFS_KEY = "tree:mapped-fs"      # ctx.shared: one dict for a whole tree (engine/tree.py _LazyShared)


def _check_vmas(s: Survey, ctx: Optional[DumpContext] = None) -> None:
    flags = s.proc.vmflags()
    known = None
    if ctx is not None and ctx.shared is not None:
        known = ctx.shared.get(MAPFS_KEY)
        if known is None:
            known = ctx.shared[MAPFS_KEY] = {}
    sysv = None     # /proc/sysvipc/shm, read at the first SysV mapping (engine/sysvshm.py)
    for vma in (s.maps if s.maps is not None else s.proc.maps()):
        vma["flags"] = flags.get(vma["start"], [])
        what = f"mapping {vma['start']:x}-{vma['end']:x} {vma['perms']} {vma['path']}".rstrip()
        try:
            kind = classify_vma(vma)
            if kind == "file":
                _check_mapped_fs(s.proc.path(f"map_files/{vma['start']:x}-{vma['end']:x}"), vma["path"], known,
                                 (vma["dev"], vma["inode"], vma["path"]))
            bad = [f for f in vma["flags"] if f not in KNOWN_FLAGS]
            if bad and kind != "special":
                raise Refusal("unsupported-mapping", "VmFlags " + ", ".join(
                    FLAG_NAMES.get(f, f"protection key {f[4:]} (pkey_mprotect)" if f.startswith("pkey") else f)
                    for f in bad), path=vma["path"] or None)
            if kind == "sysvshm":
                from . import sysvshm
                if sysv is None:
                    sysv = sysvshm.table_for(ctx)
                vma["sysv"] = sysvshm.survey_vma(vma, sysv)
        except Refusal as r:
            s.refuse(what, "mapping", r)
            if vma["path"].startswith("/SYSV"):     # its segment's attaches are not counted (sysvshm.outside)
                s.memo.setdefault("sysvshm-refused", set()).add(vma["inode"])
            continue
        vma["kind"] = kind
        vma["map_files"] = s.proc.path(f"map_files/{vma['start']:x}-{vma['end']:x}")
        s.vmas.append(vma)
        s.ok(what, "mapping", kind)
    if sysv is not None and (ctx is None or ctx.tree_root is None):
        # attachers outside the process (a tree's members: tree.tree_problems, all at once)
        from . import sysvshm
        for _, v, r in sysvshm.outside([(s.pid, v) for v in s.vmas if v["kind"] == "sysvshm"],
                                       s.memo.get(sysvshm.REFUSED_KEY, ())):
            s.refuse(f"mapping {v['start']:x}-{v['end']:x} {v['perms']} {v['path']}", "mapping", r)
    if any(v["kind"] == "shmem" for v in s.vmas):
        # one object in several mappings, or in a part of one (engine/shmem.py)
        from . import shmem
        for v, r in shmem.survey(s.vmas):
            s.refuse(f"mapping {v['start']:x}-{v['end']:x} {v['perms']} {v['path']}", "mapping", r)
        if ctx is None or ctx.tree_root is None:
            for _, what, r in shmem.uncovered([(s.pid, s.vmas)]):     # a tree's: tree.tree_problems
                s.refuse(what, "mapping", r)
    if (ctx is None or ctx.tree_root is None) and any(v["kind"] in ("shmem", "file") and v["perms"][3] == "s"
                                                      for v in s.vmas):
        # holders outside the process (a tree's: tree.tree_problems, all at once)
        from . import shmem
        for _, what, r in shmem.outside([(s.pid, s.vmas)]):
            s.refuse(what, "mapping", r)
    # The restore can give back only a block made from its own by a move
    # and unmaps (engine/vdsoblock.py): judged here against ckpt's, on this
    # kernel, so that such a process is refused before the dump kills it.
    why = vdsoblock.misfit(s.vmas, vdsoblock.own())
    if why:
        s.refuse("vdso block", "mapping", Refusal("unsupported-mapping", why))


def fd_info(proc: procfs.Proc, fd: int) -> fdkinds.FdInfo:
    """FdInfo for one fd of a frozen process. Raises Refusal(no-such-process)."""
    link = proc.readlink(f"fd/{fd}")
    try:
        st = os.stat(proc.path(f"fd/{fd}"))
    except FileNotFoundError:
        raise Refusal("no-such-process", f"fd {fd} vanished", pid=proc.pid) from None
    text = proc.fdinfo_text(fd)
    info = procfs.parse_fdinfo(text)
    return fdkinds.FdInfo(pid=proc.pid, fd=fd, link=link, mode=st.st_mode, dev=st.st_dev, ino=st.st_ino,
                          nlink=st.st_nlink, size=st.st_size, rdev=st.st_rdev,
                          pos=int(info.get("pos", "0")), flags=int(info.get("flags", "0"), 8),
                          mnt_id=int(info.get("mnt_id", "0")), fdinfo=info, fdinfo_text=text, stat=st)


def _check_fds(s: Survey, ctx: DumpContext) -> None:
    infos = [fd_info(s.proc, fd) for fd in s.proc.fds()]
    ctx.all_fds = {i.fd: i for i in infos}
    pfd = None
    try:
        for info in infos:
            what = f"fd {info.fd} {info.link}"
            try:
                kind, mod = fdkinds.handler_for(info)
                desc = mod.classify(info, ctx)
                if kind != "directory":      # a directory's owner is dnotify's (refused there)
                    if pfd is None:
                        pfd = pidfd.pidfd_open(s.pid)
                    _check_owner(info, ctx, pfd)
            except Refusal as r:
                s.refuse(what, fdkinds.classify_kind(info), r)
                continue
            s.fds.append((info, kind, mod))
            s.ok(what, kind, desc or kind)
    finally:
        if pfd is not None:
            os.close(pfd)


def _check_owner(info, ctx: DumpContext, pfd: int) -> None:
    """The F_SETOWN owner and F_SETSIG signal of every open file, O_ASYNC or
    not: without O_ASYNC they still decide where SIGURG goes and where
    signals go once the process turns O_ASYNC on, and F_GETOWN reads them
    back (a restore that kept only O_ASYNC's lost them). Saved in
    `info.owner` (engine/dump.py records it); an owner outside the dump is
    refused, as for O_ASYNC."""
    from .fds._util import check_owner, read_owner
    info.owner = read_owner(info, pfd)
    if info.owner is not None:
        check_owner(info, ctx, info.owner)


def preflight(pid: int, ctx: DumpContext, proc: procfs.Proc, maps: Optional[List[dict]] = None,
              status: Optional[Dict[str, str]] = None) -> Survey:
    """Everything about the frozen process that can be judged without
    injecting syscalls. Refusals are collected, not raised. `maps`: its
    /proc/PID/maps as parsed since the freeze, when the caller has it
    (nothing injected since: the same lines; one read and parse fewer);
    `status` likewise its /proc/PID/status."""
    s = Survey(pid=pid, proc=proc)
    s.maps = maps
    s.stat = proc.stat()
    s.status = status if status is not None else proc.status()
    _check_process(s, ctx)
    _check_restore_env(s, ctx.tree_root not in (None, pid), getattr(ctx.options, "shell_job", False))
    _check_vmas(s, ctx)
    _check_fds(s, ctx)
    _check_ctty(s, ctx)
    return s


def _check_ctty(s: Survey, ctx: DumpContext) -> None:
    """A controlling terminal is restorable when it is a pty: the pair the
    session leader holds itself (engine/fds/tty.py sets it again), or, with
    --shell-job, the terminal of ckpt's own session (the restored process
    joins that session, and so its terminal)."""
    st = s.stat
    nr = st.get("tty_nr", 0)
    sid = st.get("session")
    tree = ctx.tree_pids if ctx.tree_root is not None else frozenset()
    if sid != s.pid and sid in tree:
        _check_session_member(s, ctx, nr, sid)
        return
    if not nr:
        return
    from .fds import tty
    idx = tty.ctty_index(s.pid)
    if idx is None:
        s.refuse("controlling terminal", "session", Refusal(
            "unsupported-state", f"has a controlling terminal that is not a pseudo-terminal (tty_nr {nr}); "
            "start it with setsid"))
        return
    ends = tty._ends(ctx).get(idx) or {"master": [], "slave": []}
    if sid == s.pid:
        if ends["master"] and ends["slave"]:
            s.ok("controlling terminal", "session", f"/dev/pts/{idx}, a pair the process holds")
        elif tty._tree_master(ctx, idx):
            held = tty._tree_master(ctx, idx)
            s.ok("controlling terminal", "session", f"/dev/pts/{idx}, whose master pid {held[0]} of the tree "
                 "holds (set again after its setsid(), before it forks)")
        elif ends["slave"]:
            s.refuse("controlling terminal", "session", Refusal(
                "tty-outside", f"session leader whose controlling terminal /dev/pts/{idx} has its master "
                "outside the dump: another terminal cannot be made its controlling terminal"))
        else:
            s.refuse("controlling terminal", "session", Refusal(
                "tty", f"controlling terminal /dev/pts/{idx} is held by no fd of the process"))
    elif getattr(ctx.options, "shell_job", False):
        s.ok("controlling terminal", "session", f"/dev/pts/{idx}, the terminal of its shell's session "
             "(--shell-job: restored in the restoring shell's session, on its terminal)")
    else:
        s.refuse("controlling terminal", "session", Refusal(
            "tty-outside", f"runs on /dev/pts/{idx}, the terminal of session {sid} (a shell's): dump with "
            "--shell-job and restore with --tty"))


def _check_session_member(s: Survey, ctx: DumpContext, nr: int, sid: int) -> None:
    """A member of a tree in the session another member leads: a restore
    gives it the leader's controlling terminal (it is forked after the
    leader's TIOCSCTTY and inherits it, engine/tree_restore.py), so it must
    have that one now: a process forked before its leader took a terminal,
    or left with none by TIOCNOTTY, has none."""
    try:
        lead = procfs.Proc(sid).stat().get("tty_nr", 0)
    except (OSError, ValueError):
        lead = None
    if lead == nr:
        if nr:
            from .fds import tty
            s.ok("controlling terminal", "session", f"/dev/pts/{tty.ctty_index(s.pid)}, its session's, whose "
                 f"leader {sid} is in the tree (the restored member inherits it from the leader)")
        return
    s.refuse("controlling terminal", "session", Refusal(
        "tty", f"controlling terminal {nr or 'none'} (tty_nr), its session leader {sid}'s is {lead or 'none'}: "
        "restored, it would inherit the leader's"))


def features() -> List[str]:
    """Kernel features and capabilities the engine needs that are missing
    here (empty when all are present)."""
    missing = []
    if kernel_version(os.uname().release) < MIN_KERNEL:
        missing.append(f"kernel >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]} (this is {os.uname().release})")
    eff = int(procfs.self_status().get("CapEff", "0"), 16)     # the memo the later checks read too
    if not (eff >> 21) & 1 and not (eff >> 40) & 1:
        missing.append("capability CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")
    if not (eff >> 19) & 1:
        missing.append("capability CAP_SYS_PTRACE")
    if not os.path.exists("/proc/self/pagemap"):
        missing.append("kernel /proc/PID/pagemap (CONFIG_PROC_PAGE_MONITOR)")
    if not os.path.exists("/proc/self/map_files"):
        missing.append("kernel /proc/PID/map_files (CONFIG_CHECKPOINT_RESTORE)")
    return missing


MIN_KERNEL = (5, 13)   # PTRACE_GET_RSEQ_CONFIGURATION; clone3 set_tid is 5.5


def kernel_version(release: str) -> tuple:
    nums = []
    for part in release.split("-")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        nums.append(int(digits or 0))
    return tuple(nums)


def require_features() -> None:
    """Raise Refusal(capability | kernel-missing) naming what is missing."""
    missing = features()
    pidns.check_environment(procfs.self_status())
    caps = [m for m in missing if m.startswith("capability")]
    if caps:
        raise Refusal("capability", "; ".join(caps))
    if missing:
        raise Refusal("kernel-missing", "; ".join(missing))
