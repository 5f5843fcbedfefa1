"""Unlinked inodes brought back under their exact names: deleted files,
fifos, device nodes and directories.

The name /proc/PID/fd, /proc/PID/maps and /proc/PID/cwd show for an
unlinked inode is the name its dentry had in its directory when it lost it,
followed by " (deleted)" (fs/d_path.c). O_TMPFILE makes "/dir/#<ino>
(deleted)", so a recreated node must really have had the name. Here it is
created under a temporary name in the original directory, opened, then
moved onto the original name and removed again (:func:`bury`):

* the original path is free: ``renameat2(tmp, path, RENAME_NOREPLACE)``,
  then unlink (rmdir) ``path``;
* the path is taken now (a rotated log, a file renamed over the old one, a
  re-created fifo): ``renameat2(RENAME_EXCHANGE)`` swaps the two names in
  one step, then ``rename(tmp, path)`` puts the other file back over ours.
  Ours is the victim of a rename-over, exactly as the original was: its
  dentry is dropped and keeps the name. The path never goes missing; for a
  few microseconds it names our node, and the other file's ctime changes.
  When one of the two is a directory (a directory cannot be renamed over a
  non-directory), ours is removed at ``path`` and the other renamed back
  with RENAME_NOREPLACE: the path is missing for that moment.

An inode that was known by several names (hard links, all unlinked; each
fd shows the name it was opened by) gets each name as a hard link of the
first temporary one before any is buried: an inode with nlink 0 cannot be
linked again.

No file of the user's is ever replaced or lost: each step is one atomic
rename, a failure puts the other file back. CRIU links a ghost under its
original name when it is free and otherwise opens "<path>.cr_link" (its
comment: "strictly speaking, this is cheating"); it opens ghost
directories under their remap name.

Attributes are put back on the unlinked inode, after any content (a write
or chown clears set-user/group-ID): chown, then chmod with all 12 bits,
then atime/mtime. ctime cannot be set by anyone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Tuple

from .errors import EngineError

DELETED = " (deleted)"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


def original_path(link: str) -> str:
    return link[:-len(DELETED)] if link.endswith(DELETED) else link


def parent_of(path: str) -> str:
    return os.path.dirname(path) or "/"


def is_unlinked(link: str, st: os.stat_result) -> bool:
    """The kernel's name ends in " (deleted)" and no other name is left."""
    return link.endswith(DELETED) and st.st_nlink == 0


def missing_parent(path: str) -> Optional[str]:
    """Why a node cannot be recreated under `path` (its directory is gone),
    or None."""
    parent = parent_of(path)
    if not os.path.isdir(parent):
        return f"its directory {parent} is gone"
    return None


# -- attributes ----------------------------------------------------------------

def attrs_of(st: os.stat_result) -> dict:
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
            "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns}


def apply_attrs(fd: int, rec: dict) -> None:
    """Owner, then all 12 mode bits, then atime/mtime, on the inode behind
    `fd` (any fd, O_PATH too: through its /proc/self/fd link)."""
    path = f"/proc/self/fd/{fd}"
    os.chown(path, rec.get("uid", 0), rec.get("gid", 0))
    os.chmod(path, stat.S_IMODE(rec["mode"]))
    mtime = rec["mtime_ns"]
    os.utime(path, ns=(rec.get("atime_ns", mtime), mtime))


# -- creating under the exact name -----------------------------------------------

def _remove(path: str, is_dir: bool) -> None:
    (os.rmdir if is_dir else os.unlink)(path)


