"""The scenario schema, validated at collection with ``file:line`` errors.

A scenario is YAML; it is *composed* (PyYAML node graph, every node carrying
its start mark) and walked against the schema below, so an unknown key, a
wrong type, a missing ``expect`` or a reason code the engine does not define
is reported as ``path/to/file.yaml:LINE: key: what is wrong`` before anything
runs. :func:`load` returns the scenario as plain JSON-able data with sizes
turned into ints and defaults filled in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import yaml

from . import kinds

try:
    from engine.reasons import REASONS as ENGINE_REASONS
except ImportError:  # pragma: no cover - the engine package is part of the repo
    ENGINE_REASONS = {}

# Tags become pytest markers; the vocabulary is closed so `--strict-markers` works.
TAGS: Dict[str, str] = {
    "files": "regular files", "offsets": "file offsets and flags", "append": "O_APPEND",
    "cloexec": "close-on-exec", "many-fds": "many fds", "large": "large files",
    "rename": "renamed files", "unlink": "deleted (unlinked) files", "ghost": "ghost files kept in the image",
    "sparse": "sparse files", "hardlink": "hard links", "changed": "files changed between dump and restore",
    "mmap": "memory mappings of files", "memfd": "memfd", "dir": "directory fds", "device": "device fds",
    "fifo": "named fifos", "pipe": "anonymous pipes", "inotify": "inotify", "dnotify": "dnotify",
    "fanotify": "fanotify", "socket": "sockets", "locks": "file locks", "eventfd": "eventfd", "timerfd": "timerfd",
    "signalfd": "signalfd", "epoll": "epoll", "pidfd": "pidfds (of the process itself, of dead processes)",
    "migrate": "restore on another guest",
    "refusal": "the expected outcome is a refusal", "dup": "fds sharing one open file description",
    "process": "process-wide state: umask, rlimits, signals, itimers, attributes",
    "threads": "multi-threaded processes (workload.process.threads)",
    "tree": "process trees: a workload with children (workload.process.children)",
    "tty": "pseudo-terminals (pty pairs, controlling terminals)",
    "program": "a real, unmodified program as the workload (workload.program)",
}
STEP_NAMES = ("setup", "ready", "dump", "between", "restore", "verify")
MAX_FD = 499          # the workload builds fds above 500 and moves them down


@dataclass
class SchemaError(Exception):
    """One problem in one scenario file, located to the line."""

    path: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.key}: {self.message}"


class _Ctx:
    def __init__(self, path: str, loader: yaml.SafeLoader):
        self.path = path
        self.loader = loader

    def fail(self, node: yaml.Node, key: str, message: str) -> SchemaError:
        return SchemaError(self.path, node.start_mark.line + 1, key, message)

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, f"expected a scalar, got a {_kind(node)}")
        return self.loader.construct_object(node)


def _kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "mapping", yaml.SequenceNode: "list"}.get(type(node), "scalar")


Check = Callable[[_Ctx, yaml.Node, str], Any]


# -- value types --------------------------------------------------------------------

def Str() -> Check:
    def chk(c, n, k):
        v = c.scalar(n, k)
        if not isinstance(v, str):
            raise c.fail(n, k, f"expected a string, got {v!r}")
        return v
    return chk


def Bool() -> Check:
    def chk(c, n, k):
        v = c.scalar(n, k)
        if not isinstance(v, bool):
            raise c.fail(n, k, f"expected true or false, got {v!r}")
        return v
    return chk


def Int(lo: Optional[int] = None, hi: Optional[int] = None) -> Check:
    def chk(c, n, k):
        v = c.scalar(n, k)
        if isinstance(v, bool) or not isinstance(v, int):
            raise c.fail(n, k, f"expected an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise c.fail(n, k, f"{v} is out of range [{lo}, {hi}]")
        return v
    return chk


def Num() -> Check:
    def chk(c, n, k):
        v = c.scalar(n, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise c.fail(n, k, f"expected a positive number, got {v!r}")
        return v
    return chk


_SIZE = re.compile(r"^(\d+)\s*([KMG]?)(i?B)?$", re.I)


def parse_size(text: Any) -> Optional[int]:
    """``4096``, ``"64K"``, ``"1MiB"``, ``"1G"`` -> bytes (None if not a size)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text if text >= 0 else None
    m = _SIZE.match(str(text).strip())
    if not m:
        return None
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def Size() -> Check:
    def chk(c, n, k):
        v = parse_size(c.scalar(n, k))
        if v is None:
            raise c.fail(n, k, f"expected a size (bytes, or 64K / 1M / 1G), got {n.value!r}")
        return v
    return chk


