"""Raw ICMP sockets with nothing queued: socket(AF_INET, SOCK_RAW,
IPPROTO_ICMP) and socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6), what ping(8)
opens as root wherever net.ipv4.ping_group_range lets it no ping socket
(the kernel's default "1 0").

A raw socket has no port: the kernel keeps its bound address, its peer,
options - ICMP_FILTER / ICMP6_FILTER, IPV6_CHECKSUM, IP_HDRINCL among the
usual ones, all readable (engine/fds/_sockopts.py, scope "raw4"/"raw6") -
a classic BPF program (SO_ATTACH_FILTER: ping(8) attaches one matching
its echo id once a packet not its own reached the socket), readable with
SO_GET_FILTER, and the queue of received
packets. So: the same address bound, the same peer connected, every option
copied and read back, the same program attached (then SO_LOCK_FILTER if it
was locked) and read back instruction by instruction, the device bound
(SO_BINDTODEVICE: by name, reproduced here as it names the socket's route),
multicast memberships with their source filters (engine/fds/_mcast.py).

The peer comes from /proc/PID/net/raw{,6}: connect() to port 0 (what
ping(8) does) leaves getpeername answering ENOTCONN on a connected socket.
Nothing waits to be sent: raw_sendmsg/rawv6_sendmsg push each message.
Refused: packets queued to be read or errors pending (not refilled: each
came from the address it names), an eBPF program (SO_ATTACH_BPF: no
classic form to read back), shutdown(2) for reading, a socket held
outside, another network namespace (socket.py), and a restore where
ckpt lacks CAP_NET_RAW.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import ipaddress
import os
import select
import socket as _socket

from .. import netinfo
from . import _flowlabel, _mcast, _sockopts
from ._sockbase import building, dup_of, inode_of, outside_holders, shut_for_reading
from ._udp import _addr_tuple, _ep, _ep_text, _v, rmem
from ._util import refuse, refuse_rec, with_status_flags

PROTO = {_socket.AF_INET: _socket.IPPROTO_ICMP, _socket.AF_INET6: 58}     # IPPROTO_ICMPV6
KEY = "raw"                         # _sockopts' proto_tcp for these sockets
SO_ATTACH_FILTER = 26               # = SO_GET_FILTER
SO_LOCK_FILTER = 44
SO_BINDTODEVICE = 25
BPF_MAXINSNS = 4096
# Set options this module reproduces itself (the common table refuses them).
OWN = ("SO_GET_FILTER", "SO_LOCK_FILTER", "SO_BINDTODEVICE")
TCP_ESTABLISHED = 1

_libc = ctypes.CDLL(None, use_errno=True)


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def is_raw(family: int, typ: int, proto: int) -> bool:
    return typ == _socket.SOCK_RAW and PROTO.get(family) == proto


def read_filter(fd: int) -> list:
    """The classic BPF program attached, [[code, jt, jf, k], ...] ([] for
    none). Raises OSError (EACCES for an eBPF program)."""
    n = _sockopts._filter_len(fd)
    if n < 0:
        raise OSError(_errno.EACCES, "an eBPF program")
    if n == 0:
        return []
    buf = (_Insn * n)()
    optlen = ctypes.c_uint(n)       # in instructions, not bytes (sk_get_filter)
    if _libc.getsockopt(fd, _socket.SOL_SOCKET, SO_ATTACH_FILTER, buf, ctypes.byref(optlen)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    if optlen.value != n:
        raise OSError(_errno.EAGAIN, "the filter changed while read")
    return [[i.code, i.jt, i.jf, i.k] for i in buf]


def valid_program(prog) -> bool:
    """An image's classic BPF program: [[code, jt, jf, k], ...] in range."""
    return isinstance(prog, list) and len(prog) <= BPF_MAXINSNS and all(
        isinstance(i, list) and len(i) == 4 and all(isinstance(x, int) and not isinstance(x, bool) for x in i)
        and 0 <= i[0] < 1 << 16 and 0 <= i[1] < 256 and 0 <= i[2] < 256 and 0 <= i[3] < 1 << 32 for i in prog)


