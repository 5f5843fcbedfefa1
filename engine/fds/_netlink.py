"""NETLINK_ROUTE and NETLINK_AUDIT sockets with nothing queued: port id,
multicast groups, destination, options.

At dump: getsockname gives the port id (nl_pid: 0 until the socket is
bound, explicitly or by the kernel on its first send) and the first 32
groups; NETLINK_LIST_MEMBERSHIPS every group; getpeername the destination
set by connect(2); /proc/PID/net/netlink the bytes waiting to be read
(Rmem) and whether a dump is in progress (Dump) - either refuses, as the
messages (or the rest of the dump) cannot be asked of the kernel again.
Every other netlink protocol is refused by name.

NETLINK_AUDIT: what daemons hold to log through the kernel's audit
(dbus-daemon, sshd, login via libaudit's audit_open). The kernel keeps no
state for such a socket beyond its port id and groups - requests are
answered at once, into the queue the dump finds empty - except for the
one the audit daemon registered with AUDIT_SET (its pid and port id, where
every audit record goes: kernel/audit.c auditd_conn). That one is refused:
the dump asks the kernel (AUDIT_GET) for the audit daemon's pid and
refuses the sockets of that process, or all when it cannot be asked.

At restore: socket, options, bind to the same port id explicitly (the
kernel's autobind would pick another one; a port id taken here meanwhile
is refused), the groups beyond 32 with NETLINK_ADD_MEMBERSHIP, connect,
and everything read back.
"""

from __future__ import annotations

import errno as _errno
import os
import socket as _socket
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List

from .. import netinfo
from ..errors import Refusal
from . import _sockopts, _udp
from ._sockbase import building, check_options, dup_of, fresh_options, inode_of, options, outside_holders
from ._util import refuse, refuse_rec, with_status_flags

AF_NETLINK = getattr(_socket, "AF_NETLINK", 16)
NETLINK_ROUTE = 0
NETLINK_AUDIT = 9
PROTOCOLS = (NETLINK_ROUTE, NETLINK_AUDIT)
AUDIT_GET = 1000
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_LIST_MEMBERSHIPS = 9
_TYPES = {_socket.SOCK_RAW: "raw", _socket.SOCK_DGRAM: "dgram"}


