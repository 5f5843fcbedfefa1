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

import os
from typing import Iterable, List, Tuple

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
