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
go.

Survey. Every live member is surveyed as a single process would be
(dump._survey_frozen, with the other members not counting as "outside" for
pipe/file peers), then the tree as a whole (`tree_problems`):
  * what a restore would split: two members sharing an fd table, fs,
    signal handlers or memory (CLONE_FILES/FS/SIGHAND/VM without
    CLONE_THREAD, or a vfork child) -> `tree-sharing`, naming both;
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
comm, and a zombie's wait status. An open file description held by several
members is dumped once, by the first member holding it; the others' fds
say {"ofd_of": [pid, fd]}. Shared anonymous memory is dumped once; the
other members' mappings say {"tree_shared": [pid, start, end]}.
Restore: engine/tree_restore.py.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional

from . import procfs, ptrace, threads
from .check import SHMEM_NAMES
from .errors import Refusal, Refusals
from .libc import SysError
from .pidfd import KCMP_FILE, kcmp

O_TRACEFORK, O_TRACEVFORK = 0x2, 0x4
TREE_OPTIONS = threads.FREEZE_OPTIONS | O_TRACEFORK | O_TRACEVFORK
MAX_ROUNDS = 64
TREE_FILE = "tree.json"
# kcmp types (linux/kcmp.h) a restore of separate processes could not share
KCMP_SHARED = {"memory (CLONE_VM, or a vfork child)": 1, "fd table (CLONE_FILES)": 2,
               "fs: cwd, root, umask (CLONE_FS)": 3, "signal handlers (CLONE_SIGHAND)": 4}


class Member:
    """One process of the tree: frozen (tasks) or a zombie (status)."""

    def __init__(self, pid: int, ppid: int, stat: dict, tasks: Optional[list] = None):
        self.pid, self.ppid, self.stat, self.tasks = pid, ppid, stat, tasks
        self.zombie = tasks is None
        self.status = stat.get("exit_code", 0)
        self.survey = None
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
        return rec


