"""Named fifos: same path, same end, same flags, buffered bytes put back."""

from __future__ import annotations

import fcntl
import os

import pytest

from engine.errors import Refusal
from engine.fds import _sys

from fds_support import Target, classify, dump, restore


def test_fifo_both_ends_with_data_not_consumed_and_restored(tmp_path):
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    setup = f"""
r = os.open({fifo!r}, os.O_RDONLY | os.O_NONBLOCK)
w = os.open({fifo!r}, os.O_WRONLY)
os.write(w, b"queued bytes")
os.dup2(r, 500); os.dup2(w, 501); os.close(r); os.close(w)
"""
    with Target(tmp_path, setup, "report['data'] = os.read(500, 100).decode()") as t:
        assert "12 bytes buffered" in classify(t.pid, 500)
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        assert t.check()["data"] == "queued bytes"        # tee did not consume
    with restore(img):
        assert os.readlink("/proc/self/fd/500") == fifo
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(501, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        assert not fcntl.fcntl(501, fcntl.F_GETFL) & os.O_NONBLOCK
        assert os.read(500, 100) == b"queued bytes"
        with pytest.raises(BlockingIOError):
            os.read(500, 100)
        # The keeper is gone: after the writer closes, the reader sees EOF.
        os.close(501)
        assert os.read(500, 100) == b""


def test_fifo_rdwr_end_with_data(tmp_path):
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    setup = f"""
fd = os.open({fifo!r}, os.O_RDWR)
os.write(fd, b"x" * 60000)
os.dup2(fd, 500); os.close(fd)
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert _sys.fionread(500) == 60000


def test_fifo_missing_at_restore_refused(tmp_path):
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    with Target(tmp_path, f"fd = os.open({fifo!r}, os.O_RDWR); os.dup2(fd, 500); os.close(fd)") as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    os.unlink(fifo)
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "fifo-missing" and ei.value.fd == 500
    open(fifo, "w").close()                     # a regular file is not a fifo
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "fifo-missing" and "no longer a fifo" in ei.value.detail


def test_fifo_shared_with_outside_peer(tmp_path):
    """Empty buffer: restorable by path. Bytes queued: they belong to both
    sides, so the dump is refused and the peer and the target are unharmed."""
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    mine = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with Target(tmp_path, f"fd = os.open({fifo!r}, os.O_RDONLY | os.O_NONBLOCK); os.dup2(fd, 500); os.close(fd)",
                    "report['data'] = os.read(500, 100).decode()") as t:
            assert f"also open in pid {os.getpid()} fd {mine}" in classify(t.pid, 500)
            os.write(mine, b"ours")
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "pipe-peer-outside"
            assert "4 unread bytes" in ei.value.detail
            assert t.check()["data"] == "ours"
    finally:
        os.close(mine)


def test_fifo_with_foreign_bytes_at_restore_refused(tmp_path):
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    setup = f"fd = os.open({fifo!r}, os.O_RDWR); os.write(fd, b'saved'); os.dup2(fd, 500); os.close(fd)"
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    other = os.open(fifo, os.O_RDWR)
    try:
        os.write(other, b"foreign")
        with pytest.raises(Refusal) as ei:
            restore(img)
        assert ei.value.reason == "pipe-peer-outside"
    finally:
        os.close(other)


def test_fifo_unlinked_before_dump_is_kept_as_a_ghost(tmp_path):
    """Once refused as fifo-missing; now recreated (tests/test_ghosts.py)."""
    fifo = str(tmp_path / "f")
    os.mkfifo(fifo)
    with Target(tmp_path, f"fd = os.open({fifo!r}, os.O_RDWR); os.dup2(fd, 500); os.close(fd)") as t:
        os.unlink(fifo)
        assert classify(t.pid, 500).startswith(f"unlinked fifo {fifo} rw end")
