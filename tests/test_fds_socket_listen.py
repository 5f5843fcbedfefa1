"""Listening sockets held only by the process (TCP on 127.0.0.1 / ::1, unix
path-bound and abstract) with nothing waiting in the accept queue: rebuilt
with the same address, backlog, options and flags; otherwise refused with
`socket` and the reason."""

from __future__ import annotations

import fcntl
import os
import socket
import time
import stat
import uuid

import pytest

from engine import netdiag
from engine.errors import Refusal

from fds_support import Target, classify, dump, restore


def refusal(pid, fd) -> str:
    with pytest.raises(Refusal) as ei:
        classify(pid, fd)
    assert ei.value.reason == "socket" and ei.value.fd == fd and ei.value.pid == pid
    return ei.value.detail


def sock(fd: int) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))


TCP4 = """
import socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
l.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
l.bind(("127.0.0.1", 0)); l.listen(17)
os.dup2(l.fileno(), 500); os.dup2(l.fileno(), 501); l.close()
fcntl.fcntl(500, fcntl.F_SETFL, os.O_NONBLOCK)
"""


def test_tcp4_listener_restored_with_port_backlog_options_and_flags(tmp_path):
    with Target(tmp_path, TCP4, "report['port'] = socket.socket(fileno=os.dup(500)).getsockname()[1]") as t:
        port = t.check()["port"]
        desc = classify(t.pid, 500)
        assert desc.startswith(f"tcp listening 127.0.0.1:{port}, backlog 17")
        assert "SO_REUSEADDR" in desc and "TCP_NODELAY" in desc and "TCP_DEFER_ACCEPT" in desc
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockname() == ("127.0.0.1", port)
            assert netdiag.tcp_listener(socket.AF_INET, os.fstat(500).st_ino) == (0, 17)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert fcntl.fcntl(501, fcntl.F_GETFL) & os.O_NONBLOCK          # shared file
            with pytest.raises(BlockingIOError):
                s.accept()
            c = socket.create_connection(("127.0.0.1", port))
            try:
                c.send(b"hello")   # TCP_DEFER_ACCEPT: accept() wakes once data came
                s.setblocking(True)
                s.settimeout(10)
                conn, peer = s.accept()
                assert peer == c.getsockname()
                assert conn.recv(10) == b"hello"
                conn.close()
            finally:
                c.close()
        finally:
            s.close()


def test_tcp6_listener_restored_v6only(tmp_path):
    setup = """
import socket
l = socket.socket(socket.AF_INET6)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
l.bind(("::1", 0)); l.listen(3)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup, "report['port'] = socket.socket(fileno=os.dup(500)).getsockname()[1]") as t:
        port = t.check()["port"]
        assert classify(t.pid, 500).startswith(f"tcp6 listening [::1]:{port}, backlog 3")
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockname()[:2] == ("::1", port)
            assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert netdiag.tcp_listener(socket.AF_INET6, os.fstat(500).st_ino) == (0, 3)
            c = socket.create_connection(("::1", port))
            s.settimeout(10)
            conn, _ = s.accept()
            conn.close()
            c.close()
        finally:
            s.close()


def test_tcp_listeners_sharing_a_port_restored_with_reuseport_as_it_is_now(tmp_path):
    """CRIU's zdtm socket-tcp-reuseport: two listeners bound to one port
    with SO_REUSEPORT, one of which cleared it since. Rebuilt with its
    recorded 0, the first kept the second off the port: the restore was
    refused ("address in use") after the dump had killed the process."""
    setup = """
import socket
a = socket.socket(); a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
a.bind(("127.0.0.1", 0)); a.listen(3)
b = socket.socket(); b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
b.bind(a.getsockname()); b.listen(5)
a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
    with restore(img):
        a, b = socket.socket(fileno=os.dup(500)), socket.socket(fileno=os.dup(501))
        try:
            assert a.getsockname() == b.getsockname()
            assert a.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
            assert b.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            for s in (a, b):
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            # both take connections on the port
            got = set()
            for _ in range(40):
                with socket.create_connection(a.getsockname(), timeout=5):
                    pass
                for s in (a, b):
                    s.setblocking(False)
                    try:
                        s.accept()[0].close()
                        got.add(s.fileno())
                    except BlockingIOError:
                        pass
                if len(got) == 2:
                    break
            assert len(got) == 2
        finally:
            a.close(); b.close()


