"""TCP listeners (IPv4 and IPv6) held only by the process, with nothing
waiting to be accepted, or one connection from a client the process holds
that has sent nothing (see waiting_connections).

At dump: inet_diag (engine.netdiag) gives the accept queue length and the
backlog (a listener's idiag_rqueue / idiag_wqueue: sk_ack_backlog /
sk_max_ack_backlog, net/ipv4/inet_diag.c) - a listener with connections
waiting is refused (their clients would be dropped) unless the one
waiting connection can be made again by its client, and so is one with
half-open connections (request sockets, shown in /proc/net/tcp* as
SYN_RECV with the listener's local port). Options are read and compared
with a fresh socket's (_sockopts).

At restore: socket, options (before bind: SO_REUSEADDR, SO_REUSEPORT,
IPV6_V6ONLY, TCP_FASTOPEN ...), bind to the same address and port, listen
with the same backlog (read back through inet_diag), options read back.
A port taken meanwhile is refused ("address in use"): restore() runs
before the new process exists, so nothing is left behind.
"""

from __future__ import annotations

import errno as _errno
import os
import socket as _socket

from .. import netdiag, netinfo
from ..errors import Refusal
from . import _sockopts
from ._sockbase import building, check_options, dup_of, fresh_options, inode_of, options, outside_holders
from ._util import refuse, refuse_rec, with_status_flags

_SYN_RECV = 3      # request sockets show in /proc/net/tcp as TCP_SYN_RECV (get_openreq4)


def _v(family: int) -> str:
    return "6" if family == _socket.AF_INET6 else ""


def _addr_text(family: int, addr) -> str:
    return netinfo.endpoint_text((addr[0], addr[1]))


def listener_classify(info, ctx, q: dict) -> dict:
    """The dump record of a TCP listener; raises the `socket` refusal."""
    ino = inode_of(info.link)
    key = f"tcp-listen:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    fam = q["family"]
    addr = q["name"]
    head = f"tcp{_v(fam)} listening {_addr_text(fam, addr)}"
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    try:
        queues = netdiag.tcp_listener(fam, ino)
    except OSError as e:
        raise refuse(info, "socket", f"{head}: inet_diag cannot report its backlog ({e.strerror})") from e
    if queues is None:
        raise refuse(info, "socket", f"{head}: not found by inet_diag; its backlog cannot be known")
    waiting, backlog = queues
    pending = waiting_connections(info, ctx, fam, addr, waiting, head) if waiting else []
    half = [r for r in netinfo.parse_inet(netinfo.read_table(info.pid, "tcp" + _v(fam))).values()
            if r["state"] == _SYN_RECV and r["local"][1] == addr[1]]
    if half:
        raise refuse(info, "socket", f"{head}: {len(half)} half-open connection(s) (SYN_RECV)")
    fresh = fresh_options(ctx, fam, _socket.SOCK_STREAM, _socket.IPPROTO_TCP)
    with dup_of(info) as mine:
        opts = options(info, ctx, fam, _socket.SOCK_STREAM, _socket.IPPROTO_TCP, mine)
    try:
        setnames = check_options(info, opts, fresh)
    except Refusal as e:
        raise refuse(info, "socket", f"{head}: {e.detail}") from None
    rec = {"sock": "tcp-listen", "family": fam, "addr": list(addr), "backlog": backlog,
           "inode": ino, "opts": opts, "set": setnames, "waiting": pending}
    ctx.shared[key] = rec
    return rec


def _serves(listen_addr, local) -> bool:
    """Whether a connection to `local` was accepted by a listener bound to
    `listen_addr` (same port; same address, or the listener's is a wildcard)."""
    if listen_addr[1] != local[1]:
        return False
    return listen_addr[0] in ("0.0.0.0", "::") or listen_addr[0] == local[0]


def waiting_connections(info, ctx, fam: int, addr, waiting: int, head: str) -> list:
    """The connection waiting in the listener's accept queue, when it can be
    made again at restore by its client reconnecting: the client is held by
    the target, and neither end has sent anything (the bytes a waiting
    connection holds cannot be read without accepting it, which the dump may
    not do). Returns [{client, client_inode}]; raises the `socket` refusal."""
    from ._sockbase import held_here
    try:
        est = netdiag.tcp_sockets(fam, 1 << 1)
    except OSError as e:
        raise refuse(info, "socket", f"{head}: inet_diag cannot list its waiting connections ({e.strerror})") from e
    kids = [k for k in est if k["inode"] == 0 and _serves(addr, k["local"])]
    if len(kids) != waiting:
        raise refuse(info, "socket", f"{head}: {waiting} connection(s) waiting in the accept queue, "
                     f"{len(kids)} found (another listener on the port?)")
    if waiting > 1:
        raise refuse(info, "socket", f"{head}: {waiting} connections waiting in the accept queue: "
                     "their accept order cannot be read")
    kid = kids[0]
    what = f"{head}: a connection from {_addr_text(fam, kid['remote'])} waits in the accept queue"
    client = [k for k in est if k["local"] == kid["remote"] and k["remote"] == kid["local"]]
    if not client or not held_here(ctx, client[0]["inode"]):
        raise refuse(info, "socket", f"{what}; its client is outside the dump (a new handshake would "
                     "not be its connection)")
    if kid["rqueue"] or kid["wqueue"]:
        raise refuse(info, "socket", f"{what} with {kid['rqueue']} bytes its client sent: they cannot be "
                     "read without accepting it")
    return [{"client": list(kid["remote"]), "client_inode": client[0]["inode"], "local": list(kid["local"])}]


