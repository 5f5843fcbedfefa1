"""Sockets made by socket() that never connected nor listened (CRIU's zdtm
socket-tcp-unconn, sock_opts*, sock_tcp_opts*, socket-linger,
socket-tcp-keepalive, unbound_sock, sk-unix-unconn, sk-unix-rel): TCP
(engine/fds/_tcpunconn.py) and unix of every type (engine/fds/_unixdgram.py,
sub-kind unix-unconn), bound or not, with their options and shutdown bits;
used after the restore as the process would (listen, connect). They were
refused (`socket: tcp unconnected`, `unix stream unconnected`).

A TCP socket whose connect failed or whose connection ended is refused: it
holds state a fresh socket lacks (a stale source port, a pending error).
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from engine import netdiag
from engine.errors import Refusal

from fds_support import Target, classify, dump, restore


def sock(fd: int) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))


def _opt(fd, level, name, n=4):
    s = sock(fd)
    try:
        return s.getsockopt(level, name, n)
    finally:
        s.close()


TCP = """
import socket, struct
a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)          # options only, unbound
a.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
a.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 9))
b = socket.socket(socket.AF_INET, socket.SOCK_STREAM)          # bound to a port the kernel chose
b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
b.bind(("127.0.0.1", 0))
c = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)         # v6, bound, shut down for reading
c.bind(("::1", 0))
try:
    c.shutdown(socket.SHUT_RD)                                  # ENOTCONN, the bit set all the same
except OSError:
    pass
for i, s in enumerate((a, b, c)):
    os.dup2(s.fileno(), 500 + i); s.close()
"""


def test_tcp_unconnected_sockets_restored_with_options_address_and_shutdown(tmp_path):
    with Target(tmp_path, TCP) as t:
        assert classify(t.pid, 500).startswith("tcp unconnected, options")
        assert "bound 127.0.0.1:" in classify(t.pid, 501)
        assert "shut down for reading" in classify(t.pid, 502)
        b_name = _peek_name(t.pid, 501)
        c_name = _peek_name(t.pid, 502)
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
    with restore(img):
        assert _opt(500, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == (1).to_bytes(4, "little")
        assert _opt(500, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == (77).to_bytes(4, "little")
        assert _opt(500, socket.IPPROTO_TCP, socket.TCP_NODELAY) == (1).to_bytes(4, "little")
        assert _opt(500, socket.SOL_SOCKET, socket.SO_LINGER, 8) == (1).to_bytes(4, "little") + (9).to_bytes(4, "little")
        a, b, c = sock(500), sock(501), sock(502)
        try:
            assert a.getsockname() == ("0.0.0.0", 0)
            assert list(b.getsockname()) == b_name
            assert list(c.getsockname()[:2]) == c_name
            assert netdiag.inet_shutdown(socket.AF_INET6, socket.IPPROTO_TCP, os.fstat(502).st_ino) == \
                netdiag.RCV_SHUTDOWN
            b.listen(1)                          # the process goes on: listen, connect, talk
            a.connect(b.getsockname())
            conn, _ = b.accept()
            a.sendall(b"hello")
            assert conn.recv(5) == b"hello"
            conn.close()
        finally:
            for s in (a, b, c):
                s.close()


def _peek_name(pid: int, fd: int) -> list:
    from engine import pidfd
    with pidfd.target_fd(pid, fd) as d:
        s = socket.socket(fileno=os.dup(d))
        try:
            return list(s.getsockname()[:2])
        finally:
            s.close()


def test_tcp_socket_after_a_failed_connect_refused(tmp_path):
    # The failed connect undid itself (tcp_disconnect) but getsockname still
    # shows the port it took: a fresh socket bound there would not be it.
    setup = """
import socket
l = socket.socket(); l.bind(("127.0.0.1", 0)); port = l.getsockname()[1]; l.close()
s = socket.socket()
try:
    s.connect(("127.0.0.1", port))
except OSError:
    pass
os.dup2(s.fileno(), 500); s.close()
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "does not list it as bound" in ei.value.detail


UNIX = """
import socket
a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)                   # unbound
a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
b = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)                # abstract name
b.bind(ABSTRACT)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)                   # path, shut down for writing
c.bind(PATH)
c.shutdown(socket.SHUT_WR)
d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)                    # unbound datagram
for i, s in enumerate((a, b, c, d)):
    os.dup2(s.fileno(), 500 + i); s.close()
"""


def test_unix_unconnected_sockets_restored_bound_or_not(tmp_path):
    abstract = b"\0ckpt-test-" + uuid.uuid4().hex.encode()
    path = str(tmp_path / "s.sock")
    setup = f"ABSTRACT = {abstract!r}\nPATH = {path!r}\n" + UNIX
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500).startswith("unix stream unbound")
        assert classify(t.pid, 501).startswith("unix seqpacket bound @")
        assert "shut down for writing" in classify(t.pid, 502)
        assert classify(t.pid, 503).startswith("unix dgram unbound")
        img = dump(t.pid, [500, 501, 502, 503], str(tmp_path / "img"))
    os.unlink(path)          # the dead process's socket file: restore would remove it too
    with restore(img):
        a, b, c, d = sock(500), sock(501), sock(502), sock(503)
        try:
            assert a.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 1
            assert a.getsockname() in ("", b"") and d.getsockname() in ("", b"")
            assert b.getsockname() == abstract and b.type == socket.SOCK_SEQPACKET
            assert c.getsockname() == path
            ino = os.fstat(502).st_ino
            assert netdiag.unix_socket(ino)["shutdown"] == netdiag.SEND_SHUTDOWN
            b.listen(1)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            client.connect(abstract)
            conn, _ = b.accept()
            client.send(b"one record")
            assert conn.recv(100) == b"one record"
            conn.close(); client.close()
        finally:
            for s in (a, b, c, d):
                s.close()