def stat_of(pid: int) -> dict:
    """/proc/PID/stat with exit_code (field 52: a zombie's wait status)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    st = procfs.parse_stat(text)
    rest = text[text.rindex(")") + 2:].split()
    st["exit_code"] = int(rest[52 - 3]) if len(rest) > 52 - 3 else 0
    return st


def children_of(pid: int) -> List[int]:
    """Children of every thread of `pid` (a child's parent is the thread
    that forked it)."""
    out: List[int] = []
    for tid in threads.tids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return sorted(set(out))


def has_children(pid: int) -> bool:
    return bool(children_of(pid))


# -- freeze ----------------------------------------------------------------------

def freeze(root: int) -> List[Member]:
    """Every member frozen (or recorded as a zombie), parents before their
    children. Raises Refusal; then no member is left stopped."""
    first = Member(root, stat_of(root)["ppid"], stat_of(root), threads.freeze(root, TREE_OPTIONS))
    first.is_root = True
    members = [first]
    known: Dict[int, Member] = {root: first}
    try:
        for _ in range(MAX_ROUNDS):
            new = [(c, m.pid) for m in members if not m.zombie for c in children_of(m.pid) if c not in known]
            if not new:
                return members
            for child, parent in new:
                if child in known:
                    continue
                m = _freeze_member(child, parent)
                if m is not None:
                    members.append(m)
                    known[child] = m
        raise Refusal("process-tree", f"processes kept being forked faster than they could be frozen "
                      f"({MAX_ROUNDS} passes over the tree)", pid=root)
    except BaseException:
        _stragglers(members, known)
        release(members)
        raise


def _freeze_member(pid: int, ppid: int) -> Optional[Member]:
    try:
        st = stat_of(pid)
    except (OSError, ValueError):
        return None       # exited and reaped meanwhile
    if st["state"] in ("Z", "X"):
        return Member(pid, ppid, st)
    try:
        tasks = threads.freeze(pid, TREE_OPTIONS)
    except Refusal as r:
        if r.reason == "ptraced" and threads._tracer(pid) == os.getpid():
            # Forked by a member after its seize (PTRACE_O_TRACEFORK): ours already.
            tasks = threads.freeze(pid, TREE_OPTIONS, auto_attached=True)
        elif r.reason == "no-such-process":
            try:
                st = stat_of(pid)
            except (OSError, ValueError):
                return None
            return Member(pid, ppid, st) if st["state"] in ("Z", "X") else None
        elif r.reason == "ptraced":
            raise Refusal("ptraced", f"member {pid} ({st['comm']}, child of {ppid}) is traced by pid "
                          f"{threads._tracer(pid)}", pid=pid) from None
        else:
            raise
    return Member(pid, ppid, st, tasks)


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
                members.append(Member(c, m.pid, stat_of(c), threads.freeze(c, TREE_OPTIONS, auto_attached=True)))
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
                os.kill(m.pid, signal.SIGKILL)
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
        if parent.zombie:
            continue
        for what, kind in KCMP_SHARED.items():
            try:
                same = kcmp(parent.pid, m.pid, kind, 0, 0) == 0
            except Exception:     # noqa: BLE001 - no kcmp: the freeze-time checks already refused
                same = False
            if same:
                out.append((m, "sharing", Refusal("tree-sharing", f"pid {m.pid} shares its {what} with its parent "
                            f"{parent.pid}: a restore would make two")))
    out.extend(_shmem_outside(members))
    return out


def _shmem_key(v: dict):
    return (v["dev"], v["inode"])


def _shmem_outside(members: List[Member]) -> List[tuple]:
    """Shared anonymous memory of the tree also mapped by another process."""
    ours = {}
    for m in members:
        if m.survey is None:
            continue
        for v in m.survey.vmas:
            if v.get("kind") == "shmem":
                ours.setdefault(_shmem_key(v), (m, v))
    if not ours:
        return []
    pids = {m.pid for m in members}
    out, seen = [], set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in pids or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/maps") as f:
                vmas = procfs.parse_maps(f.read())
        except OSError:
            continue
        for v in vmas:
            key = _shmem_key(v)
            if key in ours and v["path"].startswith(SHMEM_NAMES) and key not in seen:
                seen.add(key)
                m, mine = ours[key]
                out.append((m, f"mapping {mine['start']:x}-{mine['end']:x}", Refusal(
                    "memory-peer-outside", f"shared memory {v['path']} (inode {v['inode']}) is also mapped by "
                    f"pid {name} outside the tree", path=v["path"])))
    return out


def shared_ofds(members: List[Member]) -> Dict[int, Dict[int, list]]:
    """{member pid: {fd: [owner pid, owner fd]}} for each fd sharing an
    open file description with an earlier member's (kcmp KCMP_FILE; only
    fds on the same inode can)."""
    out: Dict[int, Dict[int, list]] = {}
    seen: Dict[tuple, List[tuple]] = {}      # (dev, ino) -> [(pid, fd)] of earlier members' files
    for m in members:
        if m.survey is None:
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
    anonymous memory an earlier member maps too. Raises Refusal when the
    two mappings differ in size (a part of the object: not rebuilt)."""
    owners: Dict[tuple, tuple] = {}
    out: Dict[int, Dict[int, list]] = {}
    for m in members:
        if m.survey is None:
            continue
        mine = {}
        for v in m.survey.vmas:
            if v.get("kind") != "shmem":
                continue
            key = _shmem_key(v)
            if key in owners:
                opid, ostart, oend = owners[key]
                if oend - ostart != v["end"] - v["start"] or v["offset"]:
                    raise Refusal("unsupported-mapping", f"shared memory {v['path']} mapped {oend - ostart} bytes by "
                                  f"pid {opid} and {v['end'] - v['start']} here", pid=m.pid)
                mine[v["start"]] = [opid, ostart, oend]
            else:
                owners[key] = (m.pid, v["start"], v["end"])
        out[m.pid] = mine
    return out


class Sub:
    """An image seen from a member's directory (tree/PID/): the names the
    single-process code writes and reads, prefixed."""

    def __init__(self, img, prefix: str):
        self._img, self.prefix = img, prefix

    def open(self, name):
        return self._img.open(self.prefix + name)

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

    def __getattr__(self, name):
        return getattr(self._img, name)


def sub(img, prefix: str):
    return img if not prefix or img is None else Sub(img, prefix)


# -- entry points ----------------------------------------------------------------

