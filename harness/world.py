"""The world a scenario builds: setup / before_dump / between steps.

Runs in the guest (stdlib only, Python >= 3.9), both as a module of the
``harness`` package and as a script::

    python3 world.py apply SPEC.json PHASE [--digest DIR] [--pid PID] [--witness FILE]
    python3 world.py digest DIR               # md5 of every file under DIR

Each step is ``{op: {args}}`` with paths relative to the scenario's work dir.
:func:`apply_op` performs a step on the real filesystem; :class:`Model`
performs the same step on a model (path -> inode -> seeded content) so the
workload can tell what each of its fds must see, from the scenario alone.
"""

from __future__ import annotations

import os
import stat
import sys

TYPE_CHECKING = False   # annotations only: the exec'd workload imports this module at every start
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

try:  # package import on the host, sibling import when run as a script
    from . import records, seeded
except ImportError:  # pragma: no cover - exercised in the guest
    import records  # type: ignore[no-redef]
    import seeded  # type: ignore[no-redef]

#: what this script imports on first use (the workload imports this module
#: too, and needs none of them): harness/agent.py imports them before it
#: forks its scripts
PRELOAD = ("hashlib", "random", "json")

OPS = ("file", "dir", "fifo", "hardlink", "symlink", "rename", "rename-over",
       "unlink", "rewrite-same-size", "append", "truncate", "touch", "chmod",
       "remove-fifo", "write-into-fifo", "rmdir", "chown", "utime")


class WorldError(Exception):
    """A step could not be carried out (the scenario or the world is wrong)."""

    def __init__(self, op: str, message: str):
        self.op = op
        self.message = message
        super().__init__(f"{op}: {message}")


def split_op(step: Dict[str, Any]):
    """``{"rename": {...}}`` -> ``("rename", {...})``."""
    if not isinstance(step, dict) or len(step) != 1:
        raise WorldError("?", f"a step is a mapping with exactly one op: {step!r}")
    ((name, args),) = step.items()
    return name, args


def rel(path: str) -> str:
    """Normalised work-dir-relative path; refuses anything that escapes it."""
    norm = os.path.normpath(path)
    if os.path.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise WorldError("path", f"{path!r} is not relative to the work dir")
    return norm


def file_content(args: Dict[str, Any]) -> seeded.Content:
    """The content a ``file`` step creates."""
    extents = args.get("extents")
    return seeded.Content.seeded(
        int(args["bytes"]), int(args.get("seed", 0)),
        holes=[tuple(h) for h in args.get("holes", ())],
        extents=[tuple(e) for e in extents] if extents is not None else None)


def write_content(fd: int, content: seeded.Content, chunk: int = 1 << 20) -> None:
    """pwrite every data segment; holes are never written, so they stay holes."""
    pos = 0
    for seg in content.segments:
        if seg.seed is not None:
            done = 0
            while done < seg.length:
                n = min(chunk, seg.length - done)
                os.pwrite(fd, seg.read(done, n), pos + done)
                done += n
        pos += seg.length
    os.ftruncate(fd, content.size)


# -- the real filesystem ------------------------------------------------------

