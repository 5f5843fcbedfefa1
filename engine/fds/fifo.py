"""Named fifos: reopened by path, same end and status flags, with the bytes
that were buffered put back.

A fifo's buffer lives in memory, attached to the inode while anyone has it
open (fs/pipe.c: fifo_open / put_pipe_info). So:

* nobody outside the dumped process holds it: the buffered bytes belong to
  the process alone; they are copied with tee(2) at dump (not consumed) and
  written back at restore before any end is handed out;
* another process holds it too and the buffer is EMPTY: restorable, the
  fifo is simply reopened by path (the peer keeps the same fifo);
* another process holds it and the buffer is NOT empty: the bytes belong to
  both (the peer's open keeps them alive in the kernel after the dump,
  and they could be read by either side), so neither putting them back
  (duplicated) nor not (lost) is exact: ``pipe-peer-outside``.

At restore the fifo must exist at the path as a fifo (``fifo-missing``); a
recreated fifo (new inode) is equivalent, since no data lives on disk. If
it already holds bytes written by someone else and we have bytes to put
back, the order of the two cannot be reproduced: ``pipe-peer-outside``.

A fifo unlinked before the dump (no name left, nlink 0) is a *ghost fifo*:
nobody can open it again but through /proc/PID/fd, so when no other process
holds it the process owns it entirely. It is recreated under its old name
and unlinked again (engine.unlinked: the fds read "<path> (deleted)"), with
its mode, owner and times, its bytes put back, and every end opened through
the keeper's /proc/self/fd link. Refused: another process holds it (the
restored one would get another fifo: ``pipe-peer-outside``), or it lost the
name it was opened by but another hard link is left (``fifo-missing``:
opening that link would need the old inode).

Opening an end alone blocks until a partner opens (fifo(7)); the restorer
first opens the fifo O_RDWR|O_NONBLOCK as a "keeper" (reader and writer at
once, never blocks on Linux), fills it, opens each end O_NONBLOCK, sets the
real status flags with F_SETFL, then closes the keeper.
"""

from __future__ import annotations

import os
import stat
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List

from .. import pidfd, unlinked
from . import _dups, _peers, _pipebuf, _sys
from ._dups import is_follower
from ._util import check_async, closed_on_error, end_of, failed, open_accmode, refuse, refuse_rec

KIND = "fifo"
REASONS = ("fifo-missing", "pipe-peer-outside", "unsupported-fd", "capability", "unsupported-state", "image-invalid")

_DELETED = " (deleted)"


def _ends(info, ctx) -> List:
    if not ctx.all_fds:
        return [info]
    lead = _dups.leaders(ctx)
    return sorted((i for i in ctx.all_fds.values()
                   if (i.dev, i.ino) == (info.dev, info.ino) and lead.get(i.fd, i.fd) == i.fd),
                  key=lambda i: i.fd)


def _state(info, ctx) -> dict:
    key = f"fifo-state:{info.dev}:{info.ino}"
    st = ctx.shared.get(key)
    if st is None:
        if info.link.endswith(_DELETED):
            outside = _peers.holders_unlinked(ctx, info.dev, info.ino)
        else:
            outside = _peers.holders(ctx, info.link, info.dev, info.ino)
        with pidfd.target_fd(info.pid, info.fd) as dup:
            st = {"queued": _sys.fionread(dup), "size": _pipebuf.pipe_size(dup), "outside": outside}
        ctx.shared[key] = st
    return st


def classify(info, ctx) -> str:
    """Raises fifo-missing (unlinked or replaced at its path),
    pipe-peer-outside (bytes shared with another process), unsupported-fd
    (O_ASYNC: unsupported-state; packet-mode data); EngineError on system errors."""
    path = info.link
    if path.endswith(_DELETED):
        return _classify_ghost(info, ctx)
    try:
        st = os.stat(path)
    except OSError as e:
        raise refuse(info, "fifo-missing", f"cannot stat {path}: {e.strerror}") from e
    if (st.st_dev, st.st_ino) != (info.dev, info.ino):
        raise refuse(info, "fifo-missing", f"{path} now names another file (inode {st.st_ino}, was {info.ino})")
    check_async(info, ctx)
    if info.flags & os.O_DIRECT:
        raise refuse(info, "unsupported-fd", "packet-mode (O_DIRECT) fifo")
    s = _state(info, ctx)
    why = _pipebuf.check_size(s["size"])      # what validate() would refuse at restore, refused now
    if why:
        raise refuse(info, "capability", why)
    if s["queued"] and s["outside"]:
        raise refuse(info, "pipe-peer-outside",
                     f"fifo holds {s['queued']} unread bytes and is also open in "
                     f"{_peers.describe(s['outside'])}: the bytes belong to both")
    also = f"; also open in {_peers.describe(s['outside'])}" if s["outside"] else ""
    return f"fifo {path} {end_of(info.flags)} end, {s['queued']} bytes buffered, buffer {s['size']}{also}"


def _classify_ghost(info, ctx) -> str:
    if info.nlink:
        raise refuse(info, "fifo-missing", f"the name it was opened by is gone and {info.nlink} other hard "
                     "link(s) name it; a recreated fifo would not be the one they open")
    check_async(info, ctx)
    if info.flags & os.O_DIRECT:
        raise refuse(info, "unsupported-fd", "packet-mode (O_DIRECT) fifo")
    s = _state(info, ctx)
    if s["outside"]:
        raise refuse(info, "pipe-peer-outside",
                     f"unlinked fifo is also open in {_peers.describe(s['outside'])}: a recreated fifo "
                     "would not be theirs")
    return (f"unlinked fifo {unlinked.original_path(info.link)} {end_of(info.flags)} end, "
            f"{s['queued']} bytes buffered, buffer {s['size']}: recreated and unlinked again at restore")


