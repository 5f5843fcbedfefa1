"""Unix datagram sockets bound to a name (a path, also one unlinked since
bind - a ghost socket - or an abstract name), not connected, held by the
process only, with an empty receive queue; and, sub-kind "unix-unconn",
every other unix socket that is neither connected nor listening: a stream
or seqpacket socket made by socket(), bound or not (CRIU's zdtm
sk-unix-unconn, sk-unix-rel, sock_opts00), an unbound datagram socket.

At dump: sock_diag gives the name, the bound file's inode (UNIX_DIAG_VFS)
and the shutdown bits; the queue must be empty: a peek with peeking at an
offset turned off always returns the head of the queue, even a zero-length
datagram already peeked (net/core/datagram.c __skb_try_recv_from_queue), so
"nothing to peek" is exact. A path-bound socket whose path no longer leads
to its inode was unlinked (or replaced) since: a ghost, recorded as such.

At restore: socket, options, bind to the same name (a stale socket file
left at the path is removed first, as for listeners); a ghost is bound to
its path - whose directory must exist and where nothing may be now - and
the file unlinked again, so getsockname names it and no path leads to it;
the file's mode and owner are put back; everything read back.

The shutdown bits (UNIX_DIAG_SHUTDOWN; unix_shutdown sets them on an
unconnected socket too) are set again after the bind and read back.

Messages queued on a bound datagram socket are restored when they all came
from one socket of the dump connected to it (zdtm socket_dgram_data): it
is then the only unix socket of the namespace with anything charged to it
and its charge is exactly what the peeked messages cost (_queued); the
sender, built once this socket is bound, sends them again
(_unixnamed.fill_bound). Refused (`socket`): every other queue (a
datagram's sender may be a socket whose address and charge cannot be
reproduced exactly: a message hidden from peeking could not even be
counted).
"""

from __future__ import annotations

import errno as _errno
import os
import socket as _socket
import stat
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Optional

from .. import netdiag
from ..errors import Refusal
from . import _sockopts, _sys
from ._sockbase import (UNIX_TYPES, building, check_options, dup_of, fresh_options, inode_of, options,
                        outside_holders, same_root, shut_down, unix_diag as _diag)
from ._unixlisten import _bind, _in_use, _name_text, absolute_bound_path
from ._util import refuse, refuse_rec, with_status_flags


def _queue_empty(fd: int) -> bool:
    s = _socket.socket(fileno=os.dup(fd))
    try:
        prev = s.getsockopt(_socket.SOL_SOCKET, 42)          # SO_PEEK_OFF
        try:
            s.setsockopt(_socket.SOL_SOCKET, 42, -1)
            s.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
            return False
        except BlockingIOError:
            return True
        finally:
            s.setsockopt(_socket.SOL_SOCKET, 42, prev)
    finally:
        s.close()


def classify(info, ctx, q: dict) -> dict:
    """The dump record of an unconnected unix socket (a bound datagram one:
    "unix-dgram"; any other: "unix-unconn"); raises `socket`."""
    ino = inode_of(info.link)
    key = f"unix-dgram:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    typ = q["type"]
    d = _diag(info, ino)
    name = d["name"] or b""
    head = _head(typ, name)
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    queue = None
    with dup_of(info) as mine:
        if typ == _socket.SOCK_DGRAM and not _queue_empty(mine):
            queue = _queued(info, ctx, ino, d, name, head, mine)
        opts = options(info, ctx, _socket.AF_UNIX, typ, 0, mine)
    rec: dict = {"sock": "unix-dgram" if typ == _socket.SOCK_DGRAM and name else "unix-unconn", "type": typ,
                 "inode": ino, "name": name.hex(), "abstract": name[:1] == b"\0",
                 "file": None, "ghost": False, "shutdown": d["shutdown"]}
    if name and not rec["abstract"]:
        path = name.split(b"\0", 1)[0]
        path, base = absolute_bound_path(info, path, head)   # (checked below: leads to the bound inode, unless a ghost)
        if not same_root(info.pid):
            raise refuse(info, "socket", f"{head}: the process has another root directory")
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISSOCK(st.st_mode) and d["vfs"] == (st.st_dev, st.st_ino):
            rec["file"] = {"path": os.fsdecode(path), "base": base, "mode": stat.S_IMODE(st.st_mode),
                           "uid": st.st_uid, "gid": st.st_gid}
        else:
            # Unlinked since bind: a ghost. Its file's mode cannot be read any
            # more (nothing leads to the inode); it was made with the umask.
            if st is not None:
                raise refuse(info, "socket", f"{head}: unlinked since bind and the path now names another file")
            if not os.path.isdir(os.path.dirname(path) or b"/"):
                raise refuse(info, "socket", f"{head}: unlinked since bind, and its directory is gone")
            rec["ghost"] = True
            rec["file"] = {"path": os.fsdecode(path), "base": base}
    fresh = fresh_options(ctx, _socket.AF_UNIX, typ, 0)
    try:
        rec["set"] = check_options(info, opts, fresh)
    except Refusal as e:
        raise refuse(info, "socket", f"{head}: {e.detail}") from None
    rec["opts"] = opts
    if queue is not None:
        if rec["ghost"]:
            raise refuse(info, "socket", f"{head}: messages queued in a ghost socket")
        rec.update(queue)
    ctx.shared[key] = rec
    return rec