def attach_filter(fd: int, prog: list) -> None:
    arr = (_Insn * len(prog))(*[_Insn(*i) for i in prog])
    fp = _Fprog(len(prog), ctypes.cast(arr, ctypes.POINTER(_Insn)))
    if _libc.setsockopt(fd, _socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.byref(fp), ctypes.sizeof(fp)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _head(fam: int, name, peer) -> str:
    s = f"raw{_v(fam)} icmp"
    if name and name[0] not in ("0.0.0.0", "::"):
        s += f" {name[0]}"
    if peer:
        s += f"->{peer[0]}"
    return s


def _fresh(ctx, fam: int, proto: int) -> dict:
    key = f"sock-fresh:{fam}:raw:{proto}"
    if key not in ctx.shared:
        with _socket.socket(fam, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, proto) as s:
            ctx.shared[key] = _sockopts.read_all(s, fam, KEY)
    return ctx.shared[key]


def _peer(info, fam: int, ino: int, q: dict):
    """The connected peer (an _ep list) or None; from getpeername where it
    answers, else from the raw table (a peer connected with port 0)."""
    if q["peer"] is not None:
        return _ep(q["peer"])
    row = netinfo.parse_inet(netinfo.read_table(info.pid, "raw" + _v(fam))).get(ino)
    if row is None:
        raise refuse(info, "socket", f"raw{_v(fam)} icmp: not in /proc/net/raw{_v(fam)}; its peer cannot be known")
    if row["state"] != TCP_ESTABLISHED:
        return None
    addr = row["remote"][0]
    if fam == _socket.AF_INET6 and ipaddress.ip_address(addr).is_link_local:
        raise refuse(info, "socket", f"raw6 icmp connected to {addr}: its scope id cannot be read")
    return [addr, 0] + ([0, 0] if fam == _socket.AF_INET6 else [])


def _table_peer(fam: int, s: _socket.socket):
    """The rebuilt socket's peer address as this process's raw table shows
    it (None: not connected)."""
    row = netinfo.parse_inet(netinfo.read_table(os.getpid(), "raw" + _v(fam))).get(os.fstat(s.fileno()).st_ino)
    if row is None or row["state"] != TCP_ESTABLISHED:
        return None
    return ipaddress.ip_address(row["remote"][0])


def classify(info, ctx, q: dict) -> dict:
    """The dump record of a raw ICMP socket (cached per inode); raises the
    `socket` refusal."""
    ino = inode_of(info.link)
    key = f"raw:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    fam, proto = q["family"], q["proto"]
    name = q["name"]
    head = _head(fam, name, q["peer"])
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    _flowlabel.check(info, ctx, fam)      # a lease cannot be tied to its socket
    try:
        fresh = _fresh(ctx, fam, proto)
    except PermissionError:
        raise refuse(info, "socket", f"{head}: ckpt cannot open raw sockets (CAP_NET_RAW) to compare "
                     "its options") from None
    peer = _peer(info, fam, ino, q)
    head = _head(fam, name, peer)
    with dup_of(info) as mine:
        s = _socket.socket(fileno=os.dup(mine))
        try:
            opts = _sockopts.read_all(s, fam, KEY)
        finally:
            s.close()
        # The common table refuses these; reproduced here.
        bad = _sockopts.refused(opts, dict(fresh, **{n: opts.get(n) for n in OWN}))
        if bad:
            raise refuse(info, "socket", f"{head}: options that cannot be restored are set: " + ", ".join(bad))
        if _sockopts.as_int(opts.get("SO_GET_FILTER")) < 0:
            raise refuse(info, "socket", f"{head}: an eBPF socket filter (SO_ATTACH_BPF) is attached; it "
                         "cannot be read back")
        prog = read_filter(mine)
        try:
            groups = _mcast.memberships(info.pid, mine, fam)
        except OSError as e:
            raise refuse(info, "socket", f"{head}: its multicast memberships cannot be read ({e.strerror})") from e
        queued = rmem(mine)
        p = select.poll()
        p.register(mine, select.POLLIN)
        err = bool(dict(p.poll(0)).get(mine, 0) & select.POLLERR)
        if shut_for_reading(mine):
            raise refuse(info, "socket", f"{head}: shut down (shutdown(2)); which sides cannot all be read")
    if queued:
        raise refuse(info, "socket", f"{head}: {queued} bytes of ICMP packets queued to be read")
    if err:
        raise refuse(info, "socket", f"{head}: an error is pending (SO_ERROR or the error queue)")
    rec = {"sock": "raw", "family": fam, "proto": proto, "inode": ino, "addr": _ep(name) if name else None,
           "peer": peer, "opts": opts, "set": _sockopts.differing(opts, fresh), "filter": prog,
           "mcast": groups}
    ctx.shared[key] = rec
    return rec


def text(rec: dict) -> str:
    s = _head(rec["family"], rec["addr"], rec["peer"])
    if rec["filter"]:
        s += f", a {len(rec['filter'])}-instruction socket filter"
    if rec["mcast"]:
        s += ", multicast " + " ".join(_mcast.text(m) for m in rec["mcast"])
    shown = [n for n in rec["set"] if n != "SO_GET_FILTER"]       # the filter, named above
    if shown:
        s += ", options " + ", ".join(shown)
    return s


def _bad_ep(fam: int, a) -> bool:
    if a is None:
        return False
    n = 4 if fam == _socket.AF_INET6 else 2
    if not isinstance(a, list) or len(a) != n or not isinstance(a[0], str) or \
            not all(isinstance(x, int) and 0 <= x < 1 << 32 for x in a[1:]):
        return True
    try:
        _socket.inet_pton(fam, a[0])
    except (OSError, ValueError):
        return True
    return False


def _good_groups(fam: int, groups) -> bool:
    if not isinstance(groups, list):
        return False
    for m in groups:
        if not isinstance(m, dict) or not isinstance(m.get("ifindex"), int) or not 0 < m["ifindex"] < 1 << 31 or \
                m.get("mode") not in (_mcast.MCAST_EXCLUDE, _mcast.MCAST_INCLUDE) or \
                not isinstance(m.get("sources"), list) or len(m["sources"]) > _mcast._MAXSRC or \
                not all(isinstance(a, str) for a in [m.get("group")] + m["sources"]):
            return False
        try:
            if not ipaddress.ip_address(m["group"]).is_multicast or \
                    any(ipaddress.ip_address(a).version != ipaddress.ip_address(m["group"]).version
                        for a in m["sources"]) or \
                    ipaddress.ip_address(m["group"]).version != (4 if fam == _socket.AF_INET else 6):
                return False
        except ValueError:
            return False
    return True


def validate(rec: dict, ctx) -> None:
    fam, opts, names, prog = rec.get("family"), rec.get("opts"), rec.get("set"), rec.get("filter")
    ok = fam in PROTO and rec.get("proto") == PROTO[fam] and isinstance(opts, dict) and \
        isinstance(names, list) and all(isinstance(n, str) and n in opts for n in names) and \
        all(n in OWN or _sockopts._BY_NAME[n][5] != "refuse" for n in names if n in _sockopts._BY_NAME) and \
        all(n in _sockopts._BY_NAME and (v is None or isinstance(v, str)) for n, v in opts.items()) and \
        valid_program(prog) and not _bad_ep(fam, rec.get("addr")) and not _bad_ep(fam, rec.get("peer")) and \
        _good_groups(fam, rec.get("mcast"))
    if ok:
        try:
            for v in opts.values():
                if v is not None:
                    bytes.fromhex(v)
            ok = _sockopts.as_int(opts.get("SO_GET_FILTER")) == len(prog)
        except ValueError:
            ok = False
    if not ok:
        raise refuse_rec(rec, ctx, "image-invalid", "raw icmp socket record malformed")


def restore(rec: dict, ctx) -> int:
    """The rebuilt raw ICMP socket's fd in the restorer. Raises the
    `socket` refusal (no CAP_NET_RAW, address not available, an option or
    the filter that reads back differently) or EngineError."""
    fam, what = rec["family"], text(rec)
    try:
        s = _socket.socket(fam, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, rec["proto"])
    except PermissionError:
        raise refuse_rec(rec, ctx, "socket", f"{what}: ckpt cannot open raw sockets here (no CAP_NET_RAW)") from None
    opts, names = rec["opts"], rec["set"]
    with building(s, rec, ctx, f"recreating {what}"):
        _sockopts.apply(s, opts, [n for n in names if n not in OWN])
        _mcast.join_all(s, rec, ctx, what)
        if "SO_BINDTODEVICE" in names:
            dev = bytes.fromhex(opts["SO_BINDTODEVICE"] or "")
            try:
                s.setsockopt(_socket.SOL_SOCKET, SO_BINDTODEVICE, dev)
            except OSError as e:
                raise refuse_rec(rec, ctx, "socket", f"{what}: device "
                                 f"{_sockopts.describe_value('SO_BINDTODEVICE', dev.hex())} cannot be bound here "
                                 f"({e.strerror})") from None
        addr = rec["addr"]
        if addr and addr[0] not in ("0.0.0.0", "::"):
            try:
                s.bind(_addr_tuple(fam, addr))
            except OSError as e:
                if e.errno == _errno.EADDRNOTAVAIL:
                    raise refuse_rec(rec, ctx, "socket", f"{what}: address not available here") from None
                raise
        if rec["peer"]:
            s.connect(_addr_tuple(fam, rec["peer"]))
        if rec["filter"]:
            try:
                attach_filter(s.fileno(), rec["filter"])
            except OSError as e:
                raise refuse_rec(rec, ctx, "socket", f"{what}: the socket filter is not accepted here "
                                 f"({e.strerror})") from None
        if "SO_LOCK_FILTER" in names:
            s.setsockopt(_socket.SOL_SOCKET, SO_LOCK_FILTER, bytes.fromhex(opts["SO_LOCK_FILTER"] or ""))
        _sockopts.apply_late(s, opts, names)
        _sockopts.verify(s, fam, KEY, opts)
        if read_filter(s.fileno()) != rec["filter"]:
            raise refuse_rec(rec, ctx, "socket", f"{what}: the socket filter reads back differently here")
        if _table_peer(fam, s) != (ipaddress.ip_address(rec["peer"][0]) if rec["peer"] else None):
            raise refuse_rec(rec, ctx, "socket", f"{what}: its peer reads back differently here")
        try:
            _mcast.check(s, os.getpid(), fam, rec["mcast"])
        except OSError as e:
            raise refuse_rec(rec, ctx, "socket", f"{what}: {e.strerror}") from None
        if addr and s.getsockname()[0] != addr[0]:
            raise refuse_rec(rec, ctx, "socket", f"{what}: reads back bound to {s.getsockname()[0]}")
        fd = s.detach()
    return with_status_flags(rec, ctx, fd)
