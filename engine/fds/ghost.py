"""Regular files with no name left: deleted while open, renamed-over, memfd.

The contents go into the image (holes stay holes) and the file is recreated
unlinked on the same filesystem (O_TMPFILE in its old directory), or as a
memfd with the same name and seals. A file that lost the name it was opened
by but still has another hard link is not a ghost: it is reopened through
the surviving link once that link is shown to be the same inode.
"""

from __future__ import annotations

import os

from .. import files
from ..errors import Refusal
from . import regular

KIND = "ghost"
REASONS = ("unlinked-too-large", "unlinked-unrestorable", "file-missing", "file-changed", "unsupported-state",
           "image-invalid")


def _alias(info):
    return files._surviving_link(info.proc_path, os.stat(info.proc_path))


def _data_bytes(info) -> int:
    fd = os.open(info.proc_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sum(n for _, n in files._extents(fd, info.size))
    finally:
        os.close(fd)


def classify(info, ctx) -> str:
    regular.preflight(info, info.link)
    memfd = info.link.startswith(files.MEMFD_PREFIX)
    if info.nlink > 0 and not memfd:
        alias = _alias(info)
        if alias is None:
            raise Refusal("file-missing", f"the name it was opened by is gone and its {info.nlink} other "
                          "hard link(s) could not be found", pid=info.pid, fd=info.fd, path=info.link)
        return f"regular {alias} (reached through a surviving hard link) at {info.pos}"
    if not memfd:
        files.check_recreatable(info.link, fd=info.fd, pid=info.pid)
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
        return {"file": files.record_identity(alias, info.proc_path, ctx, fd=info.fd, pid=info.pid)}
    return {"ghost": files.dump_ghost(info.proc_path, info.link, ctx, fd=info.fd, pid=info.pid)}


def validate(rec: dict, ctx) -> None:
    if "file" in rec:
        return regular.validate(rec, ctx)
    if not isinstance(rec.get("ghost"), dict):
        raise Refusal("image-invalid", "ghost record holds no file", fd=rec.get("fd"))
    files.validate_ghost(rec["ghost"], ctx, fd=rec.get("fd"), pid=ctx.pid)


def restore(rec: dict, ctx) -> int:
    if "file" in rec:
        return regular.open_checked(rec, ctx)
    gfd = files.restore_ghost(rec["ghost"], ctx)
    fd = files.reopen(gfd, rec["flags"])
    if rec.get("pos"):
        os.lseek(fd, rec["pos"], os.SEEK_SET)
    return fd