def _queued(info, ctx, ino: int, d: dict, name: bytes, head: str, mine: int) -> dict:
    """The queue of a bound datagram socket whose messages all came from one
    socket of the dump connected to it: the only unix socket of the
    namespace with anything charged to it (each queued message is charged
    to its sender until read: a message from any other sender, even one
    closed since, would show as a charge elsewhere or as a queue the
    sender's charge does not account for). Raises `socket`."""
    from . import _unixpair
    from ._sockbase import held_here
    why = f"{head}: messages queued (their senders' addresses and charges cannot be reproduced exactly)"
    if not name:
        raise refuse(info, "socket", why)
    try:
        # (a datagram can only come from a datagram socket: unix_find_other
        # matches the type)
        charged = [s for s in netdiag.unix_sockets() if s["wqueue"] and s["type"] == _socket.SOCK_DGRAM]
    except OSError as e:
        raise refuse(info, "socket", f"{why}: sock_diag cannot list the senders ({e.strerror})") from e
    if not charged:
        raise refuse(info, "socket", f"{why}: no open socket is charged for them (their sender closed)")
    if len(charged) > 1:
        # (what else runs decides this one: tools/zdtm.py CHARGED)
        raise refuse(info, "socket", f"{why}: not all from one socket of the dump connected to it "
                     f"({len(charged)} unix datagram sockets of this network namespace have messages "
                     "charged to them)")
    if charged[0]["peer"] != ino or charged[0]["inode"] == ino:
        raise refuse(info, "socket", f"{why}: the one socket charged for them (inode {charged[0]['inode']}) "
                     "is not a socket connected to it")
    sender = charged[0]["inode"]
    if not held_here(ctx, sender) and not _unixpair._in_tree(ctx, sender)[1]:
        raise refuse(info, "socket", f"{why}: their sender (socket inode {sender}) is not held by the dump")
    msgs, anc = _unixpair._peek_queue(info, ctx, mine, _socket.SOCK_DGRAM, charged[0]["wqueue"],
                                      _sys.fionread(mine), head)
    out = {"queue_from": sender, "lengths": [len(m) for m in msgs], "fionread": _sys.fionread(mine),
           "data_len": sum(len(m) for m in msgs), "_data": b"".join(msgs)}
    if anc and any(anc):
        out["anc"] = anc
    return out


def _head(typ: int, name: bytes) -> str:
    return f"unix {UNIX_TYPES.get(typ, typ)} " + (f"bound {_name_text(name)}" if name else "unbound")


def text(rec: dict) -> str:
    s = _head(rec.get("type", _socket.SOCK_DGRAM), bytes.fromhex(rec["name"]))
    if rec.get("shutdown"):
        s += ", shut down for " + {1: "reading", 2: "writing", 3: "reading and writing"}[rec["shutdown"]]
    if rec.get("queue_from") is not None:
        s += f", {len(rec['lengths'])} messages ({rec['data_len']} bytes) queued from socket inode {rec['queue_from']}"
    return s + (" (unlinked since: a ghost socket)" if rec["ghost"] else "")


