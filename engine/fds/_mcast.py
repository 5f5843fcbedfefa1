"""Multicast memberships of an IPv4/IPv6 datagram socket.

No interface lists a socket's memberships. The kernel does list, per
network device, every group some socket (or the stack itself) joined:
/proc/PID/net/igmp and /proc/PID/net/igmp6. Each candidate (ifindex, group)
is then asked of the socket itself with getsockopt(MCAST_MSFILTER): it
answers with the membership's source filter (mode and sources), or
EADDRNOTAVAIL when this socket did not join that group on that interface
(net/ipv4/igmp.c ip_mc_gsfget, net/ipv6/mcast.c ip6_mc_msfget match the
group and the ifindex the join resolved to). getsockopt changes nothing.

At restore each membership is joined with MCAST_JOIN_GROUP on the same
ifindex, its filter set with MCAST_MSFILTER when it is not the plain
"exclude nothing", and everything is read back the same way.

Known limit: an IPv4 join through struct ip_mreq/ip_mreqn also keeps the
interface *address* it was given (only used to match a later
IP_DROP_MEMBERSHIP naming an address); it is not readable, the rejoin
keeps none, so a drop naming the address fails with EADDRNOTAVAIL.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import socket as _socket
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Tuple

MCAST_JOIN_GROUP = 42
MCAST_MSFILTER = 48
MCAST_EXCLUDE, MCAST_INCLUDE = 0, 1
_SS = 128                 # sizeof(struct sockaddr_storage)
_GF_HEAD = 144            # offsetof(struct group_filter, gf_slist): u32 if; pad; ss group; u32 fmode, numsrc
_MAXSRC = 64

_libc = ctypes.CDLL(None, use_errno=True)


def _level(family: int) -> int:
    return _socket.IPPROTO_IPV6 if family == _socket.AF_INET6 else _socket.IPPROTO_IP


def _ss(family: int, addr: str) -> bytes:
    if family == _socket.AF_INET6:
        raw = struct.pack("=H", family) + b"\0\0" + b"\0" * 4 + _socket.inet_pton(family, addr) + b"\0" * 4
    else:
        raw = struct.pack("=H", family) + b"\0\0" + _socket.inet_pton(family, addr)
    return raw.ljust(_SS, b"\0")


def _ss_addr(raw: bytes) -> str:
    fam = struct.unpack_from("=H", raw)[0]
    if fam == _socket.AF_INET6:
        return _socket.inet_ntop(fam, raw[8:24])
    return _socket.inet_ntop(_socket.AF_INET, raw[4:8])


def candidates(pid: int, family: int) -> List[Tuple[int, str]]:
    """(ifindex, group) of every group joined on a device of the target's
    network namespace (duplicates removed)."""
    out = []
    if family == _socket.AF_INET:
        try:
            text = open(f"/proc/{pid}/net/igmp").read()
        except OSError:
            return []
        idx = None
        for line in text.splitlines()[1:]:
            f = line.split()
            if not f:
                continue
            if not line[0].isspace():
                idx = int(f[0])
            elif idx is not None and len(f[0]) == 8:
                out.append((idx, _socket.inet_ntop(_socket.AF_INET, struct.pack("=I", int(f[0], 16)))))
    else:
        try:
            text = open(f"/proc/{pid}/net/igmp6").read()
        except OSError:
            return []
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 3 and len(f[2]) == 32:
                out.append((int(f[0]), _socket.inet_ntop(_socket.AF_INET6, bytes.fromhex(f[2]))))
    return sorted(set(out))


def _filter(fd: int, family: int, ifindex: int, group: str):
    """(mode, [sources]) of this socket's membership, or None."""
    size = _GF_HEAD + _MAXSRC * _SS
    buf = ctypes.create_string_buffer(size)
    struct.pack_into("=I", buf, 0, ifindex)
    buf[8:8 + _SS] = _ss(family, group)
    struct.pack_into("=II", buf, 136, 0, _MAXSRC)
    ln = ctypes.c_uint(size)
    if _libc.getsockopt(fd, _level(family), MCAST_MSFILTER, buf, ctypes.byref(ln)) != 0:
        e = ctypes.get_errno()
        if e == _errno.EADDRNOTAVAIL:
            return None
        raise OSError(e, f"getsockopt(MCAST_MSFILTER {group}): {os.strerror(e)}")
    mode, num = struct.unpack_from("=II", buf, 136)
    if num > _MAXSRC:
        raise OSError(_errno.E2BIG, f"multicast group {group} filters more than {_MAXSRC} sources")
    srcs = [_ss_addr(buf.raw[_GF_HEAD + i * _SS:_GF_HEAD + (i + 1) * _SS]) for i in range(num)]
    return mode, sorted(srcs)


