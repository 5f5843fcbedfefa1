"""Shared memory a restore makes anew, and who else holds it.

Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS: "/dev/zero (deleted)"),
and a memfd or deleted file mapped MAP_SHARED, are objects no name leads
back to: the restore makes a new one and fills it. A process outside the
dump that maps or holds the old object would go on with it, and the two
would silently stop sharing. So every process on the machine is looked
at (its maps and its fds), for a single process as for a tree: a child
dumped alone still shares its parent's MAP_SHARED|MAP_ANONYMOUS memory
(fork gave it the same object), and that parent is outside the dump.
"""

from __future__ import annotations

import errno
import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Tuple

from . import procfs
from .check import SHMEM_NAMES
from .errors import Refusal


def key(v: dict) -> tuple:
    return (v["dev"], v["inode"])


def recreated(v: dict) -> bool:
    """A shared mapping a restore makes anew: shared anonymous memory, or a
    memfd / deleted file (a ghost) mapped MAP_SHARED."""
    if v.get("kind") == "shmem":
        return True
    return v.get("kind") == "file" and v["perms"][3] == "s" and (
        v["path"].endswith(" (deleted)") or v["path"].startswith("/memfd:"))


def outside(dumped: Iterable[Tuple[int, List[dict]]]) -> List[tuple]:
    """[(pid, what, Refusal(memory-peer-outside))] for each object the
    restore makes anew that a process outside `dumped` ((pid, vmas) of
    every dumped process) also maps or holds open; one per object, named
    after its first dumped mapping."""
    ours, pids = {}, set()
    for pid, vmas in dumped:
        pids.add(pid)
        for v in vmas:
            if recreated(v):
                ours.setdefault(key(v), (pid, v))
    if not ours:
        return []
    by_path = {v["path"]: k for k, (_, v) in ours.items()}
    out, seen = [], set()

    def found(k, name: str, how: str) -> None:
        if k in seen:
            return
        seen.add(k)
        pid, mine = ours[k]
        what = "shared memory" if mine.get("kind") == "shmem" else "shared mapping of"
        out.append((pid, f"mapping {mine['start']:x}-{mine['end']:x}", Refusal(
            "memory-peer-outside", f"{what} {mine['path']} (inode {mine['inode']}) is also {how} by pid {name} "
            "outside the dump", path=mine["path"], pid=pid)))

    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in pids or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/maps") as f:
                vmas = procfs.parse_maps(f.read())
        except OSError:
            continue
        for v in vmas:
            k = key(v)
            if k in ours and (ours[k][1].get("kind") != "shmem" or v["path"].startswith(SHMEM_NAMES)):
                found(k, name, "mapped")
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{name}/fd/{fd}")
                k = by_path.get(link)
                if k is None:
                    continue
                st = os.stat(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if (f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", st.st_ino) == k:
                found(k, name, "held open")
    return out


# -- one object, several mappings ------------------------------------------------
#
# A shared anonymous object outlives the mapping that made it: mprotect of
# a part splits the mapping in two (one object, offsets 0 and N), munmap of
# a part leaves the rest at its offset, mremap(old, 0, len) maps the same
# pages a second time, and a child can hold a part of what its parent
# maps. The dump records each mapping's offset (the maps column) and the
# object's size (stat of its map_files link: the shmem inode's i_size);
# the restore makes the object once, at that size, and maps each part at
# its offset (engine/build.py, tree_restore.map_shared).

SEEK_DATA, SEEK_HOLE = 3, 4


def objects(vmas: Iterable[dict]) -> Dict[tuple, List[dict]]:
    """{object key: its mappings, in address order} for shared anonymous memory."""
    out: Dict[tuple, List[dict]] = {}
    for v in vmas:
        if v.get("kind") == "shmem":
            out.setdefault(key(v), []).append(v)
    return out


def survey(vmas: List[dict]) -> List[Tuple[dict, Refusal]]:
    """Set each shared anonymous mapping's `shmem_size` (its object's size);
    [(mapping, Refusal)] for one a restore could not map as it is."""
    out = []
    for vs in objects(vmas).values():
        try:
            size = os.stat(vs[0]["map_files"]).st_size
        except OSError as e:
            out.extend((v, Refusal("unsupported-mapping", f"shared memory: its object unreadable: {e}",
                                   path=v["path"])) for v in vs)
            continue
        for v in vs:
            v["shmem_size"] = size
            if v["offset"] % 4096 or v["offset"] + v["end"] - v["start"] > size:
                out.append((v, Refusal("unsupported-mapping", f"shared memory mapped at offset {v['offset']:#x}, "
                                       f"{v['end'] - v['start']} bytes, past its object's end ({size} bytes): "
                                       "its tail faults (SIGBUS)", path=v["path"])))
    return out


def extents(fd: int, lo: int, hi: int) -> List[Tuple[int, int]]:
    """The object's data (pages it holds, in memory or swap) between
    offsets lo and hi: [(from, to)] (SEEK_DATA / SEEK_HOLE on shmem)."""
    out, pos = [], lo
    while pos < hi:
        try:
            d = os.lseek(fd, pos, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        if d >= hi:
            break
        h = min(os.lseek(fd, d, SEEK_HOLE), hi)
        out.append((d, h))
        pos = h
    return out


def _subtract(ranges: List[Tuple[int, int]], cut: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out = []
    for lo, hi in ranges:
        parts = [(lo, hi)]
        for a, b in cut:
            parts = [p for x, y in parts for p in ((x, min(y, a)), (max(x, b), y)) if p[0] < p[1]]
        out.extend(parts)
    return out


def whole(vs: List[dict]) -> bool:
    """One mapping of the whole object (what mmap(MAP_SHARED|MAP_ANONYMOUS)
    made): its restore is that mmap again."""
    v = vs[0]
    return len(vs) == 1 and v["offset"] == 0 and v.get("shmem_size", v["end"] - v["start"]) == v["end"] - v["start"]


def uncovered(dumped: Iterable[Tuple[int, List[dict]]]) -> List[tuple]:
    """[(pid, what, Refusal)] for an object holding data that no mapping of
    the dump shows (written, then unmapped there): the dump reads memory
    through the mappings, so the restore would make those pages zero, and
    an mremap that grows a mapping over them would show it."""
    groups: Dict[tuple, List[Tuple[int, dict]]] = {}
    for pid, vmas in dumped:
        for v in vmas:
            if v.get("kind") == "shmem":
                groups.setdefault(key(v), []).append((pid, v))
    out = []
    for pvs in groups.values():
        vs = [v for _, v in pvs]
        if any(v["offset"] == 0 and v["end"] - v["start"] == v.get("shmem_size", -1) for v in vs):
            continue        # a mapping of the whole object: nothing lies outside
        pid, first = pvs[0]
        try:
            fd = os.open(first["map_files"], os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = extents(fd, 0, first["shmem_size"])
            finally:
                os.close(fd)
        except (OSError, KeyError) as e:
            out.append((pid, f"mapping {first['start']:x}-{first['end']:x}", Refusal(
                "unsupported-mapping", f"shared memory {first['path']}: its data unreadable: {e}", path=first["path"])))
            continue
        rest = _subtract(data, [(v["offset"], v["offset"] + v["end"] - v["start"]) for v in vs])
        if rest:
            out.append((pid, f"mapping {first['start']:x}-{first['end']:x}", Refusal(
                "unsupported-mapping", f"shared memory {first['path']} holds data at offsets "
                + ", ".join(f"{a:#x}-{b:#x}" for a, b in rest[:4]) + " that no mapping of the dump shows (unmapped "
                "since written): the restore reads memory through its mappings and would make it zero",
                path=first["path"], pid=pid)))
    return out


class Pages:
    """Which object ranges an earlier mapping of the dump already carries
    (a tree's members map the same memory: its pages once), and the runs
    of a mapping still to be read: its data, not its holes (an untouched
    page stays a hole in the restored object as it was in the original,
    and is not read, which would allocate it)."""

    def __init__(self) -> None:
        self.done: Dict[tuple, List[Tuple[int, int]]] = {}
        self.fds: Dict[tuple, int] = {}

    def runs(self, v: dict, page: int) -> List[List[int]]:
        """[[address, pages]] of mapping v to read, marked carried."""
        k = key(v)
        lo, hi = v["offset"], v["offset"] + v["end"] - v["start"]
        fd = self.fds.get(k)
        if fd is None:
            fd = self.fds[k] = os.open(v["map_files"], os.O_RDONLY | os.O_CLOEXEC)
        done = self.done.setdefault(k, [])
        todo = _subtract([(a - a % page, -(-b // page) * page) for a, b in extents(fd, lo, hi)], done)
        done.extend(todo)
        return [[v["start"] + a - lo, (b - a) // page] for a, b in todo]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
