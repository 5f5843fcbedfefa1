"""UDP sockets (IPv4 and IPv6): unbound, bound, connected; options,
multicast memberships (_mcast) and the receive queue with each datagram's
source and destination address.

At dump (the socket held by the process only):

- address from getsockname, peer from getpeername, options against a fresh
  socket's (_sockopts, with the UDP-level ones);
- nothing may wait to be sent (SIOCOUTQ: data corked with UDP_CORK or
  MSG_MORE) - refused;
- the receive queue is peeked, never consumed (SO_PEEK_OFF walk as in
  _sockpeek, then put back). IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR is
  turned on for the walk (and put back) so that every datagram's
  destination address comes with its source. The first peek is made
  with peeking-at-offset off, so a zero-length head datagram the process
  already peeked is seen; the walk is then checked against the kernel's
  accounting: the socket's receive charge (SO_MEMINFO rmem_alloc, the sum
  of its skbs' truesize) must equal that of the same datagrams sent here,
  from the same sources, to a scratch socket with the same buffer size.
  A difference (a datagram hidden from peeking, or datagrams that arrived
  through a network device whose buffers differ from loopback's) is a
  refusal. Ancillary data the process's own options produce (IP_PKTINFO,
  IP_RECVTTL, ...) is recorded and must read back the same after the
  refill; receive timestamps cannot be reproduced and are refused.

At restore: socket, options, multicast joins, bind to the recorded address
(SO_REUSEADDR/SO_REUSEPORT as recorded), connect to the recorded peer, then
the queue is refilled: each datagram is sent from a scratch socket bound
to its original source address and port (IP_TRANSPARENT + IP_FREEBIND let
it bind an address this machine does not have) to its original
destination. A source port still bound here by another socket cannot be
borrowed: refused naming the holder. A datagram the socket sent to itself
is sent by the rebuilt socket itself. The rebuilt queue is then peeked the
same way and must match exactly (payloads, sources, destinations,
ancillary data); options and memberships are read back.

Known limits: a pending socket error (SO_ERROR, e.g. ECONNREFUSED from an
ICMP) and the error queue (IP_RECVERR) cannot be read without consuming
them and are not carried; IP_MULTICAST_IF set by interface index (struct
ip_mreqn) reads back as an address only and is not carried.
"""

from __future__ import annotations

import errno as _errno
import os
import socket as _socket
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

from .. import netinfo
from ..errors import EngineError, Refusal
from . import _mcast, _sockopts, _sockpeek
from ._sockbase import (building, check_options, dup_of, fresh_options, inode_of, options, outside_holders,
                        shut_down, shutdown_bits)
from ._util import refuse, refuse_rec, with_status_flags

SO_MEMINFO = 55
IP_TRANSPARENT, IP_FREEBIND, IP_RECVORIGDSTADDR = 19, 15, 20
IPV6_TRANSPARENT, IPV6_FREEBIND, IPV6_RECVORIGDSTADDR = 75, 78, 74
_ORIGDST = {_socket.AF_INET: (_socket.IPPROTO_IP, IP_RECVORIGDSTADDR),
            _socket.AF_INET6: (_socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR)}
# SOL_SOCKET cmsg types of receive timestamps (SO_TIMESTAMP{,NS,ING}{,_NEW}).
_TSTAMPS = {29, 35, 37, 63, 64, 65}
_BUF = 1 << 17


def _v(family: int) -> str:
    return "6" if family == _socket.AF_INET6 else ""


def _ep(addr) -> list:
    return [addr[0], addr[1]] + ([addr[2], addr[3]] if len(addr) > 2 else [])


def _ep_text(addr) -> str:
    return netinfo.endpoint_text((addr[0], addr[1]))


def rmem(fd: int) -> int:
    """The socket's receive charge (SO_MEMINFO SK_MEMINFO_RMEM_ALLOC)."""
    s = _socket.socket(fileno=os.dup(fd))
    try:
        return struct.unpack("=9I", s.getsockopt(_socket.SOL_SOCKET, SO_MEMINFO, 36))[0]
    finally:
        s.close()


