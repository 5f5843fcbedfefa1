"""Process trees: `ckpt dump/check -t PID` of PID and every descendant.

Freeze. The root is frozen like a single process (engine/threads.py: every
thread seized and interrupted), with PTRACE_O_TRACEFORK/VFORK/CLONE, so a
child forked by a member between its seize and its stop is attached to us
by the kernel. Then /proc/M/task/*/children of every frozen member is read
and every new child frozen (or recorded, when it is a zombie), pass after
pass, until a pass finds no new process: a stopped member cannot fork, so
the tree is then complete. Processes forked faster than they can be frozen
for MAX_ROUNDS passes are refused (`process-tree`), and on any refusal every
member (also one the kernel attached to us that no pass reached yet) is let
go. Only then, every thread of every member stopped, is the freeze
finished (threads.finish_freeze): a SIGCHLD from a member that exited
during the freeze, pending over its parent's interrupted wait, is taken
there (engine/task.py settle). A vfork child is given VFORK_WAIT to exec
before the refusal.

Survey. Every live member is surveyed as a single process would be
(dump._survey_frozen, with the other members not counting as "outside" for
pipe/file peers), then the tree as a whole (`tree_problems`):
  * what members share without being threads (kcmp over every live
    member, shared_kernel_objects): fd tables and fs are restored shared
    (engine/sharing.py plans how: Member.share / leave); memory or signal
    handlers (CLONE_VM/SIGHAND, a vfork child), or a table no plan
    rebuilds -> `tree-sharing`, naming the pids; memory, a table or fs
    also held outside the tree -> `sharing-peer-outside`;
  * sessions and process groups a restore cannot rebuild: a member's
    session must be its own (setsid) or its parent's (inherited), its group
    its own, one led by a member of the same session, or the root's group
    from outside -> `process-tree`;
  * shared anonymous memory also mapped outside the tree ->
    `memory-peer-outside`, naming the outside pid;
  * a zombie killed by a signal that dumped core -> `process-tree`.

Image. The root's files are where a single process's are (core.json,
mm.json, fds.json, pages...); every other member's under tree/PID/; and
tree.json lists the members parents first: pid, ppid, dir, sid, pgid,
comm, a zombie's wait status, "share": ["files", "fs"] (created holding
its parent's fd table / fs) and "leave" (unshares them once it made its
children); a table several members hold is dumped by its first holder,
the others' fds.json is empty. An open file
description held by several
members is dumped once, by the first member holding it; the others' fds
say {"ofd_of": [pid, fd]}. Shared anonymous memory is dumped once; the
other members' mappings say {"tree_shared": [pid, start, end]}.
Restore: engine/tree_restore.py.
"""

from __future__ import annotations

import os
import _signal      # not signal: signal.py builds its enums at import (enum: ~20 ms of a run under TCG)
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from . import cow, faults, pidns, procfs, ptrace, sharing, shmem, threads, timens
from .errors import EngineError, Refusal, Refusals
from .libc import SysError
from .pidfd import KCMP_FILE, kcmp
from .task import Task

O_TRACEFORK, O_TRACEVFORK = 0x2, 0x4
TREE_OPTIONS = threads.FREEZE_OPTIONS | O_TRACEFORK | O_TRACEVFORK
MAX_ROUNDS = 64
TREE_FILE = "tree.json"
# kcmp types (linux/kcmp.h) a restore of separate processes could not share
KCMP_SHARED = {"memory (CLONE_VM, or a vfork child)": 1, "fd table (CLONE_FILES)": 2,
               "fs: cwd, root, umask (CLONE_FS)": 3, "signal handlers (CLONE_SIGHAND)": 4}
KCMP_FILES, KCMP_FS, KCMP_SIGHAND = sharing.KCMP_FILES, sharing.KCMP_FS, sharing.KCMP_SIGHAND
# What a restore rebuilds shared (engine/sharing.py plan), by kcmp type.
SHAREABLE = {KCMP_FILES: "files", KCMP_FS: "fs"}


