"""Group a process's fds by open file description (dup'ed fds).

Fds made by dup(2)/dup2/F_DUPFD/fork share one ``struct file``: one offset,
one set of status flags, one F_SETOWN owner. A restore that reopened each of
them separately would silently split the shared offset, so they must come
back as one open + dups. kcmp(2) KCMP_FILE says whether two fds name the
same struct file, and orders them (kernel/kcmp.c); only fds on the same
(dev, ino) can share one, so fds are bucketed by inode and each bucket is
sorted with kcmp as the comparison (anon-inode fds all share one inode, so
eventfd/timerfd/epoll... land in one bucket).

API for the core:

``group_by_ofd(pid, infos) -> list[list[FdInfo]]``
    every fd in exactly one group, each group sorted by fd number, groups
    sorted by their first fd. The first fd of a group is its *leader*.
``leader_map(pid, infos) -> dict[int, int]``
    fd -> leader fd (a leader maps to itself).
``leaders(ctx) -> dict[int, int]``
    the same for ``ctx.all_fds``, computed once per dump and cached in
    ``ctx.shared["ofd-leaders"]`` (handlers use it to count pipe ends).

Suggested use by the core: dump only leaders through their handler; record
followers as ``{"fd": N, "kind": ..., "dup_of": leader, "cloexec": ...}``
and at restore dup3() the leader's installed fd to N in the new process
(cloexec is per fd, not per file, so it stays per record).
"""

from __future__ import annotations

try:
    from _functools import cmp_to_key   # functools' own; functools imports collections (~10 ms under TCG)
except ImportError:     # pragma: no cover - another Python
    from functools import cmp_to_key
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Iterable, List

from ..pidfd import KCMP_FILE, kcmp

_CACHE_KEY = "ofd-leaders"


def group_by_ofd(pid: int, infos: Iterable) -> List[List]:
    """Groups of `pid`'s fds (FdInfo) that share one open file description.

    Raises EngineError when an fd vanished (the target must be frozen) and
    Refusal kernel-missing without kcmp."""
    buckets: Dict[tuple, List] = {}
    for info in infos:
        buckets.setdefault((info.dev, info.ino), []).append(info)
    out: List[List] = []
    for members in buckets.values():
        if len(members) == 1:
            out.append(members)
            continue
        # kcmp(KCMP_FILE) orders files (0 equal, 1 less, 2 greater, by an
        # obfuscated but consistent pointer order): sort, then equal files
        # are adjacent. O(n log n) even for many anon-inode fds.
        def cmp(a, b) -> int:
            r = kcmp(pid, pid, KCMP_FILE, a.fd, b.fd)
            return 0 if r == 0 else (-1 if r == 1 else 1)
        members.sort(key=cmp_to_key(cmp))
        group = [members[0]]
        for info in members[1:]:
            if cmp(group[0], info) == 0:
                group.append(info)
            else:
                out.append(sorted(group, key=lambda i: i.fd))
                group = [info]
        out.append(sorted(group, key=lambda i: i.fd))
    out.sort(key=lambda g: g[0].fd)
    return out


def leader_map(pid: int, infos: Iterable) -> Dict[int, int]:
    """fd -> the lowest fd sharing its open file description."""
    out: Dict[int, int] = {}
    for g in group_by_ofd(pid, infos):
        for info in g:
            out[info.fd] = g[0].fd
    return out


def leaders(ctx) -> Dict[int, int]:
    """leader_map over ctx.all_fds, cached in ctx.shared for the whole dump."""
    cached = ctx.shared.get(_CACHE_KEY)
    if cached is None:
        cached = leader_map(ctx.pid, ctx.all_fds.values())
        ctx.shared[_CACHE_KEY] = cached
    return cached


def is_follower(rec: dict) -> bool:
    """A restore record that is a dup of another fd (restored by the core)."""
    return rec.get("dup_of") is not None and rec.get("dup_of") != rec.get("fd")