def _sockaddr(raw: bytes):
    fam = struct.unpack_from("=H", raw)[0]
    if fam == _socket.AF_INET6:
        port = struct.unpack_from("!H", raw, 2)[0]
        flow, = struct.unpack_from("!I", raw, 4)
        scope, = struct.unpack_from("=I", raw, 24)
        return [_socket.inet_ntop(fam, raw[8:24]), port, flow, scope]
    port = struct.unpack_from("!H", raw, 2)[0]
    return [_socket.inet_ntop(_socket.AF_INET, raw[4:8]), port]


def peek_queue(fd: int, family: int, max_msgs: int) -> List[dict]:
    """[{data, src, dst, anc}] of the socket's receive queue, left in place
    (SO_PEEK_OFF and the ORIGDSTADDR option put back). Raises
    _sockpeek.Unreadable or OSError."""
    s = _socket.socket(fileno=os.dup(fd))
    level, opt = _ORIGDST[family]
    try:
        prev_off = s.getsockopt(_socket.SOL_SOCKET, _sockpeek.SO_PEEK_OFF)
        prev_dst = s.getsockopt(level, opt)
        try:
            s.setsockopt(level, opt, 1)
            return _walk(s, family, max_msgs)
        finally:
            s.setsockopt(_socket.SOL_SOCKET, _sockpeek.SO_PEEK_OFF, prev_off)
            s.setsockopt(level, opt, prev_dst)
    finally:
        s.close()


def _walk(s: _socket.socket, family: int, max_msgs: int) -> List[dict]:
    out: List[dict] = []
    off = -1          # first peek: no offset, the head is always seen
    flags = _socket.MSG_PEEK | _socket.MSG_DONTWAIT | _sockpeek.MSG_CMSG_CLOEXEC
    level, opt = _ORIGDST[family]
    while True:
        if len(out) > max_msgs:
            raise _sockpeek.Unreadable(f"the queue walk found more than {max_msgs} datagrams")
        s.setsockopt(_socket.SOL_SOCKET, _sockpeek.SO_PEEK_OFF, off)
        try:
            data, anc, mflags, src = s.recvmsg(_BUF, 4096, flags)
        except BlockingIOError:
            return out
        if mflags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
            raise _sockpeek.Unreadable("a datagram or its ancillary data does not fit a peek")
        dst = None
        extra = []
        for lv, typ, raw in anc:
            if (lv, typ) == (level, opt):
                dst = _sockaddr(raw)
            elif lv == _socket.SOL_SOCKET and typ in _TSTAMPS:
                raise _sockpeek.Unreadable("receive timestamps are on (SO_TIMESTAMP*): the queued "
                                           "datagrams' arrival times cannot be reproduced")
            elif lv == _socket.SOL_SOCKET:
                raise _sockpeek.Unreadable(f"ancillary data level SOL_SOCKET type {typ} queued")
            else:
                extra.append([lv, typ, raw.hex()])
        if dst is None:
            raise _sockpeek.Unreadable("a datagram's destination address cannot be read")
        out.append({"data": data, "src": _ep(src), "dst": dst, "anc": extra})
        off = max(off, 0) + len(data)


# -- dump ---------------------------------------------------------------