def apply_op(step: Dict[str, Any], workdir: str) -> None:
    """Carry out one step under ``workdir``.

    Raises WorldError when the step cannot be done (e.g. rename-over onto a
    missing file): a broken scenario must not pass silently.
    """
    name, a = split_op(step)
    p = lambda key: os.path.join(workdir, rel(a[key]))  # noqa: E731
    try:
        if name == "file":
            path = p("path")
            if os.path.lexists(path):
                raise WorldError(name, f"{a['path']} exists (use rename-over to replace)")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, int(a.get("mode", 0o644)))
            try:
                write_content(fd, file_content(a))
            finally:
                os.close(fd)
        elif name == "dir":
            os.makedirs(p("path"), exist_ok=True)
        elif name == "fifo":
            os.mkfifo(p("path"), int(a.get("mode", 0o644)))
        elif name == "hardlink":
            os.link(p("from"), p("to"))
        elif name == "symlink":
            os.symlink(a["target"], p("path"))
        elif name == "rename":
            if os.path.lexists(p("to")):
                raise WorldError(name, f"{a['to']} exists (use rename-over)")
            os.rename(p("from"), p("to"))
        elif name == "rename-over":
            if not os.path.lexists(p("to")):
                raise WorldError(name, f"{a['to']} does not exist (use rename)")
            os.rename(p("from"), p("to"))
        elif name == "unlink":
            os.unlink(p("path"))
        elif name == "rmdir":
            os.rmdir(p("path"))
        elif name == "remove-fifo":
            if not stat.S_ISFIFO(os.lstat(p("path")).st_mode):
                raise WorldError(name, f"{a['path']} is not a fifo")
            os.unlink(p("path"))
        elif name == "rewrite-same-size":
            fd = os.open(p("path"), os.O_WRONLY)
            try:
                size = os.fstat(fd).st_size
                c = seeded.Content()
                c.segments = [seeded.Segment(size, int(a["seed"]), 0)] if size else []
                write_content(fd, c)
            finally:
                os.close(fd)
        elif name == "append":
            fd = os.open(p("path"), os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, seeded.data(int(a["seed"]), 0, int(a["bytes"])))
            finally:
                os.close(fd)
        elif name == "truncate":
            os.truncate(p("path"), int(a["size"]))
        elif name == "touch":
            st = os.stat(p("path"))
            delta = int(a.get("seconds", 100)) * 10**9
            os.utime(p("path"), ns=(st.st_atime_ns, st.st_mtime_ns + delta))
        elif name == "chmod":
            os.chmod(p("path"), int(a["mode"]))
        elif name == "chown":
            os.chown(p("path"), int(a["uid"]), int(a["gid"]))
        elif name == "utime":
            ns = int(a["mtime"]) * 10**9
            os.utime(p("path"), ns=(ns, ns))
        elif name == "write-into-fifo":
            # O_RDWR on a fifo never blocks (Linux fifo(7)); the bytes stay in
            # the pipe buffer only while some other fd keeps the fifo open.
            fd = os.open(p("path"), os.O_RDWR | os.O_NONBLOCK)
            try:
                os.write(fd, seeded.data(int(a["seed"]), 0, int(a["bytes"])))
            finally:
                os.close(fd)
        else:
            raise WorldError(name, "unknown op")
    except OSError as e:
        raise WorldError(name, f"{a}: {e}") from None


def apply_phase(spec: Dict[str, Any], phase: str) -> None:
    """Run ``spec[phase]`` in order under ``spec['workdir']`` (created for setup)."""
    workdir = spec["workdir"]
    if phase == "setup":
        os.makedirs(workdir, exist_ok=True)
        os.makedirs(spec["ctldir"], exist_ok=True)
    for step in spec.get(phase) or []:
        apply_op(step, workdir)


def digest_tree(root: str) -> Dict[str, str]:
    """``relpath -> md5:mode`` for every file under ``root`` (sorted walk).

    It tells whether a refused restore changed the image, against a bug,
    not an adversary: any 128-bit digest will do, and MD5 (OpenSSL's,
    loaded in the agent before the golden snapshot: :data:`PRELOAD`) is
    the one a TCG guest computes fastest: 4 MB in 8-36 ms, against 65-170
    ms for BLAKE2b and 70-250 ms for SHA-256 (an x86_64 TCG guest on a
    loaded host). Every scenario pays it once, on the image before its
    restore (was BLAKE2b: ~0.1 s of the guest's 0.12 s between the dump and
    the restore)."""
    import hashlib
    out: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            h = hashlib.md5(usedforsecurity=False)
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            mode = stat.S_IMODE(os.lstat(full).st_mode)
            out[os.path.relpath(full, root)] = f"{h.hexdigest()}:{mode:o}"
    return out


# -- the model ------------------------------------------------------------------

ATTRS = ("mode", "uid", "gid", "mtime_ns")


