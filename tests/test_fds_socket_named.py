"""Unix sockets connected through a name, both ends held by the dump
(engine/fds/_unixnamed.py): a client and the end its listener accepted,
datagram sockets connected to bound ones. Restored with each end's name and
its peer's, the queues both ways (message boundaries), shutdown bits and
SO_PEERCRED; the filesystem left as it was; refused, naming why, where the
path is not ours to use."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat

import pytest

from engine import netdiag
from engine.errors import Refusal
from engine.fds import _unixpair

from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from fds_support import Target, classify, dump, restore
from test_engine_tree import _dump_restore, _ready, _start, session_killer  # noqa: F401


def sock(fd: int) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))


def z(path: str) -> bytes:
    """A path name as Python binds it: its NUL counted in the address."""
    return path.encode() + b"\0"


def names(fd: int):
    """(own name, peer's name) as the kernel holds them (bytes, exact)."""
    d = netdiag.unix_socket(os.fstat(fd).st_ino)
    peer = (netdiag.unix_socket(d["peer"])["name"] or b"") if d["peer"] else None
    return d["name"] or b"", peer


def shutdown_of(fd: int) -> int:
    return netdiag.unix_socket(os.fstat(fd).st_ino)["shutdown"]


def cred_pid(s: socket.socket) -> int:
    import struct
    return struct.unpack("iII", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]


def listing(d) -> set:
    return {n for n in os.listdir(d) if not n.startswith(("ready-", "report-"))}


def recv_all(s: socket.socket, n: int = 1 << 16):
    """Every message queued in s, in order (one recv each)."""
    out = []
    s.setblocking(False)
    while True:
        try:
            out.append(s.recv(n))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("typ", ["SOCK_STREAM", "SOCK_SEQPACKET"])
def test_accepted_end_and_client_of_a_path_listener(tmp_path, typ):
    """The listener stays alive in the dump; one accepted connection with
    data queued both ways, one waiting in the accept queue."""
    path = str(tmp_path / "l.sock")
    setup = f"""
import socket
T = socket.{typ}
l = socket.socket(socket.AF_UNIX, T); l.bind({path!r}); os.chmod({path!r}, 0o640); l.listen(4)
c = socket.socket(socket.AF_UNIX, T); c.connect({path!r})
a, _ = l.accept()
c.send(b"one"); c.send(b"two"); a.send(b"back")
w = socket.socket(socket.AF_UNIX, T); w.connect({path!r})
for x, fd in ((a, 500), (c, 501), (l, 502), (w, 503)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500).startswith(f"unix {typ[5:].lower()} connected {path}->(unnamed) (accepted)")
        assert classify(t.pid, 501).startswith(f"unix {typ[5:].lower()} connected (unnamed)->{path} (client)")
        before = listing(tmp_path)
        img = dump(t.pid, [500, 501, 502, 503], str(tmp_path / "img"))
        pid = t.pid
        t.close()
        with restore(img):
            a, c, l = sock(500), sock(501), sock(502)
            try:
                assert names(500) == (z(path), b"")
                assert names(501) == (b"", z(path))
                assert a.getsockname() == path and c.getpeername() == path
                # the listener's own file, mode kept, the only socket file
                assert listing(tmp_path) == before | {"img"}
                now = os.stat(path)
                assert stat.S_ISSOCK(now.st_mode) and stat.S_IMODE(now.st_mode) == 0o640
                assert netdiag.unix_socket(os.fstat(502).st_ino)["vfs"] == (now.st_dev, now.st_ino)
                assert cred_pid(a) == pid and cred_pid(c) == pid
                got = recv_all(a)
                assert b"".join(got) == b"onetwo"
                if typ == "SOCK_SEQPACKET":
                    assert got == [b"one", b"two"]
                assert recv_all(c) == [b"back"]
                # the waiting connection is still first in the accept queue
                l.settimeout(5)
                w = sock(503)
                w.send(b"w")
                x, _ = l.accept()
                x.settimeout(5)
                assert x.recv(5) == b"w"
                x.close(); w.close()
            finally:
                a.close(); c.close(); l.close()


def test_abstract_listener_and_client_bound_to_an_abstract_name(tmp_path):
    tag = f"ckpt-named-{os.getpid()}"
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind(b"\\0{tag}-l"); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.bind(b"\\0{tag}-c"); c.connect(b"\\0{tag}-l")
a, _ = l.accept()
a.send(b"to the client")
for x, fd in ((a, 500), (c, 501), (l, 502)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        with restore(img):
            a, c, l = sock(500), sock(501), sock(502)
            try:
                L, C = f"\0{tag}-l".encode(), f"\0{tag}-c".encode()
                assert names(500) == (L, C) and names(501) == (C, L)
                assert names(502)[0] == L
                assert recv_all(c) == [b"to the client"]
                assert recv_all(a) == []
            finally:
                a.close(); c.close(); l.close()


def test_client_bound_to_a_path_keeps_its_file(tmp_path):
    path, cpath = str(tmp_path / "l.sock"), str(tmp_path / "c.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.bind({cpath!r}); os.chmod({cpath!r}, 0o600)
c.connect({path!r})
a, _ = l.accept()
for x, fd in ((a, 500), (c, 501), (l, 502)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        with restore(img):
            try:
                assert names(500) == (z(path), z(cpath))
                assert names(501) == (z(cpath), z(path))
                st = os.stat(cpath)
                assert stat.S_IMODE(st.st_mode) == 0o600
                assert netdiag.unix_socket(os.fstat(501).st_ino)["vfs"] == (st.st_dev, st.st_ino)
            finally:
                pass


@pytest.mark.parametrize("stale", [False, True])
def test_listener_closed_name_unlinked_or_left_behind(tmp_path, stale):
    """The accepted end outlives its listener: with the name unlinked
    (zdtm deleted_unix_sock) nothing is left at the path after the restore;
    with the listener's file left behind, that same file is put back."""
    path = str(tmp_path / "gone.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect({path!r})
a, _ = l.accept(); l.close()
if not {stale!r}:
    os.unlink({path!r})
c.send(b"x" * 3000)
for x, fd in ((a, 500), (c, 501)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        ino = os.lstat(path).st_ino if stale else None
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        before = listing(tmp_path)
        with restore(img):
            a = sock(500)
            try:
                assert names(500) == (z(path), b"") and names(501) == (b"", z(path))
                assert listing(tmp_path) == before
                assert os.path.lexists(path) == stale
                if stale:
                    assert os.lstat(path).st_ino == ino
                assert b"".join(recv_all(a)) == b"x" * 3000
            finally:
                a.close()


def test_shutdown_before_connect_not_mirrored(tmp_path):
    """zdtm sockets03: the client shut its reading side before connect(2),
    so the accepted end never got SEND_SHUTDOWN."""
    path = str(tmp_path / "s.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.shutdown(socket.SHUT_RD); c.connect({path!r})
a, _ = l.accept()
a2c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); a2c.connect({path!r})
a2, _ = l.accept(); a2.shutdown(socket.SHUT_WR)
for x, fd in ((a, 500), (c, 501), (l, 502), (a2, 503), (a2c, 504)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        want = {fd: shutdown_of_target(t.pid, fd) for fd in (500, 501, 503, 504)}
        assert want == {500: 0, 501: 1, 503: 2, 504: 1}
        img = dump(t.pid, [500, 501, 502, 503, 504], str(tmp_path / "img"))
        t.close()
        with restore(img):
            assert {fd: shutdown_of(fd) for fd in want} == want


def shutdown_of_target(pid: int, fd: int) -> int:
    return netdiag.unix_socket(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)["shutdown"]


def test_datagram_sockets_connected_to_bound_ones(tmp_path):
    """One way (an unnamed sender to a bound receiver), both ways between two
    bound sockets with messages queued each way (an empty one among them),
    and a bound socket connected to itself (zdtm sockets_dgram)."""
    r, p, q, me = (str(tmp_path / n) for n in ("r", "p", "q", "me"))
    setup = f"""
import socket
D = socket.SOCK_DGRAM
rs = socket.socket(socket.AF_UNIX, D); rs.bind({r!r})
s = socket.socket(socket.AF_UNIX, D); s.connect({r!r})
ps = socket.socket(socket.AF_UNIX, D); ps.bind({p!r})
qs = socket.socket(socket.AF_UNIX, D); qs.bind({q!r})
ps.connect({q!r}); qs.connect({p!r})
ps.send(b"p1"); ps.send(b""); ps.send(b"p3"); qs.send(b"q1")
m = socket.socket(socket.AF_UNIX, D); m.bind({me!r}); m.connect({me!r})
for x, fd in ((rs, 500), (s, 501), (ps, 502), (qs, 503), (m, 504)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501, 502, 503, 504], str(tmp_path / "img"))
        t.close()
        before = listing(tmp_path)
        with restore(img):
            ss, ps, qs, m = sock(501), sock(502), sock(503), sock(504)
            try:
                assert listing(tmp_path) == before
                assert names(501) == (b"", z(r))
                assert names(502) == (z(p), z(q)) and names(503) == (z(q), z(p))
                assert names(504) == (z(me), z(me))
                assert recv_all(qs) == [b"p1", b"", b"p3"]
                assert recv_all(ps) == [b"q1"]
                ss.send(b"to r")
                assert sock(500).recvfrom(10) == (b"to r", None)
                ps.setblocking(True)
                ps.send(b"again")
                assert qs.recvfrom(10) == (b"again", p)
                m.send(b"me")
                assert m.recv(5) == b"me"
            finally:
                ss.close(); ps.close(); qs.close(); m.close()


def test_bound_datagram_queue_from_its_one_connected_sender(tmp_path):
    """zdtm socket_dgram_data: two sockets connected to a bound one, the
    first has sent (an empty datagram among them); the queue comes back in
    order, from the same sender (its name), the other sender's too."""
    r, s1 = str(tmp_path / "r"), str(tmp_path / "s1")
    setup = f"""
import socket
D = socket.SOCK_DGRAM
rs = socket.socket(socket.AF_UNIX, D); rs.bind({r!r})
a = socket.socket(socket.AF_UNIX, D); a.bind({s1!r}); a.connect({r!r})
b = socket.socket(socket.AF_UNIX, D); b.connect({r!r})
a.send(b"first"); a.send(b""); a.send(b"third" * 100)
for x, fd in ((rs, 500), (a, 501), (b, 502)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        # (no classify first: its walk marks the empty datagram peeked, and
        # a second walk at an offset skips it - then refused, not lost)
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        with restore(img):
            rs, b = sock(500), sock(502)
            try:
                rs.setblocking(False)
                got = [rs.recvfrom(1000) for _ in range(3)]
                assert got == [(b"first", s1), (b"", s1), (b"third" * 100, s1)]
                with pytest.raises(BlockingIOError):
                    rs.recv(10)
                b.send(b"b")
                assert rs.recvfrom(10) == (b"b", None)
                assert names(501) == (z(s1), z(r)) and names(502) == (b"", z(r))
            finally:
                rs.close(); b.close()


def test_bound_datagram_queue_with_a_sender_outside_refused(tmp_path):
    r = str(tmp_path / "r")
    setup = f"""
import socket
rs = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); rs.bind({r!r})
a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); a.connect({r!r}); a.send(b"in")
for x, fd in ((rs, 500), (a, 501)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            out.sendto(b"from outside", r)
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "socket"
            assert "not all from one socket of the dump connected to it (2 unix datagram sockets of this " \
                "network namespace have messages charged to them)" in ei.value.detail
        finally:
            out.close()


def test_files_in_flight_and_credentials_through_a_named_connection(tmp_path):
    """SCM_RIGHTS and SCM_CREDENTIALS queued in the accepted end, as for
    socketpairs (_inflight): the file comes back with its offset, the
    message with its sender's credentials."""
    path, data = str(tmp_path / "l.sock"), str(tmp_path / "data")
    with open(data, "w") as f:
        f.write("in flight")
    setup = f"""
import socket, array
l = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); c.connect({path!r})
a, _ = l.accept(); l.close()
a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
f = os.open({data!r}, os.O_RDONLY); os.lseek(f, 3, 0)
c.sendmsg([b"with a file"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f]).tobytes())])
os.close(f)
c.send(b"plain")
for x, fd in ((a, 500), (c, 501)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        pid = t.pid
        t.close()
        with restore(img):
            a = sock(500)
            try:
                import array
                msg, anc, _, _ = a.recvmsg(100, 4096)
                fds = [x for lvl, typ, raw in anc if typ == socket.SCM_RIGHTS
                       for x in array.array("i", raw[:len(raw) - len(raw) % 4])]
                assert msg == b"with a file" and len(fds) == 1
                assert os.read(fds[0], 100) == b"flight"
                os.close(fds[0])
                m, anc, _, _ = a.recvmsg(100, socket.CMSG_SPACE(12))
                import struct
                assert m == b"plain"
                assert [struct.unpack("iII", raw[:12])[0] for lvl, typ, raw in anc
                        if typ == socket.SCM_CREDENTIALS] == [pid]
            finally:
                a.close()


def test_senders_connected_to_a_ghost_datagram_socket(tmp_path):
    """zdtm sk-unix-dgram-ghost: the bound socket's file was unlinked after
    its senders connected: they are connected again while the restore has
    the path bound, then it is unlinked; nothing is left there."""
    r = str(tmp_path / "ghost")
    setup = f"""
import socket
D = socket.SOCK_DGRAM
rs = socket.socket(socket.AF_UNIX, D); rs.bind({r!r})
a = socket.socket(socket.AF_UNIX, D); a.connect({r!r})
b = socket.socket(socket.AF_UNIX, D); b.connect({r!r})
os.unlink({r!r})
for x, fd in ((a, 500), (rs, 501), (b, 502)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        before = listing(tmp_path)
        with restore(img):
            a, rs, b = sock(500), sock(501), sock(502)
            try:
                assert listing(tmp_path) == before and not os.path.lexists(r)
                assert names(500) == (b"", z(r)) and names(502) == (b"", z(r)) and names(501)[0] == z(r)
                a.send(b"a")
                b.send(b"b")
                rs.settimeout(5)
                assert (rs.recv(5), rs.recv(5)) == (b"a", b"b")
            finally:
                a.close(); rs.close(); b.close()


# -- refused ------------------------------------------------------------------

def test_peer_outside_the_dump_refused(tmp_path):
    path = str(tmp_path / "out.sock")
    l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    l.bind(path)
    l.listen(1)
    setup = f"""
import socket
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect({path!r})
os.dup2(c.fileno(), 500); c.close()
"""
    try:
        with Target(tmp_path, setup) as t:
            a, _ = l.accept()
            try:
                with pytest.raises(Refusal) as ei:
                    classify(t.pid, 500)
                assert ei.value.reason == "socket"
                assert f"also held by pid {os.getpid()} (fd {a.fileno()}), outside the dump" in ei.value.detail
                assert ei.value.detail.startswith(f"unix stream connected (unnamed)->{path}")
            finally:
                a.close()
    finally:
        l.close()


def _pair_setup(path: str) -> str:
    return f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect({path!r})
a, _ = l.accept(); l.close(); os.unlink({path!r})
for x, fd in ((a, 500), (c, 501)):
    os.dup2(x.fileno(), fd); x.close()
"""


def test_path_now_a_regular_file_refused_and_left_alone(tmp_path):
    path = str(tmp_path / "n.sock")
    with Target(tmp_path, _pair_setup(path)) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        with open(path, "w") as f:
            f.write("someone's file")
        with pytest.raises(Refusal) as ei:
            restore(img)
        assert ei.value.reason == "socket"
        assert f"{path} is now a '-' file, not a socket; left alone" in ei.value.detail
        assert open(path).read() == "someone's file"


def test_path_now_a_live_outside_socket_refused_and_left_alone(tmp_path):
    path = str(tmp_path / "n.sock")
    with Target(tmp_path, _pair_setup(path)) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            other.bind(path)
            other.listen(1)
            ino = os.lstat(path).st_ino
            with pytest.raises(Refusal) as ei:
                restore(img)
            assert ei.value.reason == "socket"
            assert f"{path} is the socket of a live process now; left alone" in ei.value.detail
            assert os.lstat(path).st_ino == ino
            assert listing(tmp_path) == {"n.sock", "img"}
        finally:
            other.close()


def test_directory_gone_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    path = str(d / "n.sock")
    with Target(tmp_path, _pair_setup(path)) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        d.rmdir()
        with pytest.raises(Refusal) as ei:
            restore(img)
        assert ei.value.reason == "socket" and f"the directory of {path} is gone" in ei.value.detail


def test_failure_after_the_temporary_bind_leaves_the_filesystem_as_it_was(tmp_path, monkeypatch):
    """A stale socket file at the name is moved aside for the temporary
    listener: a failure after that puts it back and removes the temporary
    one."""
    path = str(tmp_path / "st.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect({path!r})
a, _ = l.accept(); l.close()
for x, fd in ((a, 500), (c, 501)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        ino = os.lstat(path).st_ino
        before = listing(tmp_path)
        seen = []

        def boom(*a, **k):
            seen.append(sorted(listing(tmp_path)))
            raise OSError(5, "injected")
        monkeypatch.setattr(_unixpair, "fill_pair", boom)
        with pytest.raises(Exception, match="injected"):
            restore(img)
        assert seen and seen[0] == sorted(before)      # reached: the temporary file was gone already
        assert listing(tmp_path) == before and os.lstat(path).st_ino == ino


def test_client_whose_own_file_was_removed_refused(tmp_path):
    path, cpath = str(tmp_path / "l.sock"), str(tmp_path / "c.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.bind({cpath!r}); c.connect({path!r})
a, _ = l.accept(); os.unlink({cpath!r})
for x, fd in ((a, 500), (c, 501), (l, 502)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 501)
        assert ei.value.reason == "socket"
        assert f"its own socket file {cpath} was removed or replaced since bind" in ei.value.detail


def test_one_way_datagram_sender_with_messages_queued_refused(tmp_path):
    r, s = str(tmp_path / "r"), str(tmp_path / "s")
    setup = f"""
import socket
rs = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); rs.bind({r!r})
ss = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); ss.bind({s!r}); ss.connect({r!r})
rs.sendto(b"", {s!r})
for x, fd in ((rs, 500), (ss, 501)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 501)
        assert ei.value.reason == "socket"
        assert "messages queued in a datagram socket whose peer is not connected back" in ei.value.detail


# -- a process tree: the server the parent, the client its child ---------------

TREE_SRC = r"""
import json, os, signal, socket, sys, time
path, typ = sys.argv[1], getattr(socket, sys.argv[2])
l = socket.socket(socket.AF_UNIX, typ); l.bind(path); l.listen(1)

def serve(s, who):
    def on_usr1(*_):
        s.setblocking(False)
        got = []
        try:
            while True:
                got.append(s.recv(100).decode())
        except BlockingIOError:
            pass
        peer = s.getpeername()
        with open(f"got-{who}.tmp", "w") as f:
            json.dump({"got": got, "name": s.getsockname(), "peer": peer}, f)
        os.rename(f"got-{who}.tmp", f"got-{who}")
    signal.signal(signal.SIGUSR1, on_usr1)
    while True:
        time.sleep(1)

kid = os.fork()
if kid == 0:
    l.close()
    c = socket.socket(socket.AF_UNIX, typ); c.connect(path)
    c.send(b"from the child"); c.send(b"again")
    serve(c, "child")
a, _ = l.accept()
a.send(b"from the parent")
time.sleep(0.2)        # the child's two sends are queued
with open("ready.tmp", "w") as f:
    json.dump({"kid": kid}, f)
os.rename("ready.tmp", "ready")
serve(a, "parent")
"""


@pytest.mark.parametrize("typ", ["SOCK_STREAM", "SOCK_SEQPACKET"])
def test_server_parent_client_child_restored(procs, session_killer, tmp_path, typ):  # noqa: F811
    path = str(tmp_path / "srv.sock")
    p = _start(procs, [python_exe(), "-c", TREE_SRC, path, typ], tmp_path)
    session_killer.append(p.pid)
    kid = _ready(tmp_path, p)["kid"]
    _dump_restore(p.pid, tmp_path / "img", procs)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert {n for n in os.listdir(tmp_path) if n.endswith(".sock")} == {"srv.sock"}
    for pid in (p.pid, kid):
        os.kill(pid, signal.SIGUSR1)
    out = {}
    for who in ("parent", "child"):
        f = tmp_path / f"got-{who}"
        wait_for(f.exists, what=f"the {who}'s report")
        out[who] = json.loads(f.read_text())
    want_child = ["from the child", "again"] if typ == "SOCK_SEQPACKET" else ["from the childagain"]
    assert out["parent"] == {"got": want_child, "name": path, "peer": ""}
    assert out["child"] == {"got": ["from the parent"], "name": "", "peer": path}



def test_both_ends_named_with_no_listener_left_refused(tmp_path):
    path, cpath = str(tmp_path / "l.sock"), str(tmp_path / "c.sock")
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind({path!r}); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.bind({cpath!r}); c.connect({path!r})
a, _ = l.accept(); l.close()
for x, fd in ((a, 500), (c, 501)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket"
        assert "both ends are named and no listener in the dump tells which one connected" in ei.value.detail


def test_abstract_name_taken_by_a_live_listener_at_restore_refused(tmp_path):
    tag = f"ckpt-named-taken-{os.getpid()}"
    setup = f"""
import socket
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); l.bind(b"\\0{tag}"); l.listen(1)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect(b"\\0{tag}")
a, _ = l.accept(); l.close()
for x, fd in ((a, 500), (c, 501)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            other.bind(f"\0{tag}".encode())
            other.listen(1)
            with pytest.raises(Refusal) as ei:
                restore(img)
            assert ei.value.reason == "socket"
            assert f"the abstract name @{tag} is held by a live socket now" in ei.value.detail
        finally:
            other.close()


def test_hostile_records_are_image_invalid(tmp_path):
    from fds_support import assert_hostile_records_invalid
    path = str(tmp_path / "h.sock")
    with Target(tmp_path, _pair_setup(path)) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()

        def edits(good):
            assert good["sock"] == "unix-named" and good["role"] == "accepted"
            return [dict(good, role="listener"), dict(good, role="client"), dict(good, peer=good["inode"]),
                    dict(good, name="00"), dict(good, peer_name="2f78"),
                    dict(good, file=dict(good["file"], path="rel/h.sock")),
                    dict(good, file=dict(good["file"], path=path + "\0x")),
                    dict(good, lengths=[1], data_len=2), dict(good, type=99), dict(good, name=None)]
        assert_hostile_records_invalid(img, edits)