def _survey(members: List[Member], options, img, boot) -> List[Refusal]:
    from .context import DumpContext
    from .dump import _survey_frozen
    pids = frozenset(m.pid for m in members)
    root = members[0].pid
    for m in members:
        if m.zombie:
            continue
        ctx = DumpContext(pid=m.pid, options=options, image=sub(img, m.dir), boot_id=boot,
                          tree_root=root, tree_pids=pids)
        ctx.task, ctx.threads = m.tasks[0], m.tasks[1:]
        m.ctx = ctx
        m.survey, m.state, m.recs = _survey_frozen(m.pid, m.tasks[0], ctx, procfs.Proc(m.pid))
    for m, what, r in tree_problems(members):
        if m.survey is None:      # a zombie: its parent's survey carries it
            r = r.with_pid(m.pid) if r.pid is None else r
            parent = next(p for p in members if p.pid == m.ppid)
            parent.survey.refuse(f"child {m.pid} {what}", "process", r)
        else:
            m.survey.refuse(what, "process", r)
    return [r for m in members if m.survey is not None for r in m.survey.refusals]


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
        try:
            refusals = _survey(members, options, img, boot_id())
            if refusals:
                raise refusals[0] if len(refusals) == 1 else Refusals(refusals)
            ofds = shared_ofds(members)
            shm = shared_memory(members)
            live = [m for m in members if not m.zombie]
            total = nfds = nvmas = 0
            for m in live:
                task, ctx, state, s = m.tasks[0], m.ctx, m.state, m.survey
                simg = sub(img, m.dir)
                dumper = PageDumper(m.pid, simg)
                dumpers.append(dumper)
                state["xstate"] = arch.xstate_features(task.get_xstate())
                simg.write_bytes("xstate.bin", task.get_xstate())
                if ctx.threads:
                    simg.write_bytes(threads.XSTATE_FILE, threads.pack_xstate(ctx.threads, state["threads"]))
                state["exe"] = m.recs["exe"]
                fdrecs = _dump_fds(s, ctx, ofds.get(m.pid, {}))
                vmas = _dump_memory(m, dumper, shm.get(m.pid, {}))
                dumper.run()
                simg.write_json("mm.json", {"vmas": vmas, "page_files": dumper.nfiles})
                simg.write_json("fds.json", fdrecs)
                total += dumper.total
                nfds += len(fdrecs)
                nvmas += len(vmas)
            img.sync_files()
            for m in live:
                task, state = m.tasks[0], m.state
                state["signals"] = single.pending_signals(task, state)
                for t, rec in zip(m.ctx.threads, state["threads"]):
                    rec["signals"] = threads.pending(t, rec, state)
                sub(img, m.dir).write_json("core.json", state)
            img.write_json(TREE_FILE, {"root": pid, "members": [m.record() for m in members]})
            meta = {"pid": pid, "comm": members[0].state["comm"], "boot_id": members[0].ctx.boot_id,
                    "pages_bytes": total, "members": len(members)}
            if options.leave_running:
                release(members)
                t1 = time.monotonic()
                img.commit(meta)
            else:
                img.commit(meta)
                kill(members)
                t1 = time.monotonic()
        except BaseException:
            for d in dumpers:
                d.close()
            release(members)
            raise
    return {"pid": pid, "image": img.final, "pages_bytes": total, "mappings": nvmas,
            "threads": sum(len(m.tasks) for m in live), "members": len(members),
            "zombies": sum(1 for m in members if m.zombie),
            "fds": nfds, "frozen_ms": round((t1 - t_frozen) * 1000, 2),
            "total_ms": round((time.monotonic() - t0) * 1000, 2), "left_running": bool(options.leave_running)}


def _dump_fds(s, ctx, shared: Dict[int, list]) -> List[dict]:
    """dump.dump_fds, but an open file description an earlier member holds
    is that member's: {"ofd_of": [pid, fd]} (its dups here too)."""
    from .fds._dups import leader_map
    infos = [info for info, _, _ in s.fds]
    leaders = leader_map(s.pid, infos) if infos else {}
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
            rec = mod.dump(info, ctx)
        rec.update(common)
        out.append(rec)
    return out


def _dump_memory(m: Member, dumper, shared: Dict[int, list]) -> List[dict]:
    """dump.dump_memory; shared memory an earlier member holds is dumped
    there only."""
    from .dump import dump_memory
    s = m.survey
    if shared:
        class _View:
            pass
        view = _View()
        view.vmas = [dict(v, kind="tree-shared") if v["start"] in shared else v for v in s.vmas]
        s = view
    vmas = dump_memory(m.pid, s, m.recs, dumper)
    for v in vmas:
        if v["start"] in shared:
            v["kind"] = "shmem"
            v["tree_shared"] = shared[v["start"]]
    return vmas