def Enum(values: Iterable[str], what: str = "one of") -> Check:
    allowed = tuple(values)

    def chk(c, n, k):
        v = c.scalar(n, k)
        if v not in allowed:
            raise c.fail(n, k, f"{v!r} is not {what} {', '.join(map(str, allowed))}")
        return v
    return chk


def Reason() -> Check:
    def chk(c, n, k):
        v = c.scalar(n, k)
        if v not in ENGINE_REASONS:
            raise c.fail(n, k, f"{v!r} is not a reason code the engine defines (engine/reasons.py)")
        return v
    return chk


def KernelVersion() -> Check:
    def chk(c, n, k):
        v = str(c.scalar(n, k))
        if not re.match(r"^\d+\.\d+(\.\d+)?$", v):
            raise c.fail(n, k, f"expected a kernel version like 6.6, got {v!r}")
        return v
    return chk


def FdOrFds() -> Check:
    def chk(c, n, k):
        if isinstance(n, yaml.SequenceNode):
            v = List_(Int(0, MAX_FD))(c, n, k)
            if len(v) < 2 or len(set(v)) != len(v):
                raise c.fail(n, k, "a list of fds names two or more different fds")
            return v
        return Int(0, MAX_FD)(c, n, k)
    return chk


def Path() -> Check:
    def chk(c, n, k):
        v = Str()(c, n, k)
        norm = os.path.normpath(v)
        if os.path.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
            raise c.fail(n, k, f"{v!r}: paths are relative to the scenario's work dir and stay inside it")
        return v
    return chk


def List_(item: Check) -> Check:
    def chk(c, n, k):
        if not isinstance(n, yaml.SequenceNode):
            raise c.fail(n, k, f"expected a list, got a {_kind(n)}")
        return [item(c, x, f"{k}[{i}]") for i, x in enumerate(n.value)]
    return chk


def Pair() -> Check:
    def chk(c, n, k):
        v = List_(Size())(c, n, k)
        if len(v) != 2:
            raise c.fail(n, k, "expected [offset, length]")
        return v
    return chk


def FdNum() -> Check:
    return Int(3, MAX_FD)


def Data() -> Check:
    """Seeded bytes: ``{bytes, seed}``."""
    return Map({"bytes": Size(), "seed": Int(0)}, required=("bytes",))


def FdFlags(prefix: str) -> Check:
    """``[IN_NONBLOCK, IN_CLOEXEC]`` style creation flags."""
    return List_(Enum((f"{prefix}_NONBLOCK", f"{prefix}_CLOEXEC")))


def Limits() -> Check:
    """``[soft, hard]``: sizes or ``unlimited`` (-1)."""
    def one(c, n, k):
        v = c.scalar(n, k)
        if v == "unlimited":
            return -1
        return Size()(c, n, k)

    def chk(c, n, k):
        v = List_(one)(c, n, k)
        if len(v) != 2:
            raise c.fail(n, k, "expected [soft, hard]")
        if v[1] != -1 and (v[0] == -1 or v[0] > v[1]):
            raise c.fail(n, k, "the soft limit is above the hard one")
        return v
    return chk


