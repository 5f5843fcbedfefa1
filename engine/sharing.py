"""What processes share without being threads of one process, by kcmp(2)
(kernel/kcmp.c): memory (CLONE_VM), the fd table (CLONE_FILES), fs: cwd,
root, umask (CLONE_FS), signal handlers (CLONE_SIGHAND).

kcmp orders the kernel objects (0 equal, 1 less, 2 greater: kcmp_ptr
compares obfuscated pointers, a total order), so groups() sorts the
processes in n log n calls instead of comparing every pair, and outside()
finds a process of the system holding one of their objects by a binary
search among them. Signal handlers are not looked for outside: two
processes share them only with their memory (README, Known limits), which
is.

The calls go straight to libc.syscall with the number resolved once: the
scan of every process of the system makes thousands of them.
"""

from __future__ import annotations

import ctypes
import os
try:
    from _functools import cmp_to_key   # functools' own; functools imports collections (~10 ms under TCG)
except ImportError:     # pragma: no cover - another Python
    from functools import cmp_to_key
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Tuple

from .pidfd import syscall_nr

KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND = 1, 2, 3, 4
WHAT = {KCMP_VM: "memory (CLONE_VM, or a vfork child)", KCMP_FILES: "fd table (CLONE_FILES)",
        KCMP_FS: "fs: cwd, root, umask (CLONE_FS)", KCMP_SIGHAND: "signal handlers (CLONE_SIGHAND)"}
OUTSIDE_KINDS = (KCMP_VM, KCMP_FILES, KCMP_FS)

_libc = ctypes.CDLL(None, use_errno=True)
# syscall(2) with kcmp's argument types bound once: the scan calls it with
# plain ints, no ctypes objects made per call (a third of its time).
_kcmp_call = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_ulong, ctypes.c_ulong, use_errno=True)(("syscall", _libc))
_nr: List[int] = []


def _kcmp_nr() -> int:
    if not _nr:
        _nr.append(syscall_nr("kcmp"))
    return _nr[0]


def _kcmp(a: int, b: int, kind: int) -> int:
    """-1, 0, 1 as a's object is below, the same as, above b's. Raises
    OSError (ESRCH: gone; ENOSYS: no CONFIG_KCMP)."""
    r = _kcmp_call(_kcmp_nr(), a, b, kind, 0, 0)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return 0 if r == 0 else -1 if r == 1 else 1


def _member_kcmp(a: int, b: int, kind: int) -> int:
    try:
        return _kcmp(a, b, kind)
    except OSError as e:
        from .pidfd import _fail
        raise _fail(f"kcmp(pid {a}, pid {b}, {WHAT[kind]})", e, a) from None


def groups(pids: Iterable[int], kind: int) -> List[List[int]]:
    """Every object of type `kind` the processes hold, in kcmp order, as
    the list of its holders (in the order given). Raises Refusal
    (kernel-missing) or EngineError."""
    pids = list(pids)
    order = {p: i for i, p in enumerate(pids)}
    call, nr = _kcmp_call, _kcmp_nr()

    def cmp(a: int, b: int) -> int:
        # straight to the syscall (a tree of 50 makes ~300 of these a kind);
        # a failure is asked again by _member_kcmp, which raises it in words
        r = call(nr, a, b, kind, 0, 0)
        if r < 0:
            return _member_kcmp(a, b, kind)
        return 0 if r == 0 else -1 if r == 1 else 1
    ranked = sorted(pids, key=cmp_to_key(cmp))
    out: List[List[int]] = []
    for p in ranked:
        if out and cmp(out[-1][0], p) == 0:
            out[-1].append(p)
        else:
            out.append([p])
    return [sorted(g, key=order.__getitem__) for g in out]


PF_KTHREAD = 0x00200000      # include/linux/sched.h, /proc/PID/stat flags


def kernel_threads() -> set:
    """The kernel threads kthreadd made, found without a look at each
    process: kthreadd's children (/proc/2/task/2/children) that hold no
    memory, as kthreadd holds none (kcmp KCMP_VM equal to pid 2's). A
    child that holds memory is a user process (a usermode helper, made
    with CLONE_PARENT by a kworker) and stays out of this set; so does pid
    2 itself. Empty when pid 2 is not a kernel thread (a PID namespace)
    or the file is missing (no CONFIG_PROC_CHILDREN)."""
    try:
        with open("/proc/2/stat", "rb") as f:
            flags = int(f.read().rsplit(b")", 1)[1].split()[6])
        if not flags & PF_KTHREAD:
            return set()
        with open("/proc/2/task/2/children", "rb") as f:
            kids = [int(x) for x in f.read().split()]
    except (OSError, ValueError, IndexError):
        return set()
    return same_memory(2, kids)


def same_memory(pid: int, others: List[int]) -> set:
    """Those of `others` whose memory is pid's (kcmp KCMP_VM 0); one that
    cannot be compared (gone) is not."""
    call, nr = _kcmp_call, _kcmp_nr()
    return {c for c in others if call(nr, pid, c, KCMP_VM, 0, 0) == 0}


