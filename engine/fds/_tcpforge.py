"""A segment from a connection's peer, made here: how a half-closed
connection whose peer is outside the dump gets its state back.

A FIN takes a sequence number and moves the connection's state; repair
mode has no call that sets either. With both ends in the dump the real FIN
is sent again once both are back (_tcpconn._half_close). With the peer
outside, that peer has long sent its FIN (or acknowledged ours) and will
not do it again, so the restore forges the one segment it sent: a FIN the
rebuilt socket receives (close-wait), or the acknowledgement of the FIN it
queues again (fin-wait2). CRIU's soccr does the same (send_fin, libnet);
this builds the segment by hand.

The segment goes out of a raw socket with the peer's address as its
source and the local one as its destination, so the kernel delivers it
over loopback to the rebuilt socket, still in repair mode: nothing it
answers leaves the machine (repair mode sends nothing; the network lock
drops the rest). The lock's input rule lets segments carrying PASS_MARK through
(engine.netlock), and only this socket sets it.

No TCP option is sent: Linux takes a segment without a timestamp on a
connection that negotiated them (tcp_validate_incoming checks PAWS only
when one is present)."""

from __future__ import annotations

import ipaddress
import socket as _socket
import struct

from ..netlock import PASS_MARK

SO_MARK = 36
FIN, ACK = 0x01, 0x10
IPV6_HDRINCL = 36


def _v4(addr: str):
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return ip
    return ip.ipv4_mapped


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def segment(src, dst, seq: int, ack: int, flags: int, window: int) -> tuple:
    """(family, packet, destination) of a 20-byte TCP segment from `src` to
    `dst` ([address, port, ...] as the image records endpoints), IP header
    included: IPv4 when both addresses are (IPv4-mapped IPv6 too: such a
    socket talks IPv4 on the wire)."""
    s4, d4 = _v4(src[0]), _v4(dst[0])
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                      min(window, 0xFFFF), 0, 0)
    if s4 is not None and d4 is not None:
        sa, da = s4.packed, d4.packed
        pseudo = sa + da + struct.pack("!BBH", 0, _socket.IPPROTO_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        # ID 0 with DF; the kernel fills in the header checksum (IP_HDRINCL)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, _socket.IPPROTO_TCP, 0, sa, da)
        return _socket.AF_INET, ip + tcp, (str(d4), 0)
    sa = ipaddress.ip_address(src[0]).packed
    da = ipaddress.ip_address(dst[0]).packed
    pseudo = sa + da + struct.pack("!I3xB", len(tcp), _socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), _socket.IPPROTO_TCP, 64, sa, da)
    return _socket.AF_INET6, ip + tcp, (str(ipaddress.ip_address(dst[0])), 0)


def send(src, dst, seq: int, ack: int, flags: int, window: int) -> None:
    """Sends the segment (marked, so the network lock lets it in). Raises
    OSError."""
    fam, packet, to = segment(src, dst, seq, ack, flags, window)
    # IPPROTO_RAW: the packet carries its own IP header (IPv6 too, since 4.5)
    s = _socket.socket(fam, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, _socket.IPPROTO_RAW)
    try:
        s.setsockopt(_socket.SOL_SOCKET, SO_MARK, PASS_MARK)
        n = s.sendto(packet, to)
        if n != len(packet):
            raise OSError(0, f"a forged segment went out short ({n} of {len(packet)} bytes)")
    finally:
        s.close()
