"""Sockets: the safe subset is restored exactly, everything else is refused
with `socket`, the detail naming family, type and state ("unix stream
listening /run/x.sock", "unix stream connected (socketpair)",
"tcp established 127.0.0.1:5000->127.0.0.1:41234", "tcp listening
0.0.0.0:8080", "udp 127.0.0.1:5353", "netlink route", "packet").

Restored (one module each):

- unix socketpairs (stream, dgram, seqpacket) with both ends held by the
  process only, queued data both ways, shutdown state and options
  (_unixpair), files in flight in SCM_RIGHTS messages and SCM_CREDENTIALS
  (_inflight);
- unix stream/seqpacket listeners, path-bound (also a ghost, its file
  unlinked since) or abstract, with an empty accept queue (_unixlisten);
- connections waiting in such a listener's accept queue, whose connecting
  ends the process holds (_unixpending);
- unix sockets connected through a name with both ends in the dump: a
  client and the end its listener accepted, datagram sockets connected to
  bound ones, names, peers, queues both ways (_unixnamed);
- unix datagram sockets bound to a path (also a ghost: unlinked since) or
  an abstract name, unconnected, with an empty queue or one that a single
  connected sender of the dump made, and every other unix
  socket neither connected nor listening (stream, seqpacket, an unbound
  datagram one), bound or not, with its shutdown bits (_unixdgram);
- TCP sockets that never connected (socket(), options, perhaps bound):
  the same options, address and port, shutdown bits (_tcpunconn);
- TCP listeners, IPv4 and IPv6, with an empty accept queue or one
  connection waiting from a client the process holds, nothing sent
  (_inetsock; the client reconnects at restore: _tcpconn);
- established TCP connections through TCP_REPAIR, both ends held by the
  process, or the peer outside behind a network lock (_tcpconn,
  engine.netlock);
- UDP sockets, IPv4 and IPv6, bound or connected, with options, multicast
  memberships and the receive queue with each datagram's addresses
  (_udp, _mcast);
- NETLINK_ROUTE sockets with nothing queued: port id, groups, destination,
  options (_netlink);
- ICMP datagram ("ping") sockets (_ping) and raw ICMP sockets with their
  BPF filter (_raw), nothing queued. Packet sockets, other raw protocols
  and other netlink protocols stay refused by name.

Family/type/protocol/listening come from getsockopt (SO_DOMAIN, SO_TYPE,
SO_PROTOCOL, SO_ACCEPTCONN) and getsockname/getpeername on a pidfd_getfd
duplicate (all read-only); TCP/UDP states and netlink/packet details from
the target's /proc/PID/net tables, matched by socket inode; peers,
shutdown bits, accept queues and backlogs from sock_diag (engine.netdiag).
A restore record carries ``rec["sock"]``, the sub-kind.
"""

from __future__ import annotations

import os
import socket as _socket

from .. import netinfo, pidfd
from ..errors import Refusal
from . import (_inetsock, _netlink, _ping, _raw, _sockfilter, _tcpconn, _tcpunconn, _sys, _udp, _unixdgram,
               _unixlisten, _unixnamed, _unixpair, _unixpending)
from ._sockbase import UNIX_TYPES, is_tcp, is_udp, same_netns
from ._util import check_async, refuse, refuse_rec

KIND = "socket"
# and, for files in flight in a unix socket's queue, their own kinds' (_inflight)
REASONS = ("socket", "tcp-lock", "peer-pid-in-use", "unsupported-state", "image-invalid",
           "unsupported-fd", "file-missing", "file-changed", "unlinked-too-large")

_TYPES = {_socket.SOCK_STREAM: "stream", _socket.SOCK_DGRAM: "dgram", _socket.SOCK_SEQPACKET: "seqpacket",
          _socket.SOCK_RAW: "raw"}


def _unix_name(name) -> str:
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    if not name:
        return ""
    return "@" + name[1:] if name.startswith("\0") else name


def _ask(info) -> dict:
    with pidfd.target_fd(info.pid, info.fd) as dup:
        s = _socket.socket(fileno=os.dup(dup))
        try:
            out = {"family": s.family, "type": s.type, "proto": s.proto,
                   "listening": bool(s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN)),
                   "queued": None}
            try:
                out["name"] = s.getsockname()
            except OSError:
                out["name"] = None
            try:
                out["peer"] = s.getpeername()
            except OSError:
                out["peer"] = None
            try:
                out["queued"] = _sys.fionread(dup)
            except OSError:
                pass
        finally:
            s.close()
    return out


def _table(info, names) -> dict:
    for name in names:
        row = netinfo.parse_inet(netinfo.read_table(info.pid, name)).get(info.ino)
        if row is not None:
            return row
    return {}


