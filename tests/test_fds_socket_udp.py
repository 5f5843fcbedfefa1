"""UDP sockets (IPv4/IPv6) held only by the process: rebuilt with their
address, peer, options, multicast memberships and receive queue (each
datagram's payload, boundaries, source and destination); otherwise refused
with `socket` naming why."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from engine.errors import Refusal

from fds_support import Target, assert_flow_label_lease_refused, assert_hostile_records_invalid, classify, dump, restore


def sock(fd: int) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))


def drain(fd: int, n: int = 50):
    s = sock(fd)
    out = []
    try:
        while True:
            try:
                data, src = s.recvfrom(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            out.append((data, src[:2]))
            if len(out) > n:
                return out
    finally:
        s.close()


UDP4 = """
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
r.setsockopt(socket.IPPROTO_IP, 8, 1)              # IP_PKTINFO: ancillary data per datagram
r.bind(("0.0.0.0", 0))
port = r.getsockname()[1]
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 0))
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.bind(("127.0.0.2", 0))
a.sendto(b"first", ("127.0.0.1", port))
b.sendto(b"", ("127.0.0.1", port))                  # an empty datagram keeps its place
b.sendto(b"x" * 3000, ("127.0.0.3", port))
r.sendto(b"to myself", ("127.0.0.1", port))
r.recvfrom(10, socket.MSG_PEEK)                     # the process peeked the head
report_srcs = [list(a.getsockname()), list(b.getsockname()), ["127.0.0.1", port]]
a.close(); b.close()
os.dup2(r.fileno(), 500); r.close()
fcntl.fcntl(500, fcntl.F_SETFL, os.O_NONBLOCK)
"""


def test_udp4_queue_restored_with_sources_destinations_and_boundaries(tmp_path):
    with Target(tmp_path, UDP4, "report['srcs'] = report_srcs; report['port'] = port") as t:
        info = t.check()
        port = info["port"]
        srcs = [tuple(s) for s in info["srcs"]]
        # One look only: see the test below for a second one.
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockname() == ("0.0.0.0", port)
            assert s.getsockopt(socket.IPPROTO_IP, 8) == 1
            # destinations: IP_PKTINFO shows the address each was sent to
            got = []
            for _ in range(4):
                data, anc, _, src = s.recvmsg(1 << 16, 256, socket.MSG_DONTWAIT)
                dst = socket.inet_ntoa(anc[0][2][8:12]) if anc else None
                got.append((data, src, dst))
            assert got == [(b"first", srcs[0], "127.0.0.1"), (b"", srcs[1], "127.0.0.1"),
                           (b"x" * 3000, srcs[1], "127.0.0.3"), (b"to myself", srcs[2], "127.0.0.1")]
            with pytest.raises(BlockingIOError):
                s.recv(10, socket.MSG_DONTWAIT)
        finally:
            s.close()


def test_udp_second_look_at_a_queue_with_an_empty_datagram_refused(tmp_path):
    # Peeking an empty datagram marks it (skb->peeked), and a marked empty
    # datagram past the head is invisible to every later peek at an offset:
    # the accounting check turns that into a refusal, never a lost datagram.
    with Target(tmp_path, UDP4, "report['n'] = len([socket.socket(fileno=os.dup(500)).recvfrom(5000) for _ in range(4)])") as t:
        desc = classify(t.pid, 500)
        assert ", 4 datagrams (3014 bytes) queued" in desc and "SO_REUSEADDR" in desc and "IP_PKTINFO" in desc
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "do not account for the queue" in ei.value.detail
        assert t.check() == {"n": 4}                      # nothing consumed


def test_udp6_connected_with_queue_from_a_foreign_address(tmp_path):
    # The queued reply came "from" 2001:db8::53 (a foreign address, as from
    # an upstream server); the socket is connected to it afterwards.
    setup = """
