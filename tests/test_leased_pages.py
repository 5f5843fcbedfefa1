"""Pages files mapped under a read lease (engine/imagecheck.py map_leased,
engine/memory.py PageSource._check_leases): the mapping is used only while
the lease shows that no one could have opened the file for writing since
it was hashed. An open for writing (refused here with O_NONBLOCK; a
blocking one would wait for the lease-break time) breaks the lease."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from engine import imagecheck
from engine.errors import Refusal
from engine.memory import PAGE, PageSource
from engine.sha256 import sha256

SIZE = 32 * PAGE     # >= imagecheck.BIG


def _file(tmp_path, byte=0x5A):
    p = tmp_path / "pages-000.img"
    p.write_bytes(bytes([byte]) * SIZE)
    return p


def _try_writer(path) -> None:
    with pytest.raises(BlockingIOError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_mapped_and_hashed_under_a_lease(tmp_path):
    p = _file(tmp_path)
    fd = os.open(p, os.O_RDONLY)
    h = sha256()
    buf = imagecheck.map_leased(fd, SIZE, h)
    try:
        assert buf is not None and buf[:] == b"\x5a" * SIZE
        assert h.hexdigest() == sha256(b"\x5a" * SIZE).hexdigest()
        assert imagecheck.lease_held(fd)
        _try_writer(p)                          # held off...
        assert not imagecheck.lease_held(fd)    # ...and the break is seen
    finally:
        buf.close()
        os.close(fd)


def test_no_lease_while_a_writer_has_it_open(tmp_path):
    p = _file(tmp_path)
    w = os.open(p, os.O_WRONLY)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert imagecheck.map_leased(fd, SIZE, sha256()) is None   # the caller copies it then
    finally:
        os.close(fd)
        os.close(w)


def test_a_lease_broken_while_hashing_is_a_refusal(tmp_path):
    p = _file(tmp_path)

    class Racing:
        def __init__(self):
            self.h = sha256()

        def update(self, data):
            _try_writer(p)
            self.h.update(data)

    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(Refusal) as e:
            imagecheck.map_leased(fd, SIZE, Racing())
        assert e.value.reason == "image-invalid"
    finally:
        os.close(fd)


def test_pages_are_not_written_from_a_file_whose_lease_broke(tmp_path):
    p = _file(tmp_path, 0x11)
    fd = os.open(p, os.O_RDONLY)
    buf = imagecheck.map_leased(fd, SIZE, None)
    src = PageSource([buf], [fd])
    dest = mmap.mmap(-1, 2 * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(dest))
    try:
        first, second = [addr, 1, 0, 0], [addr + PAGE, 1, 0, PAGE]
        src.check_runs([first, second])
        assert src.write_runs(os.getpid(), [first]) == PAGE
        assert dest[:PAGE] == b"\x11" * PAGE
        assert buf[:PAGE] == b"\x11" * PAGE     # a mapped file is not freed as it is written
        _try_writer(p)
        with pytest.raises(Refusal) as e:
            src.write_runs(os.getpid(), [second])
        assert e.value.reason == "image-invalid" and "opened for writing" in e.value.detail
    finally:
        src.close()
        buf.close()
        os.close(fd)


def test_only_on_file_systems_where_every_writer_meets_the_lease(tmp_path, monkeypatch):
    p = _file(tmp_path)
    fd = os.open(p, os.O_RDONLY)
    try:
        monkeypatch.setattr(imagecheck, "LEASE_FS", {})    # as if tmp_path were overlayfs
        assert imagecheck.map_leased(fd, SIZE, sha256()) is None
        os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))  # and no lease was taken
    finally:
        os.close(fd)
