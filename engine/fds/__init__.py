"""fd kinds: one module per kind, one classifier, deny by default.

Every fd of the target is described by an :class:`FdInfo` (gathered from
/proc while the target is frozen), classified into exactly one kind by
:func:`classify_kind`, and handed to that kind's module. A kind with no
module is refused with ``unsupported-fd`` naming fd, mode, kind and link text
(like CRIU's ``dump_unsupp_fd``): there is no silent fallback.

The handler protocol (each module in this package):

``KIND``       the stable kind name (a key of :data:`KINDS`)
``REASONS``    the reason codes it may raise (each in engine.reasons.REASONS)
``classify(fd: FdInfo, ctx: DumpContext) -> str``
               pre-flight, target frozen, nothing written, target untouched:
               raise :class:`engine.errors.Refusal` or return a one-line
               description for ``ckpt check`` ("regular /a at 4096 O_RDONLY").
``dump(fd: FdInfo, ctx: DumpContext) -> dict``
               the JSON-able record (the core adds fd, kind, flags, pos,
               cloexec, link); bulk data goes to ``ctx.image`` files.
               Called only when every classify() passed.
``validate(rec: dict, ctx: RestoreContext) -> None``
               restore pre-flight: raise Refusal; create nothing.
``restore(rec: dict, ctx: RestoreContext) -> int``
               open the file *in the restorer* and return that fd; the core
               installs it at ``rec["fd"]`` in the new process (dup3, with
               O_CLOEXEC when ``rec["cloexec"]``) and closes the restorer's
               copy. Kinds whose objects span fds (pipes, socketpairs) share
               state through ``ctx.shared``.
optional ``finish(rec: dict, ctx: RestoreContext, task) -> None``
               after every fd is installed in the new process: inject
               syscalls with ``task.syscall(nr, *args)`` for state keyed by
               the target's fd numbers (epoll targets, F_SETOWN, ...).
"""

from __future__ import annotations

import os
import stat
import sys
from ..plainclass import dataclass, field
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Optional

from .. import fstype
from ..errors import Refusal

# kind name -> module name in this package, or None: refused by name.
# Numbers are never reused; a kind without a module is refused as
# `unsupported-fd` (tests assert every kind here has a module or a refusal).
KINDS: Dict[str, Optional[str]] = {
    "regular": "regular",
    "directory": "directory",
    "ghost": "ghost",
    "device": "device",
    "fifo": "fifo",
    "pipe": "pipe",
    "socket": "socket",
    "inotify": "inotify",
    "fanotify": "fanotify",
    "eventfd": "eventfd",
    "timerfd": "timerfd",
    "signalfd": "signalfd",
    "epoll": "epoll",
    "pseudo": "pseudo",
    "procfile": "procfile",
    "tty": "tty",
    "symlink": "symlink",
    "pidfd": "pidfd",
    "unsupported": None,
}

_ANON = {
    "anon_inode:inotify": "inotify",
    "anon_inode:[fanotify]": "fanotify",
    "anon_inode:[eventfd]": "eventfd",
    "anon_inode:[timerfd]": "timerfd",
    "anon_inode:[signalfd]": "signalfd",
    "anon_inode:[eventpoll]": "epoll",
    "anon_inode:[pidfd]": "pidfd",      # pidfs too (6.9+) names it so
}


@dataclass
class FdInfo:
    """What /proc says about one fd of a frozen process."""

    pid: int
    fd: int
    link: str                      # readlink /proc/PID/fd/N
    mode: int                      # st_mode of the open file (stat follows the fd)
    dev: int
    ino: int
    nlink: int
    size: int
    rdev: int
    pos: int                       # fdinfo "pos"
    flags: int                     # fdinfo "flags" (octal there), includes O_CLOEXEC
    mnt_id: int
    fdinfo: Dict[str, str] = field(default_factory=dict)   # every "key: value" line, first wins
    fdinfo_text: str = ""          # the raw text, for kinds with repeated lines (inotify, epoll)
    stat: Optional[os.stat_result] = None
    fs_magic: Optional[int] = -1   # statfs f_type of the open file; -1: not read yet, None: unreadable
    owner: Optional[dict] = None   # F_SETOWN_EX owner and F_SETSIG signal when either is set (check._check_fds)

    @property
    def proc_path(self) -> str:
        """A path that opens the same file as this fd, even when deleted."""
        return f"/proc/{self.pid}/fd/{self.fd}"

    @property
    def cloexec(self) -> bool:
        return bool(self.flags & os.O_CLOEXEC)


