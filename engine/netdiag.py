"""sock_diag (NETLINK_SOCK_DIAG) queries, from Python's own AF_NETLINK
socket: the facts about sockets that neither /proc/net/* nor getsockopt
expose.

- unix (net/unix/diag.c): the peer's inode (UNIX_DIAG_PEER), shutdown
  bits (UNIX_DIAG_SHUTDOWN: RCV_SHUTDOWN 1, SEND_SHUTDOWN 2), the bound
  file's inode (UNIX_DIAG_VFS), and for a listener its accept queue length
  and backlog (UNIX_DIAG_RQLEN: rqueue = pending connections, wqueue =
  sk_max_ack_backlog) plus the inodes of the pending connections
  (UNIX_DIAG_ICONS).
- inet (net/ipv4/inet_diag.c inet_sk_diag_fill): for a TCP listener,
  idiag_rqueue = sk_ack_backlog (connections waiting in accept()) and
  idiag_wqueue = sk_max_ack_backlog (the backlog given to listen(2)) -
  the one place the kernel reports a listener's backlog ("ss -l" Send-Q).

Queries answer for the caller's network namespace: callers check that the
target shares it. Every function raises OSError on a netlink failure
(ENOENT from an exact lookup: no such socket).
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Iterator, List, Optional, Tuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

# include/uapi/linux/unix_diag.h
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN = 1, 2, 4, 8, 0x10
UDIAG_SHOW_UID = 0x40
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS, UNIX_DIAG_RQLEN = 0, 1, 2, 3, 4
UNIX_DIAG_SHUTDOWN = 6
_UNIX_SHOW_ALL = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN
NOCOOKIE = 0xFFFFFFFF       # INET_DIAG_NOCOOKIE: an exact lookup by inode, no cookie check

RCV_SHUTDOWN = 1
SEND_SHUTDOWN = 2
TCP_LISTEN = 10
INET_DIAG_SHUTDOWN = 8      # include/uapi/linux/inet_diag.h: u8 sk_shutdown, always sent


def _kdev_to_dev(kdev: int) -> int:
    # UNIX_DIAG_VFS reports the superblock's s_dev in the kernel's encoding
    # (MAJOR << 20 | MINOR, include/linux/kdev_t.h).
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)


def _query(payload: bytes, dump: bool) -> Iterator[bytes]:
    """Send one SOCK_DIAG_BY_FAMILY request; yield each answer's payload."""
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
    msg = struct.pack("=IHHII", 16 + len(payload), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + payload
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as s:
        s.sendto(msg, (0, 0))
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, typ, _, _, _ = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    return
                body = data[off + 16:off + length]
                off += (length + 3) & ~3
                if typ == NLMSG_DONE:
                    return
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", body)[0]
                    if err:
                        raise OSError(err, f"sock_diag: {os.strerror(err)}")
                    return
                yield body
                if not dump:
                    return


def _attrs(data: bytes, off: int) -> Dict[int, bytes]:
    """struct nlattr list (u16 len, u16 type, payload padded to 4)."""
    out: Dict[int, bytes] = {}
    while off + 4 <= len(data):
        ln, typ = struct.unpack_from("=HH", data, off)
        if ln < 4:
            break
        out.setdefault(typ & 0x3FFF, data[off + 4:off + ln])
        off += (ln + 3) & ~3
    return out


def _unix_msg(body: bytes) -> dict:
    # struct unix_diag_msg { u8 family, type, state, pad; u32 ino; u32 cookie[2]; }
    _, typ, state, _, ino = struct.unpack_from("=BBBBI", body)
    a = _attrs(body, 16)
    out: dict = {"inode": ino, "type": typ, "state": state, "name": None, "vfs": None,
                 "peer": None, "icons": [], "rqueue": None, "wqueue": None, "shutdown": 0}
    if UNIX_DIAG_NAME in a:
        raw = a[UNIX_DIAG_NAME]
        out["name"] = raw
    if UNIX_DIAG_VFS in a:
        vino, vdev = struct.unpack_from("=II", a[UNIX_DIAG_VFS])
        out["vfs"] = (_kdev_to_dev(vdev), vino)
    if UNIX_DIAG_PEER in a:
        out["peer"] = struct.unpack_from("=I", a[UNIX_DIAG_PEER])[0]
    if UNIX_DIAG_ICONS in a:
        raw = a[UNIX_DIAG_ICONS]
        out["icons"] = list(struct.unpack_from(f"={len(raw) // 4}I", raw))
    if UNIX_DIAG_RQLEN in a:
        out["rqueue"], out["wqueue"] = struct.unpack_from("=II", a[UNIX_DIAG_RQLEN])
    if UNIX_DIAG_SHUTDOWN in a:
        out["shutdown"] = a[UNIX_DIAG_SHUTDOWN][0]
    return out


def unix_socket(inode: int) -> dict:
    """Facts about the unix socket with this inode: {inode, type, state,
    name (bytes or None), vfs (dev, ino) or None, peer inode or None,
    icons [pending connection inodes], rqueue, wqueue, shutdown bits}.

    Raises OSError (ENOENT: no such unix socket in this namespace)."""
    # struct unix_diag_req { u8 family, protocol; u16 pad; u32 states, ino, show; u32 cookie[2]; }
    req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, _UNIX_SHOW_ALL,
                      NOCOOKIE, NOCOOKIE)
    for body in _query(req, dump=False):
        return _unix_msg(body)
    raise OSError(_errno.ENOENT, f"sock_diag: no unix socket with inode {inode}")