def Map(fields: Dict[str, Check], required: Sequence[str] = (), defaults: Optional[dict] = None) -> Check:
    def chk(c, n, k):
        if not isinstance(n, yaml.MappingNode):
            raise c.fail(n, k, f"expected a mapping, got a {_kind(n)}")
        out = dict(defaults or {})
        seen = set()
        for kn, vn in n.value:
            key = c.scalar(kn, k)
            where = f"{k}.{key}" if k else str(key)
            if key in seen:
                raise c.fail(kn, where, "duplicate key")
            seen.add(key)
            if key not in fields:
                raise c.fail(kn, where, f"unknown key (allowed: {', '.join(fields)})")
            out[key] = fields[key](c, vn, where)
        for r in required:
            if r not in seen:
                raise c.fail(n, f"{k}.{r}" if k else r, "missing required key")
        return out
    return chk


def OneKey(choices: Dict[str, Check], what: str) -> Check:
    """A mapping with exactly one key out of ``choices`` (a step: ``{rename: {...}}``)."""
    def chk(c, n, k):
        if not isinstance(n, yaml.MappingNode) or len(n.value) != 1:
            raise c.fail(n, k, f"expected a mapping with exactly one {what} ({', '.join(choices)})")
        kn, vn = n.value[0]
        name = c.scalar(kn, k)
        if name not in choices:
            raise c.fail(kn, f"{k}.{name}", f"unknown {what} (allowed: {', '.join(choices)})")
        return {name: choices[name](c, vn, f"{k}.{name}")}
    return chk


def Discriminated(kinds: Dict[str, Dict[str, Check]], common: Dict[str, Check],
                  required: Dict[str, Sequence[str]]) -> Check:
    """A mapping whose kind is given by which one of ``kinds``' keys it holds."""
    def chk(c, n, k):
        if not isinstance(n, yaml.MappingNode):
            raise c.fail(n, k, f"expected a mapping, got a {_kind(n)}")
        keys = [c.scalar(kn, k) for kn, _ in n.value]
        present = [x for x in keys if x in kinds]
        if len(present) != 1:
            raise c.fail(n, k, f"an fd entry names exactly one kind ({', '.join(kinds)}); found {present or 'none'}")
        kind = present[0]
        return Map({**common, **kinds[kind]}, required=required.get(kind, ("fd",)))(c, n, k)
    return chk


# -- the scenario ---------------------------------------------------------------------

def _steps() -> Check:
    P, S = Path(), Size()
    path = {"path": P}
    return OneKey({
        "file": Map({"path": P, "bytes": S, "seed": Int(0), "holes": List_(Pair()), "extents": List_(Pair()),
                     "mode": Int(0, 0o7777)}, required=("path", "bytes")),
        "dir": Map(path, required=("path",)),
        "fifo": Map({"path": P, "mode": Int(0, 0o7777)}, required=("path",)),
        "hardlink": Map({"from": P, "to": P}, required=("from", "to")),
        "symlink": Map({"path": P, "target": Str()}, required=("path", "target")),
        "rename": Map({"from": P, "to": P}, required=("from", "to")),
        "rename-over": Map({"from": P, "to": P}, required=("from", "to")),
        "unlink": Map(path, required=("path",)),
        "rmdir": Map(path, required=("path",)),
        "remove-fifo": Map(path, required=("path",)),
        "rewrite-same-size": Map({"path": P, "seed": Int(0)}, required=("path", "seed")),
        "append": Map({"path": P, "bytes": S, "seed": Int(0)}, required=("path", "bytes", "seed")),
        "truncate": Map({"path": P, "size": S}, required=("path", "size")),
        "touch": Map({"path": P, "seconds": Int()}, required=("path",)),
        "chmod": Map({"path": P, "mode": Int(0, 0o7777)}, required=("path", "mode")),
        "chown": Map({"path": P, "uid": Int(0, 2**32 - 2), "gid": Int(0, 2**32 - 2)}, required=("path", "uid", "gid")),
        "utime": Map({"path": P, "mtime": Int(0)}, required=("path", "mtime")),
        "write-into-fifo": Map({"path": P, "bytes": S, "seed": Int(0)}, required=("path", "bytes", "seed")),
    }, "step")


