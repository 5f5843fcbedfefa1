"""Parsers of /proc/PID/net/* tables (pure functions over text, keyed by
socket inode), for naming sockets in refusals. Formats: net/unix/af_unix.c
unix_seq_show, net/ipv4/tcp_ipv4.c get_tcp4_sock, net/ipv6/tcp_ipv6.c,
net/ipv4/udp.c, net/netlink/af_netlink.c, net/packet/af_packet.c."""

from __future__ import annotations

import socket
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Tuple

TCP_STATES = {1: "established", 2: "syn-sent", 3: "syn-recv", 4: "fin-wait1", 5: "fin-wait2",
              6: "time-wait", 7: "close", 8: "close-wait", 9: "last-ack", 10: "listening",
              11: "closing", 12: "new-syn-recv"}
UNIX_STATES = {1: "unconnected", 2: "connecting", 3: "connected", 4: "disconnecting"}
NETLINK_PROTOCOLS = {0: "route", 2: "usersock", 4: "sock_diag", 5: "nflog", 6: "xfrm", 7: "selinux",
                     9: "audit", 10: "fib_lookup", 12: "netfilter", 15: "kobject_uevent", 16: "generic"}


def parse_unix(text: str) -> Dict[int, dict]:
    """inode -> {flags, type, state, path} from /proc/net/unix. The path is
    None for an unnamed socket; abstract names start with '@'."""
    out: Dict[int, dict] = {}
    for line in text.splitlines()[1:]:
        f = line.split(None, 7)
        if len(f) < 7:
            continue
        out[int(f[6])] = {"flags": int(f[3], 16), "type": int(f[4], 16), "state": int(f[5], 16),
                          "path": f[7] if len(f) > 7 else None}
    return out


def _addr4(h: str) -> str:
    return socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(h, 16)))


def _addr6(h: str) -> str:
    raw = b"".join(struct.pack("=I", int(h[i:i + 8], 16)) for i in range(0, 32, 8))
    return socket.inet_ntop(socket.AF_INET6, raw)


def _endpoint(h: str) -> Tuple[str, int]:
    addr, port = h.split(":")
    return (_addr6(addr) if len(addr) == 32 else _addr4(addr)), int(port, 16)


def parse_inet(text: str) -> Dict[int, dict]:
    """inode -> {local, remote, state, tx_queue, rx_queue} from
    /proc/net/{tcp,tcp6,udp,udp6,raw,raw6}; endpoints are (address, port)."""
    out: Dict[int, dict] = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or not f[0].endswith(":"):
            continue
        tx, rx = f[4].split(":")
        out[int(f[9])] = {"local": _endpoint(f[1]), "remote": _endpoint(f[2]), "state": int(f[3], 16),
                          "tx_queue": int(tx, 16), "rx_queue": int(rx, 16)}
    return out


def parse_netlink(text: str) -> Dict[int, dict]:
    """inode -> {protocol, portid, groups, rmem, wmem, dump} from
    /proc/net/netlink (rmem: bytes queued to read; dump: a dump in
    progress)."""
    out: Dict[int, dict] = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        out[int(f[9])] = {"protocol": int(f[1]), "portid": int(f[2]), "groups": int(f[3], 16),
                          "rmem": int(f[4]), "wmem": int(f[5]), "dump": int(f[6])}
    return out


def parse_packet(text: str) -> Dict[int, dict]:
    """inode -> {type, proto, iface} from /proc/net/packet."""
    out: Dict[int, dict] = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 9:
            continue
        out[int(f[8])] = {"type": int(f[2]), "proto": int(f[3], 16), "iface": int(f[4])}
    return out


def endpoint_text(ep: Tuple[str, int]) -> str:
    addr, port = ep
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def read_table(pid: int, name: str) -> str:
    """The text of /proc/PID/net/NAME (the target's network namespace), or
    '' when the table does not exist (protocol not built)."""
    try:
        with open(f"/proc/{pid}/net/{name}") as f:
            return f.read()
    except OSError:
        return ""
