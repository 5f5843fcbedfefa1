"""Control group membership: the restored process is put back in the
cgroup it was in, in every hierarchy (cgroup v2's one, each v1 one,
named v1 hierarchies like name=systemd too), or the dump is refused.

A restored process is a clone of the restorer, so it was in ckpt's
cgroups: a service's process came back in the shell's session scope, out
of its memory and pids limits, its CPU weight, its freezer, and out of
systemd's sight of the service. Nothing was said.

Recorded at the dump: /proc/PID/cgroup, one (controllers, path) a
hierarchy; every thread must be where the leader is (v2 threaded
subtrees, a v1 thread moved by its tid: refused, `cgroup`). A path other
than ckpt's own must be reachable by ckpt: the hierarchy mounted in its
mount namespace (/proc/self/mountinfo: a cgroup2 mount for v2, a cgroup
mount whose super options name the controllers for v1) with the cgroup's
directory under it; else the dump refuses (`cgroup`) while the process is
unharmed. The cgroup is never created (its limits and settings are not
in the image): one gone at restore is refused before any process exists.

At restore the new process is moved (its pid written to cgroup.procs) as
the first thing after its clone, before its memory is written (v2
charges pages to the cgroup that faults them; a cpuset sets the CPU
affinity the later stages then set exactly) and before its threads are
cloned (they inherit it), then read back from /proc/PID/cgroup.
"""

from __future__ import annotations

import os

from .errors import EngineError, Refusal

TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple


def parse(text: str) -> List[List[str]]:
    """[[controllers, path], ...] of a /proc/PID/cgroup text ("" is v2's)."""
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append([parts[1], parts[2]])
    return out


def read(pid) -> List[List[str]]:
    from .procfs import read_all    # no text file object: read for every member and thread
    return parse(read_all(f"/proc/{pid}/cgroup").decode())


from .procfs import self_memo

_MINE: "Dict[str, List[List[str]]]" = self_memo({})


def mine() -> List[List[str]]:
    """ckpt's own (it never moves itself), read once per process."""
    key = str(os.getpid())
    if key not in _MINE:
        _MINE.clear()
        _MINE[key] = read("self")
    return _MINE[key]


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> List[Tuple[str, str, str, set]]:
    """(fstype, root, mount point, super options) of every cgroup mount ckpt sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
                continue
            out.append((rfields[0], _unescape(fields[3]), _unescape(fields[4]), set(rfields[2].split(","))))
    return out


def directory(controllers: str, path: str, table=None) -> Optional[str]:
    """The directory of cgroup `path` of the hierarchy named by
    `controllers`, under a mount ckpt sees; None: none shows it."""
    names = set(controllers.split(",")) if controllers else set()
    for fstype, root, point, opts in (table if table is not None else mounts()):
        if (fstype == "cgroup2") != (not names):
            continue
        if names and not names <= opts:
            continue
        if root != "/" and path != root and not path.startswith(root + "/"):
            continue
        rest = path[len(root):] if root != "/" else path
        d = os.path.join(point, rest.lstrip("/"))
        if os.path.isdir(d) and os.path.exists(os.path.join(d, "cgroup.procs")):
            return d
    return None


def _moves(rec: List[List[str]], here: List[List[str]]) -> List[Tuple[str, str]]:
    """(controllers, path) of each hierarchy where the record is not where
    `here` (ckpt's) is. A hierarchy ckpt is in that the record lacks (made
    since the dump) holds every older process at its root; one the record
    has at its root that is gone here (unmounted and empty since) holds no
    process at all, the restored one as every other: nothing to restore."""
    have = {c: p for c, p in here}
    want = {c: p for c, p in rec if p != "/" or c in have}
    for c in have:
        want.setdefault(c, "/")
    return [(c, p) for c, p in sorted(want.items()) if have.get(c) != p]


def _refusals(moves, pid=None) -> List[Refusal]:
    out = []
    table = mounts() if moves else []
    here = {c for c, _ in mine()}
    for c, p in moves:
        what = f"cgroup {p} of the {'v2 hierarchy' if not c else 'v1 hierarchy ' + c}"
        if c not in here:
            out.append(Refusal("cgroup", f"{what}: no such hierarchy here", pid=pid))
        elif directory(c, p, table) is None:
            out.append(Refusal("cgroup", f"{what}: not reachable through any cgroup mount ckpt sees (gone, or "
                               "its hierarchy not mounted): the process could not be put back there", pid=pid))
    return out


def dump(pid: int) -> List[List[str]]:
    """The record; raises Refusal(cgroup)."""
    rec = read(pid)
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        if tid != str(pid):
            try:
                theirs = read(f"{pid}/task/{tid}")
            except OSError:
                continue
            if theirs != rec:
                raise Refusal("cgroup", f"thread {tid} is in other cgroups than the leader ({theirs} vs {rec}): "
                              "a restored thread is cloned into the leader's", pid=pid)
    bad = _refusals(_moves(rec, mine()), pid)
    if bad:
        raise bad[0]
    return rec


def check_record(rec) -> bool:
    return rec is None or (isinstance(rec, list) and all(
        isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) and "\0" not in y and "\n" not in y
                                                    for y in x) and x[1].startswith("/") and ".." not in
        x[1].split("/") for x in rec))


def validate(rec) -> List[Refusal]:
    """At restore, before any process exists (None: an image from before
    cgroups were recorded, restored in ckpt's as it was)."""
    if rec is None:
        return []
    if not check_record(rec):
        return [Refusal("image-invalid", "core.json cgroups")]
    return _refusals(_moves(rec, mine()))


def enter(pid: int, rec, here=None) -> None:
    """Move the new process into its cgroups, from outside; read back.
    here: where it is now when not where ckpt is (a tree member forked
    by a parent that entered its own cgroups first: engine/cow.py).
    Returns what was read back after a move (read()'s form), None when
    it was where it belongs already (`here`, or ckpt's)."""
    if not rec:
        return None
    moves = _moves(rec, mine() if here is None else here)
    if not moves:
        return None
    table = mounts()
    for c, p in moves:
        d = directory(c, p, table)
        if d is None:
            raise Refusal("cgroup", f"cgroup {p} ({c or 'v2'}) is gone", pid=pid)
        try:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError as e:
            raise EngineError(f"cannot move the process into cgroup {p} ({c or 'v2'}): {e.strerror}",
                              pid=pid, errno=e.errno) from e
    back = read(pid)
    got = {c: q for c, q in back}
    for c, p in moves:
        if got.get(c) != p:
            raise EngineError(f"cgroup of {c or 'v2'} came back {got.get(c)}, not {p}", pid=pid)
    return back
