"""Restore of a process tree (image made by engine/tree.py): all or nothing.

In ckpt, before any process exists: tree.json checked (parents first, each
member's parent an earlier member), every member's records checked and
pre-flighted as a single process's (engine/restore.py; one RestoreContext
each, but one `shared` dict and one list of every member's fd records, so a
pipe whose ends different members hold is made once), every PID free (the
zombies' too). Then every member's fds are opened in ckpt on numbers no
member uses; an fd sharing an open file description with an
earlier member's ({"ofd_of"}) takes that member's already opened file, so
the file is opened once and both get it.

In the forked restorer (build_tree), three phases:
  1. create: the root is cloned with its PID (build.clone_with_pid); its
     address space is emptied but for one gadget page at an address free in
     every member's layout and the vdso. Each member then forks all its
     children, in tree order, in one batch of injected clone3(set_tid=[PID])
     calls, with CLONE_FILES / CLONE_FS when a child takes its parent's fd
     table / fs ("share"; a member that "leave"s them unshare()s after its
     last child; CLONE_PTRACE: each child is ours, stopped, before it runs
     one instruction), after the timer slack the child's default comes
     from. Sessions and groups in the right order: a session leader calls
     setsid() before it forks (its children inherit the session), a group
     leader setpgid(0, 0); once every member exists the others join their
     group (setpgid(0, PGID): the leader exists by then; not when a fork
     put it there already). Every new process has every signal blocked.
     Before a member forks (engine/cow.py before_fork): what it inherited
     from its parent and does not keep is unmapped, what it keeps (pages
     shared copy-on-write at the dump) made its own, and the mappings its
     children keep mapped and written, so that they inherit them shared.
  2. zombies: a zombie member, created like the others, is untraced with its
     registers on `exit_group(code)` (or, for one killed by a signal, its
     action reset and `kill(self, sig)`) and left to die unreaped: its
     parent's wait() collects the dumped status. The SIGCHLD that death sent
     the (stopped, all-blocked) parent is taken back with an injected
     rt_sigtimedwait, so the parent's pending signals are the image's.
  3. rebuild each live member, parents first, by the single process
     stages, each stage's batch of every member run side by side
     (engine/batch.py run_each): every member's memory and state
     (build.rebuild_early), then every member's fds and the rest
     (build.rebuild_late), so a table
     shared with CLONE_FILES still holds the files opened for each member
     (exe, mappings, cwd) until all have used them; its first holder
     installs the dumped fds and closes the rest, the others leave it
     alone, and the first holder of an fs sets its cwd and umask. Memory
     shared with an earlier member is mapped from /proc/OWNER/map_files
     (the same object). Then every member's gadget is unmapped (side by
     side), its registers go back and it is let go, children first.
Any failure kills every member created (PTRACE_O_EXITKILL also covers a
crash of the restorer); the restorer then exits, so the root is reparented
to init, the others stay its descendants.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from . import cow, faults, files, imagecheck, pidns, ptrace, sched, sharing, signals, threads
from .arch import current as current_arch
from .errors import EngineError, Refusal, Refusals
from .batch import run_each
from .libc import SysError
from .task import Task
from .tree import TREE_FILE, Sub

PAGE = 4096
SIGCHLD = 17
ZOMBIE_WAIT = 5.0
SYS_EXTRA = {"x86_64": {"rt_sigtimedwait": 128, "openat": 257, "unshare": 272},
             "aarch64": {"rt_sigtimedwait": 137, "openat": 56, "unshare": 97}}
AT_FDCWD = -100
TTY_KIND = "tty"    # engine/fds/tty.py KIND: a pty's fd records (not imported to learn it)


def _bad(what: str) -> Refusal:
    return Refusal("image-invalid", f"{TREE_FILE}: {what}")


def _nr(arch, name: str) -> int:
    return arch.SYS.get(name) or SYS_EXTRA[arch.MACHINE][name]


def check_tree(tree) -> List[dict]:
    """The member records, parents first. Raises Refusal(image-invalid)."""
    if not isinstance(tree, dict) or not isinstance(tree.get("members"), list) or not tree["members"]:
        raise _bad("no members")
    seen = set()
    for i, m in enumerate(tree["members"]):
        if not isinstance(m, dict):
            raise _bad(f"member {i} malformed")
        for k in ("pid", "ppid", "sid", "pgid", "exit_signal"):
            if not isinstance(m.get(k), int) or isinstance(m.get(k), bool) or (k != "ppid" and m[k] <= 0):
                raise _bad(f"member {i}: {k}")
        pid = m["pid"]
        if pid in seen:
            raise _bad(f"pid {pid} twice")
        if i == 0:
            if m.get("dir") != "" or m["pid"] != tree.get("root") or "zombie" in m:
                raise _bad("the first member is not the live root")
        else:
            if m["ppid"] not in seen or m.get("dir") != f"tree/{pid}/":
                raise _bad(f"member {pid}: parent {m['ppid']} not before it, or dir {m.get('dir')!r}")
        if "zombie" in m:
            z = m["zombie"]
            if not isinstance(z, dict) or not isinstance(z.get("status"), int) or not 0 <= z["status"] <= 0xffff:
                raise _bad(f"zombie {pid}: status")
        for key in ("share", "leave"):
            # The table / fs its parent hands it, the one it leaves once it
            # made its children (engine/sharing.py plan): a live member; the
            # root has no parent in the tree to share with.
            if key not in m:
                continue
            sh = m[key]
            if (i == 0 and key == "share") or "zombie" in m or not isinstance(sh, list) or not sh \
                    or not all(x in sharing.KINDS for x in sh) or sorted(set(sh)) != sh:
                raise _bad(f"member {pid}: {key} {sh!r}")
        seen.add(pid)
    for m in tree["members"]:
        if "zombie" in m and any(c["ppid"] == m["pid"] for c in tree["members"]):
            raise _bad(f"zombie {m['pid']} has children")
        for k in m.get("leave", ()):
            # one holds a table to hand it on: to a child taking it
            if not any(c["ppid"] == m["pid"] and k in c.get("share", ()) for c in tree["members"]):
                raise _bad(f"member {m['pid']} leaves a {k} table no child of it takes")
    return tree["members"]


CLONE_FLAG = {"files": threads.CLONE_FILES, "fs": threads.CLONE_FS}



class TreeJob:
    def __init__(self, members: List[dict], jobs: Dict[int, object], ttys: Optional[Dict[int, dict]] = None):
        self.members = members
        self.jobs = jobs
        self.ttys = ttys or {}      # session leader pid -> its controlling terminal (fds/tty.session_terminals)


def restore_tree(reader, options, pidfile: Optional[str], t0: float) -> dict:
    """restore.restore of an image with tree.json."""
    from . import restore as single
    from .context import RestoreContext, boot_id
    from .memory import PageSource, page_file_name
    members = check_tree(reader.read_json(TREE_FILE))
    meta = reader.manifest.get("meta") or {}
    same_node = isinstance(meta, dict) and meta.get("boot_id") == boot_id()
    pidns.check_restore(meta, reader.manifest.get("format"), same_node)
    clocks = single.clock_offsets(meta, same_node)
    shared: dict = {}
    loaded = []
    refusals: List[Refusal] = []
    for m in members:
        if "zombie" in m:
            if not single._pid_free(m["pid"]):
                refusals.append(Refusal("pid-in-use", f"PID {m['pid']} (a zombie of the tree) is held by "
                                        f"{single._comm(m['pid'])}", pid=m["pid"]))
            continue
        img = Sub(reader, m["dir"]) if m["dir"] else reader
        core = img.read_json("core.json")
        mm = img.read_json("mm.json")
        fdrecs = img.read_json("fds.json")
        single.check_core(core)
        if core["pid"] != m["pid"]:
            raise _bad(f"member {m['pid']} holds the core of {core['pid']}")
        npf = single._need(mm, "page_files", int, "mm.json")
        vmas = single.check_mm(mm, npf)
        single.check_fd_records(fdrecs)
        imagecheck.check_records(img, core, vmas, fdrecs)
        ctx = RestoreContext(options=options, image=img, same_node=same_node, records=fdrecs, pid=m["pid"],
                             shared=shared)
        loaded.append((m, img, core, vmas, fdrecs, npf, ctx))
    pids = {m["pid"] for m in members}
    for m, img, core, vmas, fdrecs, npf, ctx in loaded:
        for r in fdrecs:
            if "ofd_of" in r:
                o = r["ofd_of"]
                if not (isinstance(o, list) and len(o) == 2 and o[0] in pids and o[0] != m["pid"]):
                    raise _bad(f"member {m['pid']} fd {r['fd']}: ofd_of {o!r}")
    imagecheck.check_tree(reader, members, {m["pid"]: fdrecs for m, _, _, _, fdrecs, _, _ in loaded},
                          {m["pid"]: core for m, _, core, _, _, _, _ in loaded})
    imagecheck.check_all_used(reader, {TREE_FILE} | imagecheck.tree_used_files(
        [(m["dir"], core, vmas, fdrecs, npf) for m, _, core, vmas, fdrecs, npf, _ in loaded]))
    # a tree_shared mapping names an earlier member's mapping of the same object
    shmem_of = {}
    order = {m["pid"]: i for i, (m, *_) in enumerate(loaded)}
    for m, _, _, vmas, _, _, _ in loaded:
        for v in vmas:
            if v["kind"] == "shmem":
                shmem_of[(m["pid"], v["start"], v["end"])] = (v["dev"], v["inode"], v["shmem_size"])
    for m, img, core, vmas, fdrecs, npf, ctx in loaded:
        for v in vmas:
            ts = v.get("tree_shared")
            if "tree_shared" in v and not (
                    isinstance(ts, list) and len(ts) == 3 and all(x.__class__ is int for x in ts)
                    and ts[0] in pids and v["kind"] == "shmem" and order.get(ts[0], 1 << 30) < order[m["pid"]]
                    and shmem_of.get(tuple(ts)) == (v["dev"], v["inode"], v["shmem_size"])):
                raise _bad(f"member {m['pid']} mapping {v['start']:#x}: tree_shared {ts!r}")
            if "cow" in v:
                cow.check(v)
    # System V segments: one record agreed by every member attaching it (engine/sysvshm.py)
    attaches = [(m["pid"], v) for m, _, _, vmas, _, _, _ in loaded for v in vmas if v["kind"] == "sysvshm"]
    segs = None
    if attaches:
        from . import sysvshm
        segs = sysvshm.segments(attaches)
    every = [r for _, _, _, _, fdrecs, _, _ in loaded for r in fdrecs if "dup_of" not in r and "ofd_of" not in r]
    for _, img, _, _, fdrecs, _, _ in loaded:
        for r in fdrecs:
            r["_image"] = img     # where its data files are, for a peer restoring both ends (socketpairs)
    for m, img, core, vmas, fdrecs, npf, ctx in loaded:
        ctx.tree_records = every
        ctx.tree_pids = frozenset(pids)
        try:
            with single._system_errors_as_engine_errors("restore pre-flight"), \
                    imagecheck.malformed_as_invalid("pre-flight"):
                single.preflight(img, core, vmas, fdrecs, ctx, tree_member=m is not members[0])
        except Refusal as r:
            refusals.append(r)
        except Refusals as rs:
            refusals.extend(rs.refusals)
    if segs:
        refusals += sysvshm.preflight(segs, pids)
    if refusals:
        raise refusals[0] if len(refusals) == 1 else Refusals(refusals)
    ttys: Dict[int, dict] = {}
    with imagecheck.malformed_as_invalid("controlling terminals"):
        # session_terminals looks at pty records alone: without one there
        # is none, and fds/tty is not imported (~2.4 ms of a tree's restore)
        if any(r.get("kind") == TTY_KIND for *_, fdrecs, _, _ in loaded for r in fdrecs):
            from .fds import tty
            ttys = tty.session_terminals(members, {m["pid"]: fdrecs for m, _, _, _, fdrecs, _, _ in loaded})
    used = {r["fd"] for *_, fdrecs, _, _ in loaded for r in fdrecs}
    prepared: Dict[int, object] = {}
    sources = []
    jobs: Dict[int, object] = {}
    ctx0 = loaded[0][-1]
    made = None
    try:
        for m, img, core, vmas, fdrecs, npf, ctx in loaded:
            faults.point("restore.tree.prepare")
            xstate = img.read_bytes("xstate.bin")
            imagecheck.check_xstate(core, xstate, m["dir"] + "xstate.bin")
            thread_xstate = threads.unpack_xstate(img, core.get("threads", []))
            pages = PageSource([img.data(page_file_name(i)) for i in range(npf)],
                               [img.lease_fd(page_file_name(i)) for i in range(npf)])
            sources.append(pages)
            for v in vmas:
                pages.check_runs(v["pages"])

            def theirs(rec, _prepared=prepared):
                opid, ofd = rec["ofd_of"]
                try:
                    return _prepared[opid].fd_of_rec[ofd]
                except KeyError:
                    raise _bad(f"fd {rec['fd']}: ofd_of {opid}/{ofd} not restored before it") from None
            with single._system_errors_as_engine_errors("opening the process's files"), \
                    imagecheck.malformed_as_invalid("opening the process's files"):
                p = single.prepare(core, vmas, fdrecs, ctx, avoid=used, shared_ofd=theirs)
            prepared[m["pid"]] = p
            jobs[m["pid"]] = single.Job(core=core, vmas=vmas, fdrecs=fdrecs, xstate=xstate,
                                        thread_xstate=thread_xstate, pages=pages, prepared=p, ctx=ctx)
        faults.point("restore.tree.prepared")
        imagecheck.process_creation_hook()
        if segs:
            with single._system_errors_as_engine_errors("System V segments"):
                made = sysvshm.materialize(segs, {pid: j.pages for pid, j in jobs.items()})
        # a shell job's foreground group (restore --tty): ckpt its subreaper
        # first, so it can wait for the group as the job's parent
        foreground = single._foreground_job([r for *_, fdrecs, _, _ in loaded for r in fdrecs], options)
        try:
            out = single._run_restorer(TreeJob(members, jobs, ttys), build_tree, clocks=clocks)
        except BaseException:
            if made is not None:
                made.undo()     # what the restore made, removed again
            raise
        # The tree is back: what handlers hold until then (a TCP
        # connection's network lock) can go.
        for hook in shared.pop("_after_restore", []):
            hook()
    finally:
        for p in prepared.values():
            p.close()
        files.close_shared(ctx0)
        for s in sources:
            s.close()
    if pidfile:
        single.write_pidfile(pidfile, out["pid"])
    cow_stats = out.get("cow") or {}
    res = {"pid": out["pid"], "members": len(members), "restore_ms": round((time.monotonic() - t0) * 1000, 2),
           "injected": out.get("injected"),
           # pages shared copy-on-write kept shared (engine/cow.py); those marked that differed: written
           "cow_shared_bytes": cow_stats.get("shared_pages", 0) * PAGE,
           "cow_rewritten_pages": cow_stats.get("rewritten_pages", 0)}
    if foreground:
        # the group of the members that were their terminal's foreground job
        pid = next(m["pid"] for m, *_, fdrecs, _, _ in loaded
                   if any(r.get("kind") == "tty" and r.get("outside") and r.get("fg_own") for r in fdrecs))
        try:
            res["foreground"] = {"tty": foreground, "pgid": os.getpgid(pid)}
        except ProcessLookupError:      # it is gone already (reaped by ckpt's wait)
            res["foreground"] = {"tty": foreground, "pgid": next(m["pgid"] for m in members if m["pid"] == pid)}
    return res


# -- in the restorer ---------------------------------------------------------------

def _gadget(b, all_vmas: List[dict]) -> None:
    """Builder.make_gadget, at an address free in every member's layout
    (the children inherit it through fork)."""
    from .build import place_gadget
    place_gadget(b, [(v["start"], v["end"]) for v in all_vmas])


def _own_group(b, m: dict, tree_pids: set) -> None:
    """Phase 1 for member m: its own session or group, or the root's
    group from outside (a group led by another member: phase 1b)."""
    if m["sid"] == m["pid"]:
        b.call("setsid")
    elif m["pgid"] == m["pid"]:
        b.call("setpgid", 0, 0)
    elif m["pgid"] not in tree_pids and m["pgid"] != 0:   # 0: the kernel's group, inherited (engine/sessionids.py)
        b.call("setpgid", 0, m["pgid"])
    b.session_done = True


def _ctty(b, m: dict, tj) -> None:
    """Phase 1, right after member m's setsid(): its controlling terminal,
    before it forks the members of its session (they inherit it)."""
    t = tj.ttys.get(m["pid"])
    if t is not None:
        from .fds import _tty      # here: a tree without a pty does without it (~3 ms of the restorer)
        pid, fd = t["holder"]
        b.call("ioctl", tj.jobs[pid].prepared.fd_of_rec[fd], _tty.TIOCSCTTY, 0)


def _foreground(builders: dict, tj) -> None:
    """Once every group exists: each controlling terminal's foreground
    group, set by its session leader (TIOCSPGRP: the caller's controlling
    terminal; every signal blocked, so no SIGTTOU)."""
    for sid, t in sorted(tj.ttys.items()):
        if t["fg"]:
            from .fds import _tty
            b = builders[sid]
            pid, fd = t["holder"]
            b.call("ioctl", tj.jobs[pid].prepared.fd_of_rec[fd], _tty.TIOCSPGRP,
                   b.put(struct.pack("<i", t["fg"]), 128))


CLONE_PTRACE = 0x2000


def _fork_all(parent, pm: dict, children: List[dict], tj) -> List[object]:
    """Every child of member pm forked by its builder with its PID, in one
    batch (engine/batch.py), then pm's _leave; each clone3 with CLONE_PTRACE:
    the child is ours, stopped (SIGSTOP pending) before it runs, and pm
    makes no fork event stop per child (as with PTRACE_O_TRACEFORK).
    Returns the children's builders, in order."""
    from .batch import Data
    from .build import Builder
    if not children:
        return []
    arch = parent.arch
    size = ctypes.sizeof(arch.CloneArgs)
    index, slack = [], []
    for m in children:
        job = tj.jobs.get(m["pid"])
        default = job.core["sched"].get("default_timerslack_ns") if job is not None else None
        if default and default != parent.timerslack:
            # A child's default slack is its parent's current one (kernel/fork.c).
            parent.pending.add("prctl", sched.PR_SET_TIMERSLACK, default, 0, 0, 0)
            parent.timerslack = default
        slack.append(parent.timerslack)     # a fork's current slack is its parent's
        # Its parent's fd table / fs, shared (tree.json "share"): the one way
        # a process gets another's (kernel/fork.c copy_files, copy_fs).
        flags = sum(CLONE_FLAG[w] for w in m.get("share", ())) | CLONE_PTRACE

        def place(addr: int, m: dict = m, flags: int = flags) -> bytes:
            args = arch.CloneArgs(flags=flags, exit_signal=m["exit_signal"], set_tid=addr + size, set_tid_size=1)
            return ctypes.string_at(ctypes.addressof(args), size) + struct.pack("<i", m["pid"]) + bytes(4)
        index.append(parent.pending.add("clone3", Data(bytes(size + 8), place=place), size))
    _leave(parent, pm)
    try:
        got = parent.flush()
        for m, i in zip(children, index):
            if got[i] != m["pid"]:
                raise Refusal("pid-in-use", f"child came back as PID {got[i]}, not {m['pid']}", pid=m["pid"])
    except SysError as e:
        _kill_forked(parent.pid, children)
        if e.errno == 17:       # EEXIST
            taken = [m["pid"] for m in children if _parent_of(m["pid"]) != parent.pid][:1] or [None]
            raise Refusal("pid-in-use", f"PID {taken[0]} was taken before it could be restored", pid=taken[0]) from None
        raise
    except BaseException:
        _kill_forked(parent.pid, children)
        raise
    mask = ptrace.get_sigmask(parent.pid)    # the children's (the runner unblocked SIGTRAP while it ran)
    out = []
    try:
        for m, s in zip(children, slack):
            t = Task.adopt(m["pid"])
            ptrace.set_sigmask(m["pid"], mask)
            b = Builder(tj.jobs.get(m["pid"]), t)
            b.member = m
            b.use_gadget(parent.gadget, parent.gadget_size)     # inherited through the fork
            b.timerslack = s
            b.cgroups_now = parent.cgroups_now      # a fork is in its parent's cgroups
            if parent.inherited_actions is not None:    # fork copies the parent's table as it is now
                b.inherited_actions = {k: list(v) for k, v in parent.inherited_actions.items()}
            out.append(b)
    except BaseException:
        _kill_forked(parent.pid, children)
        raise
    return out


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _kill_forked(ppid: int, children: List[dict]) -> None:
    """The children a failed batch of forks made (traced by us, with
    PTRACE_O_EXITKILL, but not yet known to the caller): killed."""
    import signal as _sig
    for m in children:
        if _parent_of(m["pid"]) == ppid:
            try:
                os.kill(m["pid"], _sig.SIGKILL)
            except ProcessLookupError:
                pass