def dump(info, ctx) -> dict:
    """The record; buffered bytes go to fds/fifo-DEV-INO once per fifo."""
    s = _state(info, ctx)
    attrs = unlinked.attrs_of(os.stat(info.proc_path))    # before the bytes are copied out
    data = _pipebuf.save_once(info, ctx, f"fifo-data:{info.dev}:{info.ino}", f"fds/fifo-{info.dev}-{info.ino}",
                              s["queued"], lambda: _ends(info, ctx))
    rec = {"path": info.link, "fifo": f"{info.dev}:{info.ino}", "dev": info.dev, "ino": info.ino,
           "end": end_of(info.flags), "size": s["size"], "data": data,
           "data_len": s["queued"]}
    if info.link.endswith(_DELETED):
        rec["ghost"] = attrs
        rec["path"] = unlinked.original_path(info.link)
    return rec


def validate(rec: dict, ctx) -> None:
    """Raises fifo-missing (no fifo at the path), capability (buffer size)."""
    path = rec["path"]
    if rec.get("ghost"):
        why = unlinked.missing_parent(path)
        if why:
            raise refuse_rec(rec, ctx, "fifo-missing", f"cannot recreate the unlinked fifo {path}: {why}")
        why = _pipebuf.check_size(rec["size"])
        if why:
            raise refuse_rec(rec, ctx, "capability", why)
        return
    try:
        st = os.stat(path)
    except OSError as e:
        raise refuse_rec(rec, ctx, "fifo-missing", f"{path}: {e.strerror}") from e
    if not stat.S_ISFIFO(st.st_mode):
        raise refuse_rec(rec, ctx, "fifo-missing", f"{path} is no longer a fifo ({stat.filemode(st.st_mode)})")
    why = _pipebuf.check_size(rec["size"])
    if why:
        raise refuse_rec(rec, ctx, "capability", why)
    if rec.get("data"):
        ctx.image.path(rec["data"])


def _siblings(rec: dict, ctx) -> List[dict]:
    # In a process tree, the ends every member holds (engine/tree_restore.py):
    # counted over one member only, the keeper was closed after the first
    # member's ends, and the next member's open reused its fd number, which
    # the keeper's close then closed (EBADF, the tree lost after the dump).
    return [r for r in (getattr(ctx, "tree_records", None) or ctx.records or [rec])
            if r.get("kind", KIND) == KIND and r.get("fifo") == rec["fifo"] and not is_follower(r)]


def _keeper(rec: dict, ctx) -> dict:
    key = f"fifo:{rec['fifo']}"
    st = ctx.shared.get(key)
    if st is not None:
        return st
    path = rec["path"]
    names = {}
    if rec.get("ghost"):
        # one inode; each end shows the name it was opened by (hard links, all unlinked)
        paths = [path] + sorted({r["path"] for r in _siblings(rec, ctx)} - {path})
        names = unlinked.create_fifo(paths)
        keeper = names[path]
        # the other names' O_PATH fds: closed after the restore, error or not
        ctx.shared.setdefault("_close_after_restore", []).extend(fd for p, fd in names.items() if p != path)
    else:
        try:
            keeper = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise refuse_rec(rec, ctx, "fifo-missing", f"{path}: {e.strerror}") from e
    try:
        with closed_on_error(keeper):
            kst = os.fstat(keeper)
            if not stat.S_ISFIFO(kst.st_mode):
                raise refuse_rec(rec, ctx, "fifo-missing", f"{path} is no longer a fifo")
            data = ctx.image.read_bytes(rec["data"]) if rec.get("data") else b""
            present = _sys.fionread(keeper)
            if data and present:
                raise refuse_rec(rec, ctx, "pipe-peer-outside",
                                 f"{path} already holds {present} bytes written by another process; "
                                 f"the {len(data)} saved bytes cannot be put before them")
            _pipebuf.fill(keeper, rec["size"], data)
            if rec.get("ghost"):
                unlinked.apply_attrs(keeper, rec["ghost"])   # after the writes, which touch mtime
    except OSError as e:
        raise failed(rec, ctx, f"refilling fifo {path}", e) from e
    st = {"keeper": keeper, "dev": kst.st_dev, "ino": kst.st_ino, "left": len(_siblings(rec, ctx)),
          "names": names}
    ctx.shared[key] = st
    return st


def restore(rec: dict, ctx) -> int:
    """An fd on the fifo at rec["path"], same end and status flags.
    Raises fifo-missing / pipe-peer-outside refusals, EngineError."""
    st = _keeper(rec, ctx)
    path = rec["path"]
    # An unlinked fifo is reached through the keeper (same dentry, same name).
    where = f"/proc/self/fd/{st['names'][path]}" if rec.get("ghost") else path
    try:
        # O_NONBLOCK: the keeper is a reader and a writer, but be sure the
        # open can never block the restorer (fifo(7), open(2) ENXIO rule).
        fd = os.open(where, open_accmode(rec["end"]) | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise failed(rec, ctx, f"reopening fifo {path}", e) from e
    try:
        with closed_on_error(fd):
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st["dev"], st["ino"]):
                raise refuse_rec(rec, ctx, "fifo-missing", f"{path} was replaced during the restore")
            _sys.set_status_flags(fd, rec.get("flags", 0))
    except OSError as e:
        raise failed(rec, ctx, f"setting flags on fifo {path}", e) from e
    st["left"] -= 1
    if st["left"] <= 0 and st["keeper"] is not None:
        os.close(st["keeper"])
        st["keeper"] = None     # never closed twice: its number may be another fd's by then
    return fd
