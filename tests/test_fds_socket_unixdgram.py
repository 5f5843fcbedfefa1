"""Unix datagram sockets bound to a path, a ghost path (unlinked since) or
an abstract name, unconnected, with nothing queued: rebuilt with the same
name (getsockname), options and file mode; queued messages refused."""

from __future__ import annotations

import os
import socket
import stat
import uuid

import pytest

from engine.errors import Refusal

from fds_support import Target, classify, dump, restore


def sock(fd: int) -> socket.socket:
    return socket.socket(fileno=os.dup(fd))


def test_path_ghost_and_abstract_dgram_restored(tmp_path):
    path, ghost = str(tmp_path / "d.sock"), str(tmp_path / "g.sock")
    abstract = "\0crucible-" + uuid.uuid4().hex[:12]
    setup = f"""
import socket
a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); a.bind({path!r}); os.chmod({path!r}, 0o640)
a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
g = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); g.bind({ghost!r}); os.unlink({ghost!r})
b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); b.bind({abstract!r})
for x, fd in ((a, 500), (g, 501), (b, 502)):
    os.dup2(x.fileno(), fd); x.close()
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500) == f"unix dgram bound {path}"
        assert classify(t.pid, 501) == f"unix dgram bound {ghost} (unlinked since: a ghost socket)"
        assert classify(t.pid, 502) == f"unix dgram bound @{abstract[1:]}"
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        with restore(img):
            a, g, b = sock(500), sock(501), sock(502)
            try:
                assert a.getsockname() == path and g.getsockname() == ghost
                assert b.getsockname() == abstract.encode()
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
                assert not os.path.lexists(ghost)
                assert a.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 1
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
                    c.sendto(b"to path", path)
                    c.sendto(b"to abstract", abstract)
                assert a.recv(100, socket.MSG_DONTWAIT) == b"to path"
                assert b.recv(100, socket.MSG_DONTWAIT) == b"to abstract"
            finally:
                a.close(); g.close(); b.close()


def test_dgram_with_queued_message_refused_and_kept(tmp_path):
    path = str(tmp_path / "q.sock")
    setup = f"""
import socket
a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); a.bind({path!r})
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"", {path!r})      # an empty datagram
os.dup2(a.fileno(), 500); a.close()
"""
    with Target(tmp_path, setup, "report['got'] = socket.socket(fileno=500).recv(10, socket.MSG_DONTWAIT).hex()") as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "socket" and ei.value.detail.startswith(f"unix dgram bound {path}: messages queued")
        assert t.check() == {"got": ""}


def test_ghost_whose_path_is_taken_again_refused_at_restore(tmp_path):
    ghost = str(tmp_path / "g.sock")
    setup = f"""
import socket
g = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); g.bind({ghost!r}); os.unlink({ghost!r})
os.dup2(g.fileno(), 500); g.close()
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
        t.close()
        with open(ghost, "w"):
            pass
        with pytest.raises(Refusal) as ei:
            restore(img)
        assert ei.value.reason == "socket" and "its path names a file now" in ei.value.detail


def test_relative_name_restored_from_the_working_directory(tmp_path):
    setup = f"""
import socket
os.chdir({str(tmp_path)!r})
a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); a.bind("rel.sock")
os.dup2(a.fileno(), 500); a.close()
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500) == "unix dgram bound rel.sock"
        img = dump(t.pid, [500], str(tmp_path / "img"))
        t.close()
        with restore(img):
            a = sock(500)
            try:
                assert a.getsockname() == "rel.sock"
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
                    c.sendto(b"x", str(tmp_path / "rel.sock"))
                assert a.recv(10, socket.MSG_DONTWAIT) == b"x"
            finally:
                a.close()
