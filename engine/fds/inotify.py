"""inotify: watches re-added on the same inodes (found again by path), with
the same masks and the SAME watch descriptors; pending events refused.

Dump: each watch is an fdinfo line (fs/notify/fdinfo.c inotify_fdinfo):
``inotify wd:%x ino:%lx sdev:%x mask:%x ignored_mask:%x fhandle-bytes:%x
fhandle-type:%x f_handle:%s`` (hex). The handle is opened with
open_by_handle_at(2) (CAP_DAC_READ_SEARCH) relative to a mount of that
filesystem, its path read back from /proc/self/fd and verified: the path
must stat to the same (dev, ino). A watched file deleted while the target
holds it open (a ghost fd, engine/fds/ghost.py) is saved as that fd
("fd_of", no path). Else ``inotify-unresolvable`` (e.g. a file kept only
by a mapping, or a disconnected dentry not reachable by any name).
Events queued and unread (FIONREAD on a pidfd_getfd duplicate) would be
lost: ``inotify-pending``.

Restore: the wd allocator is cyclic (fs/notify/inotify/inotify_user.c:
idr_alloc_cyclic), so, like CRIU, a watch is added, removed and re-added
until it gets its old number. Each removal queues an IN_IGNORED event; they
are drained before the fd is handed out, and any other event found there
(a watched file changed during the restore) fails the restore loudly
rather than dropping it. The path must still name the same inode (same
node) or a file of the same type (another node): else
``inotify-unresolvable``. The mask keeps IN_ONESHOT and IN_EXCL_UNLINK
(shown in fdinfo); IN_DONT_FOLLOW is added because the saved path names
the watched inode itself. An instance with an "fd_of" watch gets all its
watches in finish(), once the recreated file is the new process's fd:
through /proc/PID/fd/N (followed), then read back from fdinfo.
"""

from __future__ import annotations

import os
import re
import stat
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List

from .. import pidfd
from ..errors import EngineError
from . import _sys
from ._util import check_async, check_held_outside, closed_on_error, failed, refuse, refuse_rec

KIND = "inotify"
REASONS = ("inotify-pending", "inotify-unresolvable", "capability", "unsupported-fd", "unsupported-state")

IN_IGNORED = 0x8000
IN_DONT_FOLLOW = 0x02000000
IN_MASK_ADD = 0x20000000
MAX_BURN = 1 << 16          # wds to skip over at most, per instance

_LINE = re.compile(r"^inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) "
                   r"ignored_mask:([0-9a-f]+)(?: fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) "
                   r"f_handle:([0-9a-f]+))?", re.M)


def parse_watches(fdinfo_text: str) -> List[dict]:
    """The watches of an inotify fdinfo text (pure)."""
    out = []
    for m in _LINE.finditer(fdinfo_text):
        out.append({"wd": int(m.group(1), 16), "ino": int(m.group(2), 16),
                    "dev": _sys.kdev_to_dev(int(m.group(3), 16)), "mask": int(m.group(4), 16),
                    "handle_type": int(m.group(7), 16) if m.group(7) else None,
                    "handle": bytes.fromhex(m.group(8)) if m.group(8) else None})
    return out


