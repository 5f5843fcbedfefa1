"""seccomp: strict mode and filter programs.

Dump: the target is traced with PTRACE_O_SUSPEND_SECCOMP first, so the
injected syscalls that read its state are not judged by its filters (a
filter that kills on getitimer would otherwise kill it mid-dump). Each
filter's classic-BPF program comes from PTRACE_SECCOMP_GET_FILTER (index 0
is the oldest: kernel/seccomp.c get_nth_filter counts back from the
newest) and its flags from PTRACE_SECCOMP_GET_METADATA (only
SECCOMP_FILTER_FLAG_LOG is kept by the kernel).

Restore: the new process is traced with PTRACE_O_SUSPEND_SECCOMP too, and
the filters are installed oldest first with seccomp(SECCOMP_SET_MODE_FILTER)
before the credentials are dropped (installing needs no_new_privs or
CAP_SYS_ADMIN; the new process still has ckpt's capabilities then), strict
mode with SECCOMP_SET_MODE_STRICT. The remaining injected syscalls run
unfiltered; PTRACE_DETACH ends the suspension, so the first instruction the
program runs is filtered exactly as before.

Refused: a filter that can return SECCOMP_RET_USER_NOTIF (its listener, a
supervisor's fd, cannot be carried over). Install flags the kernel does
not keep: TSYNC/TSYNC_ESRCH (their effect, which threads share a filter,
is what the multi-threaded part below restores), NEW_LISTENER and
WAIT_KILLABLE_RECV (only with USER_NOTIF), SPEC_ALLOW (see README Known
limits).
"""

from __future__ import annotations

import ctypes
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from . import libc, ptrace
from .errors import EngineError, Refusal

PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
O_SUSPEND_SECCOMP = 0x200000
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_RET_USER_NOTIF = 0x7FC00000
BPF_RET_K = 0x06        # BPF_RET | BPF_K
INSN = 8                # struct sock_filter {u16 code; u8 jt, jf; u32 k}
PAGE = 4096


def mode_of(status: dict) -> int:
    return int(status.get("Seccomp", "0") or 0)


def suspend(task, options: int = 0) -> None:
    """Stop the task's filters judging the syscalls ckpt injects (until
    detach); `options`: the other ptrace options to keep. Raises
    Refusal(capability) when the kernel will not."""
    try:
        ptrace.set_options(task.pid, ptrace.O_TRACESYSGOOD | O_SUSPEND_SECCOMP | options)
    except libc.SysError as e:
        raise Refusal("capability", f"PTRACE_O_SUSPEND_SECCOMP: {e.message} (needs CAP_SYS_ADMIN, "
                      "ckpt itself outside seccomp, CONFIG_CHECKPOINT_RESTORE)", pid=task.pid) from None


def _filter(pid: int, index: int) -> bytes:
    n = ptrace.request(PTRACE_SECCOMP_GET_FILTER, pid, index, None)
    buf = ctypes.create_string_buffer(n * INSN)
    got = ptrace.request(PTRACE_SECCOMP_GET_FILTER, pid, index, ctypes.addressof(buf))
    return buf.raw[:got * INSN]


def _flags(pid: int, index: int) -> int:
    md = (ctypes.c_uint64 * 2)(index, 0)
    try:
        ptrace.request(PTRACE_SECCOMP_GET_METADATA, pid, ctypes.sizeof(md), ctypes.addressof(md))
    except libc.SysError:
        return 0
    return int(md[1])