class Node(records.Record):
    FIELDS = ("kind", "content", "changes", "known")

    def __init__(self, kind: str, content: Optional[seeded.Content] = None,
                 changes: Optional[Dict[str, int]] = None, known: Optional[Dict[str, Optional[int]]] = None):
        self.kind = kind                # file | dir | fifo | symlink
        self.content = content          # files only
        # What steps did to the inode's attributes: how often each changed, and
        # its value where a step set it exactly (None: changed, value unknown,
        # e.g. mtime after an append). A checker that saw the attribute itself
        # before the steps uses its own observation while the count is unchanged.
        self.changes = dict.fromkeys(ATTRS, 0) if changes is None else changes
        self.known = dict.fromkeys(ATTRS) if known is None else known

    def set_attr(self, attr: str, value: Optional[int]) -> None:
        self.changes[attr] += 1
        self.known[attr] = value


class Model(records.Record):
    """path -> inode -> content, changed by the same steps as the real world."""

    FIELDS = ("paths", "nodes", "fifo_writes", "dentries", "dentry_names", "dead")

    def __init__(self) -> None:
        self.paths: Dict[str, int] = {}
        self.nodes: Dict[int, Node] = {}
        self.fifo_writes: Dict[str, List[tuple]] = {}  # path -> [(seed, bytes)]
        # Names as the kernel's dentries carry them: an fd keeps the dentry it was
        # opened through, which follows renames and, once unlinked, is shown by
        # /proc/PID/fd as "<its last path> (deleted)".
        self.dentries: Dict[str, int] = {}      # path -> dentry id
        self.dentry_names: Dict[int, str] = {}  # dentry id -> its path now
        self.dead: set = set()                  # unlinked dentry ids

    def _new(self, path: str, node: Node) -> int:
        ino = len(self.nodes) + 1
        self.nodes[ino] = node
        self.paths[rel(path)] = ino
        self._link(path)
        return ino

    def _link(self, path: str) -> None:
        d = len(self.dentry_names) + 1
        self.dentries[rel(path)] = d
        self.dentry_names[d] = rel(path)

    def _drop(self, path: str) -> None:
        d = self.dentries.pop(rel(path), None)
        if d is not None:
            self.dead.add(d)

    def dentry(self, path: str) -> Optional[int]:
        """The dentry id of ``path`` now (what an fd opened through it keeps)."""
        return self.dentries.get(rel(path))

    def dentry_name(self, d: int) -> tuple:
        """``(path now, unlinked?)`` of dentry ``d``."""
        return self.dentry_names[d], d in self.dead

    def lookup(self, path: str) -> Optional[int]:
        """The model inode at ``path``, or None (does not follow symlinks)."""
        return self.paths.get(rel(path))

    def nlink(self, ino: int) -> int:
        """How many names the inode has (0: deleted, kept alive by an fd)."""
        return sum(1 for i in self.paths.values() if i == ino)

    def path_of(self, ino: Optional[int]) -> Optional[str]:
        """A name the inode has now (the first in sorted order), or None."""
        names = sorted(p for p, i in self.paths.items() if i == ino)
        return names[0] if names else None

    def fifo_data(self, path: str) -> List[tuple]:
        """``(seed, bytes)`` written into the fifo at ``path`` by steps, in order."""
        return self.fifo_writes.get(rel(path), [])

    def content(self, ino: int) -> seeded.Content:
        node = self.nodes[ino]
        if node.content is None:
            raise WorldError("model", f"inode {ino} is a {node.kind}, not a file")
        return node.content

    def apply(self, step: Dict[str, Any]) -> None:
        """Mirror :func:`apply_op`; raises WorldError where it would."""
        name, a = split_op(step)
        need = lambda key: self._need(name, a[key])  # noqa: E731
        if name == "file":
            self._new(a["path"], Node("file", file_content(a)))
        elif name == "dir":
            self._new(a["path"], Node("dir"))
        elif name == "fifo":
            self._new(a["path"], Node("fifo"))
        elif name == "symlink":
            self._new(a["path"], Node("symlink"))
        elif name == "hardlink":
            self.paths[rel(a["to"])] = need("from")
            self._link(a["to"])
        elif name in ("rename", "rename-over"):
            self.paths[rel(a["to"])] = self.paths.pop(rel(a["from"]), None) or need("from")
            self._drop(a["to"])
            d = self.dentries.pop(rel(a["from"]), None)
            if d is not None:
                self.dentries[rel(a["to"])] = d
                self.dentry_names[d] = rel(a["to"])
        elif name in ("unlink", "remove-fifo", "rmdir"):
            need("path")
            del self.paths[rel(a["path"])]
            self._drop(a["path"])
        elif name == "rewrite-same-size":
            self.content(need("path")).rewrite(int(a["seed"]))
            self.nodes[need("path")].set_attr("mtime_ns", None)
        elif name == "append":
            self.content(need("path")).append(int(a["bytes"]), int(a["seed"]))
            self.nodes[need("path")].set_attr("mtime_ns", None)
        elif name == "truncate":
            self.content(need("path")).truncate(int(a["size"]))
            self.nodes[need("path")].set_attr("mtime_ns", None)
        elif name == "write-into-fifo":
            need("path")
            self.fifo_writes.setdefault(rel(a["path"]), []).append((int(a["seed"]), int(a["bytes"])))
        elif name == "touch":
            self.nodes[need("path")].set_attr("mtime_ns", None)
        elif name == "chmod":
            self.nodes[need("path")].set_attr("mode", int(a["mode"]))
        elif name == "chown":
            node = self.nodes[need("path")]
            node.set_attr("uid", int(a["uid"]))
            node.set_attr("gid", int(a["gid"]))
            # chown(2) clears set-user-ID, and set-group-ID when group-exec
            # is set, on a non-directory, even for root (since Linux 2.2.13)
            mode = node.known["mode"]
            if node.kind != "dir" and (mode is None or mode & 0o6000):
                kill = 0o4000 | (0o2000 if mode is not None and mode & 0o2010 == 0o2010 else 0)
                node.set_attr("mode", None if mode is None else mode & ~kill)
        elif name == "utime":
            self.nodes[need("path")].set_attr("mtime_ns", int(a["mtime"]) * 10**9)
        else:
            raise WorldError(name, "unknown op")

    def _need(self, op: str, path: str) -> int:
        ino = self.paths.get(rel(path))
        if ino is None:
            raise WorldError(op, f"{path} does not exist in the model")
        return ino


