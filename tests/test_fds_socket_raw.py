"""Raw ICMP sockets (ping(8) as root where ping_group_range lets it no ping
socket): rebuilt with their address, peer, options, ICMP(6) filter and
classic BPF program (locked or not), checked from inside; queued packets,
an eBPF program and hostile records refused."""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import pytest

from engine.errors import Refusal

from fds_support import Target, assert_flow_label_lease_refused, assert_hostile_records_invalid, classify, dump, restore

# Read by the target about its own fds and by the test about the restored
# ones: every option a raw ICMP socket has, and its filter program.
PROBE = r'''
import ctypes, socket, struct
def probe(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    s = socket.socket(fileno=os.dup(fd))
    out = {}
    rows = [(1, 2), (1, 5), (1, 7), (1, 8), (1, 12), (1, 20), (1, 21), (1, 29), (1, 35), (1, 36), (1, 44)]
    if s.family == socket.AF_INET:
        rows += [(0, 1), (0, 2), (0, 3), (0, 4), (0, 11), (0, 10), (0, 22), (255, 1)]
    else:
        rows += [(41, 2), (41, 16), (41, 25), (41, 67), (41, 26), (41, 36), (41, 53), (41, 59), (255, 7), (58, 1)]
    for level, opt in rows:
        try:
            out[f"{level}:{opt}"] = s.getsockopt(level, opt, 32).hex()
        except OSError as e:
            out[f"{level}:{opt}"] = f"errno {e.errno}"
    out["dev"] = s.getsockopt(1, 25, 16).rstrip(b"\0").decode()
    out["name"] = list(s.getsockname())
    v6 = "6" if s.family == socket.AF_INET6 else ""
    with open(f"/proc/self/net/raw{v6}") as f:          # local, remote (a peer of port 0 too), state
        out["table"] = [l.split()[1:4] for l in f if l.split()[9:10] == [str(os.fstat(fd).st_ino)]]
    n = ctypes.c_uint(0)
    libc.getsockopt(fd, 1, 26, None, ctypes.byref(n))
    buf = ctypes.create_string_buffer(8 * max(n.value, 1))
    m = ctypes.c_uint(n.value)
    if n.value:
        assert libc.getsockopt(fd, 1, 26, buf, ctypes.byref(m)) == 0
    out["filter"] = buf.raw[:8 * m.value].hex()
    # joined on lo? (getsockopt MCAST_MSFILTER: its filter mode and count, or EADDRNOTAVAIL)
    fam = s.family
    grp = socket.inet_aton("239.1.2.3") if fam == socket.AF_INET else socket.inet_pton(fam, "ff12::1:2:3")
    ss = (struct.pack("=H2x", fam) + (b"" if fam == socket.AF_INET else bytes(4)) + grp).ljust(128, b"\0")
    gf = ctypes.create_string_buffer(struct.pack("=I4x", 1) + ss + struct.pack("=II", 0, 0) + bytes(128))
    gl = ctypes.c_uint(len(gf.raw))
    rc = libc.getsockopt(fd, 0 if fam == socket.AF_INET else 41, 48, gf, ctypes.byref(gl))
    out["member"] = list(struct.unpack_from("=II", gf.raw, 136)) if rc == 0 else ctypes.get_errno()
    s.close()
    return out
'''

# An echo reply with this test process's ident: accept, else drop (every
# raw ICMP socket on the machine gets every ICMP packet: other tests' too).
IDENT = os.getpid() & 0xFFFF
_BPF4 = [(0xb1, 0, 0, 0),                 # X = the IPv4 header's length
         (0x50, 0, 0, 0), (0x15, 0, 3, 0),                            # type: echo reply?
         (0x48, 0, 0, 4), (0x15, 0, 1, IDENT),                        # ident: ours?
         (0x06, 0, 0, 0x40000), (0x06, 0, 0, 0)]
_BPF6 = [(0x30, 0, 0, 0), (0x15, 0, 3, 129), (0x28, 0, 0, 4), (0x15, 0, 1, IDENT),
         (0x06, 0, 0, 0x40000), (0x06, 0, 0, 0)]

