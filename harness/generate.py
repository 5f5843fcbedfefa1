"""Generated scenarios: random cases from the YAML vocabulary, expectations
derived from one table of rules.

``pytest scenarios/ --generate N --seed S`` composes N scenarios (the same
seed gives the same cases, case ``i`` depends only on ``(S, i)``): fds of
every kind with their states (offsets, flags, queued data, watches, holes,
links), several in one process, anonymous and file mappings, process
attributes and threads blocked in calls beside them, world
perturbations before the dump and between dump and restore, sometimes
``leave_running`` or ``restore_on: other`` (guests only).

The expected outcome is never chosen by the generator: :func:`complete`
derives it from the scenario itself with :data:`RULES` (what a world step
on a path held by a given kind of fd must lead to) and :data:`STATIC` (fd
kinds whose outcome does not depend on any step). The shrinker
(harness/shrink.py) calls it again on every smaller candidate, so a
shrunk case carries the expectation that is right for *it*. A case the
rules cannot decide (two different reasons at one phase, a refusal of a
mapping beside one of an fd, a step on a path held by two kinds of fd, a
combination no rule names) is :class:`NotDerivable`: the generator draws
another, the shrinker skips that candidate.

The rules restate what the hand-written scenarios under scenarios/ already
pin down (each names the scenario it comes from); where the engine's answer
is not pinned down anywhere, no rule exists and no such case is generated.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import yaml

from . import kinds, schema, world


class NotDerivable(Exception):
    """The rules do not decide this scenario's outcome."""


@dataclass(frozen=True)
class Rule:
    """A world ``op`` at ``phase`` on a path held by a ``subject`` (see
    :func:`subject_of`) must lead to ``outcome``: ``restored``, or a reason
    code refused ``at`` a phase for every fd holding the path (no fd for a
    mapping). ``pending`` is the inotify events the step leaves queued."""

    op: str
    subject: str
    phase: str                 # before_dump | between
    outcome: str               # "restored" or a reason code
    at: Optional[str] = None   # dump | restore, for a refusal
    pending: Tuple[str, ...] = ()
    source: str = ""           # the hand-written scenario that pins it down


R = Rule
RULES: Tuple[Rule, ...] = (
    # a regular file held open by name
    R("rewrite-same-size", "file", "between", "file-changed", "restore", source="changed/rewrite-same-size"),
    R("append", "file", "between", "file-changed", "restore", source="changed/append-by-other-writer"),
    R("truncate", "file", "between", "file-changed", "restore", source="changed/truncated-after-dump"),
    R("touch", "file", "between", "restored", source="changed/touched-mtime-only"),
    R("chmod", "file", "between", "restored", source="changed/chmod-after-dump"),
    R("unlink", "file", "between", "file-missing", "restore", source="unlink/deleted-after-dump"),
    R("rename", "file", "between", "file-missing", "restore", source="rename/renamed-after-dump"),
    R("rename-over", "file", "between", "file-changed", "restore", source="rename/renamed-over-after-dump"),
    R("unlink", "file", "before_dump", "restored", source="unlink/deleted-small (a ghost)"),
    R("unlink", "file-over-ghost-limit", "before_dump", "unlinked-too-large", "dump",
      source="unlink/deleted-too-large"),
    R("unlink", "file-linked", "before_dump", "restored", source="hardlink/other-name-survives"),
    R("unlink", "file-linked", "between", "file-missing", "restore", source="hardlink/link-removed-after-dump"),
    R("rename", "file", "before_dump", "restored", source="rename/renamed-before-dump"),
    R("rename-over", "file", "before_dump", "restored", source="rename/renamed-over-before-dump"),
    R("rename-over", "file-over-ghost-limit", "before_dump", "unlinked-too-large", "dump",
      source="rename/renamed-over-too-large"),
    R("append", "file", "before_dump", "restored", source="changed/appended-before-dump"),
    R("touch", "file", "before_dump", "restored", source="the world model knows the new mtime is unknown"),
    R("chmod", "file", "before_dump", "restored", source="unlink/ghost-attributes (chmod before the dump)"),
    R("rewrite-same-size", "file", "before_dump", "restored", source="the dump sees the new content"),
    # a named fifo held open
    R("remove-fifo", "fifo", "between", "fifo-missing", "restore", source="fifo/removed-after-dump"),
    R("write-into-fifo", "fifo-read", "before_dump", "restored", source="fifo/written-before-dump"),
    # a file watched by inotify (its mask with or without IN_ATTRIB)
    R("touch", "watch-attrib", "before_dump", "inotify-pending", "dump", ("IN_ATTRIB",),
      source="inotify/pending-events"),
    R("chmod", "watch-attrib", "before_dump", "inotify-pending", "dump", ("IN_ATTRIB",),
      source="inotify/pending-events (chmod raises IN_ATTRIB as utime does)"),
    R("touch", "watch", "before_dump", "restored", source="inotify(7): no IN_ATTRIB in the mask, no event"),
    R("rename", "watch", "before_dump", "restored", source="inotify/renamed-watch"),
    R("rename", "watch-attrib", "before_dump", "restored", source="inotify/renamed-watch"),
    R("unlink", "watch", "before_dump", "inotify-pending", "dump", ("IN_IGNORED",),
      source="inotify/watched-deleted-before-dump"),
    R("unlink", "watch", "between", "inotify-unresolvable", "restore", source="inotify/watched-deleted-after-dump"),
    R("unlink", "watch-attrib", "between", "inotify-unresolvable", "restore",
      source="inotify/watched-deleted-after-dump"),
    R("touch", "watch", "between", "restored", source="events after the dump reach nobody"),
    R("touch", "watch-attrib", "between", "restored", source="events after the dump reach nobody"),
    # a file mapped into memory (refusals of a mapping name no fd)
    R("rewrite-same-size", "mapped", "between", "file-changed", "restore", source="mmap/changed-after-dump"),
    R("unlink", "mapped", "before_dump", "restored", source="mmap/deleted-mapped"),
)
RULE_INDEX: Dict[Tuple[str, str, str], Rule] = {(r.op, r.subject, r.phase): r for r in RULES}
# A subject falls back to the more general one when it has no rule of its own.
FALLBACK = {"file-over-ghost-limit": "file", "file-linked": "file", "fifo-read": "fifo"}


