"""Connections waiting in a unix listener's accept queue whose connecting
end the process holds itself: restored waiting.

A connect(2) to a unix stream/seqpacket listener makes a server-side
socket at once (an "embryo", net/unix/af_unix.c unix_stream_connect) and
queues it on the listener; sock_diag lists the embryos in accept order
by their connecting sockets (UNIX_DIAG_ICONS) and a connecting socket's
peer is its embryo (UNIX_DIAG_PEER). No fd names an embryo, so nothing queued in it can be
read without accepting it (which the process would miss): an embryo with
bytes queued (UNIX_DIAG_RQLEN) is refused, and so is a connecting end held
by a process outside the dump (named), one the process no longer holds,
one that is bound, shut down or has data queued.

At restore the listener is rebuilt first, then one socket per pending
connection connects to it, in the same order, with its options: accept()
then returns them in that order. The listener record and the connecting
ends' records ("unix-pending") share one build through ctx.shared,
whichever the restore reaches first.
"""

from __future__ import annotations

import os
import socket as _socket
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List

from .. import netdiag
from ..errors import Refusal
from . import _peercred, _sockopts, _sys
from ._sockbase import (check_options, fresh_options, held_here, inode_of, option_refusal, options,
                        outside_holders, unix_diag as _diag)
from ._util import failed, refuse, refuse_rec, with_status_flags
from .. import pidfd


def pending(info, ctx, d: dict, head: str) -> List[dict]:
    """[{client, opts, set}] for each waiting connection of the listener
    described by `d` (sock_diag), in accept order; raises `socket`."""
    out = []
    for client in d["icons"]:
        # UNIX_DIAG_ICONS names each queued embryo's peer: the connecting
        # end (net/unix/diag.c sk_diag_dump_icons); its peer is the embryo.
        if not client:
            raise refuse(info, "socket", f"{head}: a pending connection whose connecting end is closed")
        c = _diag(info, client)
        # The embryo has no inode (no file), so sock_diag cannot be asked
        # about it; what the connecting end sent into it is still charged to
        # the sender (UNIX_DIAG_RQLEN wqueue = unix_outq_len).
        if c["wqueue"]:
            raise refuse(info, "socket", f"{head}: a pending connection has data queued (sender charge "
                         f"{c['wqueue']} bytes), which cannot be read before it is accepted")
        outp = outside_holders(info, ctx, client)
        if outp:
            raise refuse(info, "socket", f"{head}: a pending connection from pid {outp[0][0]} (fd {outp[0][1]}), "
                         "a process outside the dump")
        mine = held_here(ctx, client)
        if not mine:
            raise refuse(info, "socket", f"{head}: a pending connection whose connecting end no process holds")
        if c["name"]:
            raise refuse(info, "socket", f"{head}: a pending connection from a bound socket")
        if c["shutdown"]:
            raise refuse(info, "socket", f"{head}: a pending connection that is shut down")
        typ = d["type"]
        with pidfd.target_fd(info.pid, mine[0]) as dup:
            if _sys.fionread(dup):
                raise refuse(info, "socket", f"{head}: a pending connection's connecting end has data queued")
            opts = options(info, ctx, _socket.AF_UNIX, typ, 0, dup)
        fresh = fresh_options(ctx, _socket.AF_UNIX, typ, 0)
        try:
            setnames = check_options(info, opts, fresh)
        except Refusal as err:
            raise refuse(info, "socket", f"{head}: a pending connection's {err.detail}") from None
        out.append({"client": client, "opts": opts, "set": setnames, "connector": _connector(info.pid)})
    return out


def _connector(pid: int) -> dict:
    """Who connect()ed: the server end will report it (SO_PEERCRED) once
    accepted, but nothing shows it before; taken to be the process that
    holds the connecting end, with its credentials now (Known limits)."""
    from .. import procfs
    st = procfs.parse_status(open(f"/proc/{pid}/status").read())
    ids = lambda k: [int(x) for x in st.get(k, "").split()]
    return {"pid": pid, "uid": ids("Uid")[1], "gid": ids("Gid")[1], "groups": sorted(ids("Groups"))}


