"""TCP sockets (IPv4 and IPv6) that never connected: made by socket(),
perhaps given options, perhaps bound, not listening, held by the process
only (CRIU's zdtm socket-tcp-unconn, sock_opts*, sock_tcp_opts*,
socket-linger, socket-tcp-keepalive, unbound_sock).

At dump: TCP_INFO must show the socket closed (TCP_CLOSE: not a connect
in progress, whose peer getpeername hides) with no segment ever sent or
received (tcpi_segs_out, tcpi_segs_in: a connection that ended, or a
connect that failed, leaves state a fresh socket lacks: a stale source
port, a pending error); poll must show no pending error (POLLERR: reading
SO_ERROR would consume it). The address comes from getsockname. A port
must be one the socket really holds: sock_diag lists a bound socket that
is not listening (TCP_BOUND_INACTIVE, Linux 6.9+); one it does not list
is refused (the port a connection took and gave back still shows in
getsockname, and older kernels cannot tell). An address bound without a
port (IP_BIND_ADDRESS_NO_PORT) is taken only with that option set. The
shutdown bits (shutdown(2) on an unconnected socket sets them and says
ENOTCONN) from sock_diag; an unbound socket shut down is refused (poll
shows only the reading side). Options against a fresh socket's
(_sockopts).

At restore: socket, options, bind to the recorded address and port
(refused when in use or not available here), the late options, shutdown
bits, everything read back. A port the kernel picked (bind to port 0)
comes back bound explicitly (SOCK_BINDPORT_LOCK: a connection that ends
later keeps the port; the same for UDP, see README).
"""

from __future__ import annotations

import errno as _errno
import os
import select
import socket as _socket
import struct

from .. import netinfo
from ..errors import Refusal
from . import _sockopts
from ._sockbase import (building, check_options, dup_of, fresh_options, inode_of, options, outside_holders,
                        shut_down, shutdown_bits)
from ._util import refuse, refuse_rec, with_status_flags

TCP_CLOSE = 7
_TCP_INFO_LEN = 144       # through tcpi_segs_in (include/uapi/linux/tcp.h)


def _v(family: int) -> str:
    return "6" if family == _socket.AF_INET6 else ""


def _wild(addr: str) -> bool:
    return addr in ("0.0.0.0", "::")


def _head(fam: int, name) -> str:
    if name and (name[1] or not _wild(name[0])):
        return f"tcp{_v(fam)} unconnected, bound {netinfo.endpoint_text((name[0], name[1]))}"
    return f"tcp{_v(fam)} unconnected"


def _never_connected(fd: int) -> str:
    """Why the socket is not a fresh one ("" when it is)."""
    s = _socket.socket(fileno=os.dup(fd))
    try:
        info = s.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_INFO, _TCP_INFO_LEN)
    finally:
        s.close()
    if info[0] != TCP_CLOSE:
        return f"in state {netinfo.TCP_STATES.get(info[0], info[0])} (a connect in progress)"
    if len(info) >= _TCP_INFO_LEN:
        out, inn = struct.unpack_from("=II", info, 136)
        if out or inn:
            return (f"closed after {out} segments sent and {inn} received (a connection that ended or "
                    "a connect that failed leaves state a new socket lacks)")
    p = select.poll()
    p.register(fd, select.POLLIN)
    if dict(p.poll(0)).get(fd, 0) & select.POLLERR:
        return "a socket error is pending (reading it would consume it)"
    return ""