@dataclass(frozen=True)
class Static:
    """An fd kind (or variant) whose outcome no step decides. ``fds`` names
    which of the entry's fds the refusal names: ``own`` or ``all``."""

    variant: str
    outcome: str
    at: Optional[str] = None
    fds: str = "own"
    old_kernels: Optional[Tuple[str, str, str]] = None    # (below, reason, at)
    source: str = ""


STATIC: Dict[str, Static] = {s.variant: s for s in (
    Static("pipe-one-end", "pipe-peer-outside", "dump", source="pipe/peer-outside"),
    Static("dnotify", "dnotify", "dump", source="notify/dnotify"),
    Static("fanotify", "fanotify", "dump", source="notify/fanotify"),
    Static("eventfd", "restored", source="anon/eventfd"),
    Static("socket-unix-pair-made-outside", "peer-pid-in-use", "dump", fds="all",
           source="socket/unix-pair-peercred-outside"),
    Static("pty-outside", "tty-outside", "dump", source="tty/master-outside"),
    Static("pidfd", "restored", source="anon/pidfd"),
    Static("pidfd-outside", "pidfd-outside", "dump", source="anon/pidfd-outside"),
)}


# -- deriving the expectation -----------------------------------------------------------

def _setup_model(sc: dict) -> world.Model:
    m = world.Model()
    for step in sc.get("setup") or []:
        m.apply(step)
    return m


def subject_of(path: str, sc: dict, holders: List[Tuple[str, dict]], phase: str) -> str:
    """What kind of thing a step on ``path`` touches: ``file``,
    ``file-linked`` (another name stays), ``file-over-ghost-limit``,
    ``fifo``, ``fifo-read`` (a read end is held), ``watch`` /
    ``watch-attrib`` (an inotify watch, its mask with IN_ATTRIB), ``mapped``.
    Raises NotDerivable for a path held by two different kinds."""
    kinds_ = {k for k, _ in holders}
    if len(kinds_) != 1:
        raise NotDerivable(f"{path} is held by {sorted(kinds_)}")
    k = kinds_.pop()
    if k == "open":
        m = _setup_model(sc)
        ino = m.lookup(path)
        if ino is not None and m.nlink(ino) > 1:
            return "file-linked"
        limit = (sc.get("dump") or {}).get("ghost_limit")
        if limit is not None and phase == "before_dump":
            size = next((_file_bytes(s["file"]) for s in sc.get("setup") or []
                         if "file" in s and s["file"]["path"] == path), 0)
            if size > limit:
                return "file-over-ghost-limit"
        return "file"
    if k == "fifo":
        return "fifo-read" if any(e.get("end", "r") in ("r", "rw") for _, e in holders) else "fifo"
    if k == "watch":
        masks = {tuple(w["mask"]) for _, e in holders for w in e["inotify"]["watches"] if w["path"] == path}
        attrib = {"IN_ATTRIB" in m for m in masks}
        if len(attrib) != 1:
            raise NotDerivable(f"{path} is watched with and without IN_ATTRIB")
        return "watch-attrib" if attrib.pop() else "watch"
    return k


def _file_bytes(a: dict) -> int:
    """Data bytes of a ``file`` step (extents given: their lengths; holes: the rest)."""
    size = int(a["bytes"])
    if a.get("extents"):
        return sum(int(length) for _, length in a["extents"])
    return size - sum(int(length) for _, length in a.get("holes") or [])