class Member:
    """One process of the tree: frozen (tasks) or a zombie (status)."""

    def __init__(self, pid: int, ppid: int, stat: dict, tasks: Optional[list] = None):
        self.pid, self.ppid, self.stat, self.tasks = pid, ppid, stat, tasks
        self.zombie = tasks is None
        self.status = stat.get("exit_code", 0)
        self.survey = None
        # tree.json "share" / "leave" (engine/sharing.py plan); the tables it
        # is the first holder of, dumped with it ("files": its fds.json)
        self.share: List[str] = []
        self.leave: List[str] = []
        self.owns: List[str] = list(sharing.KINDS)
        self.state = None
        self.recs = None
        self.ctx = None

    @property
    def dir(self) -> str:
        return "" if self.is_root else f"tree/{self.pid}/"

    is_root = False

    def record(self) -> dict:
        rec = {"pid": self.pid, "ppid": self.ppid, "dir": self.dir, "sid": self.stat["session"],
               "pgid": self.stat["pgrp"], "comm": self.stat["comm"],
               "exit_signal": self.stat.get("exit_signal", 17)}
        if self.zombie:
            rec["zombie"] = {"status": self.status}
        if self.share:
            rec["share"] = list(self.share)
        if self.leave:
            rec["leave"] = list(self.leave)
        return rec


def stat_of(pid: int) -> dict:
    """/proc/PID/stat with exit_code (field 52: a zombie's wait status)."""
    text = procfs.read_all(f"/proc/{pid}/stat").decode()
    st = procfs.parse_stat(text)
    rest = text[text.rindex(")") + 2:].split()
    st["exit_code"] = int(rest[52 - 3]) if len(rest) > 52 - 3 else 0
    return st


children_of = threads.children_of       # (in engine/threads.py: every dump asks)
has_children = threads.has_children


# -- freeze ----------------------------------------------------------------------

def freeze(root: int) -> List[Member]:
    """Every member frozen (or recorded as a zombie), parents before their
    children. Raises Refusal; then no member is left stopped."""
    _no_vfork(root)
    first = Member(root, stat_of(root)["ppid"], stat_of(root), threads.freeze(root, TREE_OPTIONS, finish=False))
    first.is_root = True
    members = [first]
    known: Dict[int, Member] = {root: first}
    try:
        for _ in range(MAX_ROUNDS):
            faults.point("dump.tree.freeze")
            new = [(c, m.pid) for m in members if not m.zombie for c in children_of(m.pid) if c not in known]
            if not new:
                # Every thread of every member stopped: now each may take a
                # pending signal over an interrupted call (threads.finish_freeze).
                threads.finish_freeze([t for m in members if m.tasks for t in m.tasks])
                return members
            batch: Dict[int, int] = {}
            for child, parent in new:
                batch.setdefault(child, parent)
            for m in _freeze_members(list(batch.items()), members, known):
                members.append(m)
                known[m.pid] = m
        raise Refusal("process-tree", f"processes kept being forked faster than they could be frozen "
                      f"({MAX_ROUNDS} passes over the tree)", pid=root)
    except BaseException:
        _stragglers(members, known)
        release(members)
        raise


