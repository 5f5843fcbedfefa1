"""Anonymous pipes (``pipe:[INODE]``).

Restorable when every fd on the pipe is in the dumped process: the pipe is
recreated with the same buffer size (F_GETPIPE_SZ) and the buffered bytes,
copied at dump with tee(2) (never consumed). The ends that existed come
back (one open file description each; dup'ed fds are the core's job, see
_dups.py) and the ends that did not exist are closed, so a lone write end
still gets EPIPE and a lone read end still reads its data, then EOF.

Any fd on the pipe held by another process: ``pipe-peer-outside``, naming
the inode and the holders (from a /proc/*/fd scan): the peer would keep
talking to the old pipe.
"""

from __future__ import annotations

import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List

from .. import pidfd
from . import _dups, _peers, _pipebuf, _sys
from ._util import check_async, end_of, failed, open_accmode, refuse, refuse_rec
from ._dups import is_follower

KIND = "pipe"
REASONS = ("pipe-peer-outside", "unsupported-fd", "capability", "unsupported-state", "image-invalid")


def _inode(info) -> int:
    return int(info.link[len("pipe:["):-1])


def _same_pipe(info, ctx) -> List:
    """This process's fds on the same pipe, one per open file description."""
    if not ctx.all_fds:
        return [info]
    lead = _dups.leaders(ctx)
    return sorted((i for i in ctx.all_fds.values()
                   if i.link == info.link and lead.get(i.fd, i.fd) == i.fd), key=lambda i: i.fd)


def _end_name(pid: int, fd: int) -> str:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return {"r": "read end", "w": "write end"}.get(end_of(int(line.split()[1], 8)), "read-write")
    except OSError:
        pass
    return "end unknown"


def _state(info, ctx) -> dict:
    """Buffered byte count and buffer size, read from a duplicate."""
    key = f"pipe-state:{_inode(info)}"
    st = ctx.shared.get(key)
    if st is None:
        with pidfd.target_fd(info.pid, info.fd) as dup:
            st = {"queued": _sys.fionread(dup), "size": _pipebuf.pipe_size(dup)}
        ctx.shared[key] = st
    return st


def classify(info, ctx) -> str:
    """Raises pipe-peer-outside, or unsupported-fd (O_ASYNC: unsupported-state; packet-mode
    data), or EngineError when the fd cannot be inspected."""
    ino = _inode(info)
    outside = _peers.holders(ctx, info.link, info.dev, info.ino)
    if outside:
        who = ", ".join(f"pid {p} fd {f} ({_end_name(p, f)})" for p, f in outside[:3])
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise refuse(info, "pipe-peer-outside", f"pipe inode {ino} is also held by {who}{more}")
    check_async(info, ctx)
    st = _state(info, ctx)
    why = _pipebuf.check_size(st["size"])     # what validate() would refuse at restore, refused now
    if why:
        raise refuse(info, "capability", why)
    ends = _same_pipe(info, ctx)
    if st["queued"] and any(e.flags & os.O_DIRECT for e in ends):
        raise refuse(info, "unsupported-fd",
                     f"packet-mode pipe (O_DIRECT) with {st['queued']} bytes queued: packet boundaries cannot be copied")
    here = ", ".join(f"fd {e.fd} {end_of(e.flags)}" for e in ends)
    return (f"pipe inode {ino} {end_of(info.flags)} end, {st['queued']} bytes buffered, "
            f"buffer {st['size']}; ends here: {here}")


def dump(info, ctx) -> dict:
    """The record; the buffered bytes (if any) go to fds/pipe-INODE once per
    pipe. Raises Refusal/EngineError as classify."""
    ino = _inode(info)
    st = _state(info, ctx)
    data = _pipebuf.save_once(info, ctx, f"pipe-data:{ino}", f"fds/pipe-{ino}", st["queued"],
                              lambda: _same_pipe(info, ctx))
    return {"pipe": ino, "end": end_of(info.flags), "size": st["size"],
            "data": data, "data_len": st["queued"],
            "packet": bool(info.flags & os.O_DIRECT)}


def _siblings(rec: dict, ctx) -> List[dict]:
    # In a process tree, the ends held by every member (engine/tree_restore.py).
    return [r for r in (getattr(ctx, "tree_records", None) or ctx.records or [rec])
            if r.get("kind", KIND) == KIND and r.get("pipe") == rec["pipe"] and not is_follower(r)]


def validate(rec: dict, ctx) -> None:
    """Raises capability (buffer size above pipe-max-size) or image-invalid
    (data file missing from the image)."""
    why = _pipebuf.check_size(rec["size"])
    if why:
        raise refuse_rec(rec, ctx, "capability", why)
    if rec.get("data"):
        ctx.image.path(rec["data"])


def restore(rec: dict, ctx) -> int:
    """An fd on the recreated pipe, with the record's end and status flags.
    Raises EngineError on system errors."""
    key = f"pipe:{rec['pipe']}"
    st = ctx.shared.get(key)
    try:
        if st is None:
            sibs = _siblings(rec, ctx)
            packet = os.O_DIRECT if any(r.get("packet") for r in sibs) else 0
            r, w = os.pipe2(os.O_CLOEXEC | packet)
            st = {"r": r, "w": w, "left": len(sibs), "used": set()}
            ctx.shared[key] = st
            data = ctx.image.read_bytes(rec["data"]) if rec.get("data") else b""
            _pipebuf.fill(w, rec["size"], data)
        end = rec["end"]
        if end in ("r", "w") and end not in st["used"]:
            # The pipe's own end: a dup shares its open file description,
            # and our copy is closed when the last end is handed out.
            fd = os.dup(st[end])
            st["used"].add(end)
        else:
            # A second open file description on the pipe (possible only via
            # open("/proc/PID/fd/N")): make it the same way. We hold both
            # ends, so an O_RDONLY/O_WRONLY open cannot block (fifo_open).
            fd = os.open(f"/proc/self/fd/{st['r']}", open_accmode(end) | os.O_CLOEXEC)
        _sys.set_status_flags(fd, rec.get("flags", 0))
    except OSError as e:
        raise failed(rec, ctx, "recreating the pipe", e) from e
    st["left"] -= 1
    if st["left"] <= 0:
        _sys.close_all((st["r"], st["w"]))
    return fd