import socket
r = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
r.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
r.bind(("::1", 0)); port = r.getsockname()[1]
t = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
t.setsockopt(socket.IPPROTO_IPV6, 75, 1); t.setsockopt(socket.IPPROTO_IPV6, 78, 1)
t.bind(("2001:db8::53", 53)); t.sendto(b"answer", ("::1", port)); t.close()
r.connect(("2001:db8::53", 53))
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup, "report['port'] = port") as t:
        port = t.check()["port"]
        desc = classify(t.pid, 500)
        assert desc.startswith(f"udp6 [::1]:{port}->[2001:db8::53]:53, 1 datagrams (6 bytes) queued"), desc
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockname()[:2] == ("::1", port)
            assert s.getpeername()[:2] == ("2001:db8::53", 53)
            assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert drain(500) == [(b"answer", ("2001:db8::53", 53))]
        finally:
            s.close()


def test_udp4_multicast_membership_restored(tmp_path):
    setup = """
import socket, struct
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.bind(("0.0.0.0", 0))
r.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("=4s4si", socket.inet_aton("239.1.2.3"), b"\\0" * 4, 1))
r.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
r.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 3)
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup, "report['port'] = socket.socket(fileno=os.dup(500)).getsockname()[1]") as t:
        port = t.check()["port"]
        desc = classify(t.pid, 500)
        assert "multicast 239.1.2.3@if1" in desc and "IP_MULTICAST_TTL" in desc, desc
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 3
            assert s.getsockname()[1] == port
            # the membership is the socket's own: leaving it works once,
            # and a second leave finds none
            mreq = struct.pack("=4s4si", socket.inet_aton("239.1.2.3"), b"\0" * 4, 1)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, mreq)
            with pytest.raises(OSError):
                s.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, mreq)
        finally:
            s.close()


def test_udp_shared_with_another_process_refused(tmp_path):
    setup = """
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
os.dup2(r.fileno(), 500)
"""
    import engine.pidfd as pidfd
    with Target(tmp_path, setup) as t:
        with pidfd.target_fd(t.pid, 500) as d:
            held = os.dup(d)
        try:
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "socket" and f"also held by pid {os.getpid()}" in ei.value.detail
        finally:
            os.close(held)


def test_udp_timestamps_with_queue_refused_and_queue_kept(tmp_path):
    setup = """
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
r.setsockopt(socket.SOL_SOCKET, 29, 1)   # SO_TIMESTAMP
r.sendto(b"stamped", r.getsockname())
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup, "report['got'] = socket.socket(fileno=500).recv(100, socket.MSG_DONTWAIT).decode()") as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "receive timestamps" in ei.value.detail
        assert t.check() == {"got": "stamped"}        # the refused look lost nothing


def test_udp_source_port_taken_at_restore_refused(tmp_path):
    # The sender still holds its port at restore: the datagram cannot be
    # re-sent from it.
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    try:
        setup = f"""
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
port = r.getsockname()[1]
os.dup2(r.fileno(), 500); r.close()
"""
        with Target(tmp_path, setup, "report['port'] = port") as t:
            port = t.check()["port"]
            holder.sendto(b"q", ("127.0.0.1", port))
            img = dump(t.pid, [500], str(tmp_path / "img"))
            t.close()
            with pytest.raises(Refusal) as ei:
                restore(img)
        assert ei.value.reason == "socket" and f"127.0.0.1:{holder.getsockname()[1]}" in ei.value.detail
    finally:
        holder.close()


SHUT = """
import socket
w = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); w.bind(("127.0.0.1", 0))
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0))
w.connect(r.getsockname()); r.connect(w.getsockname())
w.shutdown(socket.SHUT_WR)                 # still receives
r.shutdown(socket.SHUT_RD)                 # still sends
r.send(b"to the write-shut one")
b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); b.bind(("::1", 0))
try:
    b.shutdown(socket.SHUT_RDWR)           # not connected: ENOTCONN, the bits set all the same
except OSError:
    pass
os.dup2(w.fileno(), 500); os.dup2(r.fileno(), 501); os.dup2(b.fileno(), 502)
w.close(); r.close(); b.close()
"""


def _rdhup(s: socket.socket) -> bool:
    import select
    p = select.poll()
    p.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
    return bool(dict(p.poll(0)).get(s.fileno(), 0) & select.POLLRDHUP)


