"""Private pages a process tree shares copy-on-write since a fork, kept
shared by the restore (zdtm cow00, cow01).

After fork() a parent and its child map the same physical page at the
same address until one of them writes it; a preforked server's workers
share most of their heap that way. Restored one member at a time, every
member would get a copy of its own: every byte right, but the tree's
memory the sum of its members'.

Dump (find, mark): while the whole tree is frozen, before any member's pages
are read, each member's private mapping (anonymous, or a private file
mapping's copy-on-written pages) that its parent has with the same layout
(start, perms, offset, file, VmFlags; the end may differ: a [heap] grown
or trimmed since the fork) is compared page by page, over the part both
have, through both /proc/PID/pagemap: a page present in both at the same PFN
(readable as root only; 0 otherwise: nothing marked) is the same physical
page, so the same bytes. Those pages are recorded in the member's mm.json
mapping as "cow": [[addr, npages], ...]. They stay in the member's own
pages files too: an engine that ignores "cow" (or a restore that cannot
use it) writes them as before, so the record is advisory and the image
format is unchanged for older readers.

Restore (plan, before_fork; engine/tree_restore.py phase 1): a member
whose child keeps a mapping ("cow" pages, the parent's mapping of the same
layout in its image) maps that mapping and writes its own pages into it
before it forks its children ("premap"), so each child inherits it through
fork() with every page shared. Each child then, before it forks its own
children: unmaps what it inherited but does not keep, and in what it
keeps (grown in place with mremap, or trimmed, to its own end) drops
every page not marked "cow" (MADV_DONTNEED: absent, or the
file's page again), writes its own dumped pages there, and reads every
"cow" page back and compares it with its own image's bytes; a page that
differs is written (never a silent wrong byte: the sharing is lost, the
bytes are the image's). Its build stages then skip the mmap and the pages
of every mapping already in place (Builder.in_place) but do the rest
(names, madvise, the final mprotect).
"""

from __future__ import annotations

import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Set, Tuple

from . import faults
from .errors import EngineError, Refusal

PAGE = 4096
PRESENT, FILE_OR_SHARED = 1 << 63, 1 << 61
PFN_MASK = (1 << 55) - 1
# What a mapping must have as its parent's to be kept from it: all but its
# end (a heap grown or trimmed by brk since the fork is the same mapping
# longer or shorter; the restore grows it in place with mremap, or trims it).
KEY = ("start", "perms", "offset", "dev", "inode", "path", "flags", "kind")
MADV_DONTNEED, MADV_DONTDUMP, MADV_DODUMP = 4, 16, 17
READ_STEP = 4 << 20       # bytes of shared pages read back and compared at a time


def _eligible(v: dict) -> bool:
    """A private mapping whose pages a fork hands on: anonymous, or a
    private file mapping's anonymous pages; not droppable (wiped on fork)
    nor excluded from a fork (VM_DONTCOPY, "dc"; VM_WIPEONFORK, "wf")."""
    return (v.get("kind") in ("anon", "file") and len(v.get("perms", "")) == 4 and v["perms"][3] == "p"
            and not v.get("tree_shared") and not {"dp", "dc", "wf"} & set(v.get("flags", ())))


def key(v: dict) -> tuple:
    # map, not a generator expression: no Python frame per field (a tree's
    # dump and restore key every mapping of every member, ~2,300 for 50)
    return tuple(map(repr, map(v.get, KEY)))


# -- dump ------------------------------------------------------------------------