def fs_magic(info: FdInfo) -> Optional[int]:
    """statfs f_type of the file the fd has open (read once, through the
    /proc/PID/fd magic link)."""
    if info.fs_magic == -1:
        info.fs_magic = fstype.magic(info.proc_path)
    return info.fs_magic


def classify_kind(info: FdInfo) -> str:
    """The one classifier: every fd gets exactly one kind name of KINDS.

    Files and directories are judged by their filesystem before their mode:
    a kernel pseudo filesystem (proc, sysfs, nsfs, cgroup, mqueue, ...) is
    "pseudo", a handle filesystem (pidfs, anon inodes) with no known anon
    kind is "unsupported", and only a link that is an absolute path reaches
    the regular/ghost/directory handlers (deny by default)."""
    m = info.mode
    kind = _ANON.get(info.link)
    if kind:
        return kind
    if stat.S_ISREG(m) or stat.S_ISDIR(m) or stat.S_ISLNK(m) or stat.S_IFMT(m) == 0:
        fs = fs_magic(info)
        if fs == fstype.PROC and stat.S_ISREG(m):
            from .procfile import eligible
            if eligible(info.link):
                return "procfile"
        if fstype.pseudo(fs):
            return "pseudo"
        if fstype.handle(fs) or not info.link.startswith("/"):
            return "unsupported"
    if stat.S_ISREG(m):
        if info.nlink == 0 or info.link.endswith(" (deleted)"):
            return "ghost"
        return "regular"
    if stat.S_ISDIR(m):
        return "directory"
    if stat.S_ISCHR(m) and _pty(info.rdev):
        return "tty"
    if stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return "device"
    if stat.S_ISFIFO(m):
        return "pipe" if info.link.startswith("pipe:[") else "fifo"
    if stat.S_ISSOCK(m):
        return "socket"
    if stat.S_ISLNK(m):
        return "symlink"          # held by an O_PATH | O_NOFOLLOW fd
    return "unsupported"


def _pty(rdev: int) -> bool:
    """A pty master (/dev/ptmx, 5:2) or slave (/dev/pts/N, majors 136-143),
    or /dev/tty (5:0: the controlling terminal, whatever it is)."""
    major = os.major(rdev)
    return (major, os.minor(rdev)) in ((5, 2), (5, 0)) or 136 <= major < 144


def describe_mode(mode: int) -> str:
    return f"{stat.filemode(mode)} ({oct(stat.S_IFMT(mode))})"


def unsupported(info: FdInfo, kind: str) -> Refusal:
    fs = info.fs_magic if info.fs_magic != -1 else None
    on = f", filesystem {fstype.name(fs)}" if fs is not None else ""
    return Refusal("unsupported-fd",
                   f"no handler for this kind of fd: kind {kind}, mode {describe_mode(info.mode)}, "
                   f"link {info.link}{on}", pid=info.pid, fd=info.fd, path=info.link)


def handler(kind: str):
    """The module handling `kind`, or None when the kind is refused."""
    modname = KINDS.get(kind)
    if modname is None:
        return None
    name = f"{__name__}.{modname}"
    try:
        __import__(name)    # importlib.import_module's work; importing importlib costs a run ~6 ms under TCG
    except ModuleNotFoundError as e:
        if e.name == name:
            return None     # declared but not built yet: deny by default
        raise
    return sys.modules[name]


def handler_for(info: FdInfo):
    """(kind, module) for an fd; raises the `unsupported-fd` refusal when the
    kind has no module."""
    kind = classify_kind(info)
    mod = handler(kind)
    if mod is None:
        raise unsupported(info, kind)
    return kind, mod