def _freeze_members(batch: List[tuple], members: List[Member], known: Dict[int, Member]) -> List[Member]:
    """_freeze_member() for each (pid, ppid) of a pass, in that order, the
    leaders interrupted side by side: every one is seized and interrupted
    before the first is waited for, so the stops overlap instead of taking
    turns. One that cannot be seized at once (exiting, traced) takes
    _freeze_member()'s path, which tries again and says why; a refusal
    after the seize is judged as there (_freeze_refused). On an error
    every member already frozen is added to `members` and `known` (for
    the caller to let go, and not to take for a straggler) before it is
    raised."""
    got: Dict[int, Optional[Member]] = {}
    started = []
    failed: Optional[BaseException] = None
    try:
        for pid, ppid in batch:
            try:
                st = stat_of(pid)
            except (OSError, ValueError):
                got[pid] = None       # exited and reaped meanwhile
                continue
            if st["state"] in ("Z", "X"):
                got[pid] = Member(pid, ppid, st)
                continue
            _no_vfork(pid)
            try:
                started.append((pid, ppid, st, Task.begin_seize(pid, TREE_OPTIONS)))
            except (Refusal, SysError):
                pass
    except BaseException as e:      # noqa: BLE001 - the started ones are finished first
        failed = e
    for pid, ppid, st, handle in started:
        try:
            got[pid] = Member(pid, ppid, st, threads.freeze(pid, TREE_OPTIONS, finish=False,
                                                         leader=Task.finish_seize(handle, finish=False)))
        except Refusal as r:
            # let go already (finish_seize, threads.freeze); judged as _freeze_member judges it
            if r.reason != "ptraced":
                try:
                    got[pid] = _freeze_refused(pid, ppid, st, r)
                except BaseException as e:  # noqa: BLE001 - every started one is finished first
                    failed = failed or e
        except BaseException as e:      # noqa: BLE001 - every started one is finished first
            failed = failed or e
    out: List[Member] = []
    try:
        if failed is not None:
            raise failed
        for pid, ppid in batch:
            m = got.pop(pid) if pid in got else _freeze_member(pid, ppid)
            if m is not None:
                out.append(m)
    except BaseException:
        for m in out + [m for m in got.values() if m is not None]:
            members.append(m)
            known[m.pid] = m
        raise
    return out


def _freeze_member(pid: int, ppid: int) -> Optional[Member]:
    try:
        st = stat_of(pid)
    except (OSError, ValueError):
        return None       # exited and reaped meanwhile
    if st["state"] in ("Z", "X"):
        return Member(pid, ppid, st)
    _no_vfork(pid)
    deadline = time.monotonic() + 1.0
    while True:
        try:
            tasks = threads.freeze(pid, TREE_OPTIONS, finish=False)
            break
        except Refusal as r:
            if r.reason != "ptraced" or threads._tracer(pid) != 0 or time.monotonic() > deadline:
                return _freeze_refused(pid, ppid, st, r)
            # EPERM with no tracer: PTRACE_SEIZE refuses a task that is
            # exiting. It is about to be a zombie (or gone): look again.
            time.sleep(0.002)
            try:
                st = stat_of(pid)
            except (OSError, ValueError):
                return None
            if st["state"] in ("Z", "X"):
                return Member(pid, ppid, st)
    return Member(pid, ppid, st, tasks)


VFORK_WAIT = 1.0     # seconds a vfork child is given to exec or exit


def _no_vfork(pid: int) -> None:
    """Refuse, before freezing `pid`, a child sharing its memory (CLONE_VM):
    a vfork child that has not exec'd yet holds its parent in an
    uninterruptible wait that no ptrace stop can end, so the freeze would
    wait for it; a restore would split the memory anyway. A shell's vfork
    child normally execs within milliseconds (dash runs every command that
    way: a pipeline caught between its vfork and its exec was refused), so
    it is given VFORK_WAIT to exec or exit before the refusal."""
    deadline = time.monotonic() + VFORK_WAIT
    while True:
        c = _vfork_child(pid)
        if c is None:
            return
        if time.monotonic() >= deadline:
            raise Refusal("tree-sharing", f"pid {c} shares its memory with its parent {pid} (CLONE_VM, or a "
                          "vfork child that has not exec'd): a restore would make two", pid=pid)
        time.sleep(0.002)


def _vfork_child(pid: int) -> Optional[int]:
    """A child of `pid` sharing its memory, or None."""
    for c in children_of(pid):
        try:
            if kcmp(pid, c, KCMP_SHARED["memory (CLONE_VM, or a vfork child)"], 0, 0) == 0:
                return c
        except Exception:    # noqa: BLE001 - gone meanwhile, or no kcmp (refused elsewhere)
            continue
    return None


def _freeze_refused(pid: int, ppid: int, st: dict, r: Refusal) -> Optional[Member]:
    """A member whose freeze was refused: ours already, exited, or traced
    by someone else (refused, naming the tracer)."""
    if r.reason == "ptraced" and threads._tracer(pid) == os.getpid():
        # Forked by a member after its seize (PTRACE_O_TRACEFORK): ours already.
        return Member(pid, ppid, st, threads.freeze(pid, TREE_OPTIONS, auto_attached=True, finish=False))
    if r.reason == "no-such-process":
        try:
            st = stat_of(pid)
        except (OSError, ValueError):
            return None
        return Member(pid, ppid, st) if st["state"] in ("Z", "X") else None
    if r.reason == "ptraced":
        raise Refusal("ptraced", f"member {pid} ({st['comm']}, child of {ppid}) is traced by pid "
                      f"{threads._tracer(pid)}", pid=pid) from None
    raise r