def classify(info, ctx, q: dict) -> dict:
    """The dump record of a UDP socket (cached per inode); raises the
    `socket` refusal."""
    ino = inode_of(info.link)
    key = f"udp:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    fam = q["family"]
    name = q["name"]
    head = f"udp{_v(fam)} {_ep_text(name) if name and name[1] else 'unbound'}"
    if q["peer"] is not None:
        head += f"->{_ep_text(q['peer'])}"
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    fresh = fresh_options(ctx, fam, _socket.SOCK_DGRAM, _socket.IPPROTO_UDP)
    with dup_of(info) as mine:
        opts = options(info, ctx, fam, _socket.SOCK_DGRAM, _socket.IPPROTO_UDP, mine)
        try:
            setnames = check_options(info, opts, fresh)
        except Refusal as e:
            raise refuse(info, "socket", f"{head}: {e.detail}") from None
        if _sockpeek.outq(mine):
            raise refuse(info, "socket", f"{head}: {_sockpeek.outq(mine)} bytes corked, not sent yet "
                         "(UDP_CORK / MSG_MORE)")
        try:
            groups = _mcast.memberships(info.pid, mine, fam)
        except OSError as e:
            raise refuse(info, "socket", f"{head}: its multicast memberships cannot be read ({e.strerror})") from e
        try:
            shut, exact = shutdown_bits(mine, fam, _socket.IPPROTO_UDP, ino)
        except OSError as e:
            raise refuse(info, "socket", f"{head}: its shutdown state cannot be read ({e.strerror})") from e
        if shut and not exact:
            raise refuse(info, "socket", f"{head}: shut down for reading while unbound: whether for "
                         "writing too cannot be read (sock_diag lists no unbound socket)")
        charge = rmem(mine)
        msgs: List[dict] = []
        if charge:
            if _sockopts.as_int(opts.get("SO_PEEK_OFF")) >= 0:
                raise refuse(info, "socket", f"{head}: datagrams queued while the process peeks at an "
                             "offset (SO_PEEK_OFF): which ones it already saw cannot be reproduced")
            try:
                msgs = peek_queue(mine, fam, charge // 256 + 2)
                rcvbuf = _sockopts.as_int(opts["SO_RCVBUF"])
                got = replica_charge(fam, msgs, rcvbuf)
            except _sockpeek.Unreadable as e:
                raise refuse(info, "socket", f"{head}: {e}") from None
            except OSError as e:
                if e.errno in (_errno.EADDRNOTAVAIL, _errno.EADDRINUSE, _errno.EPERM):
                    raise refuse(info, "socket", f"{head}: the queue cannot be checked: {e.strerror}") from e
                raise EngineError(f"peeking pid {info.pid} fd {info.fd}: {e.strerror}", pid=info.pid,
                                  errno=e.errno) from e
            if got != charge:
                raise refuse(info, "socket", f"{head}: the peeked datagrams ({len(msgs)}, "
                             f"{sum(len(m['data']) for m in msgs)} bytes) do not account for the queue "
                             f"(receive charge {charge}, expected {got}): a datagram hidden from peeking, "
                             "or datagrams that came through a network device")
    rec = {"sock": "udp", "family": fam, "inode": ino, "addr": _ep(name) if name else None,
           "peer": _ep(q["peer"]) if q["peer"] is not None else None, "opts": opts, "set": setnames,
           "mcast": groups, "shutdown": shut,
           "msgs": [{"len": len(m["data"]), "src": m["src"], "dst": m["dst"], "anc": m["anc"]} for m in msgs],
           "_data": b"".join(m["data"] for m in msgs)}
    ctx.shared[key] = rec
    return rec


def text(rec: dict) -> str:
    fam = rec["family"]
    addr = rec["addr"]
    s = f"udp{_v(fam)} {_ep_text(addr) if addr and addr[1] else 'unbound'}"
    if rec["peer"]:
        s += f"->{_ep_text(rec['peer'])}"
    if rec["msgs"]:
        s += f", {len(rec['msgs'])} datagrams ({sum(m['len'] for m in rec['msgs'])} bytes) queued"
    if rec["mcast"]:
        s += ", multicast " + " ".join(_mcast.text(m) for m in rec["mcast"])
    if rec["set"]:
        s += ", options " + ", ".join(rec["set"])
    if rec.get("shutdown"):
        s += ", shut down for " + {1: "reading", 2: "writing", 3: "reading and writing"}[rec["shutdown"]]
    return s


def dump(info, ctx, q: dict) -> dict:
    rec = dict(classify(info, ctx, q))
    data = rec.pop("_data")
    rec["data"] = None
    if data:
        rec["data"] = f"fds/sock-{rec['inode']}"
        ctx.image.write_bytes(rec["data"], data)
    return rec


# -- the refill -------------------------------------------------------------

def _sender(family: int, src: list) -> _socket.socket:
    """A socket bound to `src`, whether or not the address is this
    machine's. Raises OSError (EADDRINUSE: the port is taken)."""
    fam = _socket.AF_INET6 if ":" in src[0] else _socket.AF_INET
    s = _socket.socket(fam, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        if fam == _socket.AF_INET6:
            s.setsockopt(_socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            s.setsockopt(_socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            s.bind((src[0], src[1], 0, src[3] if len(src) > 3 else 0))
        else:
            s.setsockopt(_socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            s.setsockopt(_socket.IPPROTO_IP, IP_FREEBIND, 1)
            s.bind((src[0], src[1]))
    except BaseException:
        s.close()
        raise
    return s


def _mapped_v4(addr: str) -> Optional[str]:
    return addr[7:] if addr.startswith("::ffff:") and "." in addr else None


def _send(src: list, dst: tuple, data: bytes, own: Optional[_socket.socket] = None) -> None:
    """Send `data` from `src` to `dst` (a v4-mapped IPv6 source is sent
    over IPv4, as it arrived)."""
    v4 = _mapped_v4(src[0])
    if v4 is not None:
        src = [v4, src[1]]
        dst = (_mapped_v4(dst[0]) or dst[0], dst[1])
    if own is not None:
        n = own.sendto(data, _socket.MSG_DONTWAIT, dst)
    else:
        with _sender(0, src) as s:
            n = s.sendto(data, _socket.MSG_DONTWAIT, dst)
    if n != len(data):
        raise OSError(_errno.EMSGSIZE, f"short datagram send {n} of {len(data)}")


def _dst_tuple(dst: list) -> tuple:
    return (dst[0], dst[1], 0, dst[3]) if ":" in dst[0] else (dst[0], dst[1])


def replica_charge(family: int, msgs: List[dict], rcvbuf: int) -> int:
    """SO_MEMINFO rmem_alloc of a scratch socket with receive buffer
    `rcvbuf` after the datagrams `msgs` were sent to it from their sources.
    Raises OSError."""
    with _socket.socket(family, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC) as r:
        r.setsockopt(_socket.SOL_SOCKET, _sockopts.SO_RCVBUFFORCE, rcvbuf // 2)
        r.bind(("::", 0) if family == _socket.AF_INET6 else ("0.0.0.0", 0))
        port = r.getsockname()[1]
        for m in msgs:
            src = m["src"]
            if _mapped_v4(src[0]) is not None or family == _socket.AF_INET:
                dst = ("127.0.0.1", port)
            else:
                dst = ("::1", port, 0, 0)
            try:
                _send(src, dst if _mapped_v4(src[0]) is None else ("::ffff:127.0.0.1", port), m["data"])
            except OSError as e:
                if e.errno == _errno.EADDRINUSE:
                    # The source port is bound here (the sender, or this very
                    # socket): a temporary port gives the same charge.
                    _send([src[0], 0] + src[2:], dst if _mapped_v4(src[0]) is None
                          else ("::ffff:127.0.0.1", port), m["data"])
                else:
                    raise
        return rmem(r.fileno())


# -- restore --------------------------------------------------------------

def validate(rec: dict, ctx) -> None:
    fam = rec.get("family")
    if fam not in (_socket.AF_INET, _socket.AF_INET6) or not isinstance(rec.get("msgs"), list) or \
            not isinstance(rec.get("mcast"), list) or rec.get("shutdown", 0) not in (0, 1, 2, 3) or \
            not _sockopts.valid_record(rec.get("opts"), rec.get("set"), fam, "udp"):
        raise refuse_rec(rec, ctx, "image-invalid", "udp socket record malformed")
    if sum(m["len"] for m in rec["msgs"]) != (len(ctx.image.read_bytes(rec["data"])) if rec.get("data") else 0):
        raise refuse_rec(rec, ctx, "image-invalid", "udp queue lengths do not add up")


def _messages(rec: dict, ctx) -> List[bytes]:
    data = ctx.image.read_bytes(rec["data"]) if rec.get("data") else b""
    out, off = [], 0
    for m in rec["msgs"]:
        out.append(data[off:off + m["len"]])
        off += m["len"]
    return out


def _addr_tuple(fam: int, a: list) -> tuple:
    return tuple(a) if fam == _socket.AF_INET6 else (a[0], a[1])


def restore(rec: dict, ctx) -> int:
    """The rebuilt UDP socket's fd in the restorer. Raises the `socket`
    refusal (address in use, a source port taken, a queue or option that
    reads back differently) or EngineError."""
    fam = rec["family"]
    text_ = text(rec)
    s = _socket.socket(fam, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC, _socket.IPPROTO_UDP)
    with building(s, rec, ctx, f"recreating {text_}"):
        _sockopts.apply(s, rec["opts"], rec["set"])
        _mcast.join_all(s, rec, ctx, text_)
        addr = rec["addr"]
        if addr and addr[1]:
            try:
                s.bind(_addr_tuple(fam, addr))
            except OSError as e:
                if e.errno in (_errno.EADDRINUSE, _errno.EADDRNOTAVAIL):
                    why = "address in use" if e.errno == _errno.EADDRINUSE else "address not available here"
                    raise refuse_rec(rec, ctx, "socket", f"{text_}: {why}") from None
                raise
        msgs = _messages(rec, ctx)
        if msgs:
            grow = sum(len(m) for m in msgs) * 2 + 4096 * (len(msgs) + 1) + (1 << 20)
            _sockopts.set_buffer(s, "SO_RCVBUF", max(grow, _sockopts.as_int(rec["opts"]["SO_RCVBUF"])))
            own = _ep(s.getsockname())
            for m, data in zip(rec["msgs"], msgs):
                # Sent to itself: the rebuilt socket holds that port now.
                self_sent = m["src"][1] == own[1] and own[0] in (m["src"][0], "0.0.0.0", "::")
                try:
                    _send(m["src"], _dst_tuple(m["dst"]), data, s if self_sent else None)
                except OSError as e:
                    if e.errno == _errno.EADDRINUSE:
                        raise refuse_rec(rec, ctx, "socket", f"{text_}: a queued datagram came from "
                                         f"{_ep_text(m['src'])}, a port another socket holds here; it "
                                         "cannot be re-sent from that address") from None
                    raise
            _sockopts.set_buffer(s, "SO_RCVBUF", _sockopts.as_int(rec["opts"]["SO_RCVBUF"]))
        if rec["peer"]:
            s.connect(_addr_tuple(fam, rec["peer"]))
        # After the refill: a socket shut down for writing cannot send
        # itself the datagrams it had sent itself.
        shut_down(s, rec.get("shutdown", 0))
        _sockopts.apply_late(s, rec["opts"], list(rec["set"]) +
                             (["SO_BUF_LOCK"] if msgs and rec["opts"].get("SO_BUF_LOCK") is not None else []))
        _sockopts.verify(s, fam, "udp", rec["opts"])
        if rec["msgs"]:
            got = peek_queue(s.fileno(), fam, len(rec["msgs"]) + 2)
            want = [{"data": d, "src": m["src"], "dst": m["dst"], "anc": m["anc"]}
                    for m, d in zip(rec["msgs"], msgs)]
            if [_norm(g) for g in got] != [_norm(w) for w in want]:
                raise refuse_rec(rec, ctx, "socket", f"{text_}: the refilled queue differs from the dumped one "
                                 f"({len(got)} datagrams, {len(want)} dumped)")
        if rec.get("shutdown"):
            now, _ = shutdown_bits(s.fileno(), fam, _socket.IPPROTO_UDP, os.fstat(s.fileno()).st_ino)
            if now != rec["shutdown"]:
                raise refuse_rec(rec, ctx, "socket", f"{text_}: shutdown state {now} after restore, "
                                 f"was {rec['shutdown']}")
        try:
            _mcast.check(s, os.getpid(), fam, rec["mcast"])
        except OSError as e:
            raise refuse_rec(rec, ctx, "socket", f"{text_}: {e.strerror}") from None
        fd = s.detach()
    return with_status_flags(rec, ctx, fd)


def _norm(m: dict) -> Tuple:
    return (m["data"], tuple(m["src"][:2]), tuple(m["dst"][:2]), tuple(tuple(a) for a in m["anc"]))