def client_classify(info, ctx, q: dict) -> dict:
    """The record of a connecting end waiting in the accept queue of a
    listener the process holds; raises `socket` otherwise."""
    ino = inode_of(info.link)
    key = f"unix-pending:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    listener = None
    try:
        for s in netdiag.unix_sockets():
            if ino in s["icons"]:
                listener = s
                break
    except OSError as e:
        raise refuse(info, "socket", f"unix socket inode {ino}: sock_diag cannot list listeners ({e.strerror})") from e
    if listener is None:
        raise refuse(info, "socket", "not waiting in an accept queue")
    if not held_here(ctx, listener["inode"]):
        raise refuse(info, "socket", "waiting in the accept queue of a listener the process does not hold")
    rec = {"sock": "unix-pending", "inode": ino, "listener": listener["inode"], "type": q["type"]}
    ctx.shared[key] = rec
    return rec


def client_text(rec: dict) -> str:
    return f"unix connection waiting in the accept queue of listener inode {rec['listener']}"


# -- restore ----------------------------------------------------------------

def build_key(listener_ino: int) -> str:
    return f"unix-listen-built:{listener_ino}"


SUN_PATH_MAX = 107        # sun_path's 108 bytes, a NUL included


def _connect(c: _socket.socket, addr, lrec: dict) -> None:
    """connect(2) to the listener. A path too long for sun_path (a
    listener bound by a relative name deep in the tree) is reached by that
    relative name from its base directory, as it was bound.
    A connecting socket keeps nothing of the name it was given."""
    f = lrec.get("file")
    if not (f and f.get("base")) or len(os.fsencode(addr)) <= SUN_PATH_MAX:
        c.connect(addr)
        return
    from ._unixlisten import from_base
    rel = bytes.fromhex(lrec["name"]).split(b"\0", 1)[0]       # the name it was bound by
    from_base(f["base"], lambda: c.connect(rel))


def connect_all(listener: _socket.socket, lrec: dict, ctx) -> Dict[int, _socket.socket]:
    """Connect one socket per recorded pending connection, in order.
    Raises OptionError, OSError or the `socket` refusal."""
    out: Dict[int, _socket.socket] = {}
    # the recorded absolute path (a relative name would resolve against the
    # restorer's cwd), or the abstract name's bytes
    addr = lrec["file"]["path"] if lrec.get("file") else bytes.fromhex(lrec["name"])
    try:
        for p in lrec.get("pending") or []:
            c = _socket.socket(_socket.AF_UNIX, lrec["type"] | _socket.SOCK_CLOEXEC)
            out[p["client"]] = c
            _sockopts.apply(c, p["opts"], p["set"])
            c.setblocking(False)
            who = p.get("connector")
            if who:
                # the server end records the connect() caller (_peercred)
                _peercred.run_as(who, lambda: [_connect(c, addr, lrec)] and [])
            else:
                _connect(c, addr, lrec)
            c.setblocking(True)
            _sockopts.apply_late(c, p["opts"], p["set"])
            _sockopts.verify(c, _socket.AF_UNIX, False, p["opts"])
        got = netdiag.unix_socket(os.fstat(listener.fileno()).st_ino)["rqueue"]
        if got != len(lrec.get("pending") or []):
            raise refuse_rec(lrec, ctx, "socket", f"{got} pending connections after restore, "
                             f"{len(lrec['pending'])} dumped")
    except BaseException:
        for c in out.values():
            c.close()
        raise
    return out


def client_validate(rec: dict, ctx) -> None:
    if not any(r.get("sock") == "unix-listen" and r.get("inode") == rec.get("listener") and
               any(p["client"] == rec["inode"] for p in r.get("pending") or []) for r in ctx.records or []):
        raise refuse_rec(rec, ctx, "image-invalid", f"the record of listener {rec.get('listener')} with this "
                         "pending connection is missing")


def client_restore(rec: dict, ctx) -> int:
    from . import _unixlisten
    built = ctx.shared.get(build_key(rec["listener"]))
    if built is None:
        lrec = next(r for r in ctx.records if r.get("sock") == "unix-listen" and r.get("inode") == rec["listener"])
        lfd = _unixlisten.listener_restore(lrec, ctx)       # builds and keeps the listener for its own record
        ctx.shared[build_key(rec["listener"])]["listener_fd"] = lfd
        built = ctx.shared[build_key(rec["listener"])]
    s = built["clients"].pop(rec["inode"])
    try:
        return with_status_flags(rec, ctx, s.detach())
    except OSError as e:
        raise failed(rec, ctx, "installing a pending connection", e) from e


__all__ = ["pending", "client_classify", "client_text", "client_validate", "client_restore", "connect_all",
           "build_key", "option_refusal"]
