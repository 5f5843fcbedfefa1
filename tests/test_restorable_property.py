"""The property hook itself (tests/restorable.py): every successful dump in
the host tests has its restore rehearsed on the unchanged machine, and a
dump that restore would refuse fails the test that made it."""

from __future__ import annotations

import os

import pytest

import restorable
from engine import files
from engine.context import Options
from engine.dump import dump as engine_dump
from engine.errors import Refusal
from engine.fds import regular
from engine_core_support import procs, python_exe, start_ready_script, wait_for  # noqa: F401
from fds_support import Target, dump, restore


def _start(procs, tmp_path, setup: str):
    return start_ready_script(procs, tmp_path, setup)


def test_every_killing_dump_is_rehearsed(procs, tmp_path):
    (tmp_path / "data").write_bytes(b"x" * 5000)
    p = _start(procs, tmp_path, "fd = os.open('data', os.O_RDONLY); os.lseek(fd, 10, 0)")
    res = engine_dump(p.pid, str(tmp_path / "img"), Options())
    assert restorable.WatchedWriter.rehearsed[-1] == res["image"]


def test_leave_running_dump_is_not_rehearsed(procs, tmp_path):
    p = _start(procs, tmp_path, "")
    before = list(restorable.WatchedWriter.rehearsed)
    engine_dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    assert restorable.WatchedWriter.rehearsed == before


def test_a_dump_restore_would_refuse_fails_the_test(procs, tmp_path, monkeypatch):
    """As if the engine had a hole: the mapped files' check refuses at
    restore. The dump's test fails with NotRestorable."""
    p = _start(procs, tmp_path, "")

    def refuse(rec, ctx):
        raise Refusal("file-missing", "simulated: restore would refuse this")
    monkeypatch.setattr(files, "map_validate", refuse)
    with pytest.raises(restorable.NotRestorable, match="simulated"):
        engine_dump(p.pid, str(tmp_path / "img"), Options())


def test_an_internal_error_at_restore_fails_the_test(procs, tmp_path, monkeypatch):
    p = _start(procs, tmp_path, "fd = os.open('/etc/hostname', os.O_RDONLY)")

    def crash(rec, ctx):
        raise NotADirectoryError(20, "Not a directory", "/proc/self/fd/3")
    monkeypatch.setattr(regular, "restore", crash)
    with pytest.raises(restorable.NotRestorable, match="NotADirectoryError"):
        engine_dump(p.pid, str(tmp_path / "img"), Options())


def test_fd_level_dumps_are_rehearsed_when_the_target_is_gone(tmp_path, monkeypatch):
    (tmp_path / "data").write_bytes(b"y" * 100)
    setup = f"fd = os.open({str(tmp_path / 'data')!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)"
    real = regular.validate

    def refuse(rec, ctx):
        raise Refusal("file-missing", "simulated: restore would refuse this")
    with pytest.raises(restorable.NotRestorable, match="simulated"):
        with Target(tmp_path, setup) as t:
            dump(t.pid, [500], str(tmp_path / "img"))
            monkeypatch.setattr(regular, "validate", refuse)
    monkeypatch.setattr(regular, "validate", real)
    # An image the test restores itself is checked by that restore instead.
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img2"))
        with restore(img):
            assert os.pread(500, 1, 0) == b"y"
        monkeypatch.setattr(regular, "validate", refuse)