def classify(info, ctx, q: dict) -> dict:
    """The dump record; raises the `socket` refusal."""
    ino = inode_of(info.link)
    key = f"tcp-unconn:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    fam = q["family"]
    name = q["name"]
    head = _head(fam, name)
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    fresh = fresh_options(ctx, fam, _socket.SOCK_STREAM, _socket.IPPROTO_TCP)
    with dup_of(info) as mine:
        why = _never_connected(mine)
        if why:
            raise refuse(info, "socket", f"{head}: {why}")
        opts = options(info, ctx, fam, _socket.SOCK_STREAM, _socket.IPPROTO_TCP, mine)
        try:
            shut, listed = shutdown_bits(mine, fam, _socket.IPPROTO_TCP, ino)
        except OSError as e:
            raise refuse(info, "socket", f"{head}: sock_diag cannot describe it ({e.strerror})") from e
    try:
        setnames = check_options(info, opts, fresh)
    except Refusal as e:
        raise refuse(info, "socket", f"{head}: {e.detail}") from None
    bound = bool(name and name[1])
    if bound and not listed:
        raise refuse(info, "socket", f"{head}: sock_diag does not list it as bound: the port may be one a "
                     "connection gave back (getsockname still shows it), or this kernel (before 6.9) "
                     "does not list bound sockets")
    if name and not name[1] and not _wild(name[0]) and \
            _sockopts.as_int(opts.get("IP_BIND_ADDRESS_NO_PORT")) != 1:
        raise refuse(info, "socket", f"{head}: an address without a port, and IP_BIND_ADDRESS_NO_PORT "
                     "is not set")
    if shut and not listed:
        raise refuse(info, "socket", f"{head}: shut down while unbound: whether for writing too cannot "
                     "be read (sock_diag lists no unbound socket)")
    rec = {"sock": "tcp-unconn", "family": fam, "inode": ino,
           "addr": list(name) if name and (name[1] or not _wild(name[0])) else None,
           "opts": opts, "set": setnames, "shutdown": shut}
    ctx.shared[key] = rec
    return rec


def text(rec: dict) -> str:
    s = _head(rec["family"], rec["addr"])
    if rec["set"]:
        s += ", options " + ", ".join(rec["set"])
    if rec["shutdown"]:
        s += ", shut down for " + {1: "reading", 2: "writing", 3: "reading and writing"}[rec["shutdown"]]
    return s


def validate(rec: dict, ctx) -> None:
    """Raises image-invalid for a malformed record."""
    fam = rec.get("family")
    addr = rec.get("addr")
    if fam not in (_socket.AF_INET, _socket.AF_INET6) or \
            not (addr is None or (isinstance(addr, list) and len(addr) == (4 if fam == _socket.AF_INET6 else 2))) or \
            not isinstance(rec.get("set"), list) or not isinstance(rec.get("opts"), dict) or \
            rec.get("shutdown") not in (0, 1, 2, 3):
        raise refuse_rec(rec, ctx, "image-invalid", "tcp unconnected socket record malformed")


def restore(rec: dict, ctx) -> int:
    """The rebuilt socket's fd in the restorer. Raises the `socket` refusal
    (address in use or not available here, an option or address that reads
    back differently) or EngineError."""
    fam = rec["family"]
    what = text(rec)
    s = _socket.socket(fam, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC, _socket.IPPROTO_TCP)
    with building(s, rec, ctx, f"recreating {what}"):
        _sockopts.apply(s, rec["opts"], rec["set"])
        if rec["addr"]:
            try:
                s.bind(tuple(rec["addr"]))
            except OSError as e:
                if e.errno in (_errno.EADDRINUSE, _errno.EADDRNOTAVAIL):
                    why = "address in use" if e.errno == _errno.EADDRINUSE else "address not available here"
                    raise refuse_rec(rec, ctx, "socket", f"{what}: {why}") from None
                raise
            got = list(s.getsockname())
            if got[:2] != rec["addr"][:2]:
                raise refuse_rec(rec, ctx, "socket", f"{what}: bound as {got[:2]} here")
        _sockopts.apply_late(s, rec["opts"], rec["set"])
        shut_down(s, rec["shutdown"])
        _sockopts.verify(s, fam, True, rec["opts"])
        if rec["shutdown"]:
            now, _ = shutdown_bits(s.fileno(), fam, _socket.IPPROTO_TCP, os.fstat(s.fileno()).st_ino)
            if now != rec["shutdown"]:
                raise refuse_rec(rec, ctx, "socket", f"{what}: shutdown state {now} after restore, "
                                 f"was {rec['shutdown']}")
        fd = s.detach()
    return with_status_flags(rec, ctx, fd)
