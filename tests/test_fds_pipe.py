"""Anonymous pipes: recreated with their bytes, or refused pipe-peer-outside."""

from __future__ import annotations

import fcntl
import os

import pytest

from engine.errors import Refusal
from engine.fds import _sys
from engine.pidfd import same_file

from fds_support import Target, classify, dump, read_available, restore

PAYLOAD = bytes(range(256)) * 800          # 204800 bytes: more than the default 64 KiB buffer


BOTH_ENDS = """
r, w = os.pipe()
fcntl.fcntl(w, 1031, 1 << 20)              # F_SETPIPE_SZ
os.write(w, bytes(range(256)) * 800)
os.dup2(r, 500); os.dup2(w, 501); os.close(r); os.close(w)
fcntl.fcntl(500, fcntl.F_SETFL, os.O_NONBLOCK)
"""

READ_ALL = """
chunks = []
while True:
    try:
        b = os.read(500, 1 << 16)
    except BlockingIOError:
        break
    if not b:
        break
    chunks.append(b)
report["data"] = b"".join(chunks).hex()
"""


def test_pipe_both_ends_restored_with_data_size_and_flags(tmp_path):
    with Target(tmp_path, BOTH_ENDS, READ_ALL) as t:
        desc = classify(t.pid, 500)
        assert "204800 bytes buffered" in desc
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        # The dump copied, it did not consume: the target reads every byte.
        assert bytes.fromhex(t.check()["data"]) == PAYLOAD
    with restore(img):
        assert fcntl.fcntl(500, _sys.F_GETPIPE_SZ) == 1 << 20
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK
        assert not fcntl.fcntl(501, fcntl.F_GETFL) & os.O_NONBLOCK
        assert not fcntl.fcntl(500, fcntl.F_GETFD) & fcntl.FD_CLOEXEC   # dup2 made it inheritable
        assert read_available(500) == PAYLOAD
        os.write(501, b"more")
        assert os.read(500, 10) == b"more"
        # No stray write end survives in the restorer: closing the only
        # writer gives EOF.
        os.close(501)
        fcntl.fcntl(500, fcntl.F_SETFL, 0)
        assert os.read(500, 10) == b""


def test_pipe_write_end_only_keeps_data_and_epipe(tmp_path):
    setup = """
r, w = os.pipe()
os.write(w, b"unread")
os.dup2(w, 501); os.close(w); os.close(r)
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [501], str(tmp_path / "img"))
    with restore(img):
        assert _sys.fionread(501) == 6
        with pytest.raises(BrokenPipeError):
            os.write(501, b"x")


def test_pipe_read_end_only_reads_data_then_eof(tmp_path):
    setup = """
r, w = os.pipe()
os.write(w, b"last words")
os.dup2(r, 500); os.close(w); os.close(r)
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert os.read(500, 100) == b"last words"
        assert os.read(500, 100) == b""


def test_pipe_dups_share_one_open_file_description(tmp_path):
    setup = """
r, w = os.pipe()
os.write(w, b"abc")
os.dup2(r, 500); os.dup2(r, 502); os.dup2(w, 501); os.close(r); os.close(w)
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
    with restore(img):
        me = os.getpid()
        assert same_file(me, 500, me, 502)
        assert not same_file(me, 500, me, 501)
        fcntl.fcntl(502, fcntl.F_SETFL, os.O_NONBLOCK)   # shared status flags
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK
        assert os.read(502, 10) == b"abc"


def test_pipe_peer_outside_refused_and_target_unharmed(tmp_path):
    r, w = os.pipe()
    try:
        setup = f"os.dup2({r}, 500); os.close({r})"
        with Target(tmp_path, setup, "report['data'] = os.read(500, 100).decode()", pass_fds=[r]) as t:
            os.close(r)
            r = -1
            ino = os.fstat(w).st_ino
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            e = ei.value
            assert e.reason == "pipe-peer-outside"
            assert e.fd == 500 and e.pid == t.pid
            assert f"pipe inode {ino}" in e.detail
            assert f"pid {os.getpid()} fd {w} (write end)" in e.detail
            with pytest.raises(Refusal):
                dump(t.pid, [500], str(tmp_path / "img"))
            assert not os.path.exists(tmp_path / "img")
            os.write(w, b"still here")
            assert t.check()["data"] == "still here"
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_pipe_stray_inherited_fds_are_refused_not_crashed(tmp_path):
    """A target started from a shell inherits pipes whose other end lives
    in the shell: an honest refusal, never a crash."""
    r, w = os.pipe()
    try:
        with Target(tmp_path, f"os.dup2({w}, 510)", pass_fds=[w]) as t:
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 510)
            assert ei.value.reason == "pipe-peer-outside"
            assert "(read end)" in ei.value.detail
    finally:
        os.close(r)
        os.close(w)