def _same(path: str, st: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _swap_in(tmp: str, path: str, mine: os.stat_result, is_dir: bool) -> None:
    """`path` is taken by another file: leave our node unlinked under the
    name `path` and the other file where it was."""
    other = os.lstat(path)
    renameat2(tmp, path, RENAME_EXCHANGE)           # ours at path, theirs at tmp
    try:
        if not _same(tmp, other) or not _same(path, mine):
            raise EngineError(f"{path} changed while a deleted file was being recreated there")
        if not is_dir and not stat.S_ISDIR(other.st_mode):
            os.rename(tmp, path)                    # theirs back, over ours
        else:
            _remove(path, is_dir)
            renameat2(tmp, path, RENAME_NOREPLACE)
    except BaseException:
        # Whatever failed, the other file goes back to its name.
        if _same(tmp, other):
            if _same(path, mine):
                renameat2(tmp, path, RENAME_EXCHANGE)
                _remove(tmp, is_dir)
            else:
                renameat2(tmp, path, RENAME_NOREPLACE)
        raise


def bury(tmp: str, path: str, fd: int, is_dir: bool) -> None:
    """Give the node at `tmp` (open as `fd`) the name `path`, then take it
    away, so that `fd` reads "<path> (deleted)"."""
    mine = os.fstat(fd)
    try:
        renameat2(tmp, path, RENAME_NOREPLACE)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        _swap_in(tmp, path, mine, is_dir)
        return
    if not _same(path, mine):
        raise EngineError(f"{path} changed while a deleted file was being recreated there")
    _remove(path, is_dir)


def _tmp_in(path: str) -> str:
    return os.path.join(parent_of(path), f".ckpt-ghost-{os.getpid()}-{os.urandom(6).hex()}")


def _drop_name(tmp: str, is_dir: bool) -> None:
    """Remove a temporary name of ours (a random name: nobody else's)."""
    try:
        _remove(tmp, is_dir)
    except OSError:
        pass


def create_many(paths: List[str], make: Callable[[str], int], is_dir: bool = False) -> Dict[str, int]:
    """Recreate an unlinked node that was known by each of `paths` (one
    path, or several hard links that were all unlinked: each fd shows the
    name it was opened by). ``make(tmp)`` creates the node at a temporary
    name next to ``paths[0]`` and returns an fd opened on it; the other
    names are hard links to it, opened O_PATH. Every name is then buried
    (see module doc). Returns {path: fd}, the first one make()'s; each reads
    "<path> (deleted)". Raises EngineError."""
    made: Dict[str, Tuple[str, int]] = {}
    first = paths[0]
    try:
        tmp = _tmp_in(first)
        try:
            made[first] = (tmp, make(tmp))
        except OSError as e:
            _drop_name(tmp, is_dir)     # made but not opened
            raise EngineError(f"cannot recreate deleted {first} in {parent_of(first)}: {e.strerror}",
                              errno=e.errno) from e
        for path in paths[1:]:
            alias = _tmp_in(path)
            try:
                os.link(tmp, alias)
                made[path] = (alias, os.open(alias, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
            except OSError as e:
                _drop_name(alias, is_dir)
                raise EngineError(f"cannot recreate {path}, another name of deleted {first}: {e.strerror}",
                                  errno=e.errno) from e
        for path, (tmp_name, fd) in made.items():
            try:
                bury(tmp_name, path, fd, is_dir)
            except OSError as e:
                raise EngineError(f"cannot give the recreated deleted file its name {path}: {e.strerror}",
                                  errno=e.errno) from e
    except BaseException:
        for tmp_name, fd in made.values():
            try:
                if os.path.lexists(tmp_name) and _same(tmp_name, os.fstat(fd)):
                    _remove(tmp_name, is_dir)
            finally:
                os.close(fd)
        raise
    return {path: fd for path, (_, fd) in made.items()}


def create(path: str, make: Callable[[str], int], is_dir: bool = False) -> int:
    """create_many() with one name; returns make()'s fd."""
    return create_many([path], make, is_dir)[path]


def create_file(paths: List[str]) -> Dict[str, int]:
    """An empty regular file, unlinked, named each of `paths`; the first
    fd O_RDWR, the others O_PATH."""
    return create_many(paths, lambda tmp: os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                                   | os.O_CLOEXEC, 0o600))


def create_fifo(paths: List[str]) -> Dict[str, int]:
    """A fifo, unlinked, named each of `paths`; the first fd opened
    O_RDWR|O_NONBLOCK (never blocks on Linux: it is its own reader and
    writer), the others O_PATH."""
    def make(tmp: str) -> int:
        os.mkfifo(tmp, 0o600)
        return os.open(tmp, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    return create_many(paths, make)


def create_device(paths: List[str], mode: int, rdev: int) -> Dict[str, int]:
    """A device node, unlinked, named each of `paths`; O_PATH fds (no
    driver open)."""
    def make(tmp: str) -> int:
        os.mknod(tmp, stat.S_IFMT(mode) | 0o600, rdev)
        return os.open(tmp, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    return create_many(paths, make)


def create_dir(path: str) -> int:
    """An empty directory, removed, named `path`; O_RDONLY|O_DIRECTORY."""
    def make(tmp: str) -> int:
        os.mkdir(tmp, 0o700)
        return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    return create(path, make, is_dir=True)


def reopen(fd: int, flags: int) -> int:
    """A new open file description with `flags` on the node behind `fd`,
    through /proc/self/fd: same dentry, so the same "(deleted)" name."""
    keep = flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC)
    return os.open(f"/proc/self/fd/{fd}", keep | os.O_CLOEXEC)


# -- shared per restore (an fd and the cwd on one removed directory) ------------

def dir_record(link: str, st: os.stat_result) -> dict:
    return {"ghost": f"d{st.st_dev}-{st.st_ino}", "path": original_path(link), **attrs_of(st)}


def restore_dir(rec: dict, ctx) -> int:
    """The recreated removed directory of `rec` (a :func:`dir_record`), once
    per restore; the fd belongs to ctx.shared (closed after the restore)."""
    key = f"ghostdir:{rec['ghost']}"
    fd = ctx.shared.get(key)
    if fd is None:
        fd = create_dir(rec["path"])
        try:
            apply_attrs(fd, rec)
        except OSError as e:
            os.close(fd)
            raise EngineError(f"cannot set the attributes of removed directory {rec['path']}: {e.strerror}",
                              errno=e.errno) from e
        ctx.shared[key] = fd
        ctx.shared.setdefault("_close_after_restore", []).append(fd)
    return fd