def listener_text(rec: dict) -> str:
    waiting = rec.get("waiting") or []
    return (f"tcp{_v(rec['family'])} listening {_addr_text(rec['family'], rec['addr'])}, "
            f"backlog {rec['backlog']}" + (f", options {', '.join(rec['set'])}" if rec["set"] else "") +
            (f", {len(waiting)} connection waiting (its client in the dump)" if waiting else ""))


def listener_validate(rec: dict, ctx) -> None:
    """Raises image-invalid for a malformed record. (Whether the port is
    free is learnt by binding, in restore: a test here would race anyway.)"""
    fam = rec.get("family")
    addr = rec.get("addr")
    if fam not in (_socket.AF_INET, _socket.AF_INET6) or not isinstance(addr, list) or \
            len(addr) != (4 if fam == _socket.AF_INET6 else 2) or not isinstance(rec.get("backlog"), int):
        raise refuse_rec(rec, ctx, "image-invalid", "tcp listener record malformed")


def _port_mates(rec: dict, ctx) -> list:
    """The dump's other listeners bound to the same address and port (a
    SO_REUSEPORT group: CRIU's zdtm socket-tcp-reuseport)."""
    return [x for x in getattr(ctx, "tree_records", None) or ctx.records or []
            if x.get("sock") == "tcp-listen" and x is not rec and x.get("inode") != rec.get("inode")
            and x.get("family") == rec["family"] and x.get("addr") == rec["addr"]]


def _build(rec: dict, ctx) -> int:
    fam = rec["family"]
    addr = tuple(rec["addr"])
    text = f"tcp{_v(fam)} listener {_addr_text(fam, addr)}"
    s = _socket.socket(fam, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC, _socket.IPPROTO_TCP)
    # Listeners sharing a port were bound with SO_REUSEPORT, which one may
    # have cleared since: bound without it, it would keep the others off
    # the port ("address in use" at restore, after the dump). It is set for
    # the bind and cleared once the others are bound too, as it was.
    mates = _port_mates(rec, ctx)
    clear = bool(mates) and _sockopts.as_int(rec["opts"].get("SO_REUSEPORT")) == 0
    with building(s, rec, ctx, f"recreating {text}"):
        _sockopts.apply(s, rec["opts"], rec["set"])
        if clear:
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno in (_errno.EADDRINUSE, _errno.EADDRNOTAVAIL):
                why = "address in use" if e.errno == _errno.EADDRINUSE else "address not available here"
                raise refuse_rec(rec, ctx, "socket", f"{text}: {why}") from None
            raise
        s.listen(rec["backlog"])
        ctx.shared[f"tcp-listen-ino:{rec['inode']}"] = os.fstat(s.fileno()).st_ino
        if clear:
            for m in mates:         # bound beside this one while it still shares the port
                ensure_listener(m, ctx)
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 0)
        got = netdiag.tcp_listener(fam, os.fstat(s.fileno()).st_ino)
        if got is None or got[1] != rec["backlog"]:
            raise refuse_rec(rec, ctx, "socket", f"{text}: backlog {rec['backlog']} becomes "
                             f"{got[1] if got else '?'} here (net.core.somaxconn?)")
        _sockopts.apply_late(s, rec["opts"], rec["set"])
        _sockopts.verify(s, fam, True, rec["opts"])
        ctx.shared[f"tcp-listen-ino:{rec['inode']}"] = os.fstat(s.fileno()).st_ino
        return s.detach()


def ensure_listener(rec: dict, ctx) -> int:
    """The rebuilt listener's inode, building it now (kept for its own
    restore() call) if its fd comes later: a waiting connection's client
    connects to it first."""
    key = f"tcp-listen-ino:{rec['inode']}"
    if key not in ctx.shared:
        ctx.shared[f"tcp-listen-built:{rec['inode']}"] = _build(rec, ctx)
    return ctx.shared[key]


def listener_restore(rec: dict, ctx) -> int:
    """A listening TCP socket on the recorded address, backlog and options
    (its waiting connection is made by its client's restore, _tcpconn).
    Raises the `socket` refusal (address in use / not available here,
    backlog or option that reads back differently) or EngineError."""
    fd = ctx.shared.pop(f"tcp-listen-built:{rec['inode']}", None)
    if fd is None:
        fd = _build(rec, ctx)
    return with_status_flags(rec, ctx, fd)
