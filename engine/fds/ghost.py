"""Regular files with no name left: deleted while open, renamed-over, memfd.

The contents go into the image (holes stay holes) and the file is recreated
unlinked on the same filesystem (O_TMPFILE in its old directory), or as a
memfd with the same name and seals. A file that lost the name it was opened
by but still has another hard link is not a ghost: it is reopened through
the surviving link once that link is shown to be the same inode, then given
back the name it was opened by, unlinked again (engine/unlinked.py), so that
/proc shows "<lost name> (deleted)" as before.
"""

from __future__ import annotations

import os

from .. import files, unlinked
from ..errors import EngineError, Refusal
from . import regular

KIND = "ghost"
REASONS = ("file-lock", "unlinked-too-large", "unlinked-unrestorable", "file-missing", "file-changed", "unsupported-state",
           "image-invalid", "memory-peer-outside")


def _alias(info):
    return files._surviving_link(info.proc_path, os.stat(info.proc_path))


def _data_bytes(info) -> int:
    fd = os.open(info.proc_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sum(n for _, n in files._extents(fd, info.size))
    finally:
        os.close(fd)


def _alone(info, ctx, what: str) -> None:
    """Refuses (memory-peer-outside, naming it) a memfd or deleted file that
    a process outside the dump holds open or maps too: the restore makes a
    new file from the image's copy, and that process would go on reading
    and writing the old one, unseen. By inode, not open file: two opens of
    one file share its data."""
    if ctx is None or info.pid == os.getpid():
        return      # a file in flight, peeked by ckpt: _inflight decides who else holds it
    from . import _peers
    held = [(p, f) for p, f in _peers.holders_unlinked(ctx, info.dev, info.ino) if p != os.getpid()]
    mapped = [p for p in _peers.mappers_unlinked(ctx, info.dev, info.ino) if p not in {h for h, _ in held}]
    if held or mapped:
        who = ", ".join(filter(None, [_peers.describe(held), ", ".join(f"pid {p} (mapped)" for p in mapped[:3])]))
        raise Refusal("memory-peer-outside", f"{what} {info.link} is also held by {who}, outside the dump: a "
                      f"restore makes a new {what} from the image, that process would keep the old one",
                      pid=info.pid, fd=info.fd, path=info.link)


def classify(info, ctx) -> str:
    regular.preflight(info, info.link)
    memfd = info.link.startswith(files.MEMFD_PREFIX)
    if info.nlink > 0 and not memfd:
        alias = _alias(info)
        if alias is None:
            raise Refusal("file-missing", f"the name it was opened by is gone and its {info.nlink} other "
                          "hard link(s) could not be found", pid=info.pid, fd=info.fd, path=info.link)
        files.check_recreatable(info.link, fd=info.fd, pid=info.pid)
        return f"regular {alias} (reached through a surviving hard link) at {info.pos}"
    if not memfd:
        files.check_recreatable(info.link, fd=info.fd, pid=info.pid)
    _alone(info, ctx, "memfd" if memfd else "deleted file")
    data = _data_bytes(info)
    if data > ctx.options.ghost_limit:
        raise Refusal("unlinked-too-large", f"deleted file holds {data} bytes of data (size {info.size}), "
                      f"over the ghost limit {ctx.options.ghost_limit}; raise it with --ghost-limit",
                      pid=info.pid, fd=info.fd, path=info.link)
    what = "memfd" if memfd else "deleted file"
    return f"{what} {info.link} kept in the image: {data} bytes of data, size {info.size}, at {info.pos}"


def dump(info, ctx) -> dict:
    memfd = info.link.startswith(files.MEMFD_PREFIX)
    if info.nlink > 0 and not memfd:
        alias = _alias(info)
        if alias is None:
            raise Refusal("file-missing", "the surviving hard link vanished during the dump",
                          pid=info.pid, fd=info.fd, path=info.link)
        return {"file": files.record_identity(alias, info.proc_path, ctx, fd=info.fd, pid=info.pid),
                "lost_name": unlinked.original_path(info.link)}
    return {"ghost": files.dump_ghost(info.proc_path, info.link, ctx, fd=info.fd, pid=info.pid)}


def validate(rec: dict, ctx) -> None:
    if "file" in rec:
        why = unlinked.missing_parent(rec["lost_name"]) if isinstance(rec.get("lost_name"), str) else None
        if why:
            raise Refusal("file-missing", f"cannot give it back the name it was opened by: {why}",
                          fd=rec.get("fd"), pid=ctx.pid, path=rec["lost_name"])
        return regular.validate(rec, ctx)
    if not isinstance(rec.get("ghost"), dict):
        raise Refusal("image-invalid", "ghost record holds no file", fd=rec.get("fd"))
    files.validate_ghost(rec["ghost"], ctx, fd=rec.get("fd"), pid=ctx.pid)


def restore(rec: dict, ctx) -> int:
    if "file" in rec:
        fd = regular.open_checked(rec, ctx)
        if not isinstance(rec.get("lost_name"), str):
            return fd
        try:
            return _under_lost_name(fd, rec)
        finally:
            os.close(fd)
    fd = files.writer_file(rec["ghost"], ctx, rec["flags"])
    if fd is None:
        fd = files.reopen(files.restore_ghost(rec["ghost"], ctx), rec["flags"])
    if rec.get("pos"):
        os.lseek(fd, rec["pos"], os.SEEK_SET)
    return fd


def _under_lost_name(fd: int, rec: dict) -> int:
    """A new open of the file behind `fd` (reached through a surviving
    link) whose dentry is the name it was opened by, unlinked again."""
    name = rec["lost_name"]
    tmp = unlinked._tmp_in(name)
    try:
        os.link(rec["file"]["path"], tmp, follow_symlinks=False)
        nfd = os.open(tmp, (rec["flags"] & ~files.OPEN_ONLY) | os.O_CLOEXEC)   # O_NOFOLLOW would show in F_GETFL
    except OSError as e:
        unlinked._drop_name(tmp, False)
        raise EngineError(f"cannot give {rec['file']['path']} back its lost name {name}: {e.strerror}",
                          errno=e.errno) from e
    try:
        was, now = os.fstat(fd), os.fstat(nfd)
        if (was.st_dev, was.st_ino) != (now.st_dev, now.st_ino):
            raise Refusal("file-changed", f"{rec['file']['path']} changed while it was being relinked",
                          fd=rec.get("fd"), path=name)
        unlinked.bury(tmp, name, nfd, False)
        if rec.get("pos"):
            os.lseek(nfd, rec["pos"], os.SEEK_SET)
    except BaseException:
        unlinked._drop_name(tmp, False)
        os.close(nfd)
        raise
    return nfd
