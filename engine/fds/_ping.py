"""ICMP datagram ("ping") sockets with nothing queued: socket(AF_INET,
SOCK_DGRAM, IPPROTO_ICMP) and its IPv6 twin (IPPROTO_ICMPV6), what ping(8)
uses without privileges or capabilities (net.ipv4.ping_group_range).

The kernel keeps per socket its ident (the ICMP echo id: sin_port in
getsockname, chosen at bind or at the first send; replies are matched to
the socket by it, net/ipv4/ping.c ping_lookup), its address and peer, and
options - all readable - and the queue of echo replies, which ping reads as
soon as one arrives. So: the same ident bound explicitly (as for UDP, a
kernel-chosen one comes back bound: a disconnect keeps it), the peer,
every option (engine/fds/_sockopts.py: set ones copied, all read back,
IP options and IPv6 sticky headers included), multicast memberships
(engine/fds/_mcast.py, as UDP: a ping socket can join groups).
Nothing waits to be sent: ping_v4_sendmsg/ping_v6_sendmsg push each
message at once (no corking; SIOCOUTQ is not even answered).
Refused: replies queued (not refilled: a reply would have to come from
the address it names, with that echo id and sequence), a socket held
outside, an ident taken here at restore, and a restore where
ping sockets are not allowed to ckpt's group (ping_group_range).
"""

from __future__ import annotations

import errno as _errno
import os
import socket as _socket

from . import _mcast, _sockopts
from ._sockbase import (building, check_options, dup_of, fresh_options, inode_of, options, outside_holders,
                        shut_for_reading)
from ._raw import _bad_ep, _good_groups
from ._udp import _addr_tuple, _ep, _ep_text, _v, rmem
from ._util import refuse, refuse_rec, with_status_flags

PROTO = {_socket.AF_INET: _socket.IPPROTO_ICMP, _socket.AF_INET6: 58}     # IPPROTO_ICMPV6


def is_ping(family: int, typ: int, proto: int) -> bool:
    return typ == _socket.SOCK_DGRAM and PROTO.get(family) == proto


def classify(info, ctx, q: dict) -> dict:
    """The dump record of a ping socket (cached per inode); raises the
    `socket` refusal."""
    ino = inode_of(info.link)
    key = f"ping:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    fam, proto = q["family"], q["proto"]
    name = q["name"]
    head = f"ping{_v(fam)} {'ident ' + str(name[1]) if name and name[1] else 'unbound'}"
    if q["peer"] is not None:
        head += f"->{_ep_text(q['peer'])}"
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    fresh = fresh_options(ctx, fam, _socket.SOCK_DGRAM, proto)
    with dup_of(info) as mine:
        opts = options(info, ctx, fam, _socket.SOCK_DGRAM, proto, mine)
        try:
            setnames = check_options(info, opts, fresh)
        except Exception as e:      # Refusal: its detail, under this socket's name
            raise refuse(info, "socket", f"{head}: {getattr(e, 'detail', e)}") from None
        try:
            groups = _mcast.memberships(info.pid, mine, fam)
        except OSError as e:
            raise refuse(info, "socket", f"{head}: its multicast memberships cannot be read ({e.strerror})") from e
        queued = rmem(mine)
        if shut_for_reading(mine):
            # sock_diag lists no ping socket: its writing side cannot be read
            raise refuse(info, "socket", f"{head}: shut down (shutdown(2)); which sides cannot all be read")
    if queued:
        raise refuse(info, "socket", f"{head}: {queued} bytes of echo replies queued to be read")
    rec = {"sock": "ping", "family": fam, "proto": proto, "inode": ino, "addr": _ep(name) if name else None,
           "peer": _ep(q["peer"]) if q["peer"] is not None else None, "opts": opts, "set": setnames,
           "mcast": groups}
    ctx.shared[key] = rec
    return rec


def text(rec: dict) -> str:
    addr = rec["addr"]
    s = f"ping{_v(rec['family'])} {'ident ' + str(addr[1]) if addr and addr[1] else 'unbound'}"
    if rec["peer"]:
        s += f"->{_ep_text(rec['peer'])}"
    if rec.get("mcast"):
        s += ", multicast " + " ".join(_mcast.text(m) for m in rec["mcast"])
    if rec["set"]:
        s += ", options " + ", ".join(rec["set"])
    return s


def validate(rec: dict, ctx) -> None:
    fam = rec.get("family")
    if fam not in PROTO or rec.get("proto") != PROTO[fam] or \
            not _sockopts.valid_record(rec.get("opts"), rec.get("set"), fam, "ping") or \
            _bad_ep(fam, rec.get("addr")) or _bad_ep(fam, rec.get("peer")) or not _good_groups(fam, rec.get("mcast")):
        raise refuse_rec(rec, ctx, "image-invalid", "ping socket record malformed")


def restore(rec: dict, ctx) -> int:
    """The rebuilt ping socket's fd in the restorer. Raises the `socket`
    refusal (not allowed here, ident taken, an option that reads back
    differently) or EngineError."""
    fam, what = rec["family"], text(rec)
    try:
        s = _socket.socket(fam, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC, rec["proto"])
    except OSError as e:
        if e.errno in (_errno.EACCES, _errno.EPERM):
            raise refuse_rec(rec, ctx, "socket", f"{what}: ping sockets are not allowed to ckpt's group here "
                             "(net.ipv4.ping_group_range)") from None
        raise
    with building(s, rec, ctx, f"recreating {what}"):
        _sockopts.apply(s, rec["opts"], rec["set"])
        _mcast.join_all(s, rec, ctx, what)
        addr = rec["addr"]
        if addr and (addr[1] or addr[0] not in ("0.0.0.0", "::")):
            try:
                s.bind(_addr_tuple(fam, addr))
            except OSError as e:
                if e.errno in (_errno.EADDRINUSE, _errno.EADDRNOTAVAIL):
                    raise refuse_rec(rec, ctx, "socket", f"{what}: ident or address taken or not available "
                                     "here") from None
                raise
        if rec["peer"]:
            s.connect(_addr_tuple(fam, rec["peer"]))
        _sockopts.apply_late(s, rec["opts"], rec["set"])
        _sockopts.verify(s, fam, "ping", rec["opts"])
        if addr and _ep(s.getsockname())[:2] != list(addr[:2]):
            raise refuse_rec(rec, ctx, "socket", f"{what}: reads back as {_ep_text(_ep(s.getsockname()))}")
        try:
            _mcast.check(s, os.getpid(), fam, rec["mcast"])
        except OSError as e:
            raise refuse_rec(rec, ctx, "socket", f"{what}: {e.strerror}") from None
        fd = s.detach()
    return with_status_flags(rec, ctx, fd)