def _fd_entry() -> Check:
    """Built from the kind registry (harness/kinds): each kind declares its
    own fields; every entry may set ``fd``, ``cloexec``, ``held_outside``
    (a process outside the dump holds a duplicate of each fd the entry made:
    the same open file, harness/workload.py open_all) and ``owner_signal``
    (each fd the entry made owned by the process, F_SETOWN, with that
    F_SETSIG signal, no O_ASYNC)."""
    return Discriminated({k: m.fields(_this()) for k, m in kinds.KINDS.items()},
                         common={"fd": FdNum(), "cloexec": Bool(), "held_outside": Bool(),
                                 "owner_signal": Int(0, 64)},
                         required={k: getattr(m, "REQUIRED", ("fd",)) for k, m in kinds.KINDS.items()})


def _this():
    import sys
    return sys.modules[__name__]


def _mmap() -> Check:
    # sysv: a System V segment (IPC_PRIVATE, attached read-write, seeded, then
    # IPC_RMID'd so nothing outlives the workload; engine/sysvshm.py)
    # apart: an anonymous mapping made as two halves the kernel keeps apart
    # (sysapi.mmap_apart: different anon_vmas), alike in all maps shows
    # shared (anon): MAP_SHARED|MAP_ANONYMOUS; outside: a process outside the
    # dump maps that memory too (forked from the workload once it is made);
    # split: its second page made read-only (three mappings, one object);
    # twice: mapped a second time (mremap old_size 0: the same pages)
    return Map({"file": Path(), "anon": Bool(), "sysv": Bool(), "apart": Bool(), "offset": Size(), "length": Size(),
                "outside": Bool(), "split": Bool(), "twice": Bool(),
                "prot": Enum(("r", "rw")),
                "shared": Bool(), "seed": Int(0),
                # madvise(2) advice the mapping keeps (smaps VmFlags)
                "advise": List_(Enum(("dontfork", "dontdump", "wipeonfork", "hugepage", "nohugepage"))),
                "dirty": Map({"offset": Size(), "bytes": Size(), "seed": Int(0)}, required=("bytes",))},
               required=("length",))


# -- the program workload (harness/program.py) -------------------------------------------

#: What every program step may name as ``{var}`` besides its own captures.
PROGRAM_VARS = ("token", "work", "ctl", "programs", "pid")


def Regex() -> Check:
    """A Python regex; ``{var}`` references are checked by :func:`_program`."""
    def chk(c, n, k):
        v = Str()(c, n, k)
        try:
            re.compile(re.sub(r"\{([A-Za-z_]\w*)\}", "x", v))
        except re.error as e:
            raise c.fail(n, k, f"not a valid regular expression: {e}")
        return v
    return chk


def Exclusive(fields: Dict[str, Check], one_of: Sequence[str], required: Sequence[str] = ()) -> Check:
    """A mapping that holds exactly one of ``one_of``."""
    inner = Map(fields, required=required)

    def chk(c, n, k):
        v = inner(c, n, k)
        present = [x for x in one_of if x in v]
        if len(present) != 1:
            raise c.fail(n, k, f"give exactly one of {', '.join(one_of)}")
        return v
    return chk


def IntOrInts(lo: int, hi: int) -> Check:
    """One integer, or a list of the ones allowed."""
    def chk(c, n, k):
        return List_(Int(lo, hi))(c, n, k) if isinstance(n, yaml.SequenceNode) else Int(lo, hi)(c, n, k)
    return chk


def StrMap() -> Check:
    def chk(c, n, k):
        if not isinstance(n, yaml.MappingNode):
            raise c.fail(n, k, f"expected a mapping, got a {_kind(n)}")
        return {str(c.scalar(kn, k)): str(Str()(c, vn, f"{k}.{c.scalar(kn, k)}")) for kn, vn in n.value}
    return chk