def outside(pids: Iterable[int], kinds: Tuple[int, ...] = OUTSIDE_KINDS,
            known: Optional[Dict[int, List[List[int]]]] = None) -> List[Tuple[int, int, int]]:
    """[(pid, kind, other)]: a process of the system, not one of `pids`
    (nor ckpt), that holds the memory, fd table or fs of `pids`' `pid`.
    One per object and kind. Raises Refusal (kernel-missing) or
    EngineError when the processes themselves cannot be compared.

    Kernel threads (kernel_threads(): about half of a machine's processes,
    one kcmp each instead of three) are not looked at: one holds no memory
    (kthread_use_mm borrows one only while it is in the kernel), and its fd
    table and fs are kthreadd's (kernel_thread CLONE_FS | CLONE_FILES) or
    ones it made itself, which no user process is ever given (usermode
    helpers are made without CLONE_FILES / CLONE_FS); the only user
    process that can share kthreadd's fs is PID 1 (made with CLONE_FS) and
    those it gives it to, and kthreadd and PID 1 are still looked at.

    `known`: groups(pids, kind) by kind, where the caller made them already."""
    pids = list(pids)
    skip = set(pids) | {os.getpid()} | kernel_threads()
    others = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in skip:
            others.append(int(name))
    found: List[Tuple[int, int, int]] = []
    call, nr = _kcmp_call, _kcmp_nr()
    for kind in kinds:
        reps = [g[0] for g in (known[kind] if known and kind in known else groups(pids, kind))]
        if len(reps) == 1:
            # One object (a single process's): one kcmp per other, no
            # search; the first holder found is the one reported. A
            # failure (gone meanwhile) is not 0: passed over, as below.
            rep = reps[0]
            for other in others:
                if call(nr, rep, other, kind, 0, 0) == 0:
                    found.append((rep, kind, other))
                    break
            continue
        seen = set()
        for other in others:
            lo, hi = 0, len(reps)
            while lo < hi:
                mid = (lo + hi) // 2
                r = call(nr, reps[mid], other, kind, 0, 0)     # as _kcmp, without its frame: thousands a scan
                if r < 0:
                    break        # gone meanwhile (or a process kcmp may not look at)
                if r == 0:
                    if reps[mid] not in seen:
                        seen.add(reps[mid])
                        found.append((reps[mid], kind, other))
                    break
                if r == 1:      # the member's object below the other's
                    lo = mid + 1
                else:
                    hi = mid
    return found


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


# -- rebuilding shared fd tables and fs in a process tree ------------------------------
#
# A restore creates each member from its parent (engine/tree_restore.py). A
# member created with CLONE_FILES / CLONE_FS ("share") holds its parent's
# table; one that "leaves" unshare()s once it has created all its children,
# for a fresh table of its own. So a table can reach its holders through
# members that hold it only while they create their children: siblings
# sharing a table their parent left (unshare, exec), a grandchild sharing
# its grandparent's past a parent that left. plan() finds the members each
# table has to pass through; tables() says which table every member ends
# with, for the dump to compare with what kcmp saw and for the restore to
# know who installs each table (its first holder, parents first).

KINDS = ("files", "fs")


def tables(members: List[dict], kind: str) -> Dict[int, int]:
    """{live member pid: table number} after a restore made by its records
    ("share", "leave"), members parents first; numbers in order of making."""
    initial: Dict[int, int] = {}
    final: Dict[int, int] = {}
    n = 0
    for m in members:
        if kind in m.get("share", ()) and m["ppid"] in initial:
            initial[m["pid"]] = initial[m["ppid"]]      # the parent's table until it leaves (after its children)
        else:
            initial[m["pid"]] = n
            n += 1
        if kind in m.get("leave", ()):
            final[m["pid"]] = n
            n += 1
        else:
            final[m["pid"]] = initial[m["pid"]]
    return {m["pid"]: final[m["pid"]] for m in members if "zombie" not in m}


def owners(members: List[dict], kind: str) -> Dict[int, int]:
    """{live member pid: the first member (parents first) holding its table}."""
    first: Dict[int, int] = {}
    out = {}
    for pid, t in tables(members, kind).items():
        out[pid] = first.setdefault(t, pid)
    return out


def plan(members: List[dict], groups: List[List[int]], kind: str) -> List[str]:
    """Set "share" and "leave" of kind on the member records (parents
    first) so the restore rebuilds `groups` (the pids holding one table);
    returns why it cannot, [] when it can."""
    parent = {m["pid"]: m["ppid"] for m in members}
    depth: Dict[int, int] = {}
    for m in members:
        depth[m["pid"]] = depth.get(m["ppid"], -1) + 1
    by_pid = {m["pid"]: m for m in members}
    why = []
    for g in groups:
        # the smallest part of the tree joining the holders, and its top
        paths = []
        for p in g:
            path = [p]
            while parent.get(path[-1]) in by_pid:
                path.append(parent[path[-1]])
            paths.append(path)
        common = set(paths[0]).intersection(*map(set, paths[1:]))
        top = max(common, key=depth.__getitem__)
        joined = {x for path in paths for x in path[:path.index(top) + 1]}
        for x in sorted(joined, key=depth.__getitem__):
            rec = by_pid[x]
            if x != top:
                if kind in rec.get("share", ()):
                    why.append(f"pid {x} would have to be given two tables")
                rec.setdefault("share", []).append(kind)
            if x not in g:
                if kind in rec.get("leave", ()):
                    why.append(f"pid {x} would have to pass on two tables")
                rec.setdefault("leave", []).append(kind)
    for m in members:
        for k in ("share", "leave"):
            if k in m:
                m[k] = sorted(set(m[k]))
    return why


def same_partition(a: Dict[int, int], groups: List[List[int]]) -> bool:
    """Whether table numbering `a` puts together exactly `groups` (every
    pid of `a` not in a group alone)."""
    want = {frozenset(g) for g in groups}
    got: Dict[int, set] = {}
    for pid, t in a.items():
        got.setdefault(t, set()).add(pid)
    return {frozenset(s) for s in got.values() if len(s) > 1} == want