def holders_of(sc: dict) -> Dict[str, List[Tuple[str, dict]]]:
    """path -> [(holder kind, fd entry or mapping)] for every named thing the
    workload holds: files opened by name, fifos, inotify-watched paths, mapped files."""
    out: Dict[str, List[Tuple[str, dict]]] = {}
    wl = sc["workload"]
    for e in wl.get("fds") or []:
        k = kinds.kind_of(e)
        if k == "open":
            out.setdefault(e["open"], []).append(("open", e))
        elif k == "fifo":
            out.setdefault(e["fifo"], []).append(("fifo", e))
        elif k == "inotify":
            for w in e["inotify"].get("watches") or []:
                if not w.get("remove"):
                    out.setdefault(w["path"], []).append(("watch", e))
        elif k == "dnotify":
            out.setdefault(e["dnotify"], []).append(("dnotify", e))
        elif k == "fanotify":
            out.setdefault(e["fanotify"]["mark"], []).append(("fanotify", e))
        elif k == "lock":
            out.setdefault(e["path"], []).append(("lock", e))     # no rule: a step on it is not derived
    for mp in wl.get("mmaps") or []:
        if mp.get("file"):
            out.setdefault(mp["file"], []).append(("mapped", mp))
    return out


# The fd variants the rules know (every other one, and an entry with one of
# UNDECIDED_FIELDS, is not derived: the case is not generated or judged).
DECIDED = {"open", "memfd", "dir", "device", "fifo", "pipe", "pipe-one-end", "inotify", "dnotify", "fanotify",
           "eventfd", "timerfd", "signalfd", "epoll", "dup", "socket-unix-pair", "socket-unix-listen",
           "socket-tcp-listen", "socket-tcp-established", "socket-udp", "socket-unix-pair-made-outside",
           "pty-pair", "pty-outside", "lock-flock", "lock-posix", "lock-ofd", "lock-lease", "pidfd", "pidfd-outside"}
UNDECIDED_FIELDS = {"sender", "outside", "pending_status", "slave_outside"}
#: ``held_outside`` (a process outside the dump holds the same open file):
#: what the engine refuses it with, for the kinds a restore makes anew; an
#: open file is decided only when it is unlinked before the dump (then a
#: ghost: its data would be copied). Other kinds: not derived.
HELD_OUTSIDE = {"eventfd": "unsupported-fd", "timerfd": "unsupported-fd", "epoll": "unsupported-fd",
                "inotify": "unsupported-fd", "memfd": "memory-peer-outside", "open": "memory-peer-outside"}


def variant_of(e: dict) -> str:
    k = kinds.kind_of(e)
    if k == "pipe":
        return "pipe" if len(e["pipe"]) == 2 else "pipe-one-end"
    if k == "socket":
        return f"socket-{e['socket']}" + ("-made-outside" if e.get("creator") == "outside" else "")
    if k == "pty":
        return f"pty-{e['pty']}"
    if k == "pidfd":
        return "pidfd-outside" if e["pidfd"]["of"] == "outside" else "pidfd"
    if k == "lock":
        # held by the process alone: restored (another holder or waiter, a
        # lease being broken - `outside` - is not derived)
        return f"lock-{e['lock']}"
    return k


def _step_path(step: dict) -> Tuple[str, str]:
    op, a = world.split_op(step)
    return op, a.get("to") if op == "rename-over" else a.get("path", a.get("from"))