def unix_sockets() -> List[dict]:
    """Every unix socket of this network namespace (as unix_socket())."""
    req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UNIX_SHOW_ALL, 0, 0)
    return [_unix_msg(b) for b in _query(req, dump=True)]


def unix_bound_to(dev: int, ino: int) -> List[dict]:
    """Live unix sockets bound to the file (dev, ino)."""
    return [s for s in unix_sockets() if s["vfs"] == (dev, ino)]


def tcp_listener(family: int, inode: int) -> Optional[Tuple[int, int]]:
    """(accept queue length, backlog) of the TCP listener with this inode,
    or None when no listener of `family` has it.

    Raises OSError on a netlink failure."""
    # struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states;
    #                           struct inet_diag_sockid id (48 bytes); }
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN) + bytes(48)
    found = None
    for body in _query(req, dump=True):
        # struct inet_diag_msg: u8 family, state, timer, retrans; sockid (48);
        # u32 expires, rqueue, wqueue, uid, inode
        state = body[1]
        _, rq, wq, _, ino = struct.unpack_from("=IIIII", body, 52)
        if ino == inode and state == TCP_LISTEN:
            found = (rq, wq)       # keep reading: the dump must be drained
    return found


def tcp_sockets(family: int, states: int) -> List[dict]:
    """Every TCP socket of `family` in one of `states` (a bit mask, 1 << state):
    {state, local, remote, rqueue, wqueue, inode, shutdown}; endpoints are
    (address, port); shutdown: sk_shutdown (INET_DIAG_SHUTDOWN: RCV_SHUTDOWN
    1, SEND_SHUTDOWN 2). A connection still waiting in a listener's accept queue is an
    established socket with no inode yet (no file holds it).

    Raises OSError on a netlink failure."""
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, states) + bytes(48)
    alen = 16 if family == socket.AF_INET6 else 4
    out = []
    for body in _query(req, dump=True):
        sport, dport = struct.unpack_from("!HH", body, 4)
        src = socket.inet_ntop(family, body[8:8 + alen])
        dst = socket.inet_ntop(family, body[24:24 + alen])
        _, rq, wq, _, ino = struct.unpack_from("=IIIII", body, 52)
        shut = _attrs(body, 72).get(INET_DIAG_SHUTDOWN, b"\0")
        out.append({"state": body[1], "local": (src, sport), "remote": (dst, dport), "rqueue": rq,
                    "wqueue": wq, "inode": ino, "shutdown": shut[0] if shut else 0})
    return out


def inet_shutdown(family: int, proto: int, inode: int) -> Optional[int]:
    """sk_shutdown (RCV_SHUTDOWN 1, SEND_SHUTDOWN 2) of the inet socket of
    `family` and `proto` (IPPROTO_UDP, IPPROTO_TCP) with this inode; None
    when sock_diag does not list it (an unbound socket is in no table).

    Raises OSError on a netlink failure."""
    req = struct.pack("=BBBBI", family, proto, 0, 0, 0xFFFFFFFF) + bytes(48)
    found = None
    for body in _query(req, dump=True):
        if struct.unpack_from("=I", body, 68)[0] == inode:
            shut = _attrs(body, 72).get(INET_DIAG_SHUTDOWN, b"\0")
            found = shut[0] if shut else 0      # keep reading: the dump must be drained
    return found