MARK = "crucible-workload"      # in every workload's argv (workload.py)


def pidstate(pid: int) -> Dict[str, Any]:
    """``{exists, state, workload}``; a zombie counts as not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]   # after the last ')': comm may hold spaces
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return {"exists": False, "state": None, "workload": False}
    return {"exists": state != "Z", "state": state, "workload": MARK.encode() in cmd}


def _main(argv: List[str]) -> int:
    import json
    if len(argv) >= 3 and argv[0] == "apply":
        # apply SPEC PHASE [--digest DIR] [--pid PID]: one command for the
        # steps, the image digest and whether the dumped PID still runs
        with open(argv[1]) as f:
            spec = json.load(f)
        opts = dict(zip(argv[3::2], argv[4::2]))
        out: Dict[str, Any] = {}
        if "--pid" in opts:
            out["pid"] = pidstate(int(opts["--pid"]))
        try:
            apply_phase(spec, argv[2])
        except WorldError as e:
            print(f"world: {e}", file=sys.stderr)
            return 1
        if "--digest" in opts:
            d = opts["--digest"]
            out["digest"] = digest_tree(d) if os.path.isdir(d) else None
        if "--witness" in opts:     # the workload's witness: its counter at its last tick
            try:
                with open(opts["--witness"], "rb") as f:
                    out["witness"] = int.from_bytes(f.read(8), "little")
            except OSError:
                out["witness"] = None
        print(json.dumps(out))
        return 0
    if len(argv) == 2 and argv[0] == "digest":
        print(json.dumps(digest_tree(argv[1]) if os.path.isdir(argv[1]) else None))
        return 0
    if len(argv) >= 2 and argv[0] == "exists":
        # the PATHs that are there (lexists: a dangling symlink is there),
        # one a line, as `ls -d` prints them: a forked script, where an
        # exec'd ls cost a reverted TCG guest ~0.1 s of ld.so and libc
        for path in argv[1:]:
            if os.path.lexists(path):
                print(path)
        return 0
    print("usage: world.py apply SPEC PHASE | digest DIR | exists PATH...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
