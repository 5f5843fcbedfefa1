"""Who else holds a file: a scan of /proc/*/fd (the only place the kernel
exposes fd tables; fds in flight in SCM_RIGHTS messages are invisible)."""

from __future__ import annotations

import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Tuple

_CACHE_KEY = "proc-fd-links"


def scan(exclude: Iterable[int] = (), proc: str = "/proc") -> Dict[str, List[Tuple[int, int]]]:
    """link text -> [(pid, fd)] over every process but `exclude`. Processes
    that vanish or deny access during the scan are skipped (what cannot be
    seen cannot be reported)."""
    skip = set(exclude)
    out: Dict[str, List[Tuple[int, int]]] = {}
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) in skip:
            continue
        base = f"{proc}/{name}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            out.setdefault(link, []).append((int(name), int(fd)))
    return out


def holders(ctx, link: str, dev: int, ino: int, proc: str = "/proc") -> List[Tuple[int, int]]:
    """(pid, fd) of every fd outside the target whose link text is `link`
    and whose inode is (dev, ino). The engine itself is NOT excluded: it is
    a process outside the dump too (callers must not hold duplicates of
    the target's fds while scanning). One /proc scan per dump,
    cached in ctx.shared: the target is frozen, and a process outside it
    that opens the file after the scan is the world moving on, as it may
    after the dump too."""
    index = ctx.shared.get(_CACHE_KEY)
    if index is None:
        index = scan({ctx.pid} | set(getattr(ctx, "tree_pids", ()) or ()), proc)
        ctx.shared[_CACHE_KEY] = index
    out: List[Tuple[int, int]] = []
    for pid, fd in index.get(link, ()):
        try:
            st = os.stat(f"{proc}/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (dev, ino):
            out.append((pid, fd))
    out.sort()
    return out


def holders_unlinked(ctx, dev: int, ino: int, proc: str = "/proc") -> List[Tuple[int, int]]:
    """holders() of an unlinked inode under any name: each opener sees the
    name it opened it by, plus " (deleted)" (another hard link, since
    removed, shows another text)."""
    holders(ctx, "", dev, ino, proc)          # fills the cached index
    out: List[Tuple[int, int]] = []
    for link in ctx.shared[_CACHE_KEY]:
        if link.endswith(" (deleted)"):
            out.extend(holders(ctx, link, dev, ino, proc))
    return sorted(set(out))


def describe(found: List[Tuple[int, int]], limit: int = 3) -> str:
    """'pid 12 fd 4, pid 40 fd 1' (at most `limit`, then '…and N more')."""
    parts = [f"pid {p} fd {f}" for p, f in found[:limit]]
    if len(found) > limit:
        parts.append(f"and {len(found) - limit} more")
    return ", ".join(parts)


def first_holder(found: List[Tuple[int, int]]) -> Optional[int]:
    return found[0][0] if found else None


_MAPS_KEY = "proc-maps-unlinked"


def mappers_unlinked(ctx, dev: int, ino: int, proc: str = "/proc") -> List[int]:
    """PIDs outside the dump that map the unlinked inode (dev, ino) (a
    memfd or deleted file: they may have closed its fd). One scan of every
    /proc/PID/maps per dump, kept in ctx.shared, of deleted files only."""
    index = ctx.shared.get(_MAPS_KEY)
    if index is None:
        index = {}
        skip = {ctx.pid, os.getpid()} | set(getattr(ctx, "tree_pids", ()) or ())
        for name in os.listdir(proc):
            if not name.isdigit() or int(name) in skip:
                continue
            try:
                with open(f"{proc}/{name}/maps") as f:
                    text = f.read()
            except OSError:
                continue
            for line in text.splitlines():
                if not line.endswith(" (deleted)"):
                    continue
                parts = line.split(None, 5)
                try:
                    major, minor = (int(x, 16) for x in parts[3].split(":"))
                    key = (os.makedev(major, minor), int(parts[4]))
                except (IndexError, ValueError):
                    continue
                pids = index.setdefault(key, [])
                if int(name) not in pids:
                    pids.append(int(name))
        ctx.shared[_MAPS_KEY] = index
    return sorted(index.get((dev, ino), ()))