def dump(pid: int, mode: int) -> dict:
    """{"mode": 0|1|2, "filters": [{"prog": hex, "flags": int}] oldest first}.
    Raises Refusal for what cannot be reinstalled."""
    filters: List[dict] = []
    if mode == 2:
        i = 0
        while True:
            try:
                prog = _filter(pid, i)
            except libc.SysError as e:
                if e.errno == 2:     # ENOENT: past the newest filter
                    break
                if e.errno in (1, 22):
                    raise Refusal("capability", f"PTRACE_SECCOMP_GET_FILTER: {e.message}", pid=pid) from None
                raise
            for j in range(0, len(prog), INSN):
                code, _, _, k = struct.unpack_from("<HBBI", prog, j)
                if code == BPF_RET_K and k & 0xFFFF0000 == SECCOMP_RET_USER_NOTIF:
                    raise Refusal("unsupported-state", f"seccomp filter {i} can return SECCOMP_RET_USER_NOTIF: "
                                  "its listener cannot be carried over", pid=pid)
            filters.append({"prog": prog.hex(), "flags": _flags(pid, i) & SECCOMP_FILTER_FLAG_LOG})
            i += 1
    elif mode not in (0, 1):
        raise Refusal("unsupported-state", f"seccomp mode {mode}", pid=pid)
    return {"mode": mode, "filters": filters}


def validate(rec: dict) -> List[Refusal]:
    """Before the process exists: can the restorer suspend the filters it
    installs (PTRACE_O_SUSPEND_SECCOMP: CAP_SYS_ADMIN, ckpt itself not
    under seccomp)?"""
    if not rec or rec["mode"] == 0:
        return []
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    why = []
    if not (int(status.get("CapEff", "0").strip(), 16) >> 21) & 1:
        why.append("CAP_SYS_ADMIN")
    if status.get("Seccomp", "0").strip() != "0":
        why.append("ckpt itself outside seccomp")
    if why:
        return [Refusal("capability", f"restoring seccomp ({describe(rec)}) needs PTRACE_O_SUSPEND_SECCOMP: "
                        + ", ".join(why))]
    return []


