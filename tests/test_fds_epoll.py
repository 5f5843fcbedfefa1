"""epoll: targets re-added with the same fd numbers, events and data."""

from __future__ import annotations

import os
import select

import pytest

from engine.errors import Refusal
from engine.fds.epoll import parse_targets

from fds_support import Target, classify, dump, restore

SETUP = """
r, w = os.pipe(); os.dup2(r, 500); os.dup2(w, 501); os.close(r); os.close(w)
fd = libc.eventfd(0, 0); os.dup2(fd, 502); os.close(fd)
ep = libc.epoll_create1(0); os.dup2(ep, 503); os.close(ep)
def add(tfd, events, data):
    ev = struct.pack("=IQ", events, data)
    assert libc.epoll_ctl(503, 1, tfd, ctypes.c_char_p(ev)) == 0, ctypes.get_errno()
add(500, select.EPOLLIN | select.EPOLLET, 0x1234)
add(502, select.EPOLLIN | select.EPOLLONESHOT, 0xdeadbeefcafe)
"""


def fdinfo(pid, fd):
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return f.read()


def test_epoll_targets_restored_exactly(tmp_path):
    with Target(tmp_path, SETUP) as t:
        # fdinfo lists targets in rb-tree order (by struct file address).
        want = sorted(parse_targets(fdinfo(t.pid, 503)), key=lambda x: x["tfd"])
        assert len(want) == 2
        assert "epoll with 2 targets" in classify(t.pid, 503)
        img = dump(t.pid, [500, 501, 502, 503], str(tmp_path / "img"))
    with restore(img, pid=os.getpid()):
        assert sorted(parse_targets(fdinfo(os.getpid(), 503)), key=lambda x: x["tfd"]) == want
        ep = select.epoll.fromfd(os.dup(503))
        try:
            assert ep.poll(0) == []
            os.write(501, b"x")
            # Python reports data.fd: the low 32 bits of the data word.
            assert ep.poll(0) == [(0x1234, select.EPOLLIN)]
            assert ep.poll(0) == []                        # edge-triggered
            os.write(502, (1).to_bytes(8, "little"))
            [(data, ev)] = ep.poll(0)                      # full 64 bits: fdinfo above
            assert (data & 0xffffffff, ev) == (0xbeefcafe, select.EPOLLIN)
            assert ep.poll(0) == []                        # one-shot
        finally:
            ep.close()


def test_epoll_closed_target_refused(tmp_path):
    setup = SETUP + "\nkeep = os.dup(501); add(keep, select.EPOLLOUT, 7); os.dup2(keep, 600); os.close(keep)"
    setup += "\nos.close(600)"    # the registration's fd is gone, its file (write end) lives on
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 503)
        assert ei.value.reason == "unsupported-fd" and "closed" in ei.value.detail


def test_epoll_ready_edge_triggered_target_refused(tmp_path):
    with Target(tmp_path, SETUP + "\nos.write(501, b'x')") as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 503)
        assert "edge-triggered fd 500 is ready" in ei.value.detail


def test_epoll_fired_oneshot_refused(tmp_path):
    setup = SETUP + "\nos.write(502, (1).to_bytes(8, 'little'))\nselect.epoll.fromfd(os.dup(503)).poll(0)"
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 503)
        assert "already fired" in ei.value.detail
