"""Shared anonymous memory in parts (engine/shmem.py): one object that
mprotect split, whose front was unmapped, that mremap(old_size 0) mapped a
second time, that only touched pages of hold, or that a parent and its
child each map a part of. Restored as one object of the original's size,
each part at its offset, writes through one part seen through every other
part on the same pages, holes still holes. Data only an unmapped part
showed is refused (the dump reads memory through mappings).

Before, any object mapped more than once was refused, and one whose
mapping did not start at offset 0 came back as a new object at offset 0
of the mapping's size (the maps offset column changed, an mremap growing
it would have shown other pages)."""

from __future__ import annotations

import json
import os

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, start_ready_script, wait_for  # noqa: F401
from test_engine_tree import _gone, _wait_killed, session_killer  # noqa: F401

PAGE = 4096

# ctypes mmap/mremap/mprotect/munmap, and put(addr, page_no, tag): a page
# filled with a byte pattern naming it
LIBC = """
libc = ctypes.CDLL(None, use_errno=True)
for f in ("mmap", "mremap"):
    getattr(libc, f).restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
P = 4096
def shared(n):
    a = libc.mmap(None, n * P, 3, 0x01 | 0x20, -1, 0)
    assert a not in (None, ctypes.c_void_p(-1).value)
    return a
def put(a, i, tag):
    ctypes.memmove(a + i * P, bytes([tag, i]) * (P // 2), P)
def ok(r):
    assert r == 0, ctypes.get_errno()
"""

CASES = {
    # mprotect splits one mapping in three: one object, offsets 0, 1 and 2 pages
    "split": ("a = shared(4)\nfor i in range(4): put(a, i, 1)\nok(libc.mprotect(a + P, P, 1))\n"
              "info = {'parts': [a, a + P, a + 2 * P]}"),
    # the front page never written, then unmapped: the rest at offset 1 page of a 4-page object
    "front": ("a = shared(4)\nfor i in range(1, 4): put(a, i, 2)\nok(libc.munmap(a, P))\n"
              "info = {'parts': [a + P]}"),
    # mremap(old_size 0): the same two pages mapped twice
    "twice": ("a = shared(2)\nfor i in range(2): put(a, i, 3)\n"
              "b = libc.mremap(a, 0, 2 * P, 1, None)\nassert b not in (None, ctypes.c_void_p(-1).value)\n"
              "info = {'parts': [a, b], 'same': [a, b]}"),
    # two pages of 64 touched: the rest stay holes, and are not read
    "sparse": "a = shared(64)\nput(a, 3, 4)\nput(a, 40, 4)\ninfo = {'parts': [a], 'data_pages': 2}",
    # named (PR_SET_VMA_ANON_NAME on shared memory: Linux 6.4+), whole and in parts
    "named": ("a = shared(1)\nput(a, 0, 7)\nb = shared(3)\nfor i in range(3): put(b, i, 7)\n"
              "ok(libc.mprotect(b + P, P, 1))\n"
              "for x, n, name in ((a, 1, b'zone'), (b, 3, b'parts')):\n"
              "    if libc.prctl(0x53564D41, 0, ctypes.c_ulong(x), ctypes.c_ulong(n * P), ctypes.c_char_p(name)):\n"
              "        open('unnamed', 'w').close()\n"
              "info = {'parts': [a, b, b + P, b + 2 * P]}"),
}


