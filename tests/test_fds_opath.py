"""O_PATH fds of a regular file and a directory (zdtm opath_file): the
dump's read of every fd's F_SETOWN owner failed EBADF on them (no fcntl
but a few works on an O_PATH file) and the whole dump failed. They come
back O_PATH, naming the same files."""

from __future__ import annotations

import os

from engine.context import Options
from engine.dump import dump
from engine.restore import restore
from engine_core_support import procs, start_ready_script  # noqa: F401

SETUP = """
open('file', 'w').write('x')
os.mkdir('dir')
a = os.open('file', os.O_PATH)
b = os.open('dir', os.O_PATH | os.O_DIRECTORY)
open('fds', 'w').write('%d %d' % (a, b))
"""


def _fd(pid, fd):
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        flags = int(next(ln.split()[1] for ln in f if ln.startswith("flags:")), 8)
    return os.readlink(f"/proc/{pid}/fd/{fd}"), bool(flags & os.O_PATH)


def test_opath_fds(procs, tmp_path):  # noqa: F811
    p = start_ready_script(procs, tmp_path, SETUP)
    fds = [int(x) for x in (tmp_path / "fds").read_text().split()]
    before = [_fd(p.pid, fd) for fd in fds]
    assert all(o for _, o in before)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert [_fd(p.pid, fd) for fd in fds] == before