SETUP = PROBE + f'''
import struct
def attach(s, prog, lock=False):
    insns = b"".join(struct.pack("=HBBI", *i) for i in prog)
    buf = ctypes.create_string_buffer(insns)
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(buf))
    s.setsockopt(socket.SOL_SOCKET, 26, fprog)
    if lock:
        s.setsockopt(socket.SOL_SOCKET, 44, 1)
r4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
r4.setsockopt(255, 1, struct.pack("=I", 0xFFFFFFFF & ~1))         # ICMP_FILTER: echo replies only
r4.setsockopt(socket.IPPROTO_IP, 11, 1)                              # IP_RECVERR
r4.setsockopt(socket.SOL_SOCKET, 29, 1)                              # SO_TIMESTAMP
r4.setsockopt(socket.IPPROTO_IP, 2, 33)                              # IP_TTL
r4.setsockopt(socket.SOL_SOCKET, 36, 7)                              # SO_MARK
r4.setsockopt(socket.IPPROTO_IP, 4, bytes([1, 1, 1, 0]))             # IP_OPTIONS: NOPs
attach(r4, {_BPF4!r}, lock=True)
r4.setsockopt(socket.IPPROTO_IP, 35, struct.pack("=4s4si", socket.inet_aton("239.1.2.3"), bytes(4), 1))  # on lo
f6 = [0xFFFFFFFF] * 8; f6[129 >> 5] &= ~(1 << (129 & 31))            # ICMP6_FILTER: echo replies only
r6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58)
r6.setsockopt(58, 1, struct.pack("=8I", *f6))
r6.setsockopt(socket.IPPROTO_IPV6, 16, 44)                           # IPV6_UNICAST_HOPS
r6.setsockopt(socket.IPPROTO_IPV6, 25, 1)                            # IPV6_RECVERR
r6.setsockopt(socket.SOL_SOCKET, 29, 1)
r6.setsockopt(socket.IPPROTO_IPV6, 2, 1)                             # IPV6_2292PKTINFO
r6.setsockopt(socket.IPPROTO_IPV6, 53, 1)                            # IPV6_RECVHOPOPTS
r6.setsockopt(socket.IPPROTO_IPV6, 59, bytes([0, 0, 1, 4, 0, 0, 0, 0]))   # IPV6_DSTOPTS: PadN, sent with each
attach(r6, {_BPF6!r})
r6.setsockopt(socket.IPPROTO_IPV6, 20, socket.inet_pton(socket.AF_INET6, "ff12::1:2:3") + struct.pack("=I", 1))
h = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
h.setsockopt(socket.IPPROTO_IP, 3, 1)                                # IP_HDRINCL
h.setsockopt(socket.SOL_SOCKET, 25, b"lo")                           # SO_BINDTODEVICE
h.bind(("127.0.0.1", 0))
h.connect(("127.0.0.2", 0))                                          # port 0: getpeername says ENOTCONN
os.dup2(r4.fileno(), 500); os.dup2(r6.fileno(), 501); os.dup2(h.fileno(), 502)
r4.close(); r6.close(); h.close()
'''
CHECK = "report.update({str(fd): probe(fd) for fd in (500, 501, 502)})"


def _local_probe():
    ns = {"os": os}
    exec(PROBE, ns)
    return ns["probe"]