def test_udp_shutdown_state_restored(tmp_path):
    """CRIU's zdtm socket_udp_shutdown: the bits shutdown(2) set on a UDP
    socket (SHUT_WR: sends fail with EPIPE; SHUT_RD: reads give 0 once the
    queue is empty) are carried; they were lost, so a write-shut socket
    could send again after the restore."""
    with Target(tmp_path, SHUT) as t:
        assert "shut down for writing" in classify(t.pid, 500)
        assert "shut down for reading and writing" in classify(t.pid, 502)
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
    with restore(img):
        w, r, b = sock(500), sock(501), sock(502)
        try:
            assert w.recv(100, socket.MSG_DONTWAIT) == b"to the write-shut one"
            with pytest.raises(BrokenPipeError):
                w.send(b"x")
            # shut for reading: poll says so, a blocking read of the empty
            # queue returns at once (0 bytes)
            assert _rdhup(r) and _rdhup(b) and not _rdhup(w)
            assert r.recv(100) == b""
            r.send(b"still sends")
            assert w.recv(100, socket.MSG_DONTWAIT) == b"still sends"
            with pytest.raises(BrokenPipeError):
                b.sendto(b"x", ("::1", 9))
            assert b.recv(100) == b""
        finally:
            for s in (w, r, b):
                s.close()


def test_udp_unbound_shut_down_refused(tmp_path):
    # An unbound socket is in no sock_diag table: poll shows its reading
    # side only, so whether it is shut for writing too cannot be known.
    setup = """
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.shutdown(socket.SHUT_RD)
except OSError:
    pass
os.dup2(u.fileno(), 500)
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "while unbound" in ei.value.detail


# IP options (a record-route option, 8 bytes) and an IPv6 destination /
# hop-by-hop options header (PadN, 8 bytes): state the socket keeps and
# puts on every datagram it sends; lost by a restore before.
RR = bytes([7, 7, 4, 0, 0, 0, 0, 0])
PADN = bytes([0, 0, 1, 4, 0, 0, 0, 0])


def test_udp4_ip_options_restored(tmp_path):
    setup = f"""
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.setsockopt(socket.IPPROTO_IP, 4, {RR!r})        # IP_OPTIONS
r.bind(("127.0.0.1", 0))
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup) as t:
        t.check()
        assert "IP_OPTIONS" in classify(t.pid, 500)
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockopt(socket.IPPROTO_IP, 4, 40) == RR
        finally:
            s.close()


def test_udp6_sticky_headers_and_rfc2292_flags_restored(tmp_path):
    setup = f"""
import socket
r = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
r.setsockopt(41, 59, {PADN!r})       # IPV6_DSTOPTS
r.setsockopt(41, 54, {PADN!r})       # IPV6_HOPOPTS (CAP_NET_RAW)
r.setsockopt(41, 2, 1)               # IPV6_2292PKTINFO
r.setsockopt(41, 8, 1)               # IPV6_2292HOPLIMIT
r.setsockopt(41, 53, 1)              # IPV6_RECVHOPOPTS
r.bind(("::1", 0))
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup) as t:
        t.check()
        desc = classify(t.pid, 500)
        for name in ("IPV6_DSTOPTS", "IPV6_HOPOPTS", "IPV6_2292PKTINFO", "IPV6_2292HOPLIMIT", "IPV6_RECVHOPOPTS"):
            assert name in desc, desc
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockopt(41, 59, 64) == PADN and s.getsockopt(41, 54, 64) == PADN
            assert [s.getsockopt(41, o) for o in (2, 8, 53)] == [1, 1, 1]
        finally:
            s.close()


def test_tcp_ip_options_refused(tmp_path):
    """Not carried for TCP (per connection): refused, not lost."""
    setup = f"""
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
r.setsockopt(socket.IPPROTO_IP, 4, {RR!r})        # IP_OPTIONS
r.bind(("127.0.0.1", 0)); r.listen(1)
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup) as t:
        t.check()
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "IP_OPTIONS(tcp)=0x" + RR.hex() in ei.value.detail, ei.value.detail


