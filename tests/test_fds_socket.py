"""Sockets outside the restorable subset: refused by name (family, type,
state), target unharmed; the restorable ones say what they are."""

from __future__ import annotations

import os

import pytest

from engine import netinfo
from engine.errors import Refusal

from fds_support import Target, classify


def refusal(pid, fd) -> str:
    with pytest.raises(Refusal) as ei:
        classify(pid, fd)
    assert ei.value.reason == "socket" and ei.value.fd == fd and ei.value.pid == pid
    assert ei.value.path.startswith("socket:[")
    return ei.value.detail


def test_socket_unix_kinds_named(tmp_path):
    path = str(tmp_path / "l.sock")
    setup = f"""
import socket
a, b = socket.socketpair(); a.send(b"hello")
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(4)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect({path!r})
d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); d.bind("\\0abstract-crucible-test")
for s, n in ((a, 500), (b, 501), (l, 502), (c, 503), (d, 504)):
    os.dup2(s.fileno(), n)
"""
    with Target(tmp_path, setup, "report['got'] = os.read(501, 10).decode()") as t:
        # the socketpair is restorable now: described, not refused
        assert classify(t.pid, 500).startswith("unix stream socketpair end")
        assert "5 bytes queued" in classify(t.pid, 501)
        # c's connection waits in l's accept queue, c is the process's own:
        # both restored (tests/test_fds_socket_unixpending.py)
        assert classify(t.pid, 502) == f"unix stream listening {path}, backlog 4, 1 connection(s) waiting"
        assert classify(t.pid, 503).startswith("unix connection waiting in the accept queue")
        assert classify(t.pid, 504) == "unix dgram bound @abstract-crucible-test"   # restored now
        assert t.check()["got"] == "hello"        # the peek consumed nothing


def test_socket_inet_kinds_named(tmp_path):
    setup = """
import socket
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
c = socket.create_connection(l.getsockname()); s, _ = l.accept()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u6.bind(("::1", 0)); u6.connect(("::1", 9))
n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
for x, fd in ((l, 500), (c, 501), (s, 502), (u, 503), (u6, 504), (n, 505)):
    os.dup2(x.fileno(), fd)
report_ports = (l.getsockname()[1], c.getsockname()[1], u.getsockname()[1], u6.getsockname()[1])
CHECK_PORTS = report_ports
"""
    with Target(tmp_path, setup, "report['ports'] = CHECK_PORTS") as t:
        lp, cp, up, u6p = t.check()["ports"]
        # c's connection was accepted (s), so l's accept queue is empty:
        assert classify(t.pid, 500).startswith(f"tcp listening 127.0.0.1:{lp}, backlog 1")
        # established, both ends held: restored through TCP_REPAIR (test_fds_socket_tcp.py)
        assert classify(t.pid, 501) == f"tcp established 127.0.0.1:{cp}->127.0.0.1:{lp}, peer in the dump"
        assert classify(t.pid, 502) == f"tcp established 127.0.0.1:{lp}->127.0.0.1:{cp}, peer in the dump"
        # UDP sockets are restored now (tests/test_fds_socket_udp.py)
        assert classify(t.pid, 503) == f"udp 127.0.0.1:{up}"
        assert classify(t.pid, 504).startswith(f"udp6 [::1]:{u6p}->[::1]:9")
        assert classify(t.pid, 505) == "netlink route raw port 0"      # restored: test_fds_socket_netlink.py


def test_netinfo_parsers_on_canned_text():
    unix = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/x.sock\n"
            "0000000000000000: 00000003 00000000 00000000 0001 03 4243\n")
    t = netinfo.parse_unix(unix)
    assert t[4242] == {"flags": 0x10000, "type": 1, "state": 1, "path": "/run/x.sock"}
    assert t[4243]["path"] is None and t[4243]["state"] == 3
    tcp = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
           "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0\n")
    assert netinfo.parse_inet(tcp)[777]["local"] == ("127.0.0.1", 8080)
    assert netinfo.parse_inet(tcp)[777]["state"] == 10
    tcp6 = ("  sl  local_address                         remote_address                        st ...\n"
            "   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A "
            "00000000:00000000 00:00000000 00000000     0        0 778 1 0\n")
    assert netinfo.parse_inet(tcp6)[778]["local"] == ("::1", 80)


def test_netdiag_unix_message_parser_on_canned_bytes():
    import struct
    from engine import netdiag

    def attr(typ, payload):
        n = 4 + len(payload)
        return struct.pack("=HH", n, typ) + payload + b"\0" * ((4 - n % 4) % 4)
    body = struct.pack("=BBBBIII", 1, 5, 10, 0, 4242, 0, 0)
    body += attr(netdiag.UNIX_DIAG_NAME, b"\0abc")
    body += attr(netdiag.UNIX_DIAG_VFS, struct.pack("=II", 77, (8 << 20) | 3))
    body += attr(netdiag.UNIX_DIAG_ICONS, struct.pack("=II", 11, 12))
    body += attr(netdiag.UNIX_DIAG_RQLEN, struct.pack("=II", 2, 128))
    body += attr(netdiag.UNIX_DIAG_SHUTDOWN, b"\x03")
    got = netdiag._unix_msg(body)
    assert got == {"inode": 4242, "type": 5, "state": 10, "name": b"\0abc", "vfs": (os.makedev(8, 3), 77),
                   "peer": None, "icons": [11, 12], "rqueue": 2, "wqueue": 128, "shutdown": 3}


def test_socket_options_compared_with_a_fresh_socket():
    import socket
    from engine.fds import _sockopts
    s, fresh = socket.socket(), socket.socket()
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, 25, b"lo")          # SO_BINDTODEVICE: reproduced by name
        s.setsockopt(socket.IPPROTO_IP, 18, 1)              # IP_PASSSEC: refused by name
        v = _sockopts.read_all(s, socket.AF_INET, True)
        f = _sockopts.read_all(fresh, socket.AF_INET, True)
        assert _sockopts.differing(v, f) == ["SO_BINDTODEVICE", "IP_PASSSEC", "TCP_NODELAY"]
        assert _sockopts.refused(v, f) == ["IP_PASSSEC=1"]
        # reproduced on a new socket, and read back identical; one left out is caught
        n = socket.socket()
        try:
            _sockopts.apply(n, v, ["TCP_NODELAY"])
            with pytest.raises(_sockopts.OptionError) as ei:
                _sockopts.verify(n, socket.AF_INET, True, v)
            assert ei.value.name == "SO_BINDTODEVICE"
            _sockopts.apply(n, v, ["SO_BINDTODEVICE"])
            n.setsockopt(socket.IPPROTO_IP, 18, 1)
            _sockopts.verify(n, socket.AF_INET, True, v)
        finally:
            n.close()
        # a device not here: the setsockopt fails, naming the option
        gone = dict(v, SO_BINDTODEVICE=b"no-such-dev0".ljust(16, b"\0").hex())
        with socket.socket() as n, pytest.raises(_sockopts.OptionError) as ei:
            _sockopts.apply(n, gone, ["SO_BINDTODEVICE"])
        assert ei.value.name == "SO_BINDTODEVICE" and "no-such-dev0" in str(ei.value)
    finally:
        s.close()
        fresh.close()
