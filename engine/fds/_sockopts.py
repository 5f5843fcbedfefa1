"""Socket options: read them all, reproduce the known ones, refuse the rest.

Every option of :data:`TABLE` that applies to a socket's family/protocol is
read raw (getsockopt into a buffer of the option's size) from a pidfd_getfd
duplicate - getsockopt changes nothing. The values are compared with those
of a fresh socket of the same family/type/protocol made by the engine: an
option that differs is "set" by the process. A set option marked ``copy``
is reproduced at restore with setsockopt of the same bytes; one marked
``refuse`` makes the socket refused by name (a BPF filter, an upper-layer
protocol: state the engine cannot carry).

At restore, after the socket is rebuilt, EVERY recorded option is read back
and compared: any difference (a sysctl default that differs on this node, a
value the kernel rounds, such as TCP_DEFER_ACCEPT) is a refusal, before the
new process exists. Nothing is "probably the same".

Special cases (socket(7)): SO_RCVBUF/SO_SNDBUF report twice the value
given to setsockopt, so they are reproduced with SO_RCVBUFFORCE /
SO_SNDBUFFORCE (CAP_NET_ADMIN; ignores net.core.rmem_max) of half the
value; setting a buffer size also sets its lock bit (SOCK_*BUF_LOCK), so
SO_BUF_LOCK (5.16+) is put back after them. Options that are not settable
before the data is queued (SO_PASSCRED, SO_PEEK_OFF) are applied by the
caller after the refill: see :data:`LATE`.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import socket as _socket
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

SOL_SOCKET = _socket.SOL_SOCKET
IP, IPV6, TCP = _socket.IPPROTO_IP, _socket.IPPROTO_IPV6, _socket.IPPROTO_TCP
UDP = _socket.IPPROTO_UDP
SOL_NETLINK = 270
SOL_RAW = 255

# (name, level, optname, size, applies to, policy)
# applies to: "all", "inet" (v4 and v6), "ip4", "ip6", "tcp", "udp", "netlink", "raw4", "raw6",
# "dgram4"/"dgram6" (raw ICMP, UDP and ping sockets), "tcp4"/"tcp6"; the IPv4 ones ("ip4", "dgram4",
# "tcp4") also on IPv6 TCP/UDP/ping sockets, which take SOL_IP options for v4-mapped traffic
# Numbers: include/uapi/asm-generic/socket.h, include/uapi/linux/tcp.h,
# include/uapi/linux/in.h, include/uapi/linux/in6.h (x86_64 and aarch64
# share the asm-generic socket numbers).
TABLE: List[Tuple[str, int, int, int, str, str]] = [
    ("SO_DEBUG", SOL_SOCKET, 1, 4, "all", "copy"),
    ("SO_REUSEADDR", SOL_SOCKET, 2, 4, "all", "copy"),
    ("SO_DONTROUTE", SOL_SOCKET, 5, 4, "all", "copy"),
    ("SO_BROADCAST", SOL_SOCKET, 6, 4, "all", "copy"),
    ("SO_SNDBUF", SOL_SOCKET, 7, 4, "all", "buf"),
    ("SO_RCVBUF", SOL_SOCKET, 8, 4, "all", "buf"),
    ("SO_KEEPALIVE", SOL_SOCKET, 9, 4, "all", "copy"),
    ("SO_OOBINLINE", SOL_SOCKET, 10, 4, "all", "copy"),
    ("SO_NO_CHECK", SOL_SOCKET, 11, 4, "all", "copy"),
    ("SO_PRIORITY", SOL_SOCKET, 12, 4, "all", "copy"),
    ("SO_LINGER", SOL_SOCKET, 13, 8, "all", "copy"),
    ("SO_REUSEPORT", SOL_SOCKET, 15, 4, "all", "copy"),
    ("SO_PASSCRED", SOL_SOCKET, 16, 4, "all", "late"),
    ("SO_RCVLOWAT", SOL_SOCKET, 18, 4, "all", "copy"),
    ("SO_RCVTIMEO", SOL_SOCKET, 20, 16, "all", "copy"),
    ("SO_SNDTIMEO", SOL_SOCKET, 21, 16, "all", "copy"),
    # by name, as the process bound it: a device of that name must exist
    # at restore (else the setsockopt fails: refused, naming it)
    ("SO_BINDTODEVICE", SOL_SOCKET, 25, 16, "all", "copy"),
    # the program and its lock: engine/fds/_sockfilter.py (raw: _raw.py)
    ("SO_GET_FILTER", SOL_SOCKET, 26, 4, "all", "filter"),   # read by _filter_len()
    ("SO_TIMESTAMP", SOL_SOCKET, 29, 4, "all", "copy"),
    ("SO_PASSSEC", SOL_SOCKET, 34, 4, "all", "refuse"),
    ("SO_TIMESTAMPNS", SOL_SOCKET, 35, 4, "all", "copy"),
    ("SO_MARK", SOL_SOCKET, 36, 4, "all", "copy"),
    ("SO_TIMESTAMPING", SOL_SOCKET, 37, 4, "all", "copy"),
    ("SO_RXQ_OVFL", SOL_SOCKET, 40, 4, "all", "copy"),
    ("SO_WIFI_STATUS", SOL_SOCKET, 41, 4, "all", "copy"),
    ("SO_PEEK_OFF", SOL_SOCKET, 42, 4, "all", "late"),
    ("SO_NOFCS", SOL_SOCKET, 43, 4, "all", "copy"),
    ("SO_LOCK_FILTER", SOL_SOCKET, 44, 4, "all", "filter"),
    ("SO_SELECT_ERR_QUEUE", SOL_SOCKET, 45, 4, "all", "copy"),
    ("SO_BUSY_POLL", SOL_SOCKET, 46, 4, "all", "copy"),
    ("SO_ZEROCOPY", SOL_SOCKET, 60, 4, "all", "copy"),
    ("SO_PREFER_BUSY_POLL", SOL_SOCKET, 69, 4, "all", "copy"),
    ("SO_BUSY_POLL_BUDGET", SOL_SOCKET, 70, 4, "all", "copy"),
    ("SO_BUF_LOCK", SOL_SOCKET, 72, 4, "all", "buflock"),
    ("SO_RESERVE_MEM", SOL_SOCKET, 73, 4, "all", "refuse"),
    ("SO_TXREHASH", SOL_SOCKET, 74, 4, "all", "copy"),
    ("SO_RCVMARK", SOL_SOCKET, 75, 4, "all", "copy"),
    ("SO_PASSPIDFD", SOL_SOCKET, 76, 4, "all", "refuse"),
    ("IP_TOS", IP, 1, 4, "ip4", "copy"),
    ("IP_TTL", IP, 2, 4, "ip4", "copy"),
    ("IP_MTU_DISCOVER", IP, 10, 4, "ip4", "copy"),
    ("IP_RECVERR", IP, 11, 4, "ip4", "copy"),
    ("IP_FREEBIND", IP, 15, 4, "ip4", "copy"),
    ("IP_TRANSPARENT", IP, 19, 4, "ip4", "copy"),
    ("IP_MINTTL", IP, 21, 4, "ip4", "copy"),
    ("IP_BIND_ADDRESS_NO_PORT", IP, 24, 4, "ip4", "copy"),
    ("IP_RECVOPTS", IP, 6, 4, "ip4", "copy"),
    ("IP_RETOPTS", IP, 7, 4, "ip4", "copy"),
    ("IP_PKTINFO", IP, 8, 4, "ip4", "copy"),
    ("IP_RECVTTL", IP, 12, 4, "ip4", "copy"),
    ("IP_RECVTOS", IP, 13, 4, "ip4", "copy"),
    ("IP_PASSSEC", IP, 18, 4, "ip4", "refuse"),
    ("IP_RECVORIGDSTADDR", IP, 20, 4, "ip4", "copy"),
    ("IP_CHECKSUM", IP, 23, 4, "ip4", "copy"),
    ("IP_RECVFRAGSIZE", IP, 25, 4, "ip4", "copy"),
    ("IP_RECVERR_RFC4884", IP, 26, 4, "ip4", "copy"),
    ("IP_MULTICAST_IF", IP, 32, 4, "ip4", "copy"),
    ("IP_MULTICAST_TTL", IP, 33, 4, "ip4", "copy"),
    ("IP_MULTICAST_LOOP", IP, 34, 4, "ip4", "copy"),
    ("IP_MULTICAST_ALL", IP, 49, 4, "ip4", "copy"),
    ("IP_UNICAST_IF", IP, 50, 4, "ip4", "copy"),
    ("IPV6_UNICAST_HOPS", IPV6, 16, 4, "ip6", "copy"),
    ("IPV6_MTU_DISCOVER", IPV6, 23, 4, "ip6", "copy"),
    ("IPV6_RECVERR", IPV6, 25, 4, "ip6", "copy"),
    ("IPV6_V6ONLY", IPV6, 26, 4, "ip6", "copy"),
    ("IPV6_TCLASS", IPV6, 67, 4, "ip6", "copy"),
    ("IPV6_MINHOPCOUNT", IPV6, 73, 4, "ip6", "copy"),
    ("IPV6_TRANSPARENT", IPV6, 75, 4, "ip6", "copy"),
    ("IPV6_FREEBIND", IPV6, 78, 4, "ip6", "copy"),
    ("IPV6_MULTICAST_IF", IPV6, 17, 4, "ip6", "copy"),
    ("IPV6_MULTICAST_HOPS", IPV6, 18, 4, "ip6", "copy"),
    ("IPV6_MULTICAST_LOOP", IPV6, 19, 4, "ip6", "copy"),
    ("IPV6_MULTICAST_ALL", IPV6, 29, 4, "ip6", "copy"),
    ("IPV6_RECVPKTINFO", IPV6, 49, 4, "ip6", "copy"),
    ("IPV6_RECVHOPLIMIT", IPV6, 51, 4, "ip6", "copy"),
    ("IPV6_RECVPATHMTU", IPV6, 60, 4, "ip6", "copy"),
    ("IPV6_DONTFRAG", IPV6, 62, 4, "ip6", "copy"),
    ("IPV6_RECVTCLASS", IPV6, 66, 4, "ip6", "copy"),
    ("IPV6_AUTOFLOWLABEL", IPV6, 70, 4, "ip6", "copy"),
    ("IPV6_RECVORIGDSTADDR", IPV6, 74, 4, "ip6", "copy"),
    ("IPV6_UNICAST_IF", IPV6, 76, 4, "ip6", "copy"),
    ("IPV6_RECVFRAGSIZE", IPV6, 77, 4, "ip6", "copy"),
    ("NETLINK_PKTINFO", SOL_NETLINK, 3, 4, "netlink", "copy"),
    ("NETLINK_BROADCAST_ERROR", SOL_NETLINK, 4, 4, "netlink", "copy"),
    ("NETLINK_NO_ENOBUFS", SOL_NETLINK, 5, 4, "netlink", "copy"),
    ("NETLINK_LISTEN_ALL_NSID", SOL_NETLINK, 8, 4, "netlink", "refuse"),
    ("NETLINK_CAP_ACK", SOL_NETLINK, 10, 4, "netlink", "copy"),
    ("NETLINK_EXT_ACK", SOL_NETLINK, 11, 4, "netlink", "copy"),
    ("NETLINK_GET_STRICT_CHK", SOL_NETLINK, 12, 4, "netlink", "copy"),
    ("UDP_CORK", UDP, 1, 4, "udp", "copy"),
    ("UDP_ENCAP", UDP, 100, 4, "udp", "refuse"),
    ("UDP_NO_CHECK6_TX", UDP, 101, 4, "udp", "copy"),
    ("UDP_NO_CHECK6_RX", UDP, 102, 4, "udp", "copy"),
    ("UDP_SEGMENT", UDP, 103, 4, "udp", "copy"),
    ("UDP_GRO", UDP, 104, 4, "udp", "copy"),
    # raw ICMP sockets (engine/fds/_raw.py: proto_tcp "raw")
    ("IP_HDRINCL", IP, 3, 4, "raw4", "copy"),
    ("IP_NODEFRAG", IP, 22, 4, "raw4", "copy"),
    ("ICMP_FILTER", SOL_RAW, 1, 4, "raw4", "copy"),
    ("IPV6_CHECKSUM", SOL_RAW, 7, 4, "raw6", "copy"),     # SOL_RAW: ICMPv6 refuses it at SOL_IPV6
    ("IPV6_HDRINCL", IPV6, 36, 4, "raw6", "copy"),
    ("ICMP6_FILTER", 58, 1, 32, "raw6", "copy"),           # SOL_ICMPV6
    # Flags (ip6): every IPv6 socket. Datagram sockets (raw ICMP, UDP,
    # ping): IP options and the IPv6
    # sticky extension headers are variable length (read up to the size
    # given; b"" when unset; the headers at most 2048 bytes).
    ("IP_OPTIONS", IP, 4, 40, "dgram4", "copy"),
    ("IPV6_2292PKTINFO", IPV6, 2, 4, "ip6", "copy"),
    ("IPV6_2292HOPOPTS", IPV6, 3, 4, "ip6", "copy"),
    ("IPV6_2292DSTOPTS", IPV6, 4, 4, "ip6", "copy"),
    ("IPV6_2292RTHDR", IPV6, 5, 4, "ip6", "copy"),
    ("IPV6_2292HOPLIMIT", IPV6, 8, 4, "ip6", "copy"),
    ("IPV6_FLOWINFO", IPV6, 11, 4, "ip6", "copy"),
    ("IPV6_FLOWINFO_SEND", IPV6, 33, 4, "ip6", "copy"),
    ("IPV6_RECVHOPOPTS", IPV6, 53, 4, "ip6", "copy"),
    ("IPV6_RECVRTHDR", IPV6, 56, 4, "ip6", "copy"),
    ("IPV6_RECVDSTOPTS", IPV6, 58, 4, "ip6", "copy"),
    ("IPV6_ADDR_PREFERENCES", IPV6, 72, 4, "ip6", "copy"),
    ("IPV6_HOPOPTS", IPV6, 54, 2048, "dgram6", "copy"),
    ("IPV6_RTHDRDSTOPTS", IPV6, 55, 2048, "dgram6", "copy"),
    ("IPV6_RTHDR", IPV6, 57, 2048, "dgram6", "copy"),
    ("IPV6_DSTOPTS", IPV6, 59, 2048, "dgram6", "copy"),
    # TCP: the same state, kept per connection (an accepted one inherits the
    # SYN's reversed IP options) and not carried: refused when set.
    ("IP_OPTIONS(tcp)", IP, 4, 40, "tcp4", "refuse"),
    ("IPV6_HOPOPTS(tcp)", IPV6, 54, 2048, "tcp6", "refuse"),
    ("IPV6_RTHDRDSTOPTS(tcp)", IPV6, 55, 2048, "tcp6", "refuse"),
    ("IPV6_RTHDR(tcp)", IPV6, 57, 2048, "tcp6", "refuse"),
    ("IPV6_DSTOPTS(tcp)", IPV6, 59, 2048, "tcp6", "refuse"),
    ("TCP_NODELAY", TCP, 1, 4, "tcp", "copy"),
    ("TCP_MAXSEG", TCP, 2, 4, "tcp", "copy"),
    ("TCP_CORK", TCP, 3, 4, "tcp", "copy"),
    ("TCP_KEEPIDLE", TCP, 4, 4, "tcp", "copy"),
    ("TCP_KEEPINTVL", TCP, 5, 4, "tcp", "copy"),
    ("TCP_KEEPCNT", TCP, 6, 4, "tcp", "copy"),
    ("TCP_SYNCNT", TCP, 7, 4, "tcp", "copy"),
    ("TCP_LINGER2", TCP, 8, 4, "tcp", "copy"),
    ("TCP_DEFER_ACCEPT", TCP, 9, 4, "tcp", "copy"),
    ("TCP_WINDOW_CLAMP", TCP, 10, 4, "tcp", "copy"),
    ("TCP_CONGESTION", TCP, 13, 16, "tcp", "copy"),
    ("TCP_USER_TIMEOUT", TCP, 18, 4, "tcp", "copy"),
    ("TCP_FASTOPEN", TCP, 23, 4, "tcp", "copy"),
    ("TCP_NOTSENT_LOWAT", TCP, 25, 4, "tcp", "copy"),
    ("TCP_SAVE_SYN", TCP, 27, 4, "tcp", "copy"),
    ("TCP_FASTOPEN_CONNECT", TCP, 30, 4, "tcp", "copy"),
    ("TCP_ULP", TCP, 31, 16, "tcp", "refuse"),
    ("TCP_FASTOPEN_NO_COOKIE", TCP, 34, 4, "tcp", "copy"),
    ("TCP_TX_DELAY", TCP, 37, 4, "tcp", "copy"),
]

_libc = ctypes.CDLL(None, use_errno=True)
SO_SNDBUFFORCE = 32
SO_BUF_LOCK = 72
SO_RCVBUFFORCE = 33
_FORCE = {"SO_SNDBUF": SO_SNDBUFFORCE, "SO_RCVBUF": SO_RCVBUFFORCE}
_BY_NAME = {row[0]: row for row in TABLE}
LATE = ("SO_PASSCRED", "SO_PEEK_OFF")     # applied by the caller after refilling queues


class OptionError(Exception):
    """An option cannot be reproduced; `name` and a one-line `why`."""

    def __init__(self, name: str, why: str):
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


def _applies(where: str, family: int, proto_tcp: bool) -> bool:
    if where == "all":
        return True
    if where == "ip4":
        # An IPv6 TCP/UDP/ping socket takes IPv4-level options too (for
        # v4-mapped traffic: ipv6_setsockopt hands SOL_IP on), so reads them.
        return family == _socket.AF_INET or (family == _socket.AF_INET6 and proto_tcp in (True, "udp", "ping"))
    if where == "ip6":
        return family == _socket.AF_INET6
    if where == "tcp":
        return proto_tcp is True
    if where == "udp":
        return proto_tcp == "udp"      # callers pass "udp" for UDP sockets
    if where in ("raw4", "raw6"):
        return proto_tcp == "raw" and family == (_socket.AF_INET if where == "raw4" else _socket.AF_INET6)
    if where == "dgram4":
        return proto_tcp in ("raw", "udp", "ping") and family == _socket.AF_INET or \
            proto_tcp in ("udp", "ping") and family == _socket.AF_INET6
    if where == "dgram6":
        return proto_tcp in ("raw", "udp", "ping") and family == _socket.AF_INET6
    if where == "tcp4":
        return proto_tcp is True and family in (_socket.AF_INET, _socket.AF_INET6)
    if where == "tcp6":
        return proto_tcp is True and family == _socket.AF_INET6
    if where == "netlink":
        return family == getattr(_socket, "AF_NETLINK", 16)
    return False


def rows_for(family: int, proto_tcp: bool) -> List[Tuple[str, int, int, int, str, str]]:
    return [r for r in TABLE if _applies(r[4], family, proto_tcp)]


def read_all(sock: _socket.socket, family: int, proto_tcp: bool) -> Dict[str, Optional[str]]:
    """name -> raw value (hex) of every applicable option; None where this
    kernel does not know the option (ENOPROTOOPT/EINVAL/EOPNOTSUPP).

    Raises OSError for any other getsockopt failure."""
    out: Dict[str, Optional[str]] = {}
    for name, level, opt, size, _, _ in rows_for(family, proto_tcp):
        try:
            if name == "SO_GET_FILTER":
                out[name] = _filter_len(sock.fileno()).to_bytes(4, "little", signed=True).hex()
                continue
            out[name] = (sock.getsockopt(level, opt, size) if size <= 1024 else _getsockopt_big(sock, level, opt, size)).hex()
        except OSError as e:
            if e.errno in (_errno.ENOPROTOOPT, _errno.EINVAL, _errno.EOPNOTSUPP):
                out[name] = None
            else:
                raise
    return out


def _getsockopt_big(sock: _socket.socket, level: int, opt: int, size: int) -> bytes:
    """getsockopt with a buffer beyond Python's 1024-byte limit."""
    buf = ctypes.create_string_buffer(size)
    optlen = ctypes.c_uint(size)
    if _libc.getsockopt(sock.fileno(), level, opt, buf, ctypes.byref(optlen)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.raw[:optlen.value]


def _filter_len(fd: int) -> int:
    """Number of classic BPF instructions attached (SO_ATTACH_FILTER), -1 for
    an eBPF program (SO_ATTACH_BPF), 0 for none. Asked with optlen 0, the
    only safe way: with a buffer, sk_get_filter (net/core/filter.c) copies
    len*8 bytes of program into it, whatever the buffer's real size."""
    optlen = ctypes.c_uint(0)
    if _libc.getsockopt(fd, SOL_SOCKET, 26, None, ctypes.byref(optlen)) != 0:
        e = ctypes.get_errno()
        if e == _errno.EACCES:          # an eBPF program: it has no classic form
            return -1
        raise OSError(e, os.strerror(e))
    return optlen.value


def valid_record(opts, names, family: int, proto_tcp) -> bool:
    """Whether a record's options are ones this kind reads, as hex of at
    most the option's size, and its set ones reproducible (not refused)."""
    if not isinstance(opts, dict) or not isinstance(names, list):
        return False
    rows = {r[0]: r for r in rows_for(family, proto_tcp)}
    for n, v in opts.items():
        if n not in rows or not (v is None or isinstance(v, str)):
            return False
        try:
            if v is not None and len(bytes.fromhex(v)) > rows[n][3]:
                return False
        except ValueError:
            return False
    return all(isinstance(n, str) and n in opts and rows[n][5] != "refuse" for n in names)


def as_int(hexval: Optional[str]) -> int:
    return int.from_bytes(bytes.fromhex(hexval or "00000000")[:4], "little", signed=True)


def describe_value(name: str, hexval: Optional[str]) -> str:
    if hexval is None:
        return "unknown to this kernel"
    raw = bytes.fromhex(hexval)
    if _BY_NAME[name][3] == 4:
        return str(as_int(hexval))
    if name in ("TCP_CONGESTION", "TCP_ULP", "SO_BINDTODEVICE"):
        return repr(raw.rstrip(b"\0").decode(errors="replace"))
    return "0x" + hexval


def differing(values: Dict[str, Optional[str]], fresh: Dict[str, Optional[str]]) -> List[str]:
    """Names whose value differs from a fresh socket's."""
    return [n for n, v in values.items() if v != fresh.get(n)]


def refused(values: Dict[str, Optional[str]], fresh: Dict[str, Optional[str]]) -> List[str]:
    """'NAME=value' for every set option the engine will not reproduce."""
    return [f"{n}={describe_value(n, values[n])}" for n in differing(values, fresh)
            if _BY_NAME[n][5] == "refuse"]


def apply(sock: _socket.socket, values: Dict[str, Optional[str]], names: List[str]) -> None:
    """setsockopt the options `names` (early ones: neither LATE nor the lock
    bits, which :func:`apply_late` puts back) to their recorded values.

    Raises OptionError when the kernel rejects one."""
    for name in names:
        _, level, opt, _, _, policy = _BY_NAME[name]
        if name in LATE or policy in ("buflock", "filter"):
            continue
        raw = bytes.fromhex(values[name] or "")
        try:
            if policy == "buf":
                # socket(7): the kernel doubles the value; FORCE skips rmem_max.
                sock.setsockopt(SOL_SOCKET, _FORCE[name], as_int(values[name]) // 2)
            else:
                sock.setsockopt(level, opt, raw)
        except OSError as e:
            raise OptionError(name, f"setsockopt to {describe_value(name, values[name])}: {e.strerror}") from e


def number(name: str) -> int:
    """The SOL_SOCKET option number of `name`."""
    return _BY_NAME[name][2]


def set_buffer(sock: _socket.socket, name: str, value: int) -> None:
    """Make SO_SNDBUF / SO_RCVBUF read back `value` (raises OSError)."""
    sock.setsockopt(SOL_SOCKET, _FORCE[name], value // 2)


def apply_late(sock: _socket.socket, values: Dict[str, Optional[str]], names: List[str]) -> None:
    """The LATE options and SO_BUF_LOCK, after queues are refilled and
    buffer sizes are final. Raises OptionError."""
    for name in names:
        if name not in LATE and _BY_NAME[name][5] != "buflock":
            continue
        _, level, opt, _, _, _ = _BY_NAME[name]
        try:
            sock.setsockopt(level, opt, bytes.fromhex(values[name] or ""))
        except OSError as e:
            raise OptionError(name, f"setsockopt to {describe_value(name, values[name])}: {e.strerror}") from e


def verify(sock: _socket.socket, family: int, proto_tcp: bool, values: Dict[str, Optional[str]]) -> None:
    """Every recorded option reads back the same on the rebuilt socket.

    Raises OptionError naming the first one that does not."""
    now = read_all(sock, family, proto_tcp)
    for name, want in values.items():
        if _BY_NAME[name][5] == "filter":
            continue        # attached after the kind's own restore, and read back there
        if now.get(name) != want:
            raise OptionError(name, f"was {describe_value(name, want)}, would be "
                              f"{describe_value(name, now.get(name))} here")