def test_hostile_udp_option_records_are_image_invalid(tmp_path):
    setup = f"""
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.setsockopt(socket.IPPROTO_IP, 4, {RR!r})
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    def edits(good):
        return [dict(good, opts=dict(good["opts"], IP_OPTIONS="00" * 41)),          # beyond 40 bytes
                dict(good, opts=dict(good["opts"], IP_OPTIONS="zz")),
                dict(good, opts=dict(good["opts"], IPV6_HOPOPTS="")),                # not an IPv4 option
                dict(good, opts=dict(good["opts"], SO_NOPE="01000000")),
                dict(good, set=good["set"] + ["SO_DEBUG_X"]),
                dict(good, opts=dict(good["opts"], SO_PASSSEC="01000000"), set=good["set"] + ["SO_PASSSEC"]),
                dict(good, opts=None)]
    assert_hostile_records_invalid(img, edits)


def test_udp6_with_a_flow_label_lease_held_refused(tmp_path):
    """A lease (IPV6_FLOWLABEL_MGR) cannot be read back per socket: refused
    while the namespace lists one, not dropped."""
    assert_flow_label_lease_refused(tmp_path, "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)")


def test_flow_label_list_parsing():
    from engine.fds._flowlabel import parse
    text = ("Label S Owner  Users  Linger Expires  Dst                              Opt\n"
            "E35F6 1 0      1      6      6        00000000000000000000000000000001 0\n"     # exclusive: whose?
            "00011 2 4242   1      6      6        00000000000000000000000000000001 0\n"     # another pid's
            "00012 2 77     1      6      6        00000000000000000000000000000001 0\n"     # ours
            "00013 1 0      0      6      6        00000000000000000000000000000001 0\n")    # lingering, unused
    assert parse(text, 77) == ["E35F6", "00012"]
    assert parse(text.splitlines()[0], 77) == []


def test_tcp6_sticky_header_and_flow_label_lease_refused(tmp_path):
    """TCP: an IPv6 destination options header set on a connection is
    refused (not carried per connection); a connection whose process holds
    a flow label lease too."""
    setup = f"""
import random, socket, struct
l = socket.socket(socket.AF_INET6); l.bind(("::1", 0)); l.listen(1)
c = socket.create_connection(l.getsockname()[:2]); a, _ = l.accept(); l.close()
c.setsockopt(41, 59, {PADN!r})       # IPV6_DSTOPTS
label = random.randrange(1, 1 << 20)
os.dup2(c.fileno(), 500); os.dup2(a.fileno(), 501); c.close(); a.close()
"""
    lease = """
s = socket.socket(fileno=501)
s.setsockopt(41, 32, socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!I", label)
             + struct.pack("=BBHHHI", 0, 2, 1, 0, 0, 0))      # a lease, this pid's (IPV6_FL_S_PROCESS)
s.detach()
"""
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    with Target(tmp_path / "a", setup) as t:
        t.check()
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "IPV6_DSTOPTS(tcp)=0x" + PADN.hex() in ei.value.detail, ei.value.detail
    with Target(tmp_path / "b", setup + lease, "report['label'] = label") as t:
        label = t.check()["label"]
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 501)
        assert ei.value.reason == "socket" and f"{label:05X}" in ei.value.detail, ei.value.detail


def test_udp6_ipv4_level_options_restored(tmp_path):
    """An IPv6 socket takes IPv4-level options (for v4-mapped traffic):
    IP_TOS, IP_TTL and IP options set on one were not read, lost."""
    setup = f"""
import socket
r = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
r.setsockopt(socket.IPPROTO_IP, 1, 0x20)          # IP_TOS
r.setsockopt(socket.IPPROTO_IP, 2, 9)             # IP_TTL
r.setsockopt(socket.IPPROTO_IP, 4, {RR!r})        # IP_OPTIONS
r.bind(("::", 0))
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup) as t:
        t.check()
        desc = classify(t.pid, 500)
        assert "IP_TOS" in desc and "IP_TTL" in desc and "IP_OPTIONS" in desc, desc
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.family == socket.AF_INET6
            assert s.getsockopt(socket.IPPROTO_IP, 1) == 0x20 and s.getsockopt(socket.IPPROTO_IP, 2) == 9
            assert s.getsockopt(socket.IPPROTO_IP, 4, 40) == RR
        finally:
            s.close()