def describe(info) -> str:
    """One line naming family, type and state of the socket at info."""
    q = _ask(info)
    fam, typ = q["family"], _TYPES.get(q["type"], f"type {int(q['type'])}")
    queued = f", {q['queued']} bytes queued" if q["queued"] else ""
    if fam == _socket.AF_UNIX:
        name, peer = _unix_name(q["name"]), _unix_name(q["peer"]) if q["peer"] is not None else None
        if q["listening"]:
            return f"unix {typ} listening {name or '(unnamed)'}"
        if peer is not None:
            if not name and not peer:
                return f"unix {typ} connected (socketpair){queued}"
            return f"unix {typ} connected {name or '(unnamed)'}->{peer or '(unnamed)'}{queued}"
        return f"unix {typ} {'bound ' + name if name else 'unconnected'}{queued}"
    if fam in (_socket.AF_INET, _socket.AF_INET6):
        v6 = "6" if fam == _socket.AF_INET6 else ""
        if q["type"] == _socket.SOCK_STREAM and q["proto"] in (0, _socket.IPPROTO_TCP):
            row = _table(info, ("tcp" + v6,))
            state = netinfo.TCP_STATES.get(row.get("state"), "unconnected" if not row else f"state {row.get('state')}")
            local = netinfo.endpoint_text(row["local"]) if row else ""
            if q["listening"] or state == "listening":
                return f"tcp{v6} listening {local}"
            remote = netinfo.endpoint_text(row["remote"]) if row else ""
            return f"tcp{v6} {state} {local}->{remote}{queued}" if row else f"tcp{v6} {state}"
        if q["type"] == _socket.SOCK_DGRAM and q["proto"] in (0, _socket.IPPROTO_UDP):
            row = _table(info, ("udp" + v6,))
            if not row:
                return f"udp{v6} unbound"
            peer = "->" + netinfo.endpoint_text(row["remote"]) if row["remote"][1] else ""
            return f"udp{v6} {netinfo.endpoint_text(row['local'])}{peer}{queued}"
        return f"inet{v6} {typ} protocol {q['proto']}"
    if fam == getattr(_socket, "AF_NETLINK", 16):
        return f"netlink {netinfo.NETLINK_PROTOCOLS.get(q['proto'], q['proto'])}"
    if fam == getattr(_socket, "AF_PACKET", 17):
        return f"packet {typ}"
    return f"family {int(fam)} {typ}"


def _describe_safely(info) -> str:
    try:
        return describe(info)
    except OSError as e:
        # The refusal stands; only its detail is poorer.
        return f"socket inode {info.ino} (details unavailable: {e.strerror})"


def _waiting(info) -> bool:
    """Whether the unix socket at `info` waits in a listener's accept
    queue (listeners name their waiting connecting ends: UNIX_DIAG_ICONS)."""
    from .. import netdiag
    from ._sockbase import inode_of
    try:
        ino = inode_of(info.link)
        return any(ino in s["icons"] for s in netdiag.unix_sockets() if s["icons"])
    except OSError:
        return False


def _subkind(info, ctx=None):
    """(sub-kind, facts) of a socket the engine can restore, or raises the
    `socket` refusal describing it. Raises EngineError when the fd cannot
    be inspected."""
    try:
        q = _ask(info)
    except OSError as e:
        raise refuse(info, "socket", _describe_safely(info)) from e
    fam, typ = q["family"], q["type"]
    kind = None
    if fam == _socket.AF_UNIX and typ in UNIX_TYPES:
        if q["listening"]:
            kind = "unix-listen" if typ != _socket.SOCK_DGRAM else None
        elif q["peer"] is not None and not _unix_name(q["name"]) and not _unix_name(q["peer"]):
            kind = "unix-pair"
        elif typ == _socket.SOCK_DGRAM and q["peer"] is None and _unix_name(q["name"]):
            kind = "unix-dgram"
        elif q["peer"] is None:
            kind = "unix-unconn"      # neither connected nor listening (_unixdgram)
        elif typ != _socket.SOCK_DGRAM and q["peer"] is not None and _unix_name(q["peer"]) and \
                not _unix_name(q["name"]) and _waiting(info):
            kind = "unix-pending"
        elif q["peer"] is not None:
            kind = "unix-named"       # connected through a name, both ends in the dump (_unixnamed)
    elif is_tcp(fam, typ, q["proto"]) and q["listening"]:
        kind = "tcp-listen"
    elif is_tcp(fam, typ, q["proto"]) and q["peer"] is not None:
        kind = "tcp-conn"         # its classify refuses every state but established
    elif is_tcp(fam, typ, q["proto"]):
        kind = "tcp-unconn"       # its classify refuses any that ever connected
    elif is_udp(fam, typ, q["proto"]):
        kind = "udp"
    elif _ping.is_ping(fam, typ, q["proto"]):
        kind = "ping"             # ICMP datagram sockets (ping(8)): nothing queued
    elif _raw.is_raw(fam, typ, q["proto"]):
        kind = "raw"              # raw ICMP sockets (ping(8) as root): nothing queued
    elif fam == _netlink.AF_NETLINK:
        kind = "netlink"          # its classify refuses every protocol but NETLINK_ROUTE and NETLINK_AUDIT
    if kind is None:
        raise refuse(info, "socket", _describe_safely(info))
    if not same_netns(info.pid):
        raise refuse(info, "socket", f"{_describe_safely(info)}: in another network namespace")
    check_async(info, ctx)
    return kind, q