def validate(rec: dict, ctx) -> None:
    """Raises socket (name in use, path taken, directory gone) or image-invalid."""
    if not isinstance(rec.get("name"), str) or not isinstance(rec.get("set"), list) or \
            rec.get("type", _socket.SOCK_DGRAM) not in UNIX_TYPES or rec.get("shutdown", 0) not in (0, 1, 2, 3) or \
            (not rec["name"] and (rec.get("sock") != "unix-unconn" or rec.get("file"))):
        raise refuse_rec(rec, ctx, "image-invalid", "unix socket record malformed")
    name = bytes.fromhex(rec["name"])
    if not name:
        return
    if rec.get("queue_from") is not None:
        _validate_queue(rec, ctx)
    what = text(rec)
    path = rec["file"]["path"] if rec.get("file") else None
    if path is not None:
        if not os.path.isdir(os.path.dirname(path) or "/"):
            raise refuse_rec(rec, ctx, "socket", f"{what}: its directory is gone")
        try:
            st = os.lstat(path)
            if rec["ghost"]:
                raise refuse_rec(rec, ctx, "socket", f"{what}: its path names a file now; the ghost cannot be "
                                 "bound there")
            if not stat.S_ISSOCK(st.st_mode):
                raise refuse_rec(rec, ctx, "socket", f"{what}: the path is now a {stat.filemode(st.st_mode)[0]!r} "
                                 "file, not a socket; not removed")
        except FileNotFoundError:
            pass
    try:
        busy = _in_use(name, path)
    except OSError as e:
        raise refuse_rec(rec, ctx, "socket", f"{what}: cannot check the address ({e.strerror})") from e
    if busy:
        raise refuse_rec(rec, ctx, "socket", f"{what}: address in use")


def _validate_queue(rec: dict, ctx) -> None:
    from . import _inflight
    from ._unixnamed import _rec_of
    srec = _rec_of(ctx, rec["queue_from"], ("unix-named",))
    if srec is None or srec.get("role") != "sender" or srec.get("peer") != rec["inode"] or rec.get("ghost") or \
            sum(rec["lengths"]) != rec["data_len"] or not rec["lengths"]:
        raise refuse_rec(rec, ctx, "image-invalid", "a bound datagram socket's queue: the record of its "
                         "sender is missing, or its lengths do not add up")
    if rec.get("data"):
        (rec.get("_image") or ctx.image).path(rec["data"])
    _inflight.validate(rec, ctx)


def restore(rec: dict, ctx) -> int:
    """The rebuilt unconnected socket; raises `socket` or EngineError."""
    from ._unixnamed import built_key, restored_key
    early = ctx.shared.pop(built_key(rec["inode"]), None)
    if early is not None:
        return early            # built already for a socket connected to it (_unixnamed)
    ctx.shared[restored_key(rec["inode"])] = True
    validate(rec, ctx)
    name = bytes.fromhex(rec["name"])
    what = text(rec)
    f: Optional[dict] = rec.get("file")
    path = f["path"] if f else None
    typ = rec.get("type", _socket.SOCK_DGRAM)
    s = _socket.socket(_socket.AF_UNIX, typ | _socket.SOCK_CLOEXEC)
    with building(s, rec, ctx, f"recreating {what}"):
        _sockopts.apply(s, rec["opts"], rec["set"])
        if path is not None and not rec["ghost"] and os.path.lexists(path):
            os.unlink(path)              # a stale socket file nobody is bound to (checked above)
        try:
            if name:
                _bind(s, name, f)
        except OSError as e:
            if e.errno == _errno.EADDRINUSE:
                raise refuse_rec(rec, ctx, "socket", f"{what}: address in use") from None
            raise
        if path is not None:
            if rec["ghost"]:
                from ._unixnamed import connect_senders
                try:
                    connect_senders(rec, ctx)       # while the path leads to it
                finally:
                    os.unlink(path)
            else:
                os.chown(path, f["uid"], f["gid"], follow_symlinks=False)
                os.chmod(path, f["mode"])
        _sockopts.apply_late(s, rec["opts"], rec["set"])
        if rec.get("queue_from") is not None:
            from ._unixnamed import fill_bound
            fill_bound(s, rec, ctx)          # its sender, connected, sends the queue again
        shut_down(s, rec.get("shutdown", 0))
        _sockopts.verify(s, _socket.AF_UNIX, False, rec["opts"])
        d = netdiag.unix_socket(os.fstat(s.fileno()).st_ino)
        if (d["name"] or b"") != name:
            raise refuse_rec(rec, ctx, "socket", f"{what}: bound as {_name_text(d['name'] or b'')} here")
        if d["shutdown"] != rec.get("shutdown", 0):
            raise refuse_rec(rec, ctx, "socket", f"{what}: shutdown state {d['shutdown']} after restore, "
                             f"was {rec.get('shutdown', 0)}")
        fd = s.detach()
    return with_status_flags(rec, ctx, fd)