def _program_steps() -> Check:
    t = Num()
    return List_(OneKey({
        "sleep": Num(),
        "write": Map({"path": Path(), "data": Str(), "append": Bool()}, required=("path", "data")),
        "exec": Exclusive({"argv": List_(Str()), "sh": Str(), "stdin": Str(), "expect": Regex(), "rc": IntOrInts(0, 255),
                           "timeout": t}, ("argv", "sh")),
        "wait": Exclusive({"output": Regex(), "lines": List_(Regex()), "since": Enum(("dump",)), "timeout": t},
                          ("output", "lines")),
        "sequence": Map({"name": Str(), "output": Regex(), "start": Int(0), "advance": Int(1), "reach": Int(0),
                         "timeout": t},
                        required=("name", "output")),
        "connect": Map({"name": Str(), "tcp": Int(1, 65535), "host": Str(), "timeout": t}, required=("name", "tcp")),
        "send": Map({"conn": Str(), "data": Str(), "expect": Regex(), "timeout": t}, required=("conn",)),
        "type": Map({"data": Str()}, required=("data",)),
    }, "program step"))


def _program() -> Check:
    return Exclusive({
        "run": List_(Str()), "sh": Str(), "env": StrMap(), "fifos": List_(Path()), "stdin": Path(),
        "tty": Enum(("outside",)),
        "ready": Map({"output": Regex(), "file": Path(), "tcp": Int(1, 65535), "settle": Num()}),
        "stable": Bool(), "before": _program_steps(), "after": _program_steps(),
    }, ("run", "sh"))


def _program_checks(c: _Ctx, node_of, prog: dict) -> None:
    """Every ``{var}`` a step names is defined by then (built in, or a named
    group an earlier pattern captures); a ``send`` names a connection made
    earlier; a ``sequence`` after the restore continues one from before."""
    known = set(PROGRAM_VARS)
    conns: set = set()
    seqs: set = set()

    def refs(text: str) -> List[str]:
        return re.findall(r"\{([A-Za-z_]\w*)\}", text)

    def need(text: str, where: tuple, key: str) -> None:
        for name in refs(text):
            if name not in known:
                raise c.fail(node_of("workload", "program", *where), key,
                             f"{{{name}}} is not defined here (known: {', '.join(sorted(known))})")

    if "stdin" in prog and prog["stdin"] not in (prog.get("fifos") or []):
        raise c.fail(node_of("workload", "program", "stdin"), "workload.program.stdin",
                     f"{prog['stdin']!r} is not one of the program's fifos")
    if "stdin" in prog and "tty" in prog:
        raise c.fail(node_of("workload", "program", "tty"), "workload.program.tty",
                     "a program on a terminal reads the terminal, not a fifo (drop stdin)")
    for phase in ("before", "after"):
        for i, step in enumerate(prog.get(phase) or []):
            if "type" in step and prog.get("tty") != "outside":
                raise c.fail(node_of("workload", "program", phase, i), f"workload.program.{phase}[{i}].type",
                             "keys are typed on a terminal: the program needs tty: outside")
    for key in ("run", "sh"):
        for text in ([prog[key]] if isinstance(prog.get(key), str) else prog.get(key) or []):
            need(text, (key,), f"workload.program.{key}")
    if "ready" in prog and "output" in prog["ready"]:
        need(prog["ready"]["output"], ("ready",), "workload.program.ready.output")
    for phase in ("before", "after"):
        for i, step in enumerate(prog.get(phase) or []):
            (name, a), = step.items()
            where, key = (phase, i), f"workload.program.{phase}[{i}].{name}"
            texts = [a] if isinstance(a, str) else [v for v in a.values() if isinstance(v, str)] + \
                [x for v in a.values() if isinstance(v, list) for x in v if isinstance(x, str)] \
                if isinstance(a, dict) else []
            for text in texts:
                need(text, where, key)
            if name == "connect":
                conns.add(a["name"])
            if name == "send" and a["conn"] not in conns:
                raise c.fail(node_of("workload", "program", *where), key,
                             f"no connection named {a['conn']!r} is made before (connect)")
            if name == "sequence":
                if "(?P<n>" not in a["output"]:
                    raise c.fail(node_of("workload", "program", *where), key,
                                 "the pattern must capture the number as (?P<n>...)")
                if phase == "after" and a["name"] not in seqs:
                    raise c.fail(node_of("workload", "program", *where), key,
                                 f"sequence {a['name']!r} after the restore continues one checked before the dump")
                seqs.add(a["name"])
            patterns = [a[k] for k in ("expect", "output") if isinstance(a, dict) and k in a] + \
                (a.get("lines") or [] if isinstance(a, dict) else [])
            for text in patterns if name in ("wait", "exec", "send") else []:
                known.update(re.compile(re.sub(r"\{([A-Za-z_]\w*)\}", "x", text)).groupindex)