def _leave(b, m: dict) -> None:
    """Member m made its last child: the tables it held to hand on to them
    it leaves, for fresh copies of its own (kernel/fork.c unshare_fd,
    unshare_fs). Queued, after the forks."""
    flags = sum(CLONE_FLAG[w] for w in m.get("leave", ()))
    if flags:
        b.pending.add("unshare", flags, nr=_nr(b.arch, "unshare"))


def _die(b, status: int) -> None:
    """Let zombie-to-be b go on `exit_group(code)` or `kill(self, sig)`."""
    arch = b.arch
    b.flush()       # its session or group, queued
    sig = status & 0x7f
    if sig:
        if sig not in (9, 19):      # SIGKILL's and SIGSTOP's action is always the default: EINVAL to set
            b.call("rt_sigaction", sig, b.put(struct.pack("<QQQQ", 0, 0, 0, 0)), 0, 8)
            if b.inherited_actions is not None:
                b.inherited_actions[str(sig)] = [0, 0, 0, 0]
        b.call("prlimit64", 0, 4, b.put(struct.pack("<QQ", 0, 0), 64), 0)     # RLIMIT_CORE 0: no core
        ptrace.set_sigmask(b.pid, signals.ALL_BLOCKED & ~(1 << (sig - 1)))
        nr, args = arch.SYS["kill"], (b.pid, sig)
    else:
        nr, args = arch.SYS["exit_group"], ((status >> 8) & 0xff,)
    from .placement import restore_mask
    restore_mask(b.pid)     # made on the restorer's one CPU; dies with the mask it would have had
    regs = b.task.get_regs()
    arch.set_syscall(regs, b.gadget, nr, args)
    b.task.set_regs(regs)
    b.task.close()
    ptrace.detach(b.pid, 0)
    b.task.attached = False


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _take_sigchld(b) -> None:
    """The SIGCHLD the zombies' deaths sent b, dequeued (rt_sigtimedwait
    with a zero timeout, retried until it came)."""
    nr = _nr(b.arch, "rt_sigtimedwait")
    deadline = time.monotonic() + ZOMBIE_WAIT
    while True:
        r = b.task.syscall(nr, b.put(struct.pack("<Q", 1 << (SIGCHLD - 1)), 0), 0,
                           b.put(struct.pack("<qq", 0, 0), 16), 8)
        if r == SIGCHLD:
            return
        if time.monotonic() > deadline:
            raise EngineError(f"the SIGCHLD of a restored zombie never reached {b.pid} ({r})", pid=b.pid)
        time.sleep(0.002)