def memberships(pid: int, fd: int, family: int) -> List[dict]:
    """[{ifindex, group, mode, sources}] of the socket `fd` (a duplicate of
    the target's). Raises OSError."""
    out = []
    for ifindex, group in candidates(pid, family):
        got = _filter(fd, family, ifindex, group)
        if got is not None:
            out.append({"ifindex": ifindex, "group": group, "mode": got[0], "sources": got[1]})
    if family == _socket.AF_INET6:
        # A dual-stack socket may also hold IPv4 memberships.
        for ifindex, group in candidates(pid, _socket.AF_INET):
            if _filter_v4_on_v6(fd, ifindex, group) is not None:
                raise OSError(_errno.EOPNOTSUPP, f"IPv6 socket joined the IPv4 group {group}")
    return out


def _filter_v4_on_v6(fd: int, ifindex: int, group: str):
    try:
        return _filter(fd, _socket.AF_INET, ifindex, group)
    except OSError:
        return None


def text(m: dict) -> str:
    mode = "include" if m["mode"] == MCAST_INCLUDE else "exclude"
    src = f" {mode} {','.join(m['sources'])}" if m["sources"] or m["mode"] == MCAST_INCLUDE else ""
    return f"{m['group']}@if{m['ifindex']}{src}"


def join(sock: _socket.socket, family: int, m: dict) -> None:
    """Join `m` (as memberships() described it). Raises OSError."""
    req = struct.pack("=I", m["ifindex"]) + b"\0" * 4 + _ss(family, m["group"])
    sock.setsockopt(_level(family), MCAST_JOIN_GROUP, req)
    if m["mode"] != MCAST_EXCLUDE or m["sources"]:
        head = struct.pack("=I", m["ifindex"]) + b"\0" * 4 + _ss(family, m["group"]) + \
            struct.pack("=II", m["mode"], len(m["sources"]))
        body = b"".join(_ss(family, s) for s in m["sources"])
        sock.setsockopt(_level(family), MCAST_MSFILTER, head + (body or b"\0" * _SS))


def join_all(sock: _socket.socket, rec: dict, ctx, what: str) -> None:
    """Every membership of the record joined on the rebuilt socket; one the
    kernel will not give here raises the `socket` refusal."""
    from ._util import refuse_rec
    for m in rec["mcast"]:
        try:
            join(sock, rec["family"], m)
        except OSError as e:
            raise refuse_rec(rec, ctx, "socket", f"{what}: cannot join {text(m)} here ({e.strerror})") from None


def check(sock: _socket.socket, pid: int, family: int, want: List[dict]) -> None:
    """Raises OSError unless the rebuilt socket's memberships are `want`."""
    got = memberships(pid, sock.fileno(), family)
    key = lambda m: (m["ifindex"], m["group"])   # noqa: E731
    if sorted(got, key=key) != sorted(want, key=key):
        raise OSError(_errno.EINVAL, f"multicast memberships {[text(m) for m in got]} after restore, "
                      f"were {[text(m) for m in want]}")