def _stragglers(members: List[Member], known: dict) -> None:
    """Children the kernel attached to us (TRACEFORK) that no pass reached:
    let go with the rest."""
    me = os.getpid()
    for m in list(members):
        if m.zombie:
            continue
        for c in children_of(m.pid):
            if c in known or threads._tracer(c) != me:
                continue
            try:
                members.append(Member(c, m.pid, stat_of(c), threads.freeze(c, TREE_OPTIONS, auto_attached=True, finish=False)))
            except (Refusal, SysError, OSError, ValueError):
                continue


def release(members: List[Member]) -> None:
    for m in reversed(members):
        if m.tasks:
            threads.release(m.tasks)


def kill(members: List[Member]) -> None:
    """SIGKILL every member (all at once, so none sees another die), then
    consume each one's exit."""
    for m in members:
        if m.tasks:
            try:
                os.kill(m.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
    for m in reversed(members):
        if m.tasks:
            threads.kill(m.tasks)


# -- the tree as a whole ---------------------------------------------------------

def tree_problems(members: List[Member]) -> List[tuple]:
    """[(member, what, Refusal)] of what only the whole tree shows."""
    out = []
    by_pid = {m.pid: m for m in members}
    root = members[0]
    for m in members[1:]:
        parent = by_pid[m.ppid]
        sid, pgid = m.stat["session"], m.stat["pgrp"]
        if sid != m.pid and sid != parent.stat["session"]:
            out.append((m, "session", Refusal("process-tree", f"in session {sid}, its parent {parent.pid} in "
                        f"{parent.stat['session']}: a restore can only give it its own session or its parent's")))
        lead = by_pid.get(pgid)
        if pgid == m.pid:
            pass
        elif lead is not None and lead.stat["pgrp"] == pgid and lead.stat["session"] == sid:
            pass
        elif pgid == root.stat["pgrp"] and pgid not in by_pid and sid == root.stat["session"]:
            pass     # the root's group, outside the tree: joined at restore like the root's
        else:
            out.append((m, "process group", Refusal("process-tree", f"its process group {pgid} has no leader in the "
                        "tree (nor is it the root's): it could not be rebuilt")))
        if m.zombie:
            if m.status & 0x80:
                out.append((m, "zombie", Refusal("process-tree", f"zombie {m.pid} was killed by signal "
                            f"{m.status & 0x7f} and dumped core: its exit status cannot be made again")))
            continue
    out.extend(shared_kernel_objects(members))
    out.extend((by_pid[pid], what, r) for pid, what, r in
               shmem.outside([(m.pid, m.survey.vmas) for m in members if m.survey is not None]))
    out.extend((by_pid[pid], what, r) for pid, what, r in
               shmem.uncovered([(m.pid, m.survey.vmas) for m in members if m.survey is not None]))
    # One time namespace is made at restore, for every member: each must
    # read the clocks as the root does (engine/timens.py)
    offs = root.survey.memo.get("timens") if root.survey is not None else None
    for m in members[1:]:
        if m.survey is not None and m.survey.memo.get("timens", offs) != offs:
            out.append((m, "time namespace", Refusal("unsupported-state", "in a time namespace whose clock offsets are not "
                        "the root's: a restore makes one for the whole tree")))
    if any(v.get("kind") == "sysvshm" for m in members if m.survey is not None for v in m.survey.vmas):
        from . import sysvshm      # SysV segments: attached outside the tree? whose mapping carries the pages
        out.extend(sysvshm.tree_problems(members))
    return out


def shared_kernel_objects(members: List[Member]) -> List[tuple]:
    """Memory, fd tables, fs (cwd, root, umask) and signal handlers that
    live members share without being threads of one process (kcmp(2) of
    every live member; a zombie holds none of them any more). Sets each
    member's `share`, `leave` and `owns`; returns [(member, what,
    Refusal)] for what a restore could not make shared again.

    An fd table or fs is rebuilt by creating members with CLONE_FILES /
    CLONE_FS and, where a member holds a table only to hand it on to its
    children, unshare() once it made them (sharing.plan; kernel/fork.c
    copy_files, copy_fs, unshare_fd, unshare_fs): siblings sharing a table
    their parent left, a grandchild sharing one with its grandparent past a
    parent that left. Refused: what that cannot make (a member that would
    have to be given, or hand on, two tables, as when a table's holders
    were reparented). Memory (CLONE_VM) between processes is refused, and
    so are signal handlers: clone() refuses CLONE_SIGHAND without CLONE_VM
    (copy_process: "Shared signal handlers imply shared VM"), unshare()
    refuses to split the memory of a process whose handlers are shared
    (check_unshare_flags), and execve gives the caller handlers of its own
    (de_thread/unshare_sighand): two processes sharing handlers always
    share memory."""
    live = [m for m in members if not m.zombie]
    recs = [{"pid": m.pid, "ppid": m.ppid, **({"zombie": 1} if m.zombie else {})} for m in members]
    by_pid = {m.pid: m for m in members}
    out = []
    try:
        # each kind's groups made once: for the members' own sharing and
        # for the search of the system's processes (sharing.outside)
        every = {kind: sharing.groups([m.pid for m in live], kind) for kind in sharing.WHAT}
        out += _outside_sharers(live, every)
        for kind, what in sharing.WHAT.items():
            groups = [g for g in every[kind] if len(g) > 1]
            if kind not in SHAREABLE:
                for g in groups:
                    why = ("signal handlers are shared between processes only with their memory (clone() refuses "
                           "CLONE_SIGHAND without CLONE_VM)" if kind == KCMP_SIGHAND else "a restore would make two")
                    out.append((by_pid[g[1]], "sharing", Refusal("tree-sharing", f"pids {', '.join(map(str, g))} "
                                f"share their {what} without being threads of one process: {why}")))
                continue
            name = SHAREABLE[kind]
            why = sharing.plan(recs, groups, name)
            if why or not sharing.same_partition(sharing.tables(recs, name), groups):
                pids = "; ".join(", ".join(map(str, g)) for g in groups)
                out.append((by_pid[groups[0][0]], "sharing", Refusal("tree-sharing", f"pids {pids} share their "
                            f"{what} as no restore could rebuild from the tree: clone() hands a table to a new "
                            f"child only ({'; '.join(why) or 'a member would hold two at once'})")))
    except Refusal as r:      # no kcmp (CONFIG_KCMP): nothing shows what they share
        return [(live[0], "sharing", r)]
    except EngineError as e:  # a frozen member cannot go away: refuse rather than guess
        return [(live[0], "sharing", Refusal("tree-sharing", f"kcmp of the members: {e.message}"))]
    owns = {k: sharing.owners(recs, k) for k in sharing.KINDS}
    for m, rec in zip(members, recs):
        m.share, m.leave = rec.get("share", []), rec.get("leave", [])
        m.owns = [k for k in sharing.KINDS if owns[k].get(m.pid) == m.pid]
    return out


def _outside_sharers(live: List[Member], known: Optional[dict] = None) -> List[tuple]:
    """Memory, an fd table or fs a member shares with a process outside the
    tree: the restored member would have its own."""
    by_pid = {m.pid: m for m in live}
    return [(by_pid[pid], "sharing", Refusal("sharing-peer-outside", f"pid {pid} shares its {sharing.WHAT[kind]} "
             f"with pid {other} ({sharing.comm(other)}) outside the tree: a restore would give it its own", pid=pid))
            for pid, kind, other in sharing.outside(list(by_pid), known=known)]


def shared_ofds(members: List[Member]) -> Dict[int, Dict[int, list]]:
    """{member pid: {fd: [owner pid, owner fd]}} for each fd sharing an
    open file description with an earlier member's (kcmp KCMP_FILE; only
    fds on the same inode can)."""
    out: Dict[int, Dict[int, list]] = {}
    seen: Dict[tuple, List[tuple]] = {}      # (dev, ino) -> [(pid, fd)] of earlier members' files
    for m in members:
        if m.survey is None or "files" not in m.owns:    # its fds are an earlier member's (one table, dumped there)
            continue
        mine: Dict[int, list] = {}
        for info, _, _ in m.survey.fds:
            key = (info.dev, info.ino)
            for opid, ofd in seen.get(key, ()):
                if kcmp(opid, m.pid, KCMP_FILE, ofd, info.fd) == 0:
                    mine[info.fd] = [opid, ofd]
                    break
        for info, _, _ in m.survey.fds:
            if info.fd not in mine:
                seen.setdefault((info.dev, info.ino), []).append((m.pid, info.fd))
        out[m.pid] = mine
    return out


def shared_memory(members: List[Member]) -> Dict[int, Dict[int, list]]:
    """{member pid: {vma start: [owner pid, start, end]}} for shared
    anonymous memory an earlier member maps too: the owner's first mapping
    of the object, through which the restore maps it again (any part, at
    its own offset: engine/tree_restore.py map_shared)."""
    owners: Dict[tuple, tuple] = {}
    out: Dict[int, Dict[int, list]] = {}
    for m in members:
        if m.survey is None:
            continue
        mine = {}
        for v in m.survey.vmas:
            if v.get("kind") != "shmem":
                continue
            k = shmem.key(v)
            if k in owners and owners[k][0] != m.pid:
                mine[v["start"]] = list(owners[k])
            else:
                owners.setdefault(k, (m.pid, v["start"], v["end"]))
        out[m.pid] = mine
    return out


class Sub:
    """An image seen from a member's directory (tree/PID/): the names the
    single-process code writes and reads, prefixed."""

    def __init__(self, img, prefix: str):
        self._img, self.prefix = img, prefix

    def open(self, name):
        return self._img.open(self.prefix + name)

    def open_pages(self, name):
        return self._img.open_pages(self.prefix + name)

    def raw_path(self, name):
        return self._img.raw_path(self.prefix + name)

    def write_bytes(self, name, data):
        return self._img.write_bytes(self.prefix + name, data)

    def write_json(self, name, obj):
        return self._img.write_json(self.prefix + name, obj)

    def path(self, name):
        return self._img.path(self.prefix + name)

    def read_bytes(self, name):
        return self._img.read_bytes(self.prefix + name)

    def read_json(self, name):
        return self._img.read_json(self.prefix + name)

    def data(self, name):
        return self._img.data(self.prefix + name)

    def size(self, name):
        return self._img.size(self.prefix + name)

    def lease_fd(self, name):
        return self._img.lease_fd(self.prefix + name)

    def __getattr__(self, name):
        return getattr(self._img, name)


def sub(img, prefix: str):
    return img if not prefix or img is None else Sub(img, prefix)


# -- entry points ----------------------------------------------------------------

def _survey(members: List[Member], options, img, boot) -> List[Refusal]:
    from .context import DumpContext
    from .dump import _survey_frozen, prefetch_injected
    from .fds import _peers
    pids = frozenset(m.pid for m in members)
    root = members[0].pid
    scan: dict = {}
    prefetch_injected([m.tasks[0] for m in members if not m.zombie])
    for m in members:
        if m.zombie:
            continue
        ctx = DumpContext(pid=m.pid, options=options, image=sub(img, m.dir), boot_id=boot,
                          tree_root=root, tree_pids=pids)
        # One /proc/*/fd scan for the whole tree (made on first use, the
        # members excluded), not one per member; and what a kind surveys
        # once for every member (keys "tree:...": a pty pair split between
        # members, engine/fds/tty.py).
        ctx.shared = _LazyShared(scan, _peers._CACHE_KEY)
        ctx.task, ctx.threads = m.tasks[0], m.tasks[1:]
        m.ctx = ctx
        m.survey, m.state, m.recs = _survey_frozen(m.pid, m.tasks[0], ctx, procfs.Proc(m.pid))
    from . import jobstop
    jobstop.tree_reports(members)       # a stopped member's report to its parent (engine/jobstop.py)
    problems = tree_problems(members)
    for m in members:
        if m.survey is not None and (m.share or m.leave):
            what = {"files": "fd table", "fs": "fs (cwd, root, umask)"}
            said = [f"holds its parent's {what[k]}" for k in m.share]
            said += [f"hands its {what[k]} on to its children, then has its own" for k in m.leave]
            m.survey.ok("sharing", "process", "; ".join(said) + " (restored so)")
    for m, what, r in problems:
        if m.survey is None:      # a zombie: its parent's survey carries it
            r = r.with_pid(m.pid) if r.pid is None else r
            parent = next(p for p in members if p.pid == m.ppid)
            parent.survey.refuse(f"child {m.pid} {what}", "process", r)
        else:
            m.survey.refuse(what, "process", r)
    return [r for m in members if m.survey is not None for r in m.survey.refusals]


TREE_KEY_PREFIX = "tree:"
# Also one for the whole tree: a file's identity and digest (engine/files.py
# record_identity, by dev and inode) and a device's filesystem (map_dump's
# statfs): the members of a tree map the same libraries, each read once.
TREE_KEYS = (TREE_KEY_PREFIX, "ident:", "fsmagic:")


class _LazyShared(dict):
    """A member's ctx.shared whose entry `key`, and every entry named
    "tree:..." (or another of TREE_KEYS), live in `common` (one dict for
    the whole tree)."""

    def __init__(self, common: dict, key: str):
        super().__init__()
        self._common, self._key = common, key

    def _tree(self, k) -> bool:
        return k == self._key or (isinstance(k, str) and k.startswith(TREE_KEYS))

    def get(self, k, default=None):
        if self._tree(k):
            return self._common.get(k, default)
        return super().get(k, default)

    def __setitem__(self, k, v):
        if self._tree(k):
            self._common[k] = v
        else:
            super().__setitem__(k, v)

    def __getitem__(self, k):
        if self._tree(k):
            return self._common[k]
        return super().__getitem__(k)

    def __contains__(self, k):
        return k in self._common if self._tree(k) else super().__contains__(k)


def _label(m: Member, items: List[dict]) -> List[dict]:
    if m.is_root:
        return items
    return [dict(i, what=f"pid {m.pid}: {i['what']}") for i in items]


def check(pid: int, options) -> dict:
    """`ckpt check -t PID` of a tree: every member's verdicts."""
    from .context import boot_id
    members = freeze(pid)
    try:
        refusals = _survey(members, options, None, boot_id())
    finally:
        release(members)
    items: List[dict] = []
    for m in members:
        if m.zombie:
            items.append({"what": f"pid {m.pid}", "kind": "process", "verdict": "ok",
                          "detail": f"zombie ({m.stat['comm']}), wait status {m.status:#x}, child of {m.ppid}"})
        else:
            items.extend(_label(m, m.survey.items))
    return {"pid": pid, "ok": not refusals, "items": items, "refusals": [r.as_dict() for r in refusals],
            "members": [m.record() for m in members]}


def _on_release(members: List[Member], killed: bool) -> None:
    """engine.dump._on_release for every member (a TCP socket held in repair
    mode, its network lock). Raises EngineError as that does."""
    from .dump import _on_release as one
    first = None
    for m in members:
        if getattr(m, "ctx", None) is None:
            continue
        try:
            one(m.ctx, killed)
        except Exception as e:     # noqa: BLE001 - every member's hooks run; the first failure is raised
            first = first or e
    if first is not None:
        raise first


def dump(pid: int, directory: str, options) -> dict:
    """engine.dump.dump of the tree rooted at `pid` (dump.dump calls this
    when the target has children)."""
    from . import dump as single
    from .arch import current as current_arch
    from .context import boot_id
    from .image import ImageWriter
    from .memory import PageDumper
    t0 = time.monotonic()
    arch = current_arch()
    with ImageWriter(directory) as img:
        members = freeze(pid)
        t_frozen = time.monotonic()
        dumpers = []
        shm_pages = None
        try:
            refusals = _survey(members, options, img, boot_id())
            if refusals:
                raise refusals[0] if len(refusals) == 1 else Refusals(refusals)
            ofds = shared_ofds(members)
            shm = shared_memory(members)
            shm_pages = shmem.Pages()       # its fds closed below, or on the way out
            live = [m for m in members if not m.zombie]
            total = nfds = nvmas = 0
            mms = []
            # Before any page is read (reading unshares them: engine/cow.py find)
            cow_found = cow.find([(m.pid, m.ppid, m.survey.vmas) for m in live])
            for m in live:
                faults.point("dump.tree.member")
                task, ctx, state, s = m.tasks[0], m.ctx, m.state, m.survey
                simg = sub(img, m.dir)
                dumper = PageDumper(m.pid, simg)
                dumpers.append(dumper)
                xstate = task.get_xstate()
                # its size too: restore checks xstate.bin against it before any process exists
                state["xstate"] = dict(arch.xstate_features(xstate), bytes=len(xstate))
                simg.write_bytes("xstate.bin", xstate)
                if ctx.threads:
                    simg.write_bytes(threads.XSTATE_FILE, threads.pack_xstate(ctx.threads, state["threads"]))
                state["exe"] = m.recs["exe"]
                # A table several members hold is dumped once, by the
                # first of them; the others' fds.json is empty.
                fdrecs = single.dump_fds(s, ctx, ofds.get(m.pid, {}), "dump.tree.fd") if "files" in m.owns else []
                vmas = _dump_memory(m, dumper, shm.get(m.pid, {}), shm_pages)
                dumper.run()
                mms.append((m, simg, vmas, dumper.nfiles))
                simg.write_json("fds.json", fdrecs)
                total += dumper.total
                nfds += len(fdrecs)
                nvmas += len(vmas)
            shm_pages.close()
            # The pages a member still shares with its parent since a fork
            # (engine/cow.py), recorded for the restore to keep them shared.
            for m, simg, vmas, nfiles in mms:
                cow.mark(cow_found.get(m.pid, {}), vmas)
                simg.write_json("mm.json", {"vmas": vmas, "page_files": nfiles})
            img.sync_files()
            for m in live:
                task, state = m.tasks[0], m.state
                state["signals"] = single.pending_signals(task, state)
                for t, rec in zip(m.ctx.threads, state["threads"]):
                    rec["signals"] = threads.pending(t, rec, state)
                sub(img, m.dir).write_json("core.json", state)
            img.write_json(TREE_FILE, {"root": pid, "members": [m.record() for m in members]})
            meta = {"pid": pid, "comm": members[0].state["comm"], "boot_id": members[0].ctx.boot_id,
                    "pages_bytes": total, "members": len(members), "namespaces": pidns.record(),
                    **timens.meta(members[0].survey.memo.get("timens"))}
            if options.leave_running:
                _on_release(members, killed=False)
                release(members)
                t1 = time.monotonic()
                img.commit(meta)
            else:
                img.commit(meta)
                kill(members)
                _on_release(members, killed=True)
                t1 = time.monotonic()
        except BaseException:
            for d in dumpers:
                d.close()
            if shm_pages is not None:
                shm_pages.close()
            try:
                _on_release(members, killed=False)
            finally:
                release(members)
            raise
    return {"pid": pid, "image": img.final, "pages_bytes": total, "mappings": nvmas,
            "threads": sum(len(m.tasks) for m in live), "members": len(members),
            "signals_taken": sum(t.settled for m in live for t in m.tasks),
            "zombies": sum(1 for m in members if m.zombie),
            "fds": nfds, "frozen_ms": round((t1 - t_frozen) * 1000, 2),
            "total_ms": round((time.monotonic() - t0) * 1000, 2), "left_running": bool(options.leave_running)}


def _dump_memory(m: Member, dumper, shared: Dict[int, list], shm) -> List[dict]:
    """dump.dump_memory; shared memory is read once per object range in the
    tree (`shm`, shmem.Pages: where an earlier member's mapping of it reads
    it, this one's reads nothing)."""
    from .dump import dump_memory
    vmas = dump_memory(m.pid, m.survey, m.recs, dumper, shm)
    for v in vmas:
        if v["start"] in shared:
            v["tree_shared"] = shared[v["start"]]
    return vmas