def _maps(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out[lo] = {"end": hi, "perms": parts[1], "offset": int(parts[2], 16), "inode": int(parts[4]),
                       "path": parts[5].strip() if len(parts) > 5 else ""}
    return out


def _facts(pid: int, parts: list) -> dict:
    """What a part shows: its line in maps (the inode only as 'the same
    object as the first part'), its object's size, where the object holds
    data (SEEK_DATA) and those bytes (a hole is not read: a read through a
    shared mapping would allocate it)."""
    maps = _maps(pid)
    first = maps[parts[0]]["inode"]
    out = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for a in parts:
            m = maps[a]
            fd = os.open(f"/proc/{pid}/map_files/{a:x}-{m['end']:x}", os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                data, pos = [], 0
                while True:
                    try:
                        d = os.lseek(fd, pos, os.SEEK_DATA)
                    except OSError:
                        break
                    pos = os.lseek(fd, d, os.SEEK_HOLE)
                    data.append((d, pos))
            finally:
                os.close(fd)
            lo, hi = m["offset"], m["offset"] + m["end"] - a
            got = []
            for d, h in data:
                d, h = max(d, lo), min(h, hi)
                if d < h:
                    mem.seek(a + d - lo)
                    got.append((d, mem.read(h - d)))
            out.append({"end": m["end"] - a, "perms": m["perms"], "offset": m["offset"], "path": m["path"],
                        "same_object": m["inode"] == first, "size": size, "data": data, "bytes": got})
    return out


def _start(procs, tmp_path, body: str):  # noqa: F811
    setup = LIBC + body + "\nopen('info', 'w').write(json.dumps(info))\n"
    p = start_ready_script(procs, tmp_path, setup, imports="ctypes, json, os, time")
    assert p.poll() is None, "the target died"
    return p, json.loads((tmp_path / "info").read_text())


def _dump_restore(pid: int, img, procs) -> dict:  # noqa: F811
    res = dump(pid, str(img), Options())
    if (img / "tree.json").exists():
        _wait_killed(pid, img, procs)
    else:
        procs.popens[:] = [p for p in procs.popens if p.pid != pid or p.wait() is not None]
        wait_for(lambda: _gone([pid]), what="the dumped process gone")
    out = restore(str(img), Options())
    procs.adopt(pid)
    assert out["pid"] == pid
    return res


@pytest.mark.parametrize("case", sorted(CASES))
def test_parts_come_back_as_one_object(procs, tmp_path, case):  # noqa: F811
    p, info = _start(procs, tmp_path, CASES[case])
    if (tmp_path / "unnamed").exists():
        pytest.skip("this kernel names no shared anonymous memory (Linux 6.4+)")
    before = _facts(p.pid, info["parts"])
    if case == "named":
        assert [f["path"] for f in before] == ["[anon_shmem:zone]"] + ["[anon_shmem:parts]"] * 3
        before = [dict(f, same_object=None) for f in before]      # two objects
    else:
        assert all(f["same_object"] for f in before)
    res = _dump_restore(p.pid, tmp_path / "img", procs)
    after = _facts(p.pid, info["parts"])
    if case == "named":
        assert after[0]["same_object"] and len({_maps(p.pid)[x]["inode"] for x in info["parts"][1:]}) == 1
        after = [dict(f, same_object=None) for f in after]
    assert after == before
    if "data_pages" in info:
        # only the touched pages were read (reading a hole would allocate it)
        mm = json.loads((tmp_path / "img" / "mm.json").read_text())
        shm = [v for v in mm["vmas"] if v["kind"] == "shmem"]
        assert [v["pages_bytes"] for v in shm] == [info["data_pages"] * PAGE], shm
    if "same" in info:
        # one object under both: a write through one is read through the other
        a, b = info["same"]
        with open(f"/proc/{p.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(a + 100)
            mem.write(b"written through the first")
            mem.seek(b + 100)
            assert mem.read(25) == b"written through the first"


def test_data_only_an_unmapped_part_held_is_refused(procs, tmp_path):  # noqa: F811
    """Written, then unmapped: no mapping shows it, the dump could not read it."""
    p, _ = _start(procs, tmp_path, "a = shared(4)\nfor i in range(4): put(a, i, 5)\n"
                                   "ok(libc.munmap(a + 3 * P, P))\ninfo = {}")
    res = check(p.pid, Options())
    assert not res["ok"]
    refs = res["refusals"]
    assert [r["reason"] for r in refs] == ["unsupported-mapping"], refs
    assert "0x3000-0x4000 that no mapping of the dump shows" in refs[0]["detail"], refs[0]
    with pytest.raises((Refusal, Refusals)):
        dump(p.pid, str(tmp_path / "img"), Options())
    assert not (tmp_path / "img").exists()


TREE = """
a = shared(4)
for i in range(4): put(a, i, 6)
kid = os.fork()
if kid == 0:
    ok(libc.munmap(a, P))           # the child keeps pages 1-3
    open('kid.tmp', 'w').close(); os.rename('kid.tmp', 'kid-ready')
    while True: time.sleep(1)
ok(libc.munmap(a + 3 * P, P))       # the parent keeps pages 0-2
while not os.path.exists('kid-ready'): time.sleep(0.01)
info = {'parent': [a], 'child': [a + P], 'kid': kid}
"""


def test_a_tree_each_holding_a_part(procs, session_killer, tmp_path):  # noqa: F811
    """The parent maps pages 0-2, its child 1-3: page 3 only the child
    shows (its pages are read there), pages 1-2 both, one object."""
    p, info = _start(procs, tmp_path, TREE)
    session_killer.append(p.pid)
    kid = info["kid"]
    procs.adopt(kid)
    before = (_facts(p.pid, info["parent"]), _facts(kid, info["child"]))
    _dump_restore(p.pid, tmp_path / "img", procs)
    wait_for(lambda: os.path.exists(f"/proc/{kid}"), what="the child restored")
    assert (_facts(p.pid, info["parent"]), _facts(kid, info["child"])) == before
    a = info["parent"][0]
    with open(f"/proc/{kid}/mem", "r+b", buffering=0) as mem:
        mem.seek(a + 2 * PAGE)
        mem.write(b"from the child")
    with open(f"/proc/{p.pid}/mem", "rb", buffering=0) as mem:
        mem.seek(a + 2 * PAGE)
        assert mem.read(14) == b"from the child"


# -- the records (restore.check_mm): hostile or old images ---------------------------------

def _shm(start: int, pages: int, **change) -> dict:
    v = {"start": start, "end": start + pages * PAGE, "offset": 0, "inode": 77, "perms": "rw-s",
         "path": "/dev/zero (deleted)", "kind": "shmem", "dev": "00:01", "flags": ["rd", "wr", "sh"], "pages": [],
         "shmem_size": 4 * PAGE}
    v.update(change)
    return {k: x for k, x in v.items() if x is not None}


def _verdict(*vmas) -> str:
    from engine import restore as single
    try:
        single.check_mm({"vmas": [dict(v) for v in vmas]}, 1)
    except Refusal as e:
        assert e.reason == "image-invalid"
        return "refused"
    return "ok"


@pytest.mark.parametrize("vmas,want", [
    ([_shm(0x10000, 4)], "ok"),
    ([_shm(0x10000, 1), _shm(0x11000, 2, offset=PAGE), _shm(0x20000, 1, offset=3 * PAGE)], "ok"),
    ([_shm(0x10000, 2), _shm(0x20000, 2)], "ok"),                       # the same pages twice
    ([_shm(0x10000, 2, offset=3 * PAGE)], "refused"),                  # past the object's end
    ([_shm(0x10000, 1, offset=100)], "refused"),                       # not at a page
    ([_shm(0x10000, 1, offset=-PAGE)], "refused"),
    ([_shm(0x10000, 1), _shm(0x20000, 1, shmem_size=8 * PAGE)], "refused"),    # one object, two sizes
    ([_shm(0x10000, 1, shmem_size=0)], "refused"),
    ([_shm(0x10000, 1, shmem_size=PAGE + 1)], "refused"),
    ([_shm(0x10000, 1, shmem_size=True)], "refused"),
    ([_shm(0x10000, 1, shmem_size=4096.0)], "refused"),
    ([_shm(0x10000, 1, shmem_size="4096")], "refused"),
    # an image older than format 13: no sizes, each mapping its own object
    ([_shm(0x10000, 2, shmem_size=None, offset=PAGE)], "ok"),
    ([_shm(0x10000, 1, shmem_size=None), _shm(0x20000, 1, shmem_size=None)], "refused"),
])
def test_records(vmas, want):
    assert _verdict(*vmas) == want


def test_an_old_record_is_read_as_its_own_whole_object():
    from engine import restore as single
    from engine.shmem import objects, whole
    vmas = single.check_mm({"vmas": [_shm(0x10000, 2, shmem_size=None, offset=PAGE)]}, 1)
    assert (vmas[0]["shmem_size"], vmas[0]["offset"]) == (2 * PAGE, 0)
    assert all(whole(vs) for vs in objects(vmas).values())
