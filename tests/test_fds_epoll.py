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


def test_epoll_registration_under_a_closed_or_reused_number_restored(tmp_path):
    """CRIU's zdtm epoll, epoll01: a registration outlives close(tfd) while
    the file is held at another fd; its number may even be reused by
    another file registered too (two registrations under one number). Both
    are re-added under their old numbers, the fd table left as it was.
    They were refused (unsupported-fd)."""
    setup = SETUP + """
keep = os.dup(501); os.dup2(keep, 600); os.close(keep)   # the write end, also at 501 and 600
add(600, select.EPOLLOUT, 7)
os.close(600)                                            # registered under 600, held at 501
r2, w2 = os.pipe(); os.dup2(r2, 601); os.dup2(r2, 604); os.dup2(w2, 602); os.close(r2); os.close(w2)
add(601, select.EPOLLIN, 8)                              # the second pipe's read end, also at 604
os.dup2(500, 601)                                        # 601 now the first pipe's read end...
add(601, select.EPOLLIN, 9)                              # ...registered too: two under 601
"""
    with Target(tmp_path, setup) as t:
        want = sorted(parse_targets(fdinfo(t.pid, 503)), key=lambda x: (x["tfd"], x["data"]))
        assert [x["tfd"] for x in want].count(601) == 2 and 600 in [x["tfd"] for x in want]
        said = classify(t.pid, 503)
        assert "fd 600 (closed since; its file at fd 501)" in said
        fds = [500, 501, 502, 503, 601, 602, 604]
        img = dump(t.pid, fds, str(tmp_path / "img"))
    with restore(img, pid=os.getpid()):
        got = sorted(parse_targets(fdinfo(os.getpid(), 503)), key=lambda x: (x["tfd"], x["data"]))
        assert got == want
        assert not os.path.exists("/proc/self/fd/600")                       # closed again
        assert os.stat("/proc/self/fd/601").st_ino == os.stat("/proc/self/fd/500").st_ino
        ep = select.epoll.fromfd(os.dup(503))
        try:
            assert (7, select.EPOLLOUT) in ep.poll(0)                         # the write end, via 501
            os.write(602, b"y")                                                # the second pipe
            assert (8, select.EPOLLIN) in ep.poll(0)
        finally:
            ep.close()


def test_epoll_target_held_only_by_another_process_refused(tmp_path):
    # The registered file is held by a child outside the dump only: the
    # process has no fd to register it again by.
    setup = SETUP + """
r2, w2 = os.pipe(); os.dup2(r2, 600); os.close(r2)
add(600, select.EPOLLIN, 7)
if os.fork() == 0:
    libc.prctl(1, 9)                    # PR_SET_PDEATHSIG: gone with the target
    os.closerange(3, 600); os.closerange(601, 4096)      # the pipe's read end only
    while True:
        time.sleep(1)
os.close(600); os.close(w2)
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 503)
        assert ei.value.reason == "unsupported-fd" and "held by no fd of the process" in ei.value.detail


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