_CLASSIFY = {"unix-pair": (_unixpair.pair_classify, _unixpair.pair_text),
             "unix-listen": (_unixlisten.listener_classify, _unixlisten.listener_text),
             "tcp-listen": (_inetsock.listener_classify, _inetsock.listener_text),
             "tcp-conn": (_tcpconn.classify, _tcpconn.text),
             "tcp-unconn": (_tcpunconn.classify, _tcpunconn.text),
             "udp": (_udp.classify, _udp.text),
             "ping": (_ping.classify, _ping.text),
             "raw": (_raw.classify, _raw.text),
             "netlink": (_netlink.classify, _netlink.text),
             "unix-dgram": (_unixdgram.classify, _unixdgram.text),
             "unix-unconn": (_unixdgram.classify, _unixdgram.text),
             "unix-pending": (_unixpending.client_classify, _unixpending.client_text),
             "unix-named": (_unixnamed.classify, _unixnamed.text)}
_RESTORE = {"unix-pair": (_unixpair.pair_validate, _unixpair.pair_restore),
            "unix-listen": (_unixlisten.listener_validate, _unixlisten.listener_restore),
            "tcp-listen": (_inetsock.listener_validate, _inetsock.listener_restore),
            "tcp-conn": (_tcpconn.validate, _tcpconn.restore),
            "tcp-unconn": (_tcpunconn.validate, _tcpunconn.restore),
            "udp": (_udp.validate, _udp.restore),
            "ping": (_ping.validate, _ping.restore),
            "raw": (_raw.validate, _raw.restore),
            "netlink": (_netlink.validate, _netlink.restore),
            "unix-dgram": (_unixdgram.validate, _unixdgram.restore),
            "unix-unconn": (_unixdgram.validate, _unixdgram.restore),
            "unix-pending": (_unixpending.client_validate, _unixpending.client_restore),
            "unix-named": (_unixnamed.validate, _unixnamed.restore)}


def classify(info, ctx) -> str:
    """A one-line description of a restorable socket; raises the `socket`
    refusal (family, type, state and why) for every other one,
    unsupported-state for O_ASYNC, EngineError when it cannot be inspected."""
    kind, q = _subkind(info, ctx)
    check, text = _CLASSIFY[kind]
    out = text(check(info, ctx, q))
    _sockfilter.check(info, kind)
    return out


def dump(info, ctx) -> dict:
    """The restore record (queued bytes go to fds/sock-INODE). Raises as
    classify."""
    kind, q = _subkind(info, ctx)
    if kind == "unix-pair":
        rec = _unixpair.pair_dump(info, ctx, q)
    elif kind == "unix-named":
        rec = _unixnamed.dump(info, ctx, q)
    elif kind == "unix-dgram" and "_data" in _unixdgram.classify(info, ctx, q):
        rec = _unixpair.store(_unixdgram.classify(info, ctx, q), ctx)     # a queue (_unixdgram._queued)
    elif kind == "udp":
        rec = _udp.dump(info, ctx, q)
    elif kind == "tcp-conn":
        rec = _tcpconn.dump(info, ctx, q)
    else:
        rec = dict(_CLASSIFY[kind][0](info, ctx, q))
    return _sockfilter.dump(info, rec, kind)


def _sub(rec: dict, ctx):
    pair = _RESTORE.get(rec.get("sock"))
    if pair is None:
        raise refuse_rec(rec, ctx, "socket", f"socket record of kind {rec.get('sock')!r} cannot be restored")
    return pair


def validate(rec: dict, ctx) -> None:
    """Restore pre-flight: raises socket (address in use, ...) or image-invalid."""
    try:
        _sub(rec, ctx)[0](rec, ctx)
        _sockfilter.validate(rec, ctx)
    except (KeyError, TypeError, ValueError) as e:
        raise refuse_rec(rec, ctx, "image-invalid", f"socket record malformed: {e!r}") from None


def restore(rec: dict, ctx) -> int:
    """The rebuilt socket's fd in the restorer. Raises Refusal (socket:
    address in use, a value that reads back differently) before the new
    process exists, or EngineError."""
    try:
        fd = _sub(rec, ctx)[1](rec, ctx)
        _sockfilter.restore(rec, ctx, fd)
        return fd
    except Refusal:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise refuse_rec(rec, ctx, "image-invalid", f"socket record malformed: {e!r}") from None


def finish(rec: dict, ctx, task) -> None:
    """After every fd is installed: an established TCP connection leaves
    repair mode (engine/fds/_tcpconn.py). Raises EngineError."""
    if rec.get("sock") == "tcp-conn":
        _tcpconn.finish(rec, ctx, task)
