"""Connections waiting in a unix listener's accept queue whose connecting
ends the process holds: restored waiting, in accept order. A connecting
end outside the dump, or bytes queued in a waiting connection, are refused
naming why."""

from __future__ import annotations

import os
import socket

import pytest

from engine.errors import Refusal

from fds_support import Target, classify, dump, restore


def sock(fd: int) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))


def test_waiting_connections_restored_in_accept_order(tmp_path):
    path = str(tmp_path / "l.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(5)
c1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c1.connect({path!r})
c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c2.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536); c2.connect({path!r})
for x, fd in ((c2, 500), (l, 501), (c1, 502)):      # a connecting end before the listener
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 501) == f"unix stream listening {path}, backlog 5, 2 connection(s) waiting"
        assert classify(t.pid, 500).startswith("unix connection waiting in the accept queue of listener")
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        with restore(img):
            l, c1, c2 = sock(501), sock(502), sock(500)
            try:
                assert c2.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 131072
                assert c1.getpeername() == path and c2.getpeername() == path
                l.settimeout(5)
                c1.send(b"one")
                c2.send(b"two")
                first, _ = l.accept()
                second, _ = l.accept()
                first.settimeout(5)
                second.settimeout(5)
                assert (first.recv(10), second.recv(10)) == (b"one", b"two")
                first.close()
                second.close()
            finally:
                l.close(); c1.close(); c2.close()


def test_connecting_end_outside_refused_naming_pid(tmp_path):
    path = str(tmp_path / "o.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(5)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            c.connect(path)
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "socket"
            assert f"a pending connection from pid {os.getpid()} (fd {c.fileno()})" in ei.value.detail
        finally:
            c.close()


def test_waiting_connection_with_bytes_queued_refused(tmp_path):
    path = str(tmp_path / "d.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(5)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect({path!r}); c.send(b"early")
os.dup2(l.fileno(), 500); os.dup2(c.fileno(), 501); l.close(); c.close()
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and "cannot be read before it is accepted" in ei.value.detail


def test_waiting_connection_to_a_listener_deeper_than_sun_path(tmp_path):
    """A listener bound by a relative name in a directory whose absolute
    path is longer than sun_path holds (108 bytes): its waiting connection
    is made again through that relative name (CRIU's zdtm sk-unix-listen01,
    run in a deep directory, lost its process: the restore connected to the
    absolute path, "AF_UNIX path too long")."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep / "l.sock")) > 108
    setup = f"""
import socket
os.chdir({str(deep)!r})
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind("l.sock"); l.listen(5)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect("l.sock")
os.dup2(l.fileno(), 501); os.dup2(c.fileno(), 502); l.close(); c.close()
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 501) == "unix stream listening l.sock, backlog 5, 1 connection(s) waiting"
        img = dump(t.pid, [501, 502], str(tmp_path / "img"))
        t.close()
        cwd = os.getcwd()
        with restore(img):
            assert os.getcwd() == cwd
            l, c = sock(501), sock(502)
            try:
                assert l.getsockname() == "l.sock" and c.getpeername() == "l.sock"
                l.settimeout(5)
                c.send(b"deep")
                conn, _ = l.accept()
                conn.settimeout(5)
                assert conn.recv(10) == b"deep"
                conn.close()
            finally:
                l.close(); c.close()
