"""An inotify watch on a file deleted while open (engine/fds/inotify.py:
"fd_of"), proven from inside the restored process by
tests/targets/inoghost.c: the watch is on the recreated file (its fd),
with its wd, so closing that fd reports IN_CLOSE_WRITE, IN_DELETE_SELF and
IN_IGNORED on the same wds as without a restore."""

from __future__ import annotations

import os
import signal

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import EngineError
from engine.fds import inotify
from engine.restore import restore
from engine_core_support import compile_target, lines_of, procs, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def inoghost_bin(tmp_path_factory) -> str:
    return compile_target(tmp_path_factory, "inoghost")


def _start(procs, exe, tmp_path):
    out, d = str(tmp_path / "out"), tmp_path / "d"
    d.mkdir()
    p = procs.start([exe, out, str(d)], cwd=str(tmp_path))
    wait_for(lambda: lines_of(out, "ready") or p.poll() is not None, what="the target to start")
    assert p.poll() is None
    return p, out


def _after(p, out) -> list:
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: lines_of(out, "done"), what="the target's events")
    text = open(out).read().splitlines()
    return text[text.index("ready") + 1:]


WANT = ["content abc", "ev 1 0x8", "ev 4 0x8", "ev 4 0x400", "ev 4 0x8000", "done"]


def test_without_a_restore(procs, inoghost_bin, tmp_path):
    p, out = _start(procs, inoghost_bin, tmp_path)
    assert lines_of(out, "wd ") == ["wd dir 1 file 4"]
    assert _after(p, out) == WANT


def test_watch_on_a_deleted_open_file_restored(procs, inoghost_bin, tmp_path):
    p, out = _start(procs, inoghost_bin, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert _after(p, out) == WANT


def test_a_watch_put_on_another_inode_fails_the_restore(procs, inoghost_bin, tmp_path, monkeypatch):
    """The read-back: the deleted file's watch added without following
    /proc/PID/fd/N (on the magic link's own inode) is caught before the
    target runs."""
    p, out = _start(procs, inoghost_bin, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    real = inotify._add
    monkeypatch.setattr(inotify, "_add", lambda rec, ctx, fd, w, burned, follow=False:
                        real(rec, ctx, fd, w, burned, False))
    with pytest.raises(EngineError) as e:
        restore(str(tmp_path / "img"), Options())
    assert "inotify watches read back" in str(e.value)
    assert not os.path.exists(f"/proc/{p.pid}")
    assert not lines_of(out, "content")