def derive(sc: dict, old: bool = False) -> Tuple[dict, Dict[int, List[str]]]:
    """The expectation the rules give ``sc`` (``old``: on a kernel below the
    static rules' ``old_kernels``) and the inotify events each inotify fd
    must hold queued at the dump. Raises NotDerivable."""
    if "program" in sc["workload"]:
        raise NotDerivable("a real program (workload.program): what it holds is its own, not the YAML's")
    refusals: List[Tuple[str, str, Optional[int]]] = []      # (reason, at, fd)
    pending: Dict[int, List[str]] = {}
    limit = (sc.get("dump") or {}).get("ghost_limit")
    for mp in sc["workload"].get("mmaps") or []:
        if mp.get("outside"):
            # a restore would make the memory anew; the outsider keeps the old (engine/shmem.py)
            refusals.append(("memory-peer-outside", "dump", None))
    for e in sc["workload"].get("fds") or []:
        if variant_of(e) not in DECIDED or set(e) & UNDECIDED_FIELDS:
            raise NotDerivable(f"no rule for {variant_of(e)} with {sorted(set(e) & UNDECIDED_FIELDS)}")
        for k in e.get("carry") or []:
            # files in flight (engine/fds/_inflight.py): the first the engine
            # cannot restore refuses the socket that holds the message
            if k in ("pipe", "socket"):
                refusals.append(("socket", "dump", e["fd"]))
                break
        if limit is not None and kinds.kind_of(e) == "memfd" and int(e.get("bytes") or 0) > limit:
            # a memfd is kept in the image as a deleted file is: the same limit (engine/fds/ghost.py)
            refusals.append(("unlinked-too-large", "dump", e["fd"]))
        if e.get("held_outside"):
            k = kinds.kind_of(e)
            unlinked = k == "open" and any(world.split_op(step)[0] == "unlink" and _step_path(step)[1] == e["open"]
                                           for step in sc.get("before_dump") or [])
            if k not in HELD_OUTSIDE or (k == "open" and not unlinked):
                raise NotDerivable(f"held_outside on a {k}" + (" that keeps its name" if k == "open" else ""))
            refusals.extend((HELD_OUTSIDE[k], "dump", fd) for fd in kinds.fd_numbers(e))
        st = STATIC.get(variant_of(e))
        if st is None:
            continue
        outcome, at = st.outcome, st.at
        if old and st.old_kernels:
            _, outcome, at = st.old_kernels
        if outcome != "restored":
            for fd in (kinds.fd_numbers(e) if st.fds == "all" else [e.get("fd", kinds.fd_numbers(e)[0])]):
                refusals.append((outcome, at, fd))
    holders = holders_of(sc)
    dup_targets = {e["dup"] for e in sc["workload"].get("fds") or [] if "dup" in e}
    touched = set()
    leave = (sc.get("dump") or {}).get("leave_running")
    if leave and sc.get("between"):
        raise NotDerivable("leave_running with steps between dump and restore")
    for phase in ("before_dump", "between"):
        for step in sc.get(phase) or []:
            op, path = _step_path(step)
            if op == "file":
                continue                    # a new file (the source of a rename-over)
            if path not in holders:
                if op in ("rename", "rename-over") and world.split_op(step)[1].get("from") in holders:
                    raise NotDerivable(f"{op} moves a held path away")
                continue                    # a path nobody holds: no effect on the process
            if path in touched:
                raise NotDerivable(f"a second step on {path}")
            touched.add(path)
            subject = subject_of(path, sc, holders[path], phase)
            rule = RULE_INDEX.get((op, subject, phase)) or RULE_INDEX.get((op, FALLBACK.get(subject, ""), phase))
            if rule is None:
                raise NotDerivable(f"no rule for {op} on a {subject} {phase}")
            for _, e in holders[path]:
                if rule.pending and "fd" in e:
                    pending.setdefault(e["fd"], []).extend(rule.pending)
            if rule.outcome == "restored":
                continue
            dupped = {e.get("fd") for _, e in holders[path]} & dup_targets
            if dupped:
                raise NotDerivable(f"{op} refuses fd {sorted(dupped)}, which a dup shares (which fds the refusal "
                                   "names is not pinned down)")
            for kind, e in holders[path]:
                for fd in ([None] if kind == "mapped" else kinds.fd_numbers(e)):
                    refusals.append((rule.outcome, rule.at, fd))
    if any(at == "dump" for _, at, _ in refusals):
        refusals = [r for r in refusals if r[1] == "dump"]
    if not refusals:
        return {"restored": True}, pending
    reasons = {r for r, _, _ in refusals}
    if len(reasons) != 1:
        raise NotDerivable(f"several reasons at one phase: {sorted(reasons)}")
    fds = sorted({fd for _, _, fd in refusals if fd is not None}) if any(
        fd is not None for _, _, fd in refusals) else []
    if fds and any(fd is None for _, _, fd in refusals):
        raise NotDerivable("a refusal of a mapping beside refusals of fds")
    want: dict = {"reason": reasons.pop(), "at": refusals[0][1]}
    if fds:
        want["fd"] = fds[0] if len(fds) == 1 else fds
    return {"refused": want}, pending


def complete(sc: dict) -> dict:
    """``sc`` with ``expect`` (and ``older_kernels``, inotify ``pending``,
    the ``refusal`` tag) derived from the rules; validated through the schema
    (returns what schema.load returns). Raises NotDerivable, or
    schema.SchemaError / world.WorldError for an illegal case."""
    sc = copy.deepcopy(sc)
    sc.pop("older_kernels", None)
    expect, pending = derive(sc)
    for e in sc["workload"].get("fds") or []:
        if "inotify" in e:
            if pending.get(e["fd"]):
                e["inotify"]["pending"] = pending[e["fd"]]
            else:
                e["inotify"].pop("pending", None)
    sc["expect"] = "restored" if expect.get("restored") else expect
    olds = {s.old_kernels[0] for e in sc["workload"].get("fds") or []
            for s in [STATIC.get(variant_of(e))] if s and s.old_kernels}
    if olds:
        old_expect, _ = derive(sc, old=True)
        if old_expect != expect:
            sc["older_kernels"] = {"below": min(olds), "why": "rules: " + ", ".join(
                s.source for s in STATIC.values() if s.old_kernels),
                "expect": "restored" if old_expect.get("restored") else old_expect}
    tags = set()                  # derived afresh: a shrunk case has no tag of a dropped fd
    for e in sc["workload"].get("fds") or []:
        tags.update(getattr(kinds.module_of(e), "TAGS", ()))
    if "refused" in expect:
        tags.add("refusal")
    sc["tags"] = sorted(t for t in tags if t in schema.TAGS)
    check_world(sc)
    return schema.load("<generated>", to_yaml(sc))


