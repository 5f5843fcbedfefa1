"""The observable-state diff: what /proc showed of the workload right before
the dump against what it shows right after the restore.

Every field of a snapshot (harness/procstate.py) must be equal, unless a row
of :data:`EXPECTED` says why it may differ. The table is the whole list of
allowed differences, one reason each; anything else is reported as
corruption naming the field. A refused dump and a ``--leave-running`` dump
are held to the same standard: the original must look exactly as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

try:
    from .procstate import anon_object
except ImportError:  # pragma: no cover - in the guest, run as a script
    from procstate import anon_object  # type: ignore[no-redef]


@dataclass(frozen=True)
class Allowed:
    """Fields matching ``pattern`` may differ (only when ``when`` holds, if
    given: ``migrate`` = restored on another guest); ``normalise`` maps a
    value to the part that must still be equal (None: ignore the field)."""

    pattern: str
    why: str
    normalise: Optional[Callable[[str], Optional[str]]] = None
    when: Optional[str] = None          # a condition of the run (e.g. "migrate")
    only_if: Optional[Callable[[str, Dict[str, str]], bool]] = None   # (field, before snapshot)


def _anon(v: str) -> Optional[str]:
    kind = anon_object(v)
    return f"{kind}:[*]" if kind else v


def _no_autogroup_id(v: str) -> str:
    return re.sub(r"^/autogroup-\d+", "/autogroup-*", v)


# Kept short on purpose: every row weakens the judge somewhere.
EXPECTED: List[Allowed] = [
    Allowed(r"^proof\.counter$", "the tick counter advances while the process runs; the harness checks it "
                                 "separately (it must continue from the value it had at the dump)", lambda v: None),
    Allowed(r"^fd\.\d+\.link$", "pipes, sockets and anon inodes get new inode numbers when they are created "
                                "again; the object kind must stay", _anon),
    Allowed(r"^fd\.\d+\.fdinfo\.ino$", "inode numbers of kernel-internal objects (pipes, sockets, anon inodes) "
                                       "and of deleted files recreated from the image are assigned at creation; "
                                       "files with a name keep theirs", lambda v: None,
            only_if=lambda f, snap: _recreated(snap.get(f.rsplit(".", 2)[0] + ".link", ""))),
    Allowed(r"^fd\.\d+\.fdinfo\.ino$", "files on another guest are other inodes (identity is checked by content)",
            lambda v: None, "migrate"),
    Allowed(r"^fd\.\d+\.fdinfo\.mnt_id$", "mount ids are per boot; the restored fd is on the same mount "
                                          "(path checked through the link)", lambda v: None, "migrate"),
    Allowed(r"^fd\.\d+\.fdinfo\.(inotify wd|fanotify ino)\.[^.]+\.(ino|sdev|fhandle-bytes|fhandle-type|f_handle)$",
            "watches name inodes and devices, which are per filesystem instance", lambda v: None, "migrate"),
    Allowed(r"^fd\.\d+\.fdinfo\.tfd\.\d+\.(ino|sdev)$", "an epoll target's inode: its own fd's identity is "
            "compared under fd.N (files keep theirs; pipes, sockets and anon inodes get new ones)", lambda v: None),
    Allowed(r"^fd\.\d+\.fdinfo\.eventfd-id$", "an eventfd's id is handed out when it is created; its count "
            "and flags are compared", lambda v: None),
    Allowed(r"^fd\.\d+\.fdinfo\.flags$", "O_LARGEFILE: every open(2) from 64-bit user space adds it (the "
            "kernel's force_o_largefile) and F_SETFL cannot take it off, so a file the original got without it "
            "(a pty's slave from TIOCGPTPEER) comes back with it; it changes nothing for a 64-bit process",
            lambda v: _without(v, O_LARGEFILE["x86_64"]), only_if=lambda f, snap: snap.get("arch") == "x86_64"),
    Allowed(r"^fd\.\d+\.fdinfo\.flags$", "O_LARGEFILE, as above (its aarch64 number)",
            lambda v: _without(v, O_LARGEFILE["aarch64"]), only_if=lambda f, snap: snap.get("arch") == "aarch64"),
    Allowed(r"^status\.FDSize$", "the fd table's capacity (grows in powers of two, never shrinks) is an "
            "allocation detail no program can observe but through /proc; every fd is compared one by one",
            lambda v: None),
    Allowed(r"^fd\.\d+\.fdinfo\.(it_value|ticks)$", "a timerfd's remaining time runs down while the process is "
                                                    "frozen and while it is an image; the workload checks it against "
                                                    "its own observation with a stated tolerance", lambda v: None),
    Allowed(r"^maps\..*\.inode$", "files on another guest are other inodes (identity is checked by content)",
            lambda v: None, "migrate"),
    Allowed(r"^maps\..*\.inode$", "shared anonymous memory, memfds and deleted files are new objects after "
                                  "a restore", lambda v: None,
            only_if=lambda f, snap: _recreated(snap.get(f.rsplit(".", 1)[0] + ".path", ""))),
    Allowed(r"^sched_autogroup$", "the autogroup id is a per-session counter; its nice value must stay",
            _no_autogroup_id),
    Allowed(r"^status\.PPid$", "a restored process is reparented to init or the nearest subreaper "
                               "(README: not carried over)", lambda v: None),
    Allowed(r"^mountinfo$", "mount ids are per boot", lambda v: None, "migrate"),
    Allowed(r"^ns\.", "namespace inode numbers of a new boot", lambda v: None, "migrate"),
    Allowed(r"^ns\.time(_for_children)?$", "criu restores into a time namespace of its own so that the "
            "monotonic and boot-time clocks carry on from the dump (its design, not a loss)", lambda v: None,
            "engine:criu"),
    Allowed(r"^status\.(Cpus|Mems)_allowed(_list)?$", "another guest may have another CPU set",
            lambda v: None, "migrate"),
]


O_LARGEFILE = {"x86_64": 0o100000, "aarch64": 0o400000}


def _without(flags: str, bit: int) -> str:
    try:
        return oct(int(flags, 8) & ~bit)
    except ValueError:
        return flags


def _recreated(name: str) -> bool:
    """Does this fd link / mapping name an object a restore must create anew?
    Not a System V segment ("/SYSV<key> (deleted)", always "deleted"): its
    inode number is its shmid, which a restore keeps (engine/sysvshm.py)."""
    if name.startswith("/SYSV"):
        return False
    return (anon_object(name) is not None or name.endswith(" (deleted)") or name.startswith("/memfd:")
            or name.startswith("anon_inode:"))


def _rule(field: str, conds: set, before: Dict[str, str]) -> Optional[Allowed]:
    for a in EXPECTED:
        if (a.when is None or a.when in conds) and re.search(a.pattern, field) \
                and (a.only_if is None or a.only_if(field, before)):
            return a
    return None


#: a mapping's fields in a snapshot (advice only where it has any)
MAP_FIELDS = ("perms", "offset", "dev", "inode", "path", "advice")


def merge_neighbours(snap: Dict[str, str]) -> Dict[str, str]:
    """The snapshot with each run of adjacent mappings the kernel could
    merge (same permissions; anonymous, or the same file at contiguous
    offsets) as one mapping. Why: the kernel merges such neighbours when it
    can (a restore maps them afresh, so it can), and keeps them apart when
    their history differs (anon_vma, an mprotect since undone); a program
    sees the same memory either way. Named, special or differently
    permitted mappings stay as they are. Where the pieces of a run were
    apart before the dump, that they still are is judged by diff
    (kept_apart): the merge itself is not what this forgives."""
    return _merged(snap)[0]


def kept_apart(snap: Dict[str, str]) -> Dict[str, List[int]]:
    """{"maps.LO-HI" of a run merge_neighbours makes: the addresses where
    its pieces meet}, for each run of more than one mapping. Two mappings
    alike in everything /proc/PID/maps and smaps' advice show, side by
    side, are two VMAs only because the kernel refused to merge them: their
    anonymous memory has different anon_vmas (a forked child's inherited
    mapping and one it made beside it; a region written elsewhere and moved
    there with mremap), or a flag maps does not show differs. A program
    sees that: an mremap(2) across the boundary fails EFAULT (it resizes
    one VMA only), and /proc/PID/maps lists two."""
    return _merged(snap)[1]


def _merged(snap: Dict[str, str]) -> tuple:
    maps = []
    for key in snap:
        if key.startswith("maps.") and key.endswith(".perms"):
            rng = key[len("maps."):-len(".perms")]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            maps.append((lo, hi, rng))
    if not maps:
        return snap, {}
    out = {k: v for k, v in snap.items() if not k.startswith("maps.")}
    seams: Dict[str, List[int]] = {}
    run = None          # [lo, hi, first rng, perms, file identity or None, next file offset, [seams]]
    for lo, hi, rng in sorted(maps):
        f = {a: snap.get(f"maps.{rng}.{a}") for a in MAP_FIELDS}
        anon = f["path"] == "" and f["inode"] == "0"
        filed = f["path"].startswith("/") and f["inode"] != "0"
        # what may merge with what: anonymous with anonymous, a file with
        # itself; only under the same madvise advice (the kernel's rule too)
        ident = ("anon", f["advice"]) if anon else (f["dev"], f["inode"], f["path"], f["advice"]) if filed else None
        off = int(f["offset"] or "0", 16)
        if run and ident is not None and run[1] == lo and run[3] == f["perms"] and run[4] == ident \
                and (anon or run[5] == off):
            run[6].append(lo)
            run[1] = hi
            run[5] = off + (hi - lo)
            continue
        if run:
            _put_run(out, seams, snap, run)
        run = [lo, hi, rng, f["perms"], ident, off + (hi - lo), []]
    if run:
        _put_run(out, seams, snap, run)
    return out, seams


def _put_run(out: Dict[str, str], seams: Dict[str, List[int]], snap: Dict[str, str], run: list) -> None:
    key = _put_map(out, snap, run)
    if run[6]:
        seams[key] = run[6]


def _put_map(out: Dict[str, str], snap: Dict[str, str], run: list) -> str:
    lo, hi, rng = run[0], run[1], run[2]
    width = len(rng.split("-")[0])
    key = f"maps.{lo:0{width}x}-{hi:0{width}x}"
    for a in MAP_FIELDS:
        if f"maps.{rng}.{a}" in snap or a != "advice":
            out[f"{key}.{a}"] = snap.get(f"maps.{rng}.{a}", "")
    return key


def diff(before: Dict[str, str], after: Dict[str, str], conds: set = frozenset()) -> List[Dict[str, str]]:
    """The differences that no row of EXPECTED allows, as ``{field, before, after}``
    (adjacent anonymous mappings compared as one: merge_neighbours). Where
    the original kept such neighbours apart (kept_apart), they must still be
    apart: ``maps.LO-HI.apart`` lists the seams before and those of them
    still seams after. A restore that splits where the original had one
    mapping is not judged here."""
    before, after = _with_seams(before, after)
    if before.get("cgroup") is not None and after.get("cgroup") is not None:
        before, after = dict(before), dict(after)
        before["cgroup"], after["cgroup"] = common_hierarchies(before["cgroup"], after["cgroup"])
    if before.get("ns.mnt") and before.get("ns.mnt") == after.get("ns.mnt"):
        # One mount namespace: its table is the namespace's, the same for
        # every process in it at any instant; what changed in it between
        # the looks (another test mounting) is not the process's.
        before, after = dict(before), dict(after)
        before.pop("mountinfo", None)
        after.pop("mountinfo", None)
    out = []
    for field in sorted(set(before) | set(after), key=_order):
        b, a = before.get(field), after.get(field)
        if b == a:
            continue
        rule = _rule(field, conds, before) if b is not None and a is not None else None
        if rule is not None:
            if rule.normalise is None:
                continue
            if rule.normalise(b) == rule.normalise(a):
                continue
        out.append({"field": field, "before": "(absent)" if b is None else b,
                    "after": "(absent)" if a is None else a})
    return out


def _hexes(addrs) -> str:
    return " ".join(f"{a:x}" for a in addrs)


def _with_seams(before: Dict[str, str], after: Dict[str, str]) -> tuple:
    """Both snapshots through merge_neighbours, each run of the original's
    that was more than one mapping given ``.apart``: its seams before, and
    after, which of them still divide two mappings."""
    starts = set()
    for key in after:
        if key.startswith("maps.") and key.endswith(".perms"):
            starts.add(int(key[len("maps."):].split("-", 1)[0], 16))
    (b, seams), a = _merged(before), merge_neighbours(after)
    if seams:
        b, a = dict(b), dict(a)
        for key, at in seams.items():
            b[key + ".apart"] = _hexes(at)
            a[key + ".apart"] = _hexes(x for x in at if x in starts) or "none: merged into one mapping"
    return b, a


def common_hierarchies(before: str, after: str) -> tuple:
    """/proc/PID/cgroup ("ID:controllers:path" lines, space-joined here) of
    the hierarchies both looks show, by controllers (their ids may be
    renumbered): a hierarchy mounted or gone between the two looks (a
    named v1 hierarchy another test or an admin mounts) is the machine's
    doing, not the process's. A move within a hierarchy both show stays
    a difference."""
    def parse(text: str) -> Dict[str, str]:
        out = {}
        for line in text.split():
            _, _, rest = line.partition(":")
            ctl, _, path = rest.partition(":")
            out[ctl] = path
        return out
    b, a = parse(before), parse(after)
    both = sorted(set(b) & set(a))
    return (" ".join(f"{c}:{b[c]}" for c in both), " ".join(f"{c}:{a[c]}" for c in both))


def _order(field: str):
    # numbers in number order; a part that is a word (or hex, mem.7f3a...) after them
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in field.split(".")]


def as_checks(diffs: List[Dict[str, str]], label: str) -> List[Dict]:
    """Differences as workload-style failed checks (so reports show them alike)."""
    return [{"fd": None, "what": f"{label}: {d['field']}", "expected": d["before"], "got": d["after"], "ok": False}
            for d in diffs]


# -- a real program's state (harness/program.py) ----------------------------------------

#: The fields of a snapshot a running program does not change by itself
#: between the harness's two looks (right before the dump, right after the
#: restore, no interaction in between), so they are compared for programs
#: too: not its signal masks and handlers (a shell changes them around every
#: command), fd offsets, pending signals, anonymous memory or the heap.
PROGRAM_STABLE = re.compile(
    r"^(arch|stat\.(pgrp|session|tty_nr|nice|rt_priority|policy|exit_signal|start_code|end_code|start_stack|start_data"
    r"|end_data|start_brk|arg_start|arg_end|env_start|env_end)"
    r"|status\.(Umask|NoNewPrivs|Seccomp|Uid|Gid|Groups|Cap(Inh|Prm|Eff|Bnd|Amb)|Cpus_allowed_list"
    r"|Mems_allowed_list|THP_enabled|Name)"
    r"|limits\..*|personality|timerslack_ns|oom_score_adj|cgroup|cmdline|environ|comm|coredump_filter|setgroups"
    r"|uid_map|gid_map|sched_autogroup|auxv|cwd|root|exe|ns\..*|numa_policies"
    r"|thread\.\d+\.(Name|Cpus_allowed_list|NoNewPrivs|Seccomp|Uid|Gid|CapEff|personality|timerslack_ns|ioprio|robust_list"
    r"|nice|policy|rt_priority)"
    r"|fd\.\d+\.(link|fdinfo\.flags|sockopt\..*)"
    r"|maps\..*)$")


def program_view(before: Dict[str, str], after: Dict[str, str]) -> tuple:
    """The two snapshots of one program member cut to PROGRAM_STABLE, and to
    what both moments have: the threads and fds present in both (a program
    opens and closes connections and may start workers; the tree check
    compares its threads), and of its mappings those of files (libraries
    and the executable: the heap and anonymous memory grow as it runs)."""
    before, after = merge_neighbours(before), merge_neighbours(after)

    def keep(field: str, snap: Dict[str, str], other: Dict[str, str]) -> bool:
        if not PROGRAM_STABLE.match(field):
            return False
        parts = field.split(".")
        if parts[0] in ("thread", "fd"):
            return f"{parts[0]}.{parts[1]}.{'Name' if parts[0] == 'thread' else 'link'}" in other
        if parts[0] == "maps":
            rng = parts[1]
            path = snap.get(f"maps.{rng}.path", "")
            return path.startswith("/") and not path.endswith(" (deleted)")
        return True
    b = {k: v for k, v in before.items() if keep(k, before, after)}
    a = {k: v for k, v in after.items() if keep(k, after, before)}
    if "fd_sharing" in before and "fd_sharing" in after:
        # which of the fds both looks hold share an open file (its stdout and
        # stderr, say): the groups cut to those fds
        both = {f.split(".")[1] for f in b if f.startswith("fd.") and f.endswith(".link")}

        def cut(text: str) -> str:
            groups = (["=".join(fd for fd in g.split("=") if fd in both)] for g in text.split())
            return " ".join(g[0] for g in groups if "=" in g[0])
        b["fd_sharing"], a["fd_sharing"] = cut(before["fd_sharing"]), cut(after["fd_sharing"])
    return b, a