def test_tcp_listener_with_pending_connection_refused(tmp_path):
    setup = """
import socket
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(4)
c = socket.create_connection(l.getsockname())
c.send(b"x")
os.dup2(l.fileno(), 500)
"""
    check = """
import socket
s = socket.socket(fileno=os.dup(500)); s.settimeout(5)
conn, _ = s.accept(); report["accepted"] = conn.recv(1) == b"x"
"""
    with Target(tmp_path, setup, check) as t:
        time.sleep(0.1)
        detail = refusal(t.pid, 500)
        # Its client is the target's own (it could be reconnected), but the
        # byte it sent cannot be read without accepting the connection.
        assert detail.endswith("waits in the accept queue with 1 bytes its client sent: they cannot be read "
                               "without accepting it")
        assert t.check() == {"accepted": True}          # the refused dump lost nothing


def test_tcp_port_taken_at_restore_refused_before_anything_exists(tmp_path):
    with Target(tmp_path, TCP4, "report['port'] = socket.socket(fileno=os.dup(500)).getsockname()[1]") as t:
        port = t.check()["port"]
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
    squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(Refusal) as ei:
            restore(img)
        assert ei.value.reason == "socket"
        assert ei.value.detail == f"tcp listener 127.0.0.1:{port}: address in use"
        assert sorted(os.listdir("/proc/self/fd")) == before        # nothing left open
    finally:
        squatter.close()


def test_unix_path_listener_restored_over_its_stale_socket_file(tmp_path):
    path = str(tmp_path / "srv.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
l.bind({path!r}); os.chmod({path!r}, 0o640); l.listen(9)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500) == f"unix seqpacket listening {path}, backlog 9"
        img = dump(t.pid, [500], str(tmp_path / "img"))
    old = os.lstat(path)                  # the dead listener's file stays behind
    assert stat.S_ISSOCK(old.st_mode)
    with restore(img):
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        s = sock(500)
        try:
            assert s.type == socket.SOCK_SEQPACKET and s.getsockname() == path
            assert netdiag.unix_socket(os.fstat(500).st_ino)["wqueue"] == 9
            assert netdiag.unix_bound_to(st.st_dev, st.st_ino)[0]["inode"] == os.fstat(500).st_ino
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.connect(path)
            conn, _ = s.accept()
            c.send(b"msg")
            assert conn.recv(10) == b"msg"
            conn.close()
            c.close()
        finally:
            s.close()


def test_unix_abstract_listener_restored(tmp_path):
    name = "\0crucible-test-" + uuid.uuid4().hex
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX)
l.bind({name!r}); l.listen(2)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500) == f"unix stream listening @{name[1:]}, backlog 2"
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockname() == name.encode()
            c = socket.socket(socket.AF_UNIX)
            c.connect(name)
            conn, _ = s.accept()
            conn.close()
            c.close()
        finally:
            s.close()


def test_unix_listener_path_now_regular_file_refused_and_kept(tmp_path):
    path = str(tmp_path / "srv.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX); l.bind({path!r}); l.listen(1)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    os.unlink(path)
    with open(path, "w") as f:
        f.write("someone's data")
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "socket" and "not a socket; not removed" in ei.value.detail
    with open(path) as f:
        assert f.read() == "someone's data"


def test_unix_listener_address_still_in_use_refused(tmp_path):
    path = str(tmp_path / "srv.sock")
    name = "\0crucible-test-" + uuid.uuid4().hex
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX); l.bind({path!r}); l.listen(1)
m = socket.socket(socket.AF_UNIX); m.bind({name!r}); m.listen(1)
os.dup2(l.fileno(), 500); os.dup2(m.fileno(), 501); l.close(); m.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        # The original still runs (a --leave-running dump): both addresses taken.
        with pytest.raises(Exception) as ei:
            restore(img)
        assert isinstance(ei.value, Refusal) and ei.value.detail.endswith("address in use")
        assert os.path.exists(path)