def check_world(sc: dict) -> None:
    """Every step applies to the world model and every named fd finds its path
    at the start (raises world.WorldError)."""
    m = world.Model()
    for step in sc.get("setup") or []:
        m.apply(step)
    for path in holders_of(sc):
        if m.lookup(path) is None:
            raise world.WorldError("workload", f"{path} does not exist after setup")
    for phase in ("before_dump", "between"):
        for step in sc.get(phase) or []:
            m.apply(step)


def to_yaml(sc: dict, header: str = "") -> str:
    """The scenario as YAML (keys in the order of hand-written scenarios)."""
    order = ("name", "description", "tags", "setup", "workload", "before_dump", "dump", "between",
             "restore_on", "timeouts", "expect", "older_kernels")
    out = {k: sc[k] for k in order if k in sc and sc[k] not in (None, [], {})}
    if "workload" in out:
        out["workload"] = {k: v for k, v in out["workload"].items() if v not in (None, [], {})}
    if out.get("restore_on") == "same":
        del out["restore_on"]
    if isinstance(out.get("expect"), dict) and out["expect"].get("restored"):
        out["expect"] = "restored"
    if isinstance((out.get("older_kernels") or {}).get("expect"), dict) and out["older_kernels"]["expect"].get(
            "restored"):
        out["older_kernels"] = dict(out["older_kernels"], expect="restored")
    text = yaml.safe_dump(out, sort_keys=False, default_flow_style=None, width=110)
    return (header + text) if header else text


# -- generating ---------------------------------------------------------------------------

SIZES = (1, 100, 1000, 4096, 10000, 65536, 200000)
OPEN_MODES = ("r", "w", "rw", "a", "a+")
SAFE_FLAGS = ("O_NONBLOCK", "O_NOATIME", "O_SYNC", "O_DSYNC")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/full")
SIGNALFD_SIGNALS = ("SIGUSR2", "SIGHUP", "SIGWINCH", "SIGRTMIN")
# weights: kinds refused at the dump whatever else the process holds (dnotify,
# fanotify) would hide the rest of the case, so they are rare
FD_KINDS = ("open",) * 8 + ("fifo",) * 3 + ("pipe",) * 3 + ("memfd",) * 2 + ("socket",) * 2 + ("inotify",) * 3 + (
    "dir", "device", "eventfd", "timerfd", "signalfd", "dnotify", "fanotify", "pidfd")
# the world steps a generated case may apply to a held path, per holder kind
PERTURB = {
    "open": ("rewrite-same-size", "append", "truncate", "touch", "chmod", "unlink", "rename", "rename-over"),
    "fifo": ("remove-fifo", "write-into-fifo"),
    "watch": ("touch", "chmod", "rename", "unlink"),
    "mapped": ("rewrite-same-size", "unlink"),
}
MIGRATABLE = {"open", "memfd", "pipe", "fifo", "dir", "device", "dup"}