def _expect() -> Check:
    # An expected refusal names its phase and its fd (or fds, for one reason
    # on several); without fd it is one that concerns no fd (a mapping, the
    # process). Only exactly that refusal satisfies it (runner.judge).
    # `also`: a program workload's refusal is the set {reason} + also (the
    # fds are the program's own; see _cross_checks)
    refused = Map({"refused": Map({"reason": Reason(), "fd": FdOrFds(), "at": Enum(("dump", "restore")),
                                   "also": List_(Reason())},
                                  required=("reason", "at"))}, required=("refused",))

    def chk(c, n, k):
        if isinstance(n, yaml.ScalarNode):
            return {"restored": True} if Enum(("restored",))(c, n, k) else None
        return refused(c, n, k)
    return chk


SCENARIO = Map({
    "name": Str(), "description": Str(), "tags": List_(Enum(TAGS, "a known tag:")),
    "setup": List_(_steps()),
    "workload": Map({"fds": List_(_fd_entry()), "mmaps": List_(_mmap()),
                     "process": Map(kinds.PROCESS.fields(_this())),
                     # tick, then sleep with no timeout: its whole memory judged (harness/memstate.py)
                     "quiet": Bool(),
                     # a real program instead of the Python workload (harness/program.py)
                     "program": _program()}),
    "before_dump": List_(_steps()),
    "dump": Map({"leave_running": Bool(), "ghost_limit": Size(),
                 "file_validation": Enum(("strict", "digest", "size", "none"))}),
    "between": List_(_steps()),
    "restore_on": Enum(("same", "other")),
    # the two guests' shared network (harness/segment.py): the service
    # address moves from the dump guest to the restore guest, the client's stays
    "segment": Map({"moves": Str(), "stays": Str()}, required=("moves", "stays")),
    "timeouts": Map({s: Num() for s in STEP_NAMES}),
    "expect": _expect(),
    # What the only exact answer is on guest kernels older than `below`,
    # where the kernel does not expose the state (say `why`).
    "older_kernels": Map({"below": KernelVersion(), "expect": _expect(), "why": Str()},
                         required=("below", "expect", "why")),
    # What the only exact answer is in guests of one distro, where its own
    # programs differ (say `why`): trixie's xz sandboxes itself with Landlock.
    # It wins over older_kernels.
    "distros": Map({d: Map({"expect": _expect(), "why": Str()}, required=("expect", "why"))
                    for d in ("bookworm", "trixie")}),
    # Kernels older than `version` cannot run the scenario at all (skipped,
    # saying `why`): state no engine can read there, and no refusal possible
    # because nothing shows it is in use (README "Known limits").
    "min_kernel": Map({"version": KernelVersion(), "why": Str()}, required=("version", "why")),
}, required=("name", "workload", "expect"), defaults={"restore_on": "same", "tags": []})