def parse_mountinfo(text: str) -> Dict[int, str]:
    """st_dev -> a mount point of that filesystem, preferring mounts of its
    root (pure; proc(5) /proc/PID/mountinfo)."""
    out: Dict[int, str] = {}
    best: Dict[int, bool] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 5:
            continue
        major, minor = (int(x) for x in f[2].split(":"))
        dev = os.makedev(major, minor)
        is_root = f[3] == "/"
        mnt = f[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        if dev not in out or (is_root and not best[dev]):
            out[dev] = mnt
            best[dev] = is_root
    return out


def _held_ghost(info, w: dict, ctx) -> int:
    """The lowest fd of the target that holds the watched inode as a file
    with no name left (a ghost, recreated by engine/fds/ghost.py), or -1."""
    from . import classify_kind
    for fd, other in sorted((getattr(ctx, "all_fds", None) or {}).items()):
        if (other.dev, other.ino) == (w["dev"], w["ino"]) and stat.S_ISREG(other.mode):
            try:
                if classify_kind(other) == "ghost":
                    return fd
            except (OSError, ValueError):
                continue
    return -1


def _resolve(info, w: dict, mounts: Dict[int, str], ctx=None) -> str:
    if w["handle"] is None:
        raise refuse(info, "inotify-unresolvable", f"watch {w['wd']}: the kernel shows no file handle")
    mnt = mounts.get(w["dev"])
    if mnt is None:
        raise refuse(info, "inotify-unresolvable",
                     f"watch {w['wd']} (inode {w['ino']}): no mount of device {os.major(w['dev'])}:{os.minor(w['dev'])}")
    try:
        # Not O_PATH: open_by_handle_at takes the mount fd with fdget(), which
        # ignores O_PATH files (EBADF).
        mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise refuse(info, "inotify-unresolvable", f"watch {w['wd']}: cannot open mount {mnt}: {e.strerror}") from e
    try:
        hfd = _sys.open_by_handle_at(mfd, w["handle_type"], w["handle"], os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == 1:
            raise refuse(info, "capability",
                         "open_by_handle_at needs CAP_DAC_READ_SEARCH to resolve inotify watches") from e
        raise refuse(info, "inotify-unresolvable",
                     f"watch {w['wd']} (inode {w['ino']}): open_by_handle_at: {e.strerror}") from e
    finally:
        os.close(mfd)
    try:
        path = os.readlink(f"/proc/self/fd/{hfd}")
    finally:
        os.close(hfd)
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is None or (st.st_dev, st.st_ino) != (w["dev"], w["ino"]):
        held = _held_ghost(info, w, ctx)
        if held >= 0:
            # A file deleted while open, watched: the watch goes back on the
            # recreated file, through that fd (finish()).
            w["fd_of"] = held
            w["mode"] = stat.S_IFREG
            return None
        raise refuse(info, "inotify-unresolvable",
                     f"watch {w['wd']} (inode {w['ino']}) has no path naming it (kernel says {path!r}) and "
                     "is no file the process holds open")
    w["mode"] = stat.S_IFMT(st.st_mode)
    return path


def _watches(info, ctx=None) -> List[dict]:
    watches = parse_watches(info.fdinfo_text)
    if not watches:
        return []
    with open(f"/proc/{info.pid}/mountinfo") as f:
        mounts = parse_mountinfo(f.read())
    for w in watches:
        w["path"] = _resolve(info, w, mounts, ctx)
        if w["wd"] > MAX_BURN:
            raise refuse(info, "unsupported-fd", f"inotify wd {w['wd']} is too high to reproduce (> {MAX_BURN})")
    return sorted(watches, key=lambda w: w["wd"])


def _pending(info) -> int:
    with pidfd.target_fd(info.pid, info.fd) as dup:
        return _sys.fionread(dup)


def classify(info, ctx) -> str:
    """Raises inotify-pending, inotify-unresolvable, capability,
    unsupported-fd; EngineError on system errors."""
    check_async(info, ctx)
    check_held_outside(info, ctx, "inotify instance")
    n = _pending(info)
    if n:
        raise refuse(info, "inotify-pending", f"{n} bytes of unread events queued; restoring would drop them")
    watches = _watches(info, ctx)
    body = ", ".join(f"wd {w['wd']} {w['path'] or 'the deleted file at fd %d' % w['fd_of']} mask {w['mask']:#x}"
                     for w in watches)
    return f"inotify with {len(watches)} watches" + (f": {body}" if body else "")


def dump(info, ctx) -> dict:
    if _pending(info):
        raise refuse(info, "inotify-pending", "events arrived after the pre-flight")
    # A deleted file's watch has its fd, no path ("fd_of").
    return {"watches": [dict({"wd": w["wd"], "mask": w["mask"], "dev": w["dev"],
                              "ino": w["ino"], "mode": w["mode"], "handle_type": w["handle_type"],
                              "handle": w["handle"].hex()},
                             **({"fd_of": w["fd_of"]} if "fd_of" in w else {"path": w["path"]}))
                        for w in _watches(info, ctx)]}


def _check_path(rec: dict, ctx, w: dict) -> None:
    try:
        st = os.lstat(w["path"])
    except OSError as e:
        raise refuse_rec(rec, ctx, "inotify-unresolvable", f"watch {w['wd']} {w['path']}: {e.strerror}") from e
    if ctx.same_node:
        if (st.st_dev, st.st_ino) != (w["dev"], w["ino"]):
            raise refuse_rec(rec, ctx, "inotify-unresolvable",
                             f"watch {w['wd']}: {w['path']} is inode {st.st_ino} now, was {w['ino']}")
        # An inode number can be reused at once by a new file: the file
        # handle (with the inode generation) tells them apart.
        try:
            handle = _sys.name_to_handle_at(-100, w["path"])     # AT_FDCWD
        except OSError:
            handle = None
        if handle is not None and handle != (w["handle_type"], bytes.fromhex(w["handle"])):
            raise refuse_rec(rec, ctx, "inotify-unresolvable",
                             f"watch {w['wd']}: {w['path']} is a new file that reuses inode {st.st_ino}")
    elif stat.S_IFMT(st.st_mode) != w["mode"]:
        raise refuse_rec(rec, ctx, "inotify-unresolvable",
                         f"watch {w['wd']}: {w['path']} is not the same type of file any more")


def validate(rec: dict, ctx) -> None:
    """Raises inotify-unresolvable when a watched path changed;
    image-invalid when a watch of a deleted file names no ghost fd."""
    ghosts = {r["fd"] for r in ctx.records or [] if r.get("kind") == "ghost"}
    for w in rec["watches"]:
        if "fd_of" in w:
            if ctx.records is not None and w["fd_of"] not in ghosts:
                raise refuse_rec(rec, ctx, "image-invalid",
                                 f"watch {w['wd']}: fd {w['fd_of']} is no deleted file of the image")
            continue
        _check_path(rec, ctx, w)


def restore(rec: dict, ctx) -> int:
    """A new inotify instance with the same watches and wds. Raises
    inotify-unresolvable, EngineError."""
    try:
        fd = _sys.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise failed(rec, ctx, "inotify_init1", e) from e
    if any("fd_of" in w for w in rec["watches"]):
        return fd       # the watches go on once the deleted files are in the new process (finish)
    try:
        with closed_on_error(fd):
            burned = set()
            for w in rec["watches"]:
                _check_path(rec, ctx, w)
                _add(rec, ctx, fd, w, burned)
            _drain(rec, ctx, fd, burned)
            _sys.set_status_flags(fd, rec.get("flags", 0))
    except OSError as e:
        raise failed(rec, ctx, "re-adding inotify watches", e) from e
    return fd


def finish(rec: dict, ctx, task) -> None:
    """An instance watching a deleted file: every watch added here, in wd
    order, through a duplicate of the new process's instance; a deleted
    file's watch by the new process's fd for it (/proc/PID/fd/N, followed:
    the recreated file itself). Then read back from the new process's
    fdinfo: each wd with its mask on the inode it must watch."""
    if not any("fd_of" in w for w in rec["watches"]):
        return
    from .. import pidfd
    pid = getattr(task, "pid", None) or ctx.pid
    try:
        with pidfd.target_fd(pid, rec["fd"]) as fd:
            burned = set()
            for w in rec["watches"]:
                if "fd_of" in w:
                    _add(rec, ctx, fd, dict(w, path=f"/proc/{pid}/fd/{w['fd_of']}"), burned, follow=True)
                else:
                    _check_path(rec, ctx, w)
                    _add(rec, ctx, fd, w, burned)
            _drain(rec, ctx, fd, burned)
            _sys.set_status_flags(fd, rec.get("flags", 0))
        with open(f"/proc/{pid}/fdinfo/{rec['fd']}") as f:
            got = [(g["wd"], g["mask"], g["dev"], g["ino"]) for g in parse_watches(f.read())]
        want = []
        for w in rec["watches"]:
            st = os.stat(f"/proc/{pid}/fd/{w['fd_of']}" if "fd_of" in w else w["path"],
                         follow_symlinks="fd_of" in w)
            want.append((w["wd"], w["mask"] & ~IN_MASK_ADD, st.st_dev, st.st_ino))
    except OSError as e:
        raise failed(rec, ctx, "re-adding inotify watches", e) from e
    if sorted(got) != sorted(want):
        raise EngineError(f"fd {rec['fd']}: inotify watches read back as {sorted(got)}, not {sorted(want)}",
                          pid=pid)


def _add(rec: dict, ctx, fd: int, w: dict, burned: set, follow: bool = False) -> None:
    mask = (w["mask"] & ~IN_MASK_ADD) | (0 if follow else IN_DONT_FOLLOW)
    for _ in range(MAX_BURN + 1):
        wd = _sys.inotify_add_watch(fd, w["path"], mask)
        if wd == w["wd"]:
            return
        if wd > w["wd"]:
            raise EngineError(f"fd {rec['fd']}: inotify gave wd {wd}, past the wanted {w['wd']}", pid=ctx.pid)
        _sys.inotify_rm_watch(fd, wd)
        burned.add(wd)
    raise EngineError(f"fd {rec['fd']}: could not reach inotify wd {w['wd']}", pid=ctx.pid)


def _drain(rec: dict, ctx, fd: int, burned: set) -> None:
    while True:
        if not _sys.fionread(fd):       # finish() drains a duplicate that may be blocking
            return
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        for wd, mask, _cookie, name in _sys.inotify_events(data):
            if not (mask & IN_IGNORED and wd in burned):
                raise EngineError(f"fd {rec['fd']}: a watched file changed during the restore "
                                  f"(event {mask:#x} on wd {wd} {name!r}); retry", pid=ctx.pid)
