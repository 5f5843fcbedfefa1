"""Private pages a process tree shares copy-on-write since a fork come back
shared (engine/cow.py), every byte the dumped one.

Target: tests/targets/cowtree.c - a root filling NPAGES pages, children
writing one page each, a grandchild under child 0, child 2 with its
mapping split by an mprotect (the part at its parent's start kept, the
read-only last page its own copy), and NPAGES heap pages the root trims
by 8 after the forks (the children's [heap], longer than their parent's,
kept from it and grown in place; child 1's own [heap] VMA after it, its
own copy). Sharing is read from outside through /proc/PID/pagemap
(the PFN: root only); bytes through /proc/PID/mem, which does not unshare
a page (process_vm_readv's pin would: mm/gup.c gup_must_unshare).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal
from engine.restore import restore
from engine_core_support import compile_target, procs, wait_for  # noqa: F401

PAGE = 4096
NPAGES = 64
NCHILD = 3

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="pagemap shows PFNs to root only")]


@pytest.fixture(scope="module")
def cowtree(tmp_path_factory):
    return compile_target(tmp_path_factory, "cowtree")


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _members(root: int) -> list:
    out = [root]
    for c in _children(root):
        out += _members(c)
    return out


def _pfns(pid: int, addr: int, n: int = NPAGES) -> list:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, n * 8, addr // PAGE * 8)
    finally:
        os.close(fd)
    return [e & ((1 << 55) - 1) if e >> 63 else 0 for e in struct.unpack(f"<{n}Q", raw)]


def _sharing(root: int, addr: int) -> dict:
    """{pid: page indexes (of NPAGES at addr) at the same PFN as in its
    parent}, the root left out."""
    out = {}
    for pid in _members(root)[1:]:
        mine, theirs = _pfns(pid, addr), _pfns(_ppid(pid), addr)
        out[pid] = {i for i, (a, b) in enumerate(zip(mine, theirs)) if a and a == b}
    return out


def _region(pid: int, addr: int, n: int = NPAGES) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, n * PAGE, addr)
    finally:
        os.close(fd)


def _page(i: int, gen: int) -> bytes:
    return b"".join(struct.pack("<Q", i << 32 | gen << 16 | k) for k in range(PAGE // 8))


def _expected(root: int) -> dict:
    """{pid: {page index: generation}} of what cowtree.c wrote, by member."""
    kids = _children(root)
    out = {root: {}}
    for k, c in enumerate(kids):
        out[c] = {k: k + 1}
        for g in _children(c):
            out[g] = {0: 1, NPAGES - 1: 99}
    return out


def _check_bytes(root: int, addr: int, want: dict, heap: int) -> None:
    for pid, own in want.items():
        data = _region(pid, addr)
        for i in range(NPAGES):
            assert data[i * PAGE:(i + 1) * PAGE] == _page(i, own.get(i, 0)), (pid, i)
        n = NPAGES - 8 if pid == root else NPAGES       # the root trimmed its heap
        data = _region(pid, heap, n)
        for i in range(n):
            assert data[i * PAGE:(i + 1) * PAGE] == _page(1000 + i, 0), (pid, "heap", i)
    child1 = _children(root)[1]
    data = _region(child1, heap + NPAGES * PAGE, 4)
    for j in range(4):
        assert data[j * PAGE:(j + 1) * PAGE] == _page(2000 + j, 7), (child1, "grown heap", j)


def _start(procs, exe, tmp_path):  # noqa: F811
    ready = tmp_path / "ready"
    p = subprocess.Popen([exe, str(NPAGES), str(NCHILD), str(ready)], close_fds=True, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.popens.append(p)
    wait_for(lambda: ready.exists() or p.poll() is not None, what="cowtree ready")
    assert p.poll() is None
    _, pid, addr, heap = ready.read_text().split()
    assert int(pid) == p.pid
    return p, int(addr), int(heap)


def _kill_tree(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def gone():
        for x in pids:
            try:
                os.waitpid(x, os.WNOHANG)
            except ChildProcessError:
                pass
        return not any(os.path.exists(f"/proc/{x}") and _state(x) != "Z" for x in pids)
    wait_for(gone, what="the cowtree members gone")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _dumped(procs, exe, tmp_path):  # noqa: F811
    """A cowtree dumped (and killed): (root pid, region address, sharing
    before (the region's, the heap's), expected bytes, pids, image, heap address)."""
    p, addr, heap = _start(procs, exe, tmp_path)
    pids = _members(p.pid)
    assert len(pids) == NCHILD + 2
    before = _sharing(p.pid, addr)
    before_heap = _sharing(p.pid, heap)
    want = _expected(p.pid)
    _check_bytes(p.pid, addr, want, heap)
    img = str(tmp_path / "img")
    dump(p.pid, img, Options())
    p.wait()
    wait_for(lambda: all(_state(x) in ("gone", "Z") for x in pids), what="the dumped tree killed")
    _kill_tree(pids)
    return p.pid, addr, (before, before_heap), want, pids, img, heap


def _cow(img: str, pid: int, root: int) -> list:
    d = img if pid == root else os.path.join(img, "tree", str(pid))
    with open(os.path.join(d, "mm.json")) as f:
        return [v for v in json.load(f)["vmas"] if "cow" in v]


def test_pages_shared_since_a_fork_come_back_shared(procs, cowtree, tmp_path):  # noqa: F811
    root, addr, (before, before_heap), want, pids, img, heap = _dumped(procs, cowtree, tmp_path)
    kids = [x for x in pids if x != root]
    child0, child1, child2 = kids[0], kids[2], kids[3]      # _members: depth first, child 0's grandchild next
    grandchild = kids[1]
    # as cowtree.c set it up: each shares every page but its own written one(s)
    assert before[child0] == set(range(NPAGES)) - {0}
    assert before[grandchild] == set(range(NPAGES)) - {NPAGES - 1}
    assert before[child1] == set(range(NPAGES)) - {1}
    assert before[child2] == set(range(NPAGES)) - {2}
    # the image says so, for every member whose mapping has its parent's layout
    region = [v for v in _cow(img, child0, root) if v["start"] == addr]
    assert region and region[0]["cow"] == [[addr + PAGE, NPAGES - 1]]
    # child 2's split mapping: the part with its parent's start kept
    # (trimmed), its read-only last page not (no mapping of the parent's
    # starts there: its own copy)
    split = [v for v in _cow(img, child2, root) if addr <= v["start"] < addr + NPAGES * PAGE]
    assert [v["start"] for v in split] == [addr] and split[0]["end"] == addr + (NPAGES - 1) * PAGE
    out = restore(img, Options())
    procs.adopt(root)
    try:
        # what the restore says it kept: the shared pages, each read back equal
        assert out["cow_rewritten_pages"] == 0
        assert out["cow_shared_bytes"] >= sum(len(x) for x in list(before.values())[:3]) * PAGE
        assert sorted(_members(root)) == sorted(pids)
        after = _sharing(root, addr)
        for pid in (child0, grandchild, child1):
            assert after[pid] == before[pid], pid
        assert after[child2] == before[child2] - {NPAGES - 1}
        # the heap: every page shared before is shared after, in the
        # children's [heap] longer than their parent's (trimmed since the
        # fork: theirs grown in place at restore)
        assert before_heap[grandchild] == set(range(NPAGES))
        assert all(before_heap[x] == set(range(NPAGES - 8)) for x in (child0, child1, child2)), before_heap
        assert _sharing(root, heap) == before_heap
        _check_bytes(root, addr, want, heap)
        # the memory measured the way a user would: the restored tree holds
        # the region about once, plus the few pages written since the fork
        pss = sum(_pss_of_region(pid, addr) for pid in pids)
        assert pss < 1.5 * NPAGES * 4, pss
    finally:
        _kill_tree(sorted(_members(root), reverse=True))


def test_members_that_fork_none_make_their_layout_side_by_side(procs, cowtree, tmp_path, monkeypatch):  # noqa: F811
    # Only a member with children does its copy-on-write work (before_fork)
    # before its forks, one at a time; the others' calls are queued and run
    # in one batch side by side after the forks, their pages written and
    # read back after that: the pages come back shared and equal all the same.
    from engine import cow
    root, addr, (before, before_heap), want, pids, img, heap = _dumped(procs, cowtree, tmp_path)
    kids = [x for x in pids if x != root]
    child0 = kids[0]
    log = tmp_path / "alone"
    real = cow.before_fork

    def recording(b, *a):       # in the restorer (a fork of this process)
        with open(log, "a") as f:
            f.write(f"{b.pid}\n")
        return real(b, *a)
    monkeypatch.setattr(cow, "before_fork", recording)
    out = restore(img, Options())
    procs.adopt(root)
    try:
        assert sorted(int(x) for x in log.read_text().split()) == sorted([root, child0])
        assert out["cow_rewritten_pages"] == 0
        assert sorted(_members(root)) == sorted(pids)
        after = _sharing(root, addr)
        for pid in kids[:3]:
            assert after[pid] == before[pid], pid
        assert _sharing(root, heap) == before_heap
        _check_bytes(root, addr, want, heap)
    finally:
        _kill_tree(sorted(_members(root), reverse=True))


def _pss_of_region(pid: int, addr: int) -> int:
    """Pss (kB) of the mappings inside the region [addr, addr + NPAGES pages)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                s, e = (int(x, 16) for x in head.split("-"))
                inside = addr <= s and e <= addr + NPAGES * PAGE
            elif inside and head == "Pss:":
                total += int(line.split()[1])
    return total