class _Gen:
    """The state of one case being drawn: next fd, names, setup steps."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.next_fd = 3
        self.setup: List[dict] = []
        self.fds: List[dict] = []
        self.mmaps: List[dict] = []
        self.n = 0
        self.seed = rng.randrange(1, 10**6)

    def fd(self) -> int:
        fd = self.next_fd
        self.next_fd += 1 + (self.rng.random() < 0.2) * self.rng.randrange(1, 20)
        return fd

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def sd(self) -> int:
        self.seed += 1
        return self.seed

    def data(self, hi: int = 30000) -> dict:
        return {"bytes": self.rng.choice([b for b in SIZES if b <= hi] + [7]), "seed": self.sd()}

    def new_file(self, size: Optional[int] = None, link: bool = True) -> str:
        r = self.rng
        path = self.name("f")
        size = size or r.choice(SIZES)
        step = {"path": path, "bytes": size, "seed": self.sd()}
        if size >= 65536 and r.random() < 0.3:
            step["holes"] = [[4096, 8192]]
        self.setup.append({"file": step})
        if link and r.random() < 0.1:
            self.setup.append({"hardlink": {"from": path, "to": path + "-link"}})
        return path

    # one builder per fd kind
    def open(self) -> None:
        r = self.rng
        path = self.new_file()
        size = self.setup[-1]["file"]["bytes"] if "file" in self.setup[-1] else self.setup[-2]["file"]["bytes"]
        e = {"fd": self.fd(), "open": path, "mode": r.choice(OPEN_MODES), "seek": r.randrange(0, size + 1)}
        if r.random() < 0.3:
            e["flags"] = sorted(r.sample(SAFE_FLAGS, r.randrange(1, 3)))
        if r.random() < 0.2:
            e["cloexec"] = True
        if r.random() < 0.15:
            e["count"] = r.randrange(2, 5)
            e["seek_step"] = r.randrange(1, 200)
            self.next_fd = e["fd"] + e["count"] + 1
        self.fds.append(e)
        if r.random() < 0.2:
            self.fds.append({"fd": self.fd(), "dup": e["fd"]})

    def fifo(self) -> None:
        r = self.rng
        path = self.name("ff")
        self.setup.append({"fifo": {"path": path}})
        shape = r.choice((("r", "w"), ("rw",), ("r",)))
        for end in shape:
            e = {"fd": self.fd(), "fifo": path, "end": end}
            if end == "r" and len(shape) == 1:
                e["nonblock"] = True
            if r.random() < 0.6:
                e["data"] = self.data(20000)
            self.fds.append(e)

    def pipe(self) -> None:
        r = self.rng
        ends = ("read", "write") if r.random() < 0.85 else r.choice((("read",), ("write",)))
        e = {"pipe": {end: self.fd() for end in ends}}
        if r.random() < 0.6:
            e["data"] = self.data(30000)
        self.fds.append(e)

    def memfd(self) -> None:
        r = self.rng
        size = r.choice(SIZES)
        e = {"fd": self.fd(), "memfd": self.name("m"), "bytes": size, "seed": self.sd(),
             "seek": r.randrange(0, size + 1)}
        if r.random() < 0.4:
            e["seals"] = sorted(r.sample(("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_SEAL"), r.randrange(0, 3)))
        self.fds.append(e)
        if r.random() < 0.2:
            self.fds.append({"fd": self.fd(), "dup": e["fd"]})

    def dir(self) -> None:
        path = self.name("d")
        self.setup.append({"dir": {"path": path}})
        self.fds.append({"fd": self.fd(), "dir": path})

    def device(self) -> None:
        dev = self.rng.choice(DEVICES)
        self.fds.append({"fd": self.fd(), "device": dev, "mode": "r" if dev != "/dev/null" else "rw"})

    def socket(self) -> None:
        r = self.rng
        kind = r.choice(("unix-pair",) * 3 + ("tcp-listen", "unix-listen") * 2 + ("udp", "tcp-established"))
        e = {"fd": self.fd(), "socket": kind}
        if kind in ("unix-pair", "tcp-established"):
            e["peer_fd"] = self.fd()
            if r.random() < 0.6:
                e["data"] = self.data(20000)
            if kind == "unix-pair" and r.random() < 0.4:
                e["peer_data"] = self.data(20000)
        if kind == "unix-listen":
            e["path"] = self.name("sock")
        if kind == "udp" and r.random() < 0.5:
            e["data"] = self.data(512)
        self.fds.append(e)

    def inotify(self) -> None:
        r = self.rng
        watches = []
        for _ in range(r.randrange(1, 3)):
            path = self.new_file(100, link=False)
            watches.append({"path": path, "mask": r.choice((["IN_MODIFY"], ["IN_ATTRIB"],
                                                            ["IN_MODIFY", "IN_ATTRIB"]))})
        e = {"fd": self.fd(), "inotify": {"watches": watches}}
        if r.random() < 0.4:
            e["inotify"]["flags"] = ["IN_NONBLOCK"]
        self.fds.append(e)

    def eventfd(self) -> None:
        r = self.rng
        spec = {"initval": r.randrange(0, 100)}
        if r.random() < 0.5:
            spec["add"] = r.randrange(1, 1000)
        if r.random() < 0.5:
            spec["flags"] = sorted(r.sample(("EFD_SEMAPHORE", "EFD_NONBLOCK", "EFD_CLOEXEC"), r.randrange(1, 3)))
        self.fds.append({"fd": self.fd(), "eventfd": spec})

    def timerfd(self) -> None:
        r = self.rng
        spec = {"clock": r.choice(("monotonic", "realtime", "boottime")),
                "value_ms": r.choice((3600000, 7200000, 500))}
        if spec["value_ms"] == 500:
            spec["interval_ms"] = r.choice((200, 1000))
        if r.random() < 0.3:
            spec["flags"] = ["TFD_NONBLOCK"]
        self.fds.append({"fd": self.fd(), "timerfd": spec})

    def signalfd(self) -> None:
        r = self.rng
        spec = {"signals": sorted(r.sample(SIGNALFD_SIGNALS, r.randrange(1, 3)))}
        if r.random() < 0.5:
            spec["flags"] = ["SFD_NONBLOCK"]
        self.fds.append({"fd": self.fd(), "signalfd": spec})

    def pidfd(self) -> None:
        r = self.rng
        spec: dict = {"of": r.choice(("self", "self", "dead", "dead", "dead", "outside"))}
        if spec["of"] == "dead":
            if r.random() < 0.5:
                spec["exit"] = r.randrange(0, 256)
            else:
                spec["signal"] = r.choice(("SIGKILL", "SIGTERM", "SIGHUP", "SIGUSR1"))
        if r.random() < 0.4:
            spec["flags"] = ["PIDFD_NONBLOCK"]
        self.fds.append({"fd": self.fd(), "pidfd": spec})

    def dnotify(self) -> None:
        path = self.name("d")
        self.setup.append({"dir": {"path": path}})
        self.fds.append({"fd": self.fd(), "dnotify": path, "mask": ["DN_CREATE"]})

    def fanotify(self) -> None:
        path = self.new_file(10, link=False)
        self.fds.append({"fd": self.fd(), "fanotify": {"mark": path, "mask": ["FAN_OPEN"]}})

    def epoll(self) -> None:
        """An epoll on some of the pipes, timerfds and socketpair ends drawn so far."""
        r = self.rng
        cands = []
        for e in self.fds:
            k = kinds.kind_of(e)
            if k == "pipe" and len(e["pipe"]) == 2:
                cands += [(e["pipe"]["read"], "EPOLLIN"), (e["pipe"]["write"], "EPOLLOUT")]
            elif (k == "timerfd" and e["timerfd"]["value_ms"] >= 3600000) or (
                    k == "socket" and e["socket"] == "unix-pair"):
                # a timer that fires during the run is ready or not by timing
                # (found: gen-s2027-0032), which no checker can predict
                cands.append((e["fd"], "EPOLLIN"))
        if not cands:
            return
        targets = [{"fd": fd, "events": [ev]} for fd, ev in r.sample(cands, r.randrange(1, len(cands) + 1))]
        for t in targets:
            if r.random() < 0.5:
                t["data"] = r.randrange(0, 2**64)
        self.fds.append({"fd": self.fd(), "epoll": {"targets": targets}})

    def mmap(self) -> None:
        r = self.rng
        if r.random() < 0.5:
            self.mmaps.append({"anon": True, "length": r.choice((4096, 65536, 1 << 20)), "seed": self.sd()})
            return
        path = self.new_file(r.choice((4096, 16384, 65536)), link=False)
        length = self.setup[-1]["file"]["bytes"] if "file" in self.setup[-1] else self.setup[-2]["file"]["bytes"]
        mp = {"file": path, "length": length, "prot": r.choice(("r", "rw")), "shared": False}
        if mp["prot"] == "r" and r.random() < 0.5:
            mp["shared"] = True
        if mp["prot"] == "rw" and r.random() < 0.5:
            mp["dirty"] = {"offset": 100, "bytes": 1000, "seed": self.sd()}
        self.mmaps.append(mp)


def _perturb(g: _Gen, sc: dict, allow_ghost_limit: bool) -> None:
    """0-2 world steps on held paths, before the dump or between."""
    r = g.rng
    holders = holders_of(sc)
    paths = [p for p in sorted(holders) if len({k for k, _ in holders[p]}) == 1 and holders[p][0][0] in PERTURB]
    r.shuffle(paths)
    for path in paths[:r.choice((0, 1, 1, 1, 2))]:
        kind = holders[path][0][0]
        op = r.choice(PERTURB[kind])
        phase = r.choice(("before_dump", "between"))
        steps = sc.setdefault(phase, [])
        size = next((s["file"]["bytes"] for s in sc["setup"] if "file" in s and s["file"]["path"] == path), 100)
        if op == "rewrite-same-size":
            steps.append({op: {"path": path, "seed": g.sd()}})
        elif op == "append":
            steps.append({op: {"path": path, "bytes": r.choice((1, 100, 4096)), "seed": g.sd()}})
        elif op == "truncate":
            steps.append({op: {"path": path, "size": size // 2}})
        elif op == "touch":
            steps.append({op: {"path": path, "seconds": r.choice((1, 3600))}})
        elif op == "chmod":
            steps.append({op: {"path": path, "mode": r.choice((0o600, 0o640, 0o755))}})
        elif op in ("unlink", "remove-fifo"):
            steps.append({op: {"path": path}})
            if op == "unlink" and phase == "before_dump" and allow_ghost_limit and kind == "open" \
                    and r.random() < 0.3 and size > 1:
                sc["dump"] = dict(sc.get("dump") or {}, ghost_limit=size - 1)
        elif op == "rename":
            steps.append({op: {"from": path, "to": path + "-moved"}})
        elif op == "rename-over":
            steps.append({"file": {"path": path + "-new", "bytes": size, "seed": g.sd()}})
            steps.append({op: {"from": path + "-new", "to": path}})
        elif op == "write-into-fifo":
            steps.append({op: {"path": path, "bytes": r.choice((1, 300, 4096)), "seed": g.sd()}})


def draw(rng: random.Random, migrate: bool = False) -> dict:
    """One raw case (no ``expect`` yet) from ``rng``."""
    g = _Gen(rng)
    for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
        getattr(g, rng.choice(FD_KINDS))()
    if rng.random() < 0.25:
        g.epoll()
    if rng.random() < 0.2:
        g.mmap()
    if rng.random() < 0.1:
        # one object also held by a process outside the dump (not one a dup shares: its fd is refused too)
        dupped = {e["dup"] for e in g.fds if "dup" in e}
        held = [e for e in g.fds if kinds.kind_of(e) in HELD_OUTSIDE and kinds.kind_of(e) != "open"
                and e.get("fd") not in dupped]
        if held:
            rng.choice(held)["held_outside"] = True
    sc: dict = {"setup": g.setup, "workload": {"fds": g.fds}}
    if g.mmaps:
        sc["workload"]["mmaps"] = g.mmaps
    if not g.fds and not g.mmaps:
        g.device()
    if rng.random() < 0.15:
        sc["workload"]["process"] = {"umask": rng.choice((0o22, 0o27, 0o77))}
    _perturb(g, sc, allow_ghost_limit=True)
    if rng.random() < 0.15 and not sc.get("between"):
        sc["dump"] = dict(sc.get("dump") or {}, leave_running=True)
    if migrate and rng.random() < 0.15 and all(kinds.kind_of(e) in MIGRATABLE for e in g.fds):
        sc["restore_on"] = "other"
    # Last, so that every earlier draw of a seed stays what it was.
    if rng.random() < 0.15:
        sc["workload"].setdefault("process", {})["attrs"] = _attrs(rng)
    # (after the attrs: the same rule) Threads beside whatever the process
    # holds: one process's fds, memory and attributes shared by threads
    # blocked in calls (scenarios/threads/blocked.yaml restores each); a
    # thread changes no fd's outcome, so the derived expectation stands
    if rng.random() < 0.2:
        sc["workload"].setdefault("process", {})["threads"] = _threads(rng)
    # (after the threads: the same rule) Anonymous memory made shared, and
    # at times mapped by a process outside the dump too (memory-peer-outside)
    anon = [mp for mp in sc["workload"].get("mmaps") or [] if mp.get("anon")]
    if anon and rng.random() < 0.4:
        mp = rng.choice(anon)
        mp["shared"] = True
        if rng.random() < 0.4:
            mp["outside"] = True
        if rng.random() < 0.3:
            mp["twice"] = True          # one object in parts (engine/shmem.py)
        if int(mp["length"]) >= 3 * 65536 and rng.random() < 0.5:
            mp["split"] = True
    return sc


def _threads(rng) -> list:
    """1-3 workload.process.threads, each blocked in one call, some with a nice of their own."""
    out = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        t = {"blocked_in": rng.choice(("sleep", "read", "lock", "cond", "join"))}
        if rng.random() < 0.3:
            t["nice"] = rng.randrange(1, 20)
        out.append(t)
    return out


def _attrs(rng) -> dict:
    """Some of workload.process.attrs (scenarios/process/attrs.yaml: each is
    restored as set)."""
    choices = {"ioprio": lambda: rng.choice(("idle", "none", f"best-effort:{rng.randrange(8)}")),
               "coredump_filter": lambda: rng.randrange(0x200),
               "thp_disable": lambda: rng.random() < 0.5, "child_subreaper": lambda: rng.random() < 0.5,
               "keep_caps": lambda: rng.random() < 0.5, "mce_kill": lambda: rng.choice(("early", "late")),
               "dumpable": lambda: rng.random() < 0.5}
    keys = rng.sample(sorted(choices), rng.choice((1, 2, 3)))
    return {k: choices[k]() for k in sorted(keys)}


def _describe(sc: dict) -> str:
    parts = [variant_of(e) for e in sc["workload"].get("fds") or []]
    parts += ["mmap" for _ in sc["workload"].get("mmaps") or []]
    for phase in ("before_dump", "between"):
        parts += [f"{world.split_op(s)[0]} {phase.replace('_', ' ')}" for s in sc.get(phase) or []
                  if world.split_op(s)[0] != "file"]
    return ", ".join(parts)


def case_id(seed: int, index: int) -> str:
    return f"gen-s{seed}-{index:04d}"


def generate_one(seed: int, index: int, migrate: bool = False, tries: int = 50) -> dict:
    """Case ``index`` of ``seed``: drawn until the rules decide it (a fixed
    sequence of draws from ``Random("seed:index")``, so it is reproducible)."""
    rng = random.Random(f"crucible:{seed}:{index}")
    last: Exception = NotDerivable("no draw")
    for _ in range(tries):
        raw = draw(rng, migrate)
        raw["name"] = f"generated {case_id(seed, index)}: {_describe(raw)}"
        try:
            return complete(raw)
        except (NotDerivable, world.WorldError) as e:
            last = e
    raise NotDerivable(f"case {index} of seed {seed}: no decidable draw in {tries} tries ({last})")


def generate(n: int, seed: int, migrate: bool = False) -> List[Tuple[str, dict]]:
    """``n`` cases: ``[(id, scenario)]``, the same for the same seed."""
    return [(case_id(seed, i), generate_one(seed, i, migrate)) for i in range(n)]