def map_shared(b, v: dict, flags: int) -> int:
    """Build stage hook (Builder.map_all): map the shared memory an earlier
    member of the tree holds, through its /proc/PID/map_files entry: the
    same object, one write seen by both, this part at its own offset
    (engine/shmem.py). Writable while pages of its own are to go in (a
    forced write into a read-only shared mapping fails); map_steps gives
    it its protection once they are."""
    from .build import prot_of, MADVISE_FLAGS
    opid, ostart, oend = v["tree_shared"]
    path = f"/proc/{opid}/map_files/{ostart:x}-{oend:x}".encode() + b"\0"
    fd = b.task.syscall(_nr(b.arch, "openat"), AT_FDCWD & 0xFFFFFFFFFFFFFFFF, b.put(path, 512),
                        os.O_RDWR | os.O_CLOEXEC, 0)
    if -4096 < fd < 0:
        raise SysError(f"open {path[:-1].decode()} (injected)", -fd, b.pid)
    try:
        start, size = v["start"], v["end"] - v["start"]
        got = b.call("mmap", start, size, 3 if v["pages"] else prot_of(v["perms"]), flags, fd, v["offset"])
        if got != start:
            raise EngineError(f"shared mapping {start:#x} landed at {got:#x}", pid=b.pid)
        b._name(v)
        for f in v["flags"]:
            if f in MADVISE_FLAGS:
                b.call("madvise", start, size, MADVISE_FLAGS[f])
    finally:
        b.call("close", fd)
    return 0