def kernel_tuple(release: str) -> tuple:
    """``"6.1.0-28-amd64"`` -> ``(6, 1, 0)``; ``"6.6"`` -> ``(6, 6)``."""
    nums = re.match(r"^(\d+(?:\.\d+)*)", release.strip())
    return tuple(int(x) for x in nums.group(1).split(".")) if nums else ()


def below_min_kernel(sc: dict, kernel_release: str) -> str:
    """Why the scenario cannot run on this kernel ("" when it can)."""
    low = sc.get("min_kernel")
    if low and kernel_release and kernel_tuple(kernel_release) < kernel_tuple(low["version"]):
        return f"needs Linux {low['version']} (this is {kernel_release}): {low['why']}"
    return ""


def effective_expect(sc: dict, kernel_release: str, distro: str = "") -> dict:
    """The scenario's ``expect``; ``distros.<distro>.expect`` in that distro;
    else ``older_kernels.expect`` on an older kernel."""
    if distro in (sc.get("distros") or {}):
        return sc["distros"][distro]["expect"]
    old = sc.get("older_kernels")
    if old and kernel_release and kernel_tuple(kernel_release) < kernel_tuple(old["below"]):
        return old["expect"]
    return sc["expect"]


# -- cross-field rules ----------------------------------------------------------------

def fd_numbers(entry: dict) -> List[int]:
    """Every fd number an entry occupies."""
    return kinds.fd_numbers(entry)


def ipaddress_of(seg: dict, key: str):
    import ipaddress
    return ipaddress.ip_interface(seg[key]).ip


def _expectations(data: dict):
    """(key, expectation) of every expectation a scenario states."""
    yield "expect", data.get("expect", {})
    if "older_kernels" in data:
        yield "older_kernels", data["older_kernels"].get("expect", {})
    for d, alt in sorted((data.get("distros") or {}).items()):
        yield "distros", alt.get("expect", {})