def _rewrite(img: str, rel: str, mutate) -> None:
    path = os.path.join(img, rel)
    with open(path) as f:
        mm = json.load(f)
    mutate(mm)
    data = json.dumps(mm).encode()
    with open(path, "wb") as f:
        f.write(data)
    mpath = os.path.join(img, "manifest.json")
    with open(mpath) as f:
        man = json.load(f)
    man["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with open(mpath, "w") as f:
        json.dump(man, f)


def test_a_marked_page_that_differs_is_written(procs, cowtree, tmp_path):  # noqa: F811
    """mm.json says child 1 shares its own written page with the root: the
    restore reads every kept page back against the member's own image, so
    the page is written (its bytes), not left as the root's."""
    root, addr, _, want, pids, img, heap = _dumped(procs, cowtree, tmp_path)
    child1 = [x for x in pids if x != root][2]
    rel = f"tree/{child1}/mm.json"

    def mark_all(mm):
        for v in mm["vmas"]:
            if v["start"] == addr:
                assert v["cow"] == [[addr, 1], [addr + 2 * PAGE, NPAGES - 2]]
                v["cow"] = [[addr, NPAGES]]
    _rewrite(img, rel, mark_all)
    out = restore(img, Options())
    assert out["cow_rewritten_pages"] == 1
    procs.adopt(root)
    try:
        _check_bytes(root, addr, want, heap)
        after = _sharing(root, addr)
        assert after[child1] == set(range(NPAGES)) - {1}
    finally:
        _kill_tree(sorted(_members(root), reverse=True))


@pytest.mark.parametrize("bad", ["outside", "not-dumped", "unsorted", "empty"])
def test_a_malformed_cow_record_is_refused(procs, cowtree, tmp_path, bad):  # noqa: F811
    root, addr, _, want, pids, img, heap = _dumped(procs, cowtree, tmp_path)
    child1 = [x for x in pids if x != root][2]

    def mutate(mm):
        for v in mm["vmas"]:
            if v["start"] == addr:
                v["cow"] = {"outside": [[v["end"], 1]],
                            "not-dumped": [[addr, 1]],
                            "unsorted": [[addr + 2 * PAGE, 1], [addr, 1]],
                            "empty": []}[bad]
                if bad == "not-dumped":     # its first page no longer dumped
                    first = [r for r in v["pages"] if r[0] == addr]
                    assert first
                    if first[0][1] > 1:
                        first[0][:] = [addr + PAGE, first[0][1] - 1, first[0][2], first[0][3] + PAGE]
                    else:
                        v["pages"].remove(first[0])
    _rewrite(img, f"tree/{child1}/mm.json", mutate)
    with pytest.raises(Refusal) as e:
        restore(img, Options())
    assert e.value.reason == "image-invalid" and " cow " in e.value.detail, e.value
    assert not any(os.path.exists(f"/proc/{x}") and _state(x) != "Z" for x in pids)


def test_a_dump_leaves_the_original_tree_sharing(procs, cowtree, tmp_path):  # noqa: F811
    """The pages members share are read through /proc/PID/mem, not with
    process_vm_readv, whose pin unshares them: after a dump with
    --leave-running the tree goes on sharing what it shared (not a copy
    per member of every shared page), its bytes as they were."""
    p, addr, heap = _start(procs, cowtree, tmp_path)
    pids = _members(p.pid)
    try:
        before, before_heap = _sharing(p.pid, addr), _sharing(p.pid, heap)
        want = _expected(p.pid)
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
        after = _sharing(p.pid, addr)
        assert {k: sorted(before[k] - after[k]) for k in before} == {k: [] for k in before}
        assert after == before
        assert _sharing(p.pid, heap) == before_heap
        _check_bytes(p.pid, addr, want, heap)
    finally:
        _kill_tree(sorted(pids, reverse=True))


def test_a_member_already_in_its_cgroups_is_not_read_again_before_its_forks(monkeypatch):
    # cow.before_fork: a member whose record is where it is now (its
    # parent's cgroups, or ckpt's) is not moved, and what its children are
    # forked into is that, known: /proc/PID/cgroup is not read again (it was
    # for every member of a tree). After a move, enter's own read-back is it.
    from engine import cgroups, cow
    mine = cgroups.mine()       # ckpt's, read once per process (memo)
    reads = []
    real = cgroups.read
    monkeypatch.setattr(cgroups, "read", lambda pid: (reads.append(pid), real(pid))[1])

    class Pending:
        def add(self, *a, **k):
            pass

    class Job:
        vmas = [{"start": 0x10000, "end": 0x11000, "pages": []}]
        core = {"cgroups": [list(x) for x in mine]}

    class B:
        pid, job, pending, cgroups_now = os.getpid(), Job(), Pending(), None

        def mmap_args(self, v):
            return 0, 0, 0, False, -1, 0

        def flush(self):
            pass

    pl = cow.Plan()
    pl.premap[os.getpid()] = {0x10000}
    b = B()
    cow.before_fork(b, pl, set(), {})
    assert reads == [] and b.cgroups_now is None
    assert cgroups.enter(os.getpid(), Job.core["cgroups"], mine) is None and reads == []