def test_unix_listener_with_pending_connection_or_unlinked_file_classified(tmp_path):
    path = str(tmp_path / "a.sock")
    gone = str(tmp_path / "gone.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX); c.connect({path!r})
g = socket.socket(socket.AF_UNIX); g.bind({gone!r}); g.listen(1); os.unlink({gone!r})
os.dup2(l.fileno(), 500); os.dup2(g.fileno(), 501)
"""
    with Target(tmp_path, setup) as t:
        # the waiting connection's end is the process's own: restored waiting
        # (tests/test_fds_socket_unixpending.py)
        assert classify(t.pid, 500) == f"unix stream listening {path}, backlog 1, 1 connection(s) waiting"
        # unlinked since bind: a ghost, bound again and unlinked at restore
        assert classify(t.pid, 501) == f"unix stream listening {gone}, backlog 1"


@pytest.mark.parametrize("ghost_fd", [500, 502])
def test_unix_listeners_one_unlinked_by_the_other_restored(tmp_path, ghost_fd):
    """zdtm del_standalone_un: two listeners bound to one path, the first's
    file renamed back over the second's: the second is a ghost. Both come
    back with the name; the path is the first's file again, nothing else
    is left in the directory; each accepts."""
    path, temp = str(tmp_path / "sock"), str(tmp_path / "temp")
    setup = f"""
import socket
a = socket.socket(socket.AF_UNIX); a.bind({path!r}); a.listen(1)
os.rename({path!r}, {temp!r})
b = socket.socket(socket.AF_UNIX); b.bind({path!r}); b.listen(1)
os.rename({temp!r}, {path!r})
os.dup2(b.fileno(), {ghost_fd}); os.dup2(a.fileno(), 501)     # the ghost restored first, or last
a.close(); b.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [ghost_fd, 501], str(tmp_path / "img"))
        t.close()
        before = set(os.listdir(tmp_path))
        with restore(img):
            ghost, live = (netdiag.unix_socket(os.fstat(fd).st_ino) for fd in (ghost_fd, 501))
            assert ghost["name"] == live["name"] == path.encode() + b"\0"
            st = os.lstat(path)
            assert live["vfs"] == (st.st_dev, st.st_ino) and ghost["vfs"] != live["vfs"]
            assert set(os.listdir(tmp_path)) == before
            c = socket.socket(socket.AF_UNIX)
            try:
                c.connect(path)
                l = socket.socket(fileno=os.dup(501))
                l.settimeout(5)
                l.accept()[0].close()
                l.close()
            finally:
                c.close()


def test_unix_ghost_listener_with_a_connection_waiting_refused(tmp_path):
    gone = str(tmp_path / "gone.sock")
    setup = f"""
import socket
g = socket.socket(socket.AF_UNIX); g.bind({gone!r}); g.listen(1)
c = socket.socket(socket.AF_UNIX); c.connect({gone!r}); os.unlink({gone!r})
os.dup2(g.fileno(), 500); os.dup2(c.fileno(), 501)
"""
    with Target(tmp_path, setup) as t:
        assert refusal(t.pid, 500) == (f"unix stream listening {gone}: the socket file was removed or replaced "
                                       "since bind, with connections waiting (they connect by the path)")


def test_listener_shared_with_another_process_refused(tmp_path):
    setup = """
import socket
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
os.dup2(l.fileno(), 500)
"""
    from engine.pidfd import target_fd
    with Target(tmp_path, setup) as t:
        with target_fd(t.pid, 500) as dup:      # this test process now holds it too
            assert refusal(t.pid, 500).endswith(f"also held by pid {os.getpid()} (fd {dup})")