def groups_of(fd: int) -> List[int]:
    """Every multicast group (1-based) the netlink socket `fd` is in."""
    s = _socket.socket(fileno=os.dup(fd))
    try:
        raw = s.getsockopt(SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, 1024)
    finally:
        s.close()
    out = []
    for i in range(len(raw) // 4):
        word, = struct.unpack_from("=I", raw, 4 * i)
        out.extend(32 * i + b + 1 for b in range(32) if word >> b & 1)
    return out


def classify(info, ctx, q: dict) -> dict:
    """The dump record of a NETLINK_ROUTE or NETLINK_AUDIT socket; raises
    the `socket` refusal (other protocols included)."""
    ino = inode_of(info.link)
    key = f"netlink:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    proto = q["proto"]
    head = f"netlink {netinfo.NETLINK_PROTOCOLS.get(proto, proto)}"
    if proto not in PROTOCOLS or q["type"] not in _TYPES:
        raise refuse(info, "socket", f"{head} {_TYPES.get(q['type'], q['type'])}: only NETLINK_ROUTE and "
                     "NETLINK_AUDIT sockets are restored")
    if proto == NETLINK_AUDIT:
        daemon = ctx.shared.get("netlink:auditd")
        if daemon is None:
            daemon = ctx.shared["netlink:auditd"] = audit_daemon_pid()
        if daemon == info.pid or daemon == -1:
            why = "the process is the audit daemon (AUDIT_SET): the kernel's audit records go to its socket" \
                if daemon == info.pid else "the audit daemon's pid could not be asked of the kernel (AUDIT_GET)"
            raise refuse(info, "socket", f"{head}: {why}")
    portid, _ = q["name"]
    head += f" port {portid}"
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    # /proc/net/netlink lists bound sockets only (an unbound one has sent
    # nothing, so no dump can be running on it); SO_MEMINFO measures the
    # receive queue of any.
    row = netinfo.parse_netlink(netinfo.read_table(info.pid, "netlink")).get(ino)
    if row is None and portid:
        raise refuse(info, "socket", f"{head}: not in /proc/net/netlink; whether a dump runs cannot be known")
    if row is not None and row["dump"]:
        raise refuse(info, "socket", f"{head}: a dump is in progress")
    with dup_of(info) as mine:
        queued = _udp.rmem(mine)
    if queued:
        raise refuse(info, "socket", f"{head}: {queued} bytes of messages queued to be read")
    fresh = fresh_options(ctx, AF_NETLINK, q["type"], proto)
    with dup_of(info) as mine:
        opts = options(info, ctx, AF_NETLINK, q["type"], proto, mine)
        groups = groups_of(mine)
    try:
        setnames = check_options(info, opts, fresh)
    except Refusal as e:
        raise refuse(info, "socket", f"{head}: {e.detail}") from None
    peer = list(q["peer"]) if q["peer"] is not None else [0, 0]
    rec = {"sock": "netlink", "type": q["type"], "proto": proto, "inode": ino, "portid": portid,
           "groups": groups, "peer": peer, "opts": opts, "set": setnames}
    ctx.shared[key] = rec
    return rec


def audit_daemon_pid() -> int:
    """The pid the kernel sends audit records to (0: none), asked with
    AUDIT_GET on a socket of ckpt's own; -1 when it cannot be asked."""
    try:
        s = _socket.socket(AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_AUDIT)
    except OSError:
        return -1
    try:
        s.settimeout(2.0)
        s.bind((0, 0))
        s.sendto(struct.pack("=IHHII", 16, AUDIT_GET, 1, 1, 0), (0, 0))
        while True:
            msg = s.recv(65536)
            length, mtype, _, seq, _ = struct.unpack_from("=IHHII", msg)
            if mtype == 2:          # NLMSG_ERROR: an ack (0) comes first on some kernels; else the error
                err, = struct.unpack_from("=i", msg, 16)
                if err:
                    return -1
                continue
            if mtype == AUDIT_GET and len(msg) >= 16 + 16:
                _, _, _, pid = struct.unpack_from("=IIII", msg, 16)
                return pid
    except OSError:
        return -1
    finally:
        s.close()


def text(rec: dict) -> str:
    s = f"netlink {netinfo.NETLINK_PROTOCOLS.get(rec['proto'], rec['proto'])} {_TYPES[rec['type']]} port {rec['portid']}"
    if rec["groups"]:
        s += f", groups {','.join(map(str, rec['groups']))}"
    if any(rec["peer"]):
        s += f", connected to {rec['peer'][0]}/{rec['peer'][1]}"
    if rec["set"]:
        s += ", options " + ", ".join(rec["set"])
    return s


def validate(rec: dict, ctx) -> None:
    if rec.get("proto") not in PROTOCOLS or rec.get("type") not in _TYPES or \
            not isinstance(rec.get("portid"), int) or not isinstance(rec.get("groups"), list):
        raise refuse_rec(rec, ctx, "image-invalid", "netlink socket record malformed")


def _mask(groups: List[int]) -> int:
    return sum(1 << (g - 1) for g in groups if g <= 32)


def restore(rec: dict, ctx) -> int:
    """The rebuilt netlink socket. Raises the `socket` refusal (port id
    taken, a group or option that reads back differently) or EngineError."""
    what = text(rec)
    s = _socket.socket(AF_NETLINK, rec["type"] | _socket.SOCK_CLOEXEC, rec["proto"])
    with building(s, rec, ctx, f"recreating {what}"):
        _sockopts.apply(s, rec["opts"], rec["set"])
        if rec["portid"]:
            try:
                s.bind((rec["portid"], _mask(rec["groups"])))
            except OSError as e:
                if e.errno == _errno.EADDRINUSE:
                    raise refuse_rec(rec, ctx, "socket", f"{what}: port id {rec['portid']} is taken here") from None
                raise
        # Groups beyond the bind mask (or all, for a socket without a port
        # id: bind() would autobind it) are joined one by one.
        for g in rec["groups"]:
            if g > 32 or not rec["portid"]:
                s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)
        if any(rec["peer"]):
            s.connect(tuple(rec["peer"]))
        _sockopts.apply_late(s, rec["opts"], rec["set"])
        _sockopts.verify(s, AF_NETLINK, False, rec["opts"])
        if s.getsockname()[0] != rec["portid"] or groups_of(s.fileno()) != rec["groups"]:
            raise refuse_rec(rec, ctx, "socket", f"{what}: reads back as port {s.getsockname()[0]}, "
                             f"groups {groups_of(s.fileno())}")
        fd = s.detach()
    return with_status_flags(rec, ctx, fd)