def _cross_checks(c: _Ctx, root: yaml.MappingNode, data: dict) -> None:
    def node_of(*keys) -> yaml.Node:
        n = root
        for key in keys:
            if isinstance(n, yaml.MappingNode):
                n = next((v for kn, v in n.value if kn.value == key), n)
            elif isinstance(n, yaml.SequenceNode) and isinstance(key, int) and key < len(n.value):
                n = n.value[key]
        return n

    prog = data["workload"].get("program")
    if prog is not None:
        others = [k for k in ("fds", "mmaps", "process", "quiet") if k in data["workload"]]
        if others:
            raise c.fail(node_of("workload", others[0]), f"workload.{others[0]}",
                         "a program workload holds what the program opens (no fds, mmaps or process here)")
        if (data.get("dump") or {}).get("leave_running"):
            raise c.fail(node_of("dump"), "dump.leave_running", "not with a program workload")
        if data.get("restore_on") == "other":
            raise c.fail(node_of("restore_on"), "restore_on", "a program workload is restored on the same guest")
        _program_checks(c, node_of, prog)
        for key, exp in _expectations(data):
            ref = exp.get("refused")
            if ref is not None:
                if "fd" in ref:
                    raise c.fail(node_of(key), f"{key}.refused.fd",
                                 "a program's refusal names its reason codes (reason, also), not fds")
                ref.setdefault("also", [])
        return
    seg = data.get("segment")
    if seg is not None:
        import ipaddress
        if data.get("restore_on") != "other":
            raise c.fail(node_of("segment"), "segment", "a moving address needs restore_on: other")
        try:
            nets = [ipaddress.ip_interface(seg[k]) for k in ("moves", "stays")]
        except ValueError as e:
            raise c.fail(node_of("segment"), "segment", f"not an address with its prefix: {e}") from None
        if nets[0].network != nets[1].network or nets[0].ip == nets[1].ip or nets[0].version != 4:
            raise c.fail(node_of("segment"), "segment", "moves and stays: two IPv4 addresses of one subnet")
    seen: Dict[int, int] = {}
    fds = data["workload"].get("fds", [])
    for i, e in enumerate(fds):
        where = f"workload.fds[{i}]"
        n = node_of("workload", "fds", i)
        for num in fd_numbers(e):
            if num > MAX_FD:
                raise c.fail(n, where, f"fd {num} is above {MAX_FD}")
            if num in seen:
                raise c.fail(n, where, f"fd {num} is already used by workload.fds[{seen[num]}]")
            seen[num] = i
    by_fd = {num: fds[i] for num, i in seen.items()}
    for i, e in enumerate(fds):
        validate = getattr(kinds.module_of(e), "validate", None)
        for key, message in (validate(e, by_fd) if validate else []):
            raise c.fail(node_of("workload", "fds", i), f"workload.fds[{i}].{key}", message)
    proc = data["workload"].get("process")
    for key, message in (kinds.PROCESS.validate(proc) if proc else []):
        raise c.fail(node_of("workload", "process"), f"workload.process.{key}", message)
    for i, m in enumerate(data["workload"].get("mmaps", [])):
        if ("file" in m) + bool(m.get("anon")) + bool(m.get("sysv")) != 1:
            raise c.fail(node_of("workload", "mmaps", i), f"workload.mmaps[{i}]",
                         "give one of file, anon: true or sysv: true")
        if m.get("apart") and (not m.get("anon") or int(m["length"]) % (2 * 65536)):
            raise c.fail(node_of("workload", "mmaps", i), f"workload.mmaps[{i}].apart",
                         "two halves of anonymous memory: anon: true, a length that is a multiple of 128K "
                         "(two halves of whole pages on every page size)")
        if m.get("outside") and not (m.get("anon") and m.get("shared")):
            raise c.fail(node_of("workload", "mmaps", i), f"workload.mmaps[{i}].outside",
                         "a process outside maps shared anonymous memory: anon: true, shared: true")
        for part in ("split", "twice"):
            if m.get(part) and not (m.get("anon") and m.get("shared")):
                raise c.fail(node_of("workload", "mmaps", i), f"workload.mmaps[{i}].{part}",
                             "parts of one object are shared anonymous memory: anon: true, shared: true")
        if m.get("split") and int(m["length"]) < 3 * 65536:
            raise c.fail(node_of("workload", "mmaps", i), f"workload.mmaps[{i}].split",
                         "a split mapping is at least 192K (three pieces of whole pages on every page size)")
        if m.get("anon") and m.get("shared") and m.get("apart"):
            raise c.fail(node_of("workload", "mmaps", i), f"workload.mmaps[{i}].shared",
                         "apart is private anonymous memory")
    for i, e in enumerate(fds):
        if "bind" in e:
            want = [str(ipaddress_of(seg, k)) for k in ("moves", "stays")] if seg else None
            if want != [e["bind"], e.get("peer_bind")]:
                raise c.fail(node_of("workload", "fds", i), f"workload.fds[{i}].bind",
                             "bind and peer_bind are the segment's moves and stays addresses (without prefix)")
    for key, exp in _expectations(data):
        ref = exp.get("refused")
        if ref and "also" in ref:
            raise c.fail(node_of(key), f"{key}.refused.also", "only a program workload refuses with a set of reasons")
        for fd in (ref.get("fd") if isinstance(ref.get("fd"), list) else [ref.get("fd")]) if ref else []:
            if fd is not None and fd not in seen:
                raise c.fail(node_of(key), f"{key}.refused.fd", f"fd {fd} is not opened by the workload")


def load(path: str, text: Optional[str] = None) -> dict:
    """Read and validate one scenario; raises SchemaError (file:line: key: why)."""
    if text is None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            raise SchemaError(path, (mark.line + 1) if mark else 0, "yaml", str(e.problem or e)) from None
        if root is None:
            raise SchemaError(path, 1, "scenario", "empty file")
        c = _Ctx(path, loader)
        data = SCENARIO(c, root, "")
        _cross_checks(c, root, data)
        return data
    finally:
        loader.dispose()