def test_unix_listener_bound_by_relative_name_restored_with_that_name(tmp_path):
    sub = tmp_path / "run"
    sub.mkdir()
    setup = f"""
import socket
os.chdir({str(tmp_path)!r})
l = socket.socket(socket.AF_UNIX); l.bind("run/rel.sock"); l.listen(5)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500) == "unix stream listening run/rel.sock, backlog 5"
        img = dump(t.pid, [500], str(tmp_path / "img"))
    cwd = os.getcwd()
    with restore(img):
        assert os.getcwd() == cwd                      # the restorer went back
        s = sock(500)
        try:
            assert s.getsockname() == "run/rel.sock"   # the name as the process bound it
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(sub / "rel.sock"))
            conn, _ = s.accept()
            conn.close()
            c.close()
        finally:
            s.close()


def test_unix_listener_relative_name_no_longer_reachable_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    setup = f"""
import socket
os.chdir({str(tmp_path)!r})
l = socket.socket(socket.AF_UNIX); l.bind("rel.sock"); l.listen(5)
os.dup2(l.fileno(), 500); l.close()
os.chdir("elsewhere")
"""
    with Target(tmp_path, setup) as t:
        assert refusal(t.pid, 500).endswith("bound to a relative path that the working directory no longer leads to")


@pytest.mark.parametrize("name", ["./agent.sock", "run/../agent.sock", "run//./../agent.sock"])
def test_unix_listener_bound_by_a_dotted_name_is_restored(tmp_path, name):
    """`ssh-agent -a ./agent.sock` binds "./agent.sock": the dump used to
    record "<cwd>/./agent.sock", which restore rejects as no plain path
    (image-invalid), after the dump had killed the process."""
    (tmp_path / "run").mkdir()
    setup = f"""
import socket
os.chdir({str(tmp_path)!r})
l = socket.socket(socket.AF_UNIX); l.bind({name!r}); l.listen(5)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockname() == name
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(tmp_path / "agent.sock"))
            conn, _ = s.accept()
            conn.close()
            c.close()
        finally:
            s.close()


def test_unix_listener_whose_file_was_renamed_after_bind_is_restored(tmp_path):
    """The JVM's attach listener (made in every JVM jcmd or jstack looks
    at) binds .java_pidN.tmp and renames the file .java_pidN: found by a
    survey of real programs, refused as "the socket file was removed or
    replaced since bind". The restore binds the same name and renames the
    file the same way: getsockname shows the bound name, clients connect
    to the file's name now."""
    bound, now = str(tmp_path / ".java_pid1.tmp"), str(tmp_path / ".java_pid1")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX); l.bind({bound!r}); os.rename({bound!r}, {now!r}); l.listen(3)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    assert os.path.exists(now) and not os.path.exists(bound)
    with restore(img):
        s = sock(500)
        try:
            assert s.getsockname() == bound
            assert not os.path.exists(bound) and stat.S_ISSOCK(os.lstat(now).st_mode)
            c = socket.socket(socket.AF_UNIX)
            c.connect(now)
            conn, _ = s.accept()
            conn.close()
            c.close()
        finally:
            s.close()


def test_unix_listener_renamed_file_taken_at_restore_is_refused(tmp_path):
    """The renamed-to path holding another file at the restore: refused
    before anything exists, the file left alone."""
    bound, now = str(tmp_path / "l.tmp"), str(tmp_path / "l")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX); l.bind({bound!r}); os.rename({bound!r}, {now!r}); l.listen(3)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    os.unlink(now)
    with open(now, "w") as f:
        f.write("mine")
    with pytest.raises(Refusal) as ei:
        with restore(img):
            pass
    assert ei.value.reason == "socket" and "not a socket" in ei.value.detail
    assert open(now).read() == "mine" and not os.path.exists(bound)


def test_tcp6_listener_rfc2292_and_receive_flags_restored(tmp_path):
    """IPv6 flags read for datagram sockets only before (IPV6_2292PKTINFO,
    IPV6_RECVHOPOPTS, IPV6_FLOWINFO_SEND, ...): set on a TCP socket they
    were lost."""
    setup = """
import socket
l = socket.socket(socket.AF_INET6)
for opt in (2, 8, 53, 33):     # IPV6_2292PKTINFO, IPV6_2292HOPLIMIT, IPV6_RECVHOPOPTS, IPV6_FLOWINFO_SEND
    l.setsockopt(41, opt, 1)
l.bind(("::1", 0)); l.listen(3)
os.dup2(l.fileno(), 500); l.close()
"""
    with Target(tmp_path, setup) as t:
        t.check()
        desc = classify(t.pid, 500)
        for name in ("IPV6_2292PKTINFO", "IPV6_2292HOPLIMIT", "IPV6_RECVHOPOPTS", "IPV6_FLOWINFO_SEND"):
            assert name in desc, desc
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        s = sock(500)
        try:
            assert [s.getsockopt(41, o) for o in (2, 8, 53, 33)] == [1, 1, 1, 1]
        finally:
            s.close()