def _entries(pid: int, v: dict, fds: Optional[Dict[int, Optional[int]]] = None) -> Optional[bytes]:
    """The raw pagemap entries of v's pages. fds: {pid: its pagemap fd,
    or None where it would not open}, kept open by the caller for the
    next mapping (a tree's members: ~16 mappings each, compared with
    both a parent's and a child's)."""
    n = (v["end"] - v["start"]) // PAGE
    fd = fds.get(pid, -1) if fds is not None else -1
    if fd is None:
        return None
    if fd < 0:
        try:
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            if fds is not None:
                fds[pid] = None
            return None
        if fds is not None:
            fds[pid] = fd
    try:
        raw = os.pread(fd, n * 8, v["start"] // PAGE * 8)
    finally:
        if fds is None:
            os.close(fd)
    return raw if len(raw) == n * 8 else None


# top byte of a pagemap entry (bits 56-63) -> b"1" where the page is present
# (bit 63), for a file mapping also anonymous (bit 61 clear)
_PRESENT = bytes(0x31 if b & 0x80 else 0x30 for b in range(256))
_PRESENT_ANON = bytes(0x31 if b & 0x80 and not b & 0x20 else 0x30 for b in range(256))
CHUNK = 512     # entries compared as bytes at once (one page of pagemap)


def pfns_visible() -> bool:
    """/proc/PID/pagemap shows PFNs to CAP_SYS_ADMIN only (0 otherwise):
    one of this process's own pages, just written, tells."""
    import ctypes
    buf = ctypes.create_string_buffer(PAGE * 2)
    addr = (ctypes.addressof(buf) + PAGE - 1) // PAGE * PAGE
    ctypes.memset(addr, 1, 8)
    entry = _entries(os.getpid(), {"start": addr, "end": addr + PAGE})
    return bool(entry) and int.from_bytes(entry, "little") & PFN_MASK != 0


def _runs(flags: bytearray, base: int) -> List[List[int]]:
    """[addr, npages] of each run of b"1" in `flags` (one byte a page from `base`)."""
    out: List[List[int]] = []
    n = len(flags)
    i = flags.find(b"1")
    while i >= 0:
        j = flags.find(b"0", i)
        if j < 0:
            j = n
        out.append([base + i * PAGE, j - i])
        i = flags.find(b"1", j)
    return out


def shared_runs(mine: bytes, theirs: bytes, base: int, anon_only: bool) -> List[List[int]]:
    """Runs [addr, npages] where both raw pagemaps show the same present
    page (the PFNs visible: pfns_visible), anonymous for a file mapping.
    A chunk whose entries are the same bytes in both is judged from the
    top bytes at C speed (a shared heap: most of it); others entry by entry."""
    import struct
    n = len(mine) // 8
    want = _PRESENT_ANON if anon_only else _PRESENT
    flags = bytearray(b"0" * n)
    for c in range(0, n, CHUNK):
        e = min(n, c + CHUNK)
        if mine[c * 8:e * 8] == theirs[c * 8:e * 8]:
            flags[c:e] = mine[c * 8 + 7:e * 8:8].translate(want)
            continue
        k = e - c
        for i, (a, b) in enumerate(zip(struct.unpack_from(f"<{k}Q", mine, c * 8),
                                       struct.unpack_from(f"<{k}Q", theirs, c * 8))):
            if (a & PRESENT and b & PRESENT and a & PFN_MASK and a & PFN_MASK == b & PFN_MASK
                    and not (anon_only and (a | b) & FILE_OR_SHARED)):
                flags[c + i] = 0x31
    return _runs(flags, base)


def find(members: List[Tuple[int, int, List[dict]]]) -> Dict[int, Dict[int, List[List[int]]]]:
    """members: (pid, ppid, mappings as surveyed) of every live member, all
    frozen, none of their pages read yet: process_vm_readv pins the pages
    it reads (FOLL_PIN), and pinning a page shared copy-on-write unshares
    it (mm/gup.c gup_must_unshare): after the dump reads them, parent and
    child no longer share a page. Returns {pid: {mapping start: runs}} of
    the pages each member shares with its parent."""
    by_pid = {pid: vmas for pid, _, vmas in members}
    out: Dict[int, Dict[int, List[List[int]]]] = {}
    if not pfns_visible():
        return out
    fds: Dict[int, Optional[int]] = {}
    indexes: Dict[int, dict] = {}       # a parent's mappings by key, once per parent (plan's reason)
    parents: Dict[Tuple[int, int, int], Optional[bytes]] = {}
    try:
        for pid, ppid, vmas in members:
            theirs = by_pid.get(ppid)
            if not theirs:
                continue
            if ppid not in indexes:
                indexes[ppid] = {key(w): w for w in theirs if _eligible(w)}
            index = indexes[ppid]
            for v in vmas:
                faults.point("dump.tree.cow")
                w = index.get(key(v)) if _eligible(v) else None
                if w is None:
                    continue
                both = {"start": v["start"], "end": min(v["end"], w["end"])}
                # the parent's entries once for all its children (frozen:
                # they do not change), not a pagemap read per child
                span = (ppid, both["start"], both["end"])
                if span not in parents:
                    parents[span] = _entries(ppid, both, fds)
                a, b = _entries(pid, both, fds), parents[span]
                if a is None or b is None:
                    continue
                runs = shared_runs(a, b, v["start"], v["kind"] == "file")
                if runs:
                    out.setdefault(pid, {})[v["start"]] = runs
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    return out


# top byte -> b"1" where the page is present and not mapped by this process
# alone (bit 56, PM_MMAP_EXCLUSIVE, clear), for a file mapping anonymous
_SHARED = bytes(0x31 if b & 0x80 and not b & 0x01 else 0x30 for b in range(256))
_SHARED_ANON = bytes(0x31 if b & 0x80 and not b & 0x01 and not b & 0x20 else 0x30 for b in range(256))
_zero_pfn: Optional[int] = None


def zero_pfn() -> int:
    """The shared zero page's PFN (0: PFNs hidden): an anonymous page only
    read is mapped to it, never exclusively; reading it pinned unshares
    nothing."""
    global _zero_pfn
    if _zero_pfn is None:
        import ctypes
        import mmap
        m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # not shmem (the default)
        try:
            anchor = ctypes.c_char.from_buffer(m)
            addr = ctypes.addressof(anchor)
            _ = m[0]        # a read fault: the zero page
            del anchor
            entry = _entries(os.getpid(), {"start": addr, "end": addr + PAGE}) or bytes(8)
        finally:
            m.close()
        e = int.from_bytes(entry, "little")
        # present, and not exclusive: the zero page (else: unknown, 0)
        _zero_pfn = e & PFN_MASK if e & PRESENT and not e & (1 << 56) else 0
    return _zero_pfn


def unpinned_runs(raw: bytes, base: int, anon_only: bool) -> List[List[int]]:
    """Runs [addr, npages] of a mapping's raw pagemap whose pages the dump
    reads through /proc/PID/mem: present and not exclusive (shared
    copy-on-write with another process, a parent or a child: pinning them
    with process_vm_readv would unshare them, mm/gup.c gup_must_unshare,
    and a dumped tree, left running, would hold a copy per member of every
    page it shared), the zero page left out (pinned, it stays shared)."""
    import struct
    n = len(raw) // 8
    flags = bytearray(raw[7:n * 8:8].translate(_SHARED_ANON if anon_only else _SHARED))
    zero = zero_pfn()
    i = flags.find(b"1")
    while i >= 0:
        j = flags.find(b"0", i)
        if j < 0:
            j = n
        if zero:
            for k, e in enumerate(struct.unpack_from(f"<{j - i}Q", raw, i * 8)):
                if e & PFN_MASK == zero:
                    flags[i + k] = 0x30
        i = flags.find(b"1", j)
    return _runs(flags, base)


def mark(found: Dict[int, List[List[int]]], vmas: List[dict]) -> int:
    """One member's mm.json mappings get their "cow" runs (find(), cut to
    the pages the dump saved); returns how many pages were marked."""
    total = 0
    for v in vmas:
        runs = found.get(v["start"])
        if runs and _eligible(v):
            runs = _within(runs, v["pages"])
            if runs:
                v["cow"] = runs
                total += sum(n for _, n in runs)
    return total


def _within(runs: List[List[int]], pages: List[List[int]]) -> List[List[int]]:
    """The parts of runs that the dumped pages cover (a page shared at the
    PFN check is present, so dumped: this only guards the invariant the
    restore checks)."""
    return [[a, n] for a, n, _, _ in intersect([[r[0], r[1], 0, 0] for r in pages], runs)]


# -- runs ------------------------------------------------------------------------

def _pieces(runs: List[List[int]], cut: List[List[int]], inside: bool) -> List[List[int]]:
    """Page runs [addr, n, file, offset] cut by the sorted runs [addr, n]:
    the parts inside them (inside=True) or outside them."""
    out = []
    spans = sorted((a, a + n * PAGE) for a, n in cut)
    for addr, n, fi, off in runs:
        end = addr + n * PAGE
        pos = addr
        for s, e in spans:
            if e <= pos or s >= end:
                continue
            if s > pos and not inside:
                out.append([pos, (s - pos) // PAGE, fi, off + pos - addr])
            lo, hi = max(s, pos), min(e, end)
            if inside:
                out.append([lo, (hi - lo) // PAGE, fi, off + lo - addr])
            pos = hi
        if pos < end and not inside:
            out.append([pos, (end - pos) // PAGE, fi, off + pos - addr])
    return out


def intersect(runs, cut):
    return _pieces(runs, cut, True)


def subtract(runs, cut):
    return _pieces(runs, cut, False)


def _gaps(start: int, end: int, cut: List[List[int]]) -> List[Tuple[int, int]]:
    """(addr, size) of the parts of [start, end) no run of cut covers."""
    out, pos = [], start
    for a, n in sorted(cut):
        if a > pos:
            out.append((pos, a - pos))
        pos = max(pos, a + n * PAGE)
    if pos < end:
        out.append((pos, end - pos))
    return out


def check(v: dict) -> None:
    """A mapping's "cow" record: sorted, disjoint runs inside the mapping,
    every page of them dumped. Raises Refusal(image-invalid)."""
    runs = v["cow"]
    if not _runs_ok(v, runs):
        # made only to be raised: its text (the runs shown) cost a tree's
        # restore ~300 str() of every mapping's runs, twice
        raise Refusal("image-invalid", f"mm.json: mapping {v['start']:#x} cow {str(runs)[:80]}")


def _runs_ok(v: dict, runs) -> bool:
    if not isinstance(runs, list) or not runs:
        return False
    last = v["start"]
    for r in runs:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                            for x in r)):
            return False
        if r[0] % PAGE or r[1] <= 0 or r[0] < last or r[0] + r[1] * PAGE > v["end"]:
            return False
        last = r[0] + r[1] * PAGE
    return sum(n for _, n, _, _ in intersect(v["pages"], runs)) == sum(n for _, n in runs)


# -- restore -----------------------------------------------------------------------

# This restore's pages kept shared (read back equal) and "cow" pages that
# differed and were written; the restorer reports them (restore._run_restorer).
STATS = {"shared_pages": 0, "rewritten_pages": 0}


class Plan:
    """Per member PID: the starts of its mappings it keeps from its
    parent (keep) and those it maps before its forks (premap)."""

    def __init__(self):
        self.keep: Dict[int, Set[int]] = {}
        self.premap: Dict[int, Set[int]] = {}

    def in_place(self, pid: int) -> Set[int]:
        return self.keep.get(pid, set()) | self.premap.get(pid, set())


def plan(members: List[dict], jobs: Dict[int, object], busy: List[Tuple[int, int]]) -> Plan:
    """Which mapping each member keeps and premaps (module docstring).
    busy: (start, end) of what every new process holds before its
    mappings (the vdso blocks as cloned): a mapping over them is left to
    the ordinary path (mapped after the vdso moved)."""
    p = Plan()
    exe = _restorer_exe()
    # a parent's mappings by key, once per parent: a server's root has
    # every worker as its child (a 50-process tree's root: 49 times ~23)
    index: Dict[int, Tuple[dict, Set[int]]] = {}
    for m in members:
        job = jobs.get(m["pid"])
        parent = jobs.get(m["ppid"])
        if job is None or parent is None:
            continue
        if m["ppid"] not in index:
            index[m["ppid"]] = ({key(w): w for w in parent.vmas if _eligible(w)}, {w["start"] for w in parent.vmas})
        theirs, starts = index[m["ppid"]]
        for v in job.vmas:
            if "cow" not in v:
                continue
            check(v)
            w = theirs.get(key(v)) if _eligible(v) else None
            if w is not None and v["end"] > w["end"] and w["end"] in starts:
                # grown in place by mremap: not with a neighbour of the
                # parent's there (it may have merged with it when mapped)
                w = None
            if w is None or any(s < max(v["end"], w["end"]) and v["start"] < e for s, e in busy) \
                    or (v["kind"] == "file" and (_file_id(v) == exe[0] or v["path"] == exe[1])):
                continue
            p.keep.setdefault(m["pid"], set()).add(v["start"])
            p.premap.setdefault(m["ppid"], set()).add(w["start"])
    # premap may name what the parent keeps itself: in place already,
    # before_fork maps only the rest.
    return p


def _file_id(v: dict) -> Optional[Tuple[int, int, int]]:
    if v.get("kind") != "file":
        return None
    try:
        major, minor = (int(x, 16) for x in v["dev"].split(":"))
    except (ValueError, AttributeError):
        return None
    return major, minor, v["inode"]


def _restorer_exe() -> tuple:
    """The file the new processes still have as their exe until their
    PR_SET_MM_MAP: that prctl fails with EBUSY while a mapping of it
    exists (kernel/sys.c replace_mm_exe_file), so a mapping of that file
    (a python3 target restored by a python3 ckpt) is mapped after it, by
    the member itself, as before. Its (major, minor, inode) and path
    (either one: an overlayfs file's maps entry names the file beneath)."""
    try:
        st = os.stat("/proc/self/exe")
        return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), os.readlink("/proc/self/exe")
    except OSError:
        return None, None


def before_fork(b, pl: Plan, inherited: Set[int], parent_vmas: Dict[int, dict]) -> None:
    """Member b, before it forks its children: what it inherited and does
    not keep unmapped, what it keeps made its own, what its children keep
    mapped and written. inherited: the starts of its parent's mappings in
    place at the fork (parent_vmas: the parent's mappings by start)."""
    then = queue_before_fork(b, pl, inherited, parent_vmas)
    if then is not None:
        b.flush()
        then()


def queue_before_fork(b, pl: Plan, inherited: Set[int], parent_vmas: Dict[int, dict]):
    """before_fork in two halves: its calls queued in b.pending (b moved
    into its cgroups first), and returned, what must follow once they ran
    (the pages written and read back from outside); None: nothing to do.
    A member that forks no child runs its queue beside the others'
    (engine/tree_restore.py: one batch side by side, not a round trip
    each in a row)."""
    keep = pl.keep.get(b.pid, set())
    premap = pl.premap.get(b.pid, set()) - keep
    if not inherited and not premap:
        return None
    faults.point("restore.tree.premap")
    vmas = {v["start"]: v for v in b.job.vmas}
    if keep or premap:
        # its pages are charged to the cgroup that faults them
        from . import cgroups
        # its children are forked there: where it is now (read back after
        # a move; without one, where it was already)
        now = cgroups.enter(b.pid, b.job.core.get("cgroups"), b.cgroups_now)
        if now is not None:
            b.cgroups_now = now
    for s in sorted(inherited - keep):
        w = parent_vmas[s]
        b.pending.add("munmap", w["start"], w["end"] - w["start"])
    for s in sorted(keep):
        v, w = vmas[s], parent_vmas[s]
        if v["end"] > w["end"]:
            size = v["end"] - v["start"]
            b.pending.add("mremap", s, w["end"] - s, size, 0, 0,
                          expect=(s, f"mapping {s:#x} grown in place moved to {{got:#x}}"))
        elif v["end"] < w["end"]:
            b.pending.add("munmap", v["end"], w["end"] - v["end"])
        for addr, size in _gaps(v["start"], v["end"], v["cow"]):
            b.pending.add("madvise", addr, size, MADV_DONTNEED)
    later = []
    # Neighbours the original kept apart (build.kept_apart), both mapped
    # here: set apart while their pages go in by a VM_DONTDUMP unlike the
    # other's (not VM_DONTCOPY: the children must inherit them), given back
    # once they have an anon_vma each.
    from .build import kept_apart
    apart = {s: (MADV_DODUMP, MADV_DONTDUMP) if "dd" in vmas[s]["flags"] else (MADV_DONTDUMP, MADV_DODUMP)
             for s in kept_apart([vmas[s] for s in sorted(premap)])}
    for s in sorted(premap):
        v = vmas[s]
        flags, prot, final, force, fd, off = b.mmap_args(v)
        b.pending.add("mmap", v["start"], v["end"] - v["start"], prot, flags, fd, off,
                      expect=(v["start"], f"mapping {v['start']:#x} landed at {{got:#x}}"))
        if s in apart:
            b.pending.add("madvise", v["start"], v["end"] - v["start"], apart[s][0])
        later.append((v, force))

    def then() -> None:
        mem = None      # the member's /proc/PID/mem, opened once for all it keeps
        try:
            for s in sorted(keep):
                v = vmas[s]
                force = b.mmap_args(v)[3]
                own = subtract(v["pages"], v["cow"])
                if own:
                    b.page_bytes_early += b._write_pages(own, force)
                runs = intersect(v["pages"], v["cow"])
                if runs and mem is None:
                    mem = os.open(f"/proc/{b.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
                _verify(b, runs, force, pl, mem)
        finally:
            if mem is not None:
                os.close(mem)
        for v, force in later:
            if v["pages"]:
                b.page_bytes_early += b._write_pages(v["pages"], force)
        if apart:
            # each has its anon_vma now: its own VM_DONTDUMP back
            for s, (_, back) in sorted(apart.items()):
                b.pending.add("madvise", s, vmas[s]["end"] - s, back)
            b.flush()
    return then


def _verify(b, runs: List[List[int]], force: bool, pl: Plan, fd: int) -> None:
    """Every inherited page marked "cow" read back (through fd, b's
    /proc/PID/mem) and compared with the member's own image bytes; a page
    that differs is written."""
    if not runs:
        return
    pages = b.job.pages
    wrong: List[List[int]] = []
    buf = bytearray(min(READ_STEP, max(n for _, n, _, _ in runs) * PAGE))
    for addr, n, fi, off in runs:
        for k in range(0, n * PAGE, READ_STEP):
            size = min(READ_STEP, n * PAGE - k)
            with memoryview(buf) as view:
                # /proc/PID/mem reads without pinning: the page stays shared
                if os.preadv(fd, [view[:size]], addr + k) != size:
                    raise EngineError(f"cannot read back {size} bytes at {addr + k:#x}", pid=b.pid)
            got = buf if size == len(buf) else buf[:size]
            want = pages.maps[fi][off + k:off + k + size]      # bytes against bytes: a memcmp
            if want == got:
                STATS["shared_pages"] += size // PAGE
                continue
            for i in range(0, size, PAGE):
                if got[i:i + PAGE] != want[i:i + PAGE]:
                    wrong.append([addr + k + i, 1, fi, off + k + i])
                else:
                    STATS["shared_pages"] += 1
    pages._check_leases(runs)     # what was compared is what the image check verified
    right = subtract(runs, [[r[0], 1] for r in wrong])
    pages._release(right)         # each piece is used once: freed as a written one is
    if wrong:
        STATS["rewritten_pages"] += len(wrong)
        b.page_bytes_early += b._write_pages(wrong, force)