def _echo(s: socket.socket, fam: int, dst: str, ident: int, seq: int) -> bytes:
    """Send an echo request through `s`; the first echo reply with `ident`
    it reads (other pings on this machine reach every raw ICMP socket)."""
    typ = 8 if fam == socket.AF_INET else 128
    body = struct.pack(">BBHHH", typ, 0, 0, ident, seq) + b"crucible"
    if fam == socket.AF_INET:
        c = sum(struct.unpack(">%dH" % (len(body) // 2), body))
        c = (c >> 16) + (c & 0xFFFF)
        body = body[:2] + struct.pack(">H", ~(c + (c >> 16)) & 0xFFFF) + body[4:]
    s.sendto(body, (dst, 0))
    deadline = time.monotonic() + 5
    s.settimeout(5)
    while time.monotonic() < deadline:
        pkt = s.recv(2000)
        icmp = pkt[20:] if fam == socket.AF_INET else pkt
        if struct.unpack(">HH", icmp[4:8]) == (ident, seq):
            return icmp
    raise AssertionError("no echo reply")


def test_raw_icmp_sockets_restored_with_filters_options_and_answered(tmp_path):
    """Refused before ("inet raw protocol 1"). Every option and both BPF
    programs read back the same from inside; each restored socket still
    filters (only replies pass: the request it sends arrives on it too)
    and receives the reply to a request it sends."""
    with Target(tmp_path, SETUP, CHECK) as t:
        before = t.check()
        assert "error" not in before, before
        assert classify(t.pid, 500) == ("raw icmp, a 7-instruction socket filter, multicast 239.1.2.3@if1, options SO_TIMESTAMP, "
                                        "SO_MARK, SO_LOCK_FILTER, IP_TTL, IP_RECVERR, ICMP_FILTER, IP_OPTIONS")
        assert classify(t.pid, 501) == ("raw6 icmp, a 6-instruction socket filter, multicast ff12::1:2:3@if1, options SO_TIMESTAMP, "
                                        "IPV6_UNICAST_HOPS, IPV6_RECVERR, ICMP6_FILTER, IPV6_2292PKTINFO, "
                                        "IPV6_RECVHOPOPTS, IPV6_DSTOPTS")
        assert classify(t.pid, 502) == "raw icmp 127.0.0.1->127.0.0.2, options SO_BINDTODEVICE, IP_HDRINCL"
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        with restore(img):
            probe = _local_probe()
            after = {str(fd): probe(fd) for fd in (500, 501, 502)}
            assert after == before
            assert after["500"]["filter"] and after["501"]["filter"] and after["502"]["dev"] == "lo"
            # the lock held: the program cannot be replaced
            s4 = socket.socket(fileno=os.dup(500))
            s6 = socket.socket(fileno=os.dup(501))
            try:
                with pytest.raises(PermissionError):
                    s4.setsockopt(socket.SOL_SOCKET, 27, 0)         # SO_DETACH_FILTER
                ident = IDENT
                assert _echo(s4, socket.AF_INET, "127.0.0.1", ident, 1)[8:] == b"crucible"
                assert _echo(s6, socket.AF_INET6, "::1", ident, 2)[8:] == b"crucible"
                # the filters let only replies through: nothing else waits
                time.sleep(0.1)
                for s in (s4, s6):
                    s.setblocking(False)
                    with pytest.raises(BlockingIOError):
                        while True:
                            pkt = s.recv(2000)
                            icmp = pkt[20:] if s is s4 else pkt
                            assert icmp[0] in (0, 129), icmp[:8]
            finally:
                s4.close()
                s6.close()


def test_raw_icmp_socket_with_a_packet_queued_is_refused(tmp_path):
    setup = """
import socket, time
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
r.sendto(bytes([8, 0, 0xf7, 0xfe, 0, 0, 0, 1]), ("127.0.0.1", 0))
time.sleep(0.2)                                   # its request and reply wait, unread
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and ei.value.detail.endswith("bytes of ICMP packets queued to be read")


def test_raw_icmp_socket_shut_down_for_reading_is_refused(tmp_path):
    setup = """
import socket
r = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58)
try:
    r.shutdown(socket.SHUT_RD)
except OSError:
    pass                                          # ENOTCONN, the bits taken all the same
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "shut down" in ei.value.detail


def test_hostile_raw_records_are_image_invalid(tmp_path):
    with Target(tmp_path, SETUP) as t:
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
    def edits(good):
        return [dict(good, filter=good["filter"][:-1]),                         # count differs from SO_GET_FILTER
                dict(good, filter=[[0x06, 0, 0, 1 << 32]] * len(good["filter"])),
                dict(good, filter=[[0x06, 0, 0, "x"]] * len(good["filter"])),
                dict(good, filter=None),
                dict(good, proto=58),
                dict(good, family=socket.AF_INET6),
                dict(good, addr=["not an address", 1]),
                dict(good, peer=["127.0.0.1"]),
                dict(good, opts=dict(good["opts"], SO_NOPE="01000000")),
                dict(good, opts=dict(good["opts"], IP_TTL="zz")),
                dict(good, set=good["set"] + ["SO_DEBUG_X"]),
                dict(good, mcast=[{"ifindex": 1, "group": "10.0.0.1", "mode": 0, "sources": []}]),
                dict(good, mcast=[{"ifindex": 1, "group": "ff12::1", "mode": 0, "sources": []}]),
                dict(good, mcast=[{"ifindex": 1, "group": "239.1.1.1", "mode": 7, "sources": []}]),
                dict(good, mcast=None),
                dict(good, opts=dict(good["opts"], SO_PASSSEC="01000000"), set=good["set"] + ["SO_PASSSEC"])]
    assert_hostile_records_invalid(img, edits)


PROTO = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: 58}


def _ping_filter(pid: int, fd: int) -> list:
    """The classic BPF program on `pid`'s socket `fd` (read on a duplicate)."""
    from engine import pidfd
    from engine.fds._raw import read_filter
    with pidfd.target_fd(pid, fd) as dup:
        return read_filter(dup)


@pytest.mark.parametrize("family", [["-4", "127.0.0.1"], ["-6", "::1"]], ids=["ipv4", "ipv6"])
def test_real_ping_on_raw_sockets_is_restored_and_goes_on_counting_replies(tmp_path, family):
    """ping(8) as root where ping_group_range lets gid 0 no ping socket: its
    socket is a raw ICMP one, with ping's BPF filter (and, IPv6, its
    ICMP6_FILTER) on it; refused before. After the restore its sequence
    numbers go on from where they were, every request answered. (-4/-6:
    without them ping opens both families and never reads the other
    socket, whose queue then holds every ICMP packet of that family on the
    machine - such a dump is refused, packets queued.)"""
    import shutil
    from engine.context import Options
    from engine.restore import restore as full_restore
    from fds_support import dump_between_packets, ping_counts_on, real_ping
    from harness.hostsysctl import ping_sockets_excluded
    if not shutil.which("ping"):
        pytest.skip("no ping (iputils-ping)")
    with ping_sockets_excluded(), real_ping(tmp_path, family) as (p, seqs):
        socks = {int(os.readlink(f"/proc/{p.pid}/fd/{fd}")[8:-1]) for fd in os.listdir(f"/proc/{p.pid}/fd")
                 if os.readlink(f"/proc/{p.pid}/fd/{fd}").startswith("socket:")}
        raw = set()
        for table in ("raw", "raw6"):
            with open(f"/proc/{p.pid}/net/{table}") as f:
                raw |= {int(l.split()[9]) for l in list(f)[1:]}
        assert socks and socks <= raw, (socks, raw)          # SOCK_RAW, not ping sockets
        # ping attaches its BPF filter (its ident) once a packet not its own
        # reached it: send it an echo reply of another ident
        fd = next(int(n) for n in os.listdir(f"/proc/{p.pid}/fd")
                  if os.readlink(f"/proc/{p.pid}/fd/{n}").startswith("socket:"))
        fam = socket.AF_INET if family[0] == "-4" else socket.AF_INET6
        with socket.socket(fam, socket.SOCK_RAW, PROTO[fam]) as tx:
            body = struct.pack(">BBHHH", 0 if fam == socket.AF_INET else 129, 0, 0, (p.pid + 1) & 0xFFFF, 1)
            if fam == socket.AF_INET:
                c = sum(struct.unpack(">4H", body))
                c = (c >> 16) + (c & 0xFFFF)
                body = body[:2] + struct.pack(">H", ~(c + (c >> 16)) & 0xFFFF) + body[4:]
            deadline = time.monotonic() + 10
            while _ping_filter(p.pid, fd) == [] and time.monotonic() < deadline:
                tx.sendto(body, (family[1], 0))
                time.sleep(0.2)
        prog = _ping_filter(p.pid, fd)
        assert prog, "ping attached no filter"
        # a freeze that meets a packet still queued is refused: again
        dump_between_packets(p.pid, str(tmp_path / "img"), "ICMP packets queued", 20)
        p.wait()
        n = max(seqs())
        full_restore(str(tmp_path / "img"), Options())
        assert _ping_filter(p.pid, fd) == prog
        ping_counts_on(seqs, n)


def test_raw_icmp_socket_with_an_ebpf_filter_or_held_outside_is_refused(tmp_path):
    """An eBPF program (SO_ATTACH_BPF) has no classic form SO_GET_FILTER could
    read back; a socket another process holds too would be split in two."""
    setup = """
import socket, platform
insns = struct.pack("=BBhi", 0xb7, 0, 0, 0) + struct.pack("=BBhi", 0x95, 0, 0, 0)   # r0 = 0; exit
ibuf, lic = ctypes.create_string_buffer(insns), ctypes.create_string_buffer(b"GPL")
attr = struct.pack("=IIQQIIQI", 1, 2, ctypes.addressof(ibuf), ctypes.addressof(lic), 0, 0, 0, 0) + bytes(80)
abuf = ctypes.create_string_buffer(attr)
libc.syscall.restype = ctypes.c_long
prog = libc.syscall(321 if platform.machine() == "x86_64" else 280, 5, abuf, len(attr))  # BPF_PROG_LOAD
assert prog >= 0, ctypes.get_errno()
e = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
e.setsockopt(socket.SOL_SOCKET, 50, prog)                    # SO_ATTACH_BPF
o = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58)
os.dup2(e.fileno(), 500); os.dup2(o.fileno(), 501)
r, w = os.pipe()
if os.fork() == 0:
    libc.prctl(1, 9)                                         # PR_SET_PDEATHSIG: goes with the target
    e.close(); os.close(500)
    os.write(w, b"x")
    signal.pause()                                           # holds the IPv6 one too
os.read(r, 1)           # ready only once the child let go of the eBPF one (else it is "also held" too)
os.close(r); os.close(w)
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "eBPF socket filter (SO_ATTACH_BPF)" in ei.value.detail
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 501)
        assert ei.value.reason == "socket" and "also held by pid" in ei.value.detail
        child = int(ei.value.detail.split("also held by pid ")[1].split()[0])
        os.kill(child, 9)


def _without_net_raw(fn):
    """fn() in a child whose effective capabilities lack CAP_NET_RAW: the
    (reason, detail) of the Refusal it raises, or ("", repr) otherwise."""
    import ctypes
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)            # _LINUX_CAPABILITY_VERSION_3
            data = (ctypes.c_uint32 * 6)()
            assert libc.capget(hdr, data) == 0
            data[0] &= ~(1 << 13)                                  # effective: CAP_NET_RAW
            assert libc.capset(hdr, data) == 0
            try:
                fn()
                out = ["", "no refusal"]
            except Refusal as e:
                out = [e.reason, e.detail]
            except BaseException as e:
                out = ["", repr(e)]
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    os.waitpid(pid, 0)
    return tuple(json.loads(got))


def test_raw_icmp_socket_without_cap_net_raw_is_refused_at_dump_and_restore(tmp_path):
    setup = """
import socket
r = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58)
os.dup2(r.fileno(), 500); r.close()
"""
    with Target(tmp_path, setup) as t:
        assert _without_net_raw(lambda: classify(t.pid, 500)) == (
            "socket", "raw6 icmp: ckpt cannot open raw sockets (CAP_NET_RAW) to compare its options")
        img = dump(t.pid, [500], str(tmp_path / "img"))

    def rebuild():
        restore(img).__exit__()
    assert _without_net_raw(rebuild) == ("socket", "raw6 icmp: ckpt cannot open raw sockets here (no CAP_NET_RAW)")


def test_raw_icmp_sockets_bound_and_connected_both_ways_restored(tmp_path):
    """The peer read from getpeername (connected with a port) and from the
    raw6 table (port 0: getpeername says ENOTCONN); both bound. A request
    sent with send() (no address: the peer) is answered."""
    # filtered: whatever else goes from loopback to loopback would queue
    setup = SETUP.split("r4 = ")[0] + f"""
a = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58)
attach(a, {_BPF6!r})
a.bind(("::1", 0)); a.connect(("::1", 0))
b = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
b.setsockopt(255, 1, struct.pack("=I", 0xFFFFFFFF))                  # ICMP_FILTER: nothing
b.bind(("127.0.0.2", 0)); b.connect(("127.0.0.1", 5))               # not the source connect would pick
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
"""
    check = PROBE + "report.update({str(fd): probe(fd) for fd in (500, 501)})"
    with Target(tmp_path, setup, check) as t:
        before = t.check()
        assert "error" not in before, before
        assert classify(t.pid, 500) == "raw6 icmp ::1->::1, a 6-instruction socket filter"
        assert classify(t.pid, 501) == "raw icmp 127.0.0.2->127.0.0.1, options ICMP_FILTER"
        assert before["500"]["table"][0][2] == "01" and before["501"]["table"][0][2] == "01"    # established
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        with restore(img):
            probe = _local_probe()
            assert {str(fd): probe(fd) for fd in (500, 501)} == before
            s = socket.socket(fileno=os.dup(500))
            try:
                s.send(struct.pack(">BBHHH", 128, 0, 0, IDENT, 9) + b"crucible")
                s.settimeout(5)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    icmp = s.recv(2000)
                    if icmp[0] == 129 and struct.unpack(">HH", icmp[4:8]) == (IDENT, 9):
                        break
                else:
                    raise AssertionError("no echo reply")
            finally:
                s.close()


def test_raw_icmp6_socket_with_a_flow_label_lease_held_refused(tmp_path):
    """As for every other IPv6 socket (engine/fds/_flowlabel.py): a lease
    cannot be tied to its socket, so a raw socket is refused while its
    namespace lists one that may be the target's."""
    assert_flow_label_lease_refused(tmp_path, "socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)")
