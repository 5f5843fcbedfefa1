"""Adjacent private mappings the kernel keeps apart only because their
anonymous memory has different anon_vmas (a forked child's inherited
mapping and one it made next to it: mm/vma.c will not merge a new mapping
into one cloned from a parent). A restore that maps them one after the
other got one merged mapping (found by the scenario generator in warm-
forked workloads: scenarios-found/gen-s2029-0033.yaml and 4 others); the
memory was the same, /proc/PID/maps and an mremap across the boundary
were not."""

from __future__ import annotations

import pytest

from engine_core_support import procs  # noqa: F401
from fds_support import NotOurChild, dump_restore, start_worker

PAGES = 16

WORKER = r'''
import ctypes, json, mmap, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
P, N, WRITE = mmap.PAGESIZE, int(sys.argv[1]), sys.argv[2] == "write"
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
def anon(addr, size):
    got = libc.mmap(addr, size, 3, MAP_PRIVATE | MAP_ANONYMOUS | (MAP_FIXED_NOREPLACE if addr else 0), -1, 0)
    assert got not in (None, ctypes.c_void_p(-1).value) and (not addr or got == addr), ctypes.get_errno()
    return got
def touch(addr, size, byte):
    ctypes.memset(addr, byte, size)
base = anon(0, 3 * N * P)                       # room for the three; the rest given back
libc.munmap(base + N * P, 2 * N * P)
touch(base, N * P, 0x41)
if os.fork() == 0:
    os.setsid()
    # the child: A (inherited), then B and C made beside it, written or not
    anon(base + N * P, N * P)
    anon(base + 2 * N * P, N * P)
    if WRITE:
        touch(base + N * P, N * P, 0x42)
        touch(base + 2 * N * P, N * P, 0x43)
    def lines():
        return [l.split()[0] for l in open("/proc/self/maps") if base <= int(l.split("-")[0], 16) < base + 3 * N * P]
    def on_usr1(*_):
        data = [ctypes.string_at(base + i * N * P, N * P) == bytes([0x41 + i if WRITE or i == 0 else 0]) * (N * P)
                for i in range(3)]
        json.dump({"maps": lines(), "data": data}, open("verdict.json.tmp", "w"))
        os.rename("verdict.json.tmp", "verdict.json")
    signal.signal(signal.SIGUSR1, on_usr1)
    json.dump({"pid": os.getpid(), "maps": lines()}, open("ready.tmp", "w"))
    os.rename("ready.tmp", "ready")
    while True:
        signal.pause()
while True:             # reaps the child the dump kills: its pid is free for the restore
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
'''


@pytest.mark.parametrize("write", ["write", "bare"])
def test_adjacent_mappings_kept_apart_by_their_anon_vma_stay_apart(procs, tmp_path, write):
    """With "bare" the child never writes what it mapped beside the
    inherited mapping, so none of its pages is in the image: it was
    restored merged with the inherited one (build.bare_apart gives it an
    anon_vma of its own)."""
    from fds_support import ask_verdict
    _, ready = start_worker(procs, tmp_path, [str(PAGES), write], WORKER)
    # the kernel kept the inherited one apart (B and C, both the child's, merged): the premise
    assert len(ready["maps"]) == 2, ready
    child = NotOurChild(ready["pid"])
    procs.adopt(child.pid)
    dump_restore(procs, child, str(tmp_path / "img"))
    v = ask_verdict(child.pid, tmp_path)
    assert v["data"] == [True, True, True]
    assert v["maps"] == ready["maps"]


# A process tree: the parent's pair A | B, its child sharing A copy-on-write
# (so the restore maps A in the parent before it forks: engine/cow.py). With
# "after", B is the parent's own, written elsewhere and moved beside A after
# the fork; with "before", the pair is made before the fork and the child
# shares both.
TREE_WORKER = r'''
import ctypes, json, mmap, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
P, N, WHEN = mmap.PAGESIZE, int(sys.argv[1]), sys.argv[2]
room = libc.mmap(None, (2 * N + 2) * P, 0, 0x22, -1, 0)          # PROT_NONE: the pair's place
A = room + P
B = A + N * P
assert libc.mmap(A, N * P, 3, 0x22 | 0x10, -1, 0) == A            # MAP_FIXED
ctypes.memset(A, 0x41, N * P)
def make_b():
    other = libc.mmap(None, N * P, 3, 0x22, -1, 0)
    ctypes.memset(other, 0x42, N * P)
    assert libc.mremap(other, N * P, N * P, 3, B) == B            # MAYMOVE | FIXED
if WHEN == "before":
    make_b()
parent = os.getpid()
if os.fork() == 0:
    while os.getppid() == parent:       # reads nothing of the pair: it stays shared
        time.sleep(0.2)
    os._exit(0)
if WHEN == "after":
    make_b()
def lines():
    return [l.split()[0] + " " + l.split()[1] for l in open("/proc/self/maps")
            if A <= int(l.split("-")[0], 16) < B + N * P]
def on_usr1(*_):
    data = [ctypes.string_at(A, N * P) == b"A" * (N * P), ctypes.string_at(B, N * P) == b"B" * (N * P)]
    json.dump({"maps": lines(), "data": data}, open("verdict.json.tmp", "w"))
    os.rename("verdict.json.tmp", "verdict.json")
signal.signal(signal.SIGUSR1, on_usr1)
json.dump({"maps": lines()}, open("ready.tmp", "w"))
os.rename("ready.tmp", "ready")
while True:
    signal.pause()
'''


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_pair_kept_apart_stays_apart_where_a_child_shares_one_side(procs, tmp_path, when):
    """Found by the judge's seam check (statediff.kept_apart) in
    tree/threads-and-children: the parent's A is mapped before the forks
    (its child keeps it), and its B, mapped later beside it, was not set
    apart (kept_apart left out every pair with a side in place)."""
    from fds_support import ask_verdict
    p, ready = start_worker(procs, tmp_path, [str(PAGES), when], TREE_WORKER)
    assert len(ready["maps"]) == 2, ready          # the premise: the kernel kept them apart
    dump_restore(procs, p, str(tmp_path / "img"))
    v = ask_verdict(p.pid, tmp_path)
    assert v["data"] == [True, True]
    assert v["maps"] == ready["maps"]