def build_tree(tj: TreeJob) -> int:
    """Runs in the restorer: create, zombies, rebuild, release (see the
    module docstring). Returns the root's PID."""
    from .build import Builder, _check_xstate, clone_with_pid, rebuild_early_steps, rebuild_late_steps
    from .task import syscall_each
    arch = current_arch()
    members = tj.members
    root = members[0]
    tree_pids = {m["pid"] for m in members}
    all_vmas = [v for j in tj.jobs.values() for v in j.vmas]
    builders: Dict[int, object] = {}
    order: List[object] = []
    _become_subreaper()
    try:
        rjob = tj.jobs[root["pid"]]
        sched.before_clone(rjob.core["sched"])
        inherited = signals.cleared_actions()   # what the clone starts with (CLONE_CLEAR_SIGHAND)
        child, ip = clone_with_pid(root["pid"], arch)
        task = Task.adopt(child)
        task.syscall_ip = ip
        b = Builder(rjob, task)
        b.inherited_actions = inherited
        builders[child] = b
        order.append(b)
        faults.point("restore.tree.created")
        _check_xstate(task, rjob.core)
        _gadget(b, all_vmas)
        b.unregister_rseq()
        b.clear_address_space()
        b.flush()       # before the forks: the members inherit the emptied layout
        # Pages shared copy-on-write since a fork: which mapping each member
        # keeps from its parent, which it maps before its forks (engine/cow.py).
        cow_plan = cow.plan(members, tj.jobs, [(v["start"], v["end"]) for v in b._vdso()]
                            + [(b.gadget, b.gadget + b.gadget_size)])
        ppids = {m["pid"]: m["ppid"] for m in members}
        ptrace.set_sigmask(child, signals.ALL_BLOCKED)
        _own_group(b, root, tree_pids)
        _ctty(b, root, tj)
        # Who installs each fd table and fs: its first holder (engine/sharing.py).
        owners = {k: sharing.owners(members, k) for k in sharing.KINDS}
        kids: Dict[int, list] = {}
        for m in members[1:]:
            kids.setdefault(m["ppid"], []).append(m)
        # 1. create, parents first: each member forks all its children in
        # one batch, right after it was made (its session and group first).
        # A member that forks none has its copy-on-write work (cow.py
        # before_fork) queued, its batch run beside the others' below.
        leaves = []
        for m in members:
            mb = builders[m["pid"]]
            if mb.job is not None:
                pjob = tj.jobs.get(m["ppid"]) if m is not root else None
                args = (mb, cow_plan, cow_plan.in_place(m["ppid"]) if pjob else set(),
                        {v["start"]: v for v in pjob.vmas} if pjob else {})
                if kids.get(m["pid"]):
                    cow.before_fork(*args)
                else:
                    leaves.append(args)
                mb.in_place = cow_plan.in_place(m["pid"])
            for mb in _fork_all(builders[m["pid"]], m, kids.get(m["pid"], []), tj):
                builders[mb.pid] = mb
                order.append(mb)
                faults.point("restore.tree.fork")
                if mb.job is not None:
                    _check_xstate(mb.task, mb.job.core)
                mm = mb.member
                _own_group(mb, mm, tree_pids)
                _ctty(mb, mm, tj)
        for m in members:
            if m["pgid"] != m["pid"] and m["pgid"] in tree_pids and m["sid"] != m["pid"] \
                    and os.getpgid(m["pid"]) != m["pgid"]:   # not in it already (a fork is in its parent's)
                builders[m["pid"]].pending.add("setpgid", 0, m["pgid"])
        then = [cow.queue_before_fork(*args) for args in leaves]
        run_each(order)
        for t in then:
            if t is not None:
                t()     # the pages of what it keeps, once its layout is made
        _foreground(builders, tj)
        for mb in order:
            mb.files_shared = owners["files"].get(mb.pid, mb.pid) != mb.pid
            mb.fs_shared = owners["fs"].get(mb.pid, mb.pid) != mb.pid
        # 2. zombies
        faults.point("restore.tree.zombies")
        zombies = [m for m in members if "zombie" in m]
        for m in zombies:
            _die(builders[m["pid"]], m["zombie"]["status"])
        deadline = time.monotonic() + ZOMBIE_WAIT
        for m in zombies:
            while _state(m["pid"]) != "Z":
                if time.monotonic() > deadline:
                    raise EngineError(f"zombie {m['pid']} did not die", pid=m["pid"])
                time.sleep(0.002)
        for ppid in sorted({m["ppid"] for m in zombies}):
            _take_sigchld(builders[ppid])
        # 3. rebuild, parents first: every member's memory and state, then
        # every member's fds (a table shared with CLONE_FILES holds the files
        # opened for each of its members until the last one has used them:
        # its top member installs the dumped fds and closes the rest);
        # then let go, children first
        live = [b for b in order if b.job is not None]
        steps = []
        for mb in live:
            faults.point("restore.tree.rebuild")
            steps.append((mb, rebuild_early_steps(mb)))
        _side_by_side(steps)
        _side_by_side([(mb, rebuild_late_steps(mb)) for mb in live])
        run_each(live)      # what the last stages left queued
        if any(v["kind"] == "sysvshm" for v in all_vmas):
            from .sysvshm import seal
            seal(all_vmas)      # a removed System V segment removed again, once every member attached it
        # Every gadget unmapped side by side (one round trip in flight
        # each), then each member let go, children first. With a member
        # stopped by job control, one at a time: each stopped again while
        # it has its gadget (Builder.finish), its parent's view of that
        # stop set while the parent still has its own (engine/jobstop.py).
        stopped = any(mb.job.core.get("job_stop") for mb in live)
        if not stopped:
            got = syscall_each([(mb.task, arch.SYS["munmap"], (mb.gadget, mb.gadget_size)) for mb in live])
            for mb, r in zip(live, got):
                if -4096 < r < 0:
                    raise SysError("munmap (injected)", -r, mb.pid)
        for mb in reversed(live):
            faults.point("restore.tree.release")
            if not stopped:
                mb.let_go()
                continue
            mb.finish()
            if mb.job.core.get("job_stop") and mb.pid != root["pid"]:
                from . import jobstop
                jobstop.restore_report(builders[ppids[mb.pid]], mb.pid, mb.job.core)
    except BaseException:
        for mb in reversed(order):
            try:
                threads.kill([mb.task] + [tb.task for tb in mb.threads])
            except (SysError, OSError):
                pass
        _reap_orphans(tree_pids)
        raise
    return root["pid"]


def _side_by_side(steps) -> None:
    """Each step of every member's stage generator, their queued batches
    run side by side (engine/batch.py run_each); steps: (builder, generator)."""
    while steps:
        going = []
        for mb, g in steps:
            if next(g, StopIteration) is not StopIteration:
                going.append((mb, g))
        run_each([mb for mb, _ in going])
        steps = going


PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """A member killed while its (killed) parent still stood is a zombie
    only that parent could reap; as the restorer is their subreaper, such
    orphans come back to it (_reap_orphans), and a failed restore leaves
    no zombie holding a PID of the tree."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_orphans(pids, timeout: float = 2.0) -> None:
    left = set(pids)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for pid in sorted(left):
            try:
                got, _ = os.waitpid(pid, os.WNOHANG | 0x40000000)    # __WALL
            except ChildProcessError:
                if not os.path.exists(f"/proc/{pid}"):
                    left.discard(pid)
                continue
            if got:
                left.discard(pid)
        if left:
            time.sleep(0.005)