def describe(rec: dict) -> str:
    if rec["mode"] == 0:
        return "none"
    if rec["mode"] == 1:
        return "strict"
    return f"{len(rec['filters'])} filter(s) of " + ", ".join(
        str(len(f["prog"]) // (2 * INSN)) for f in rec["filters"]) + " instructions"


def check_record(rec) -> bool:
    try:
        return rec["mode"] in (0, 1, 2) and all(
            isinstance(f["prog"], str) and len(f["prog"]) % (2 * INSN) == 0 and f["prog"]
            and isinstance(f["flags"], int) and isinstance(f.get("node", 0), int)
            for f in rec["filters"]) and (rec["mode"] == 2) == bool(rec["filters"])
    except (KeyError, TypeError):
        return False


def install(b, rec: dict) -> None:
    """Builder stage: install strict mode or the filters in the new process
    (a multi-threaded one's were installed with its threads: b.seccomp_done)."""
    if not rec or rec["mode"] == 0 or b.seccomp_done:
        return
    suspend(b.task, ptrace.O_EXITKILL)
    if rec["mode"] == 1:
        b.call("seccomp", SECCOMP_SET_MODE_STRICT, 0, 0)
        return
    got, size = map_area(b, rec["filters"])
    try:
        for f in rec["filters"]:
            install_one(b, got, f)
    finally:
        b.call("munmap", got, size)


def map_area(b, filters: List[dict]):
    """(address, size) of a new private mapping in b's process that holds
    the largest of `filters` and its sock_fprog; the caller unmaps it."""
    size = (max(len(f["prog"]) // 2 for f in filters) + 16 + PAGE - 1) & ~(PAGE - 1)
    from .build import MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, _free_gap, _maps
    busy = [(v["start"], v["end"]) for v in b.job.vmas] + [(v["start"], v["end"]) for v in _maps(b.pid)]
    area = _free_gap(busy, size)
    return b.call("mmap", area, size, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0), size


def install_one(b, area: int, f: dict) -> None:
    """Filter `f` installed by the thread b builds (area: map_area's)."""
    prog = bytes.fromhex(f["prog"])
    # struct sock_fprog {unsigned short len; struct sock_filter *filter}
    b.task.write_mem(area + 16, prog)
    b.task.write_mem(area, struct.pack("<H6xQ", len(prog) // INSN, area + 16))
    b.call("seccomp", SECCOMP_SET_MODE_FILTER, f["flags"], area)


def read_back(pid: int, tid: int, rec: dict) -> None:
    """The restored thread's mode and filters are the record's, or EngineError."""
    want = [(bytes.fromhex(f["prog"]), f["flags"]) for f in rec["filters"]] if rec["mode"] == 2 else []
    mode = thread_mode(pid, tid)
    if mode != rec["mode"]:
        raise EngineError(f"thread {tid}: seccomp mode reads back as {mode}, not {rec['mode']}", pid=tid)
    got = chain(tid) if mode == 2 else []
    if got != want:
        raise EngineError(f"thread {tid}: seccomp filters read back as {len(got)} filter(s) "
                          f"{[len(p) // INSN for p, _ in got]}, not {[len(p) // INSN for p, _ in want]} "
                          "(or their programs/flags differ)", pid=tid)


# -- multi-threaded processes ----------------------------------------------------
#
# Filters are per thread: each thread points at the newest filter of a chain
# (each filter points at the one before), and a clone starts pointing where
# its creator does. Threads share a filter object when one was cloned from
# the other after it was installed, or when SECCOMP_FILTER_FLAG_TSYNC moved
# every thread onto the caller's new filter. Which objects are shared is
# what the program can observe later: a TSYNC succeeds only when every
# other thread's newest filter is on the caller's chain (kernel/seccomp.c
# seccomp_can_sync_threads), and otherwise returns the first thread (in
# thread-list order) that is not.
#
# PTRACE_SECCOMP_GET_FILTER gives programs, not identities. The dump
# decides, for every pair whose programs allow it, what could ever be
# observed - "thread B's newest filter is on thread A's chain" - with a
# probe that cannot succeed: a throwaway thread T cloned from A asks for
# TSYNC while a throwaway sentinel S (created after every real thread, with
# a filter of its own) is certain to fail the check; the kernel walks the
# threads in list order, so T's result names the first real thread off A's
# chain, or S when there is none, and nothing is attached or synchronised
# either way (share). Identical filters installed separately are told
# apart so; a pair hidden behind another thread's failure in every probe
# is refused. The restore builds what was learnt: each shared filter
# installed once, by one thread, and the threads that share it cloned
# after it (plan; engine/threads.py create).

SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ALLOW = 0x7FFF0000
PR_SET_NO_NEW_PRIVS = 38
_CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000   # VM FS FILES SIGHAND THREAD SYSVSEM
_CLONE_PTRACE = 0x2000
PROBE_BYTES = 128       # clone_args, the allow-all program and its sock_fprog


def thread_mode(pid: int, tid: int) -> int:
    # one field, without a text file read line by line (asked twice per thread)
    from .procfs import read_status_fields
    got = read_status_fields(f"/proc/{pid}/task/{tid}/status", ("Seccomp",)).get("Seccomp")
    return int(got.split()[0]) if got else 0


def _key(rec: dict) -> tuple:
    return tuple((f["prog"], f["flags"]) for f in rec["filters"]) if rec and rec["mode"] == 2 else ()


def _on_chain(recs: dict, a: int, b: int) -> bool:
    """The node numbers say: b's newest filter is on a's chain (b filtered)."""
    fb = recs[b]["filters"]
    return bool(fb) and fb[-1]["node"] in {f["node"] for f in recs[a]["filters"]}


def _threads(recs: dict, order: List[int]):
    """(threads with a record in list order, those of them in filter mode);
    strict mode in a multi-threaded process is refused."""
    live = [t for t in order if t in recs]
    if any(recs[t]["mode"] == 1 for t in live):
        raise Refusal("threads", "seccomp strict mode in a multi-threaded process is not restored",
                      pid=live[0] if live else None)
    return live, [t for t in live if recs[t]["mode"] == 2]


def _probe_passed(tasks: dict, recs: dict, live: List[int], a: int, scratch: int):
    """One probe from thread `a`: (the thread the kernel names, None for
    none; the threads before it in list order, whose newest filters are
    therefore on a's chain)."""
    first = probe(tasks[a], scratch)
    if first is not None and first not in recs:
        raise Refusal("threads", f"seccomp probe from thread {a} named thread {first}, not one of the "
                      "process's", pid=a)
    passed = []
    for b in live:
        if b == first:
            break
        if b != a:
            passed.append(b)
    return first, passed


def share(tasks: dict, recs: dict, order: List[int], scratch: int) -> int:
    """Dump: which filters the threads share, learnt by probes (see above),
    written as the filters' "node" numbers. `tasks`: {tid: frozen Task,
    seccomp suspended}; `recs`: {tid: seccomp record}; `order`: the thread
    list order (/proc/PID/task); `scratch`: PROBE_BYTES of writable memory
    of the process. Returns the number of probes run. Raises Refusal when
    a pair of threads whose programs allow sharing stays undecided.

    Every pair (A, B) where B's chain of programs is a prefix of A's must
    be decided: does B's newest filter sit on A's chain? A probe from A
    answers yes for every thread before the first it names, no for that
    one. A yes makes their first filters one object each (a union of
    positions: thread, depth); a no keeps two positions apart, and with
    them their descendants. Positions never joined are filters nobody can
    tell shared or not (nobody's newest): each is its own."""
    live, filtered = _threads(recs, order)
    key = {t: _key(recs[t]) for t in filtered}
    depth = {t: len(key[t]) for t in filtered}
    pairs = [(a, b) for a in filtered for b in filtered if a != b and key[a][:depth[b]] == key[b]]
    parent: dict = {}

    def find(pos):
        while parent.get(pos, pos) != pos:
            pos = parent[pos]
        return pos

    def join(a, b, d):
        for k in range(1, d + 1):
            ra, rb = find((a, k)), find((b, k))
            if ra != rb:
                parent[ra] = rb
    apart = []      # (depth, a, b): a's and b's filters at that depth are two objects

    def decided(a, b) -> bool:
        if find((a, depth[b])) == find((b, depth[b])):
            return True
        for d, x, y in apart:
            if d <= depth[b] and {find((a, d)), find((b, d))} == {find((x, d)), find((y, d))}:
                return True
        return False
    probes = 0
    blocker: dict = {}
    for a in sorted(filtered, key=lambda t: (-depth[t], live.index(t))):
        if all(decided(a, b) for x, b in pairs if x == a):
            continue
        first, passed = _probe_passed(tasks, recs, live, a, scratch)
        blocker[a] = first
        probes += 1
        for b in passed:
            if b in depth:      # its newest filter is on a's chain
                if key[a][:depth[b]] != key[b]:
                    raise Refusal("threads", f"seccomp: thread {b}'s filters pass thread {a}'s TSYNC check "
                                  "though their programs differ", pid=a)
                join(a, b, depth[b])
        if first in depth and key[a][:depth[first]] == key[first]:
            apart.append((depth[first], a, first))
    for d, x, y in apart:
        if find((x, d)) == find((y, d)):
            raise Refusal("threads", f"seccomp: the probes contradict each other about threads {x} and {y}",
                          pid=x)
    hidden = sorted({(a, b) for a, b in pairs if not decided(a, b)})
    if hidden:
        a = hidden[0][0]
        raise Refusal("threads", f"seccomp: whether thread(s) {', '.join(str(b) for x, b in hidden if x == a)} "
                      f"share thread {a}'s filters cannot be told (thread {blocker.get(a)} fails its TSYNC "
                      "check first)", pid=a)
    ids: dict = {}
    for t in filtered:
        for k, f in enumerate(recs[t]["filters"], 1):
            f["node"] = ids.setdefault(find((t, k)), len(ids))
    return probes


def check_sharing(tasks: dict, recs: dict, order: List[int], scratch: int, hidden_ok: bool = False) -> int:
    """The restore's reading back of what it built: the probes' answers
    against the sharing the "node" numbers state (`hidden_ok`: a pair no
    probe reaches in the new thread order is left to the construction)."""
    live, filtered = _threads(recs, order)
    pos = {t: i for i, t in enumerate(filtered)}
    n = len(filtered)
    # known[i]: bit j set when "filtered[j]'s newest is on filtered[i]'s
    # chain" has been seen true; claims are the pairs the numbers say true.
    claims = [sum(1 << pos[b] for b in filtered if b != a and _on_chain(recs, a, b)) for a in filtered]
    known = [0] * n
    probes = 0
    depth = {t: len(recs[t]["filters"]) for t in filtered}
    blocker = {}
    # Deepest first (its chain holds the most claims); a claim one probe
    # cannot reach may follow from others' (closure), so what stays
    # unknown is judged once every thread has had its probe.
    for a in sorted(filtered, key=lambda t: (-depth[t], live.index(t))):
        i = pos[a]
        if claims[i] & ~known[i] == 0:
            continue
        first, passed = _probe_passed(tasks, recs, live, a, scratch)
        blocker[a] = first
        probes += 1
        for b in passed:
            if b in pos:      # its newest filter is on a's chain
                if not claims[i] >> pos[b] & 1:
                    raise Refusal("threads", f"seccomp: thread {b}'s filters pass thread {a}'s TSYNC check "
                                  "though the image has them apart", pid=a)
                known[i] |= 1 << pos[b]
        if first is not None:
            if first in pos and claims[i] >> pos[first] & 1:
                raise Refusal("threads", f"seccomp: thread {first}'s filters fail thread {a}'s TSYNC check "
                              "though the image has them shared", pid=a)
        _close(known, [depth[t] for t in filtered])
    for a in filtered if not hidden_ok else ():
        i = pos[a]
        if claims[i] & ~known[i]:
            hidden = [filtered[j] for j in range(n) if (claims[i] & ~known[i]) >> j & 1]
            raise Refusal("threads", f"seccomp: whether thread(s) {', '.join(map(str, hidden))} share thread "
                          f"{a}'s filters cannot be told (thread {blocker.get(a)} fails its TSYNC check first)",
                          pid=a)
    return probes


def _close(known: List[int], depth: List[int]) -> None:
    """Closure of the facts "j's newest is on i's chain": transitive; and
    of two threads on one chain, the one no deeper has its newest on the
    other's chain too (a chain's first filters are one)."""
    n = len(known)
    changed = True
    while changed:
        changed = False
        for i in range(n):
            on = [j for j in range(n) if known[i] >> j & 1 and j != i]
            for k in on:
                more = known[k] & ~(1 << i)
                for j in on + [i]:
                    if j != k and depth[j] <= depth[k]:
                        more |= 1 << j
                if more & ~known[k] & ~(1 << k):
                    known[k] |= more & ~(1 << k)
                    changed = True
                if known[k] & ~known[i] & ~(1 << i):
                    known[i] |= known[k] & ~(1 << i)
                    changed = True


def probe(a, scratch: int) -> Optional[int]:
    """The TID the kernel names when a thread positioned like `a` asks for
    TSYNC (the first thread off a's chain), None when it names the
    throwaway sentinel (every real thread is on a's chain).
    Two threads are created in a's process and ended before this returns;
    no filter of a real thread changes. Raises Refusal."""
    from .task import Task
    arch = a.arch
    size = ctypes.sizeof(arch.CloneArgs)
    args = arch.CloneArgs(flags=_CLONE_THREAD_FLAGS | _CLONE_PTRACE, exit_signal=0)
    allow = scratch + 96
    fprog = scratch + 112
    a.write_mem(scratch, ctypes.string_at(ctypes.addressof(args), size).ljust(96, b"\0")
                + struct.pack("<HBBI", BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW).ljust(16, b"\0")
                + struct.pack("<H6xQ", 1, allow))
    made: list = []
    try:
        for _ in range(2):
            tid = a.call("clone3", scratch, size)
            st = ptrace.wait(tid)
            if not st.stopped:
                raise Refusal("unsupported-state", f"seccomp probe thread {tid}: {st!r}", pid=a.pid)
            t = Task(tid)
            t.tgid, t.syscall_ip, t.fault_name = a.tgid, a.syscall_ip, a.fault_name
            made.append(t)
            t.call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)   # its own flag: it installs without CAP_SYS_ADMIN
        caller, sentinel = made
        sentinel.call("seccomp", SECCOMP_SET_MODE_FILTER, 0, fprog)
        if len(chain(sentinel.pid)) != len(chain(a.pid)) + 1:
            raise Refusal("unsupported-state", "seccomp probe: the sentinel's filter is not in place", pid=a.pid)
        got = caller.syscall(arch.SYS["seccomp"], SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, fprog)
        if got == 0:    # cannot happen: the sentinel fails the check
            raise EngineError("seccomp probe: TSYNC succeeded", pid=a.pid)
        if got < 0:
            raise Refusal("threads", f"seccomp: which threads share thread {a.pid}'s filters cannot be told "
                          f"(probe TSYNC: errno {-got})", pid=a.pid)
        return None if got == sentinel.pid else got
    except libc.SysError as e:
        raise Refusal("threads", f"seccomp: which threads share thread {a.pid}'s filters cannot be told "
                      f"(probe: {e.message})", pid=a.pid) from None
    finally:
        for t in made:
            _end(t)


def _end(t) -> None:
    """Make the throwaway thread `t` call exit(0) and reap it."""
    regs = t.orig_regs.copy()
    t.arch.set_syscall(regs, t.syscall_ip, t.arch.SYS["exit"], (0,))
    t.set_regs(regs)
    t.close()
    ptrace.cont(t.pid, 0)
    while True:
        st = ptrace.wait(t.pid)
        if st.exited:
            t.attached = False
            return
        ptrace.cont(t.pid, 0)


def chain(tid: int) -> List[tuple]:
    """[(program bytes, flags)] oldest first, read with ptrace (tid stopped)."""
    out = []
    i = 0
    while True:
        try:
            prog = _filter(tid, i)
        except libc.SysError as e:
            if e.errno == 2:
                return out
            raise
        out.append((prog, _flags(tid, i) & SECCOMP_FILTER_FLAG_LOG))
        i += 1


def tree_problem(recs: dict) -> Optional[str]:
    """Why the "node" numbers of `recs` ({tid: seccomp record}) are not one
    tree (a node with two programs or two parents), or None."""
    seen: dict = {}
    for tid, rec in recs.items():
        parent = None
        for f in rec["filters"]:
            node = f.get("node")
            if not isinstance(node, int) or isinstance(node, bool):
                return f"thread {tid}: seccomp filter without a node number"
            val = (f["prog"], f["flags"], parent)
            if seen.setdefault(node, val) != val:
                return f"thread {tid}: seccomp filter node {node} is not one filter"
            parent = node
    return None


def plan(order: List[int], recs: dict) -> list:
    """The restore's steps, [("clone", creator, tid) | ("install", tid,
    filter)], that make threads `order[1:]` from order[0] (the leader,
    which exists) with every filter node installed once and inherited by
    the threads that share it."""
    chains = {t: [f["node"] for f in recs[t]["filters"]] for t in order}
    first = {}
    for t in order:
        for f in recs[t]["filters"]:
            first.setdefault(f["node"], f)
    steps: list = []

    def grow(creator: int, depth: int, members: List[int]) -> None:
        groups: dict = {}
        for m in members:
            if len(chains[m]) == depth:
                steps.append(("clone", creator, m))
            else:
                groups.setdefault(chains[m][depth], []).append(m)
        mine = chains[creator][depth] if len(chains[creator]) > depth else None
        for node, g in groups.items():
            if node != mine:
                steps.append(("clone", creator, g[0]))
                steps.append(("install", g[0], first[node]))
                grow(g[0], depth + 1, g[1:])
        if mine is not None:
            steps.append(("install", creator, first[mine]))
            grow(creator, depth + 1, groups.get(mine, []))

    grow(order[0], 0, order[1:])
    return steps
