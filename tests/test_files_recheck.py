"""The re-check at reopen is real (issue 10 item 7): the content digest is
taken from the file restore opened, never from a cache keyed on (dev, ino,
size, mtime), so a same-size rewrite that keeps mtime_ns exactly is refused
`file-changed` under the default `digest` validation, also when it lands
between the restore's pre-check and its open."""

from __future__ import annotations

import os

import pytest

from engine import files
from engine.context import Options
from engine.dump import dump as engine_dump
from engine.errors import Refusal
from engine.fds import regular
from engine import restore as engine_restore
from engine_core_support import alive, procs, python_exe, start_ready_script, wait_for  # noqa: F401

import fds_support
from fds_support import Target, dump, restore


def rewrite_keeping_mtime(path, offset: int = 100) -> None:
    """Change one byte in place; size and mtime_ns exactly as before."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xff]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "data"
    p.write_bytes(bytes(range(256)) * 64)
    return p


FLAGS = {"rdonly": "os.O_RDONLY", "wronly-append": "os.O_WRONLY | os.O_APPEND", "rdwr": "os.O_RDWR"}


@pytest.mark.parametrize("how", sorted(FLAGS))
def test_same_size_rewrite_keeping_mtime_is_refused(tmp_path, data, how):
    setup = f"fd = os.open({str(data)!r}, {FLAGS[how]}); os.dup2(fd, 500); os.close(fd)"
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    rewrite_keeping_mtime(data)
    with pytest.raises(Refusal) as e:
        restore(img)
    assert e.value.reason == "file-changed" and "content differs" in e.value.detail


@pytest.mark.parametrize("how", sorted(FLAGS))
def test_rewrite_between_check_and_open_is_caught(tmp_path, data, how, monkeypatch):
    """validate() (the pre-check) passes on the unchanged file; the rewrite
    lands right after it, before restore() opens the file."""
    setup = f"fd = os.open({str(data)!r}, {FLAGS[how]}); os.dup2(fd, 500); os.close(fd)"
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    checked = []
    real_validate = regular.validate

    def validate_then_race(rec, ctx):
        real_validate(rec, ctx)
        checked.append(rec["fd"])
        rewrite_keeping_mtime(data)
    monkeypatch.setattr(regular, "validate", validate_then_race)
    with pytest.raises(Refusal) as e:
        restore(img)
    assert checked == [500]
    assert e.value.reason == "file-changed" and "content differs" in e.value.detail


def test_each_open_is_hashed_once(tmp_path, data, monkeypatch):
    """Speed: one digest per restored open file description, none in the
    pre-check."""
    setup = f"fd = os.open({str(data)!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)"
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    calls = []
    real = files.sha256_fd
    monkeypatch.setattr(files, "sha256_fd", lambda fd, size=None: calls.append(fd) or real(fd, size))
    with restore(img):
        assert os.pread(500, 4, 0) == bytes(range(4))
    assert len(calls) == 1


# -- the whole restore: the race between its pre-flight and its opens -------------------

@pytest.mark.slow
@pytest.mark.parametrize("what", ["fd", "mapping"])
def test_engine_restore_catches_a_rewrite_after_its_preflight(procs, tmp_path, data, what, monkeypatch):
    if what == "fd":
        setup = f"fd = os.open({str(data)!r}, os.O_RDONLY)"
    else:   # mapped, its fd closed: only the mapping holds the file
        setup = (f"fd = os.open({str(data)!r}, os.O_RDONLY)\n"
                 "libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p\n"
                 "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, "
                 "ctypes.c_int, ctypes.c_long]\n"
                 "assert libc.mmap(None, 16384, 1, 2, fd, 0) not in (None, 2**64 - 1)\n"
                 "os.close(fd)")
    p = start_ready_script(procs, tmp_path, setup, imports="os, time, ctypes", tick=0.05)
    image = str(tmp_path / "img")
    engine_dump(p.pid, image, Options())
    p.wait()
    original = data.read_bytes()
    st = data.stat()
    real_preflight = engine_restore.preflight

    def preflight_then_race(*a, **kw):
        real_preflight(*a, **kw)
        rewrite_keeping_mtime(data)
    monkeypatch.setattr(engine_restore, "preflight", preflight_then_race)
    try:
        with pytest.raises(Refusal) as e:
            engine_restore.restore(image, Options())
    finally:
        if alive(p.pid):            # restored after all (the bug): ours to kill and reap
            procs.adopt(p.pid)
    assert e.value.reason == "file-changed" and e.value.path == str(data)
    assert not alive(p.pid)
    # The same image on the unchanged world restores.
    monkeypatch.setattr(engine_restore, "preflight", real_preflight)
    data.write_bytes(original)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = engine_restore.restore(image, Options())
    procs.adopt(out["pid"])
    assert out["pid"] == p.pid and alive(p.pid)


@pytest.mark.slow
def test_a_refused_restore_names_every_changed_file_not_only_the_first_stage(procs, tmp_path, data):
    """One file renamed over (found by the pre-flight, no content read) and
    another rewritten in place with its size and mtime (found only by its
    content): the restore is refused naming both, so one run tells the
    user everything (the content stage runs on the refusal path too)."""
    other = tmp_path / "other"
    other.write_bytes(bytes(range(256)) * 32)
    setup = (f"a = os.open({str(data)!r}, os.O_RDONLY); os.dup2(a, 500); os.close(a)\n"
             f"b = os.open({str(other)!r}, os.O_RDWR); os.dup2(b, 501); os.close(b)")
    p = start_ready_script(procs, tmp_path, setup, tick=0.05)
    image = str(tmp_path / "img")
    engine_dump(p.pid, image, Options())
    p.wait()
    rewrite_keeping_mtime(other)
    (tmp_path / "new").write_bytes(data.read_bytes())
    os.rename(tmp_path / "new", data)
    with pytest.raises(Exception) as e:
        engine_restore.restore(image, Options())
    if alive(p.pid):
        procs.adopt(p.pid)
    found = getattr(e.value, "refusals", [e.value])
    by_fd = {r.fd: r for r in found}
    assert set(by_fd) == {500, 501}, [str(r) for r in found]
    assert by_fd[500].reason == "file-changed" and "renamed-over" in by_fd[500].detail
    assert by_fd[501].reason == "file-changed" and "content differs" in by_fd[501].detail
    assert not alive(p.pid)


def test_a_content_change_names_every_fd_on_every_changed_file(procs, tmp_path, data):
    """Found only by their content (same size, same mtime), so only when
    the restore opens the fds: one file opened twice (two open files) and
    another rewritten too. The refusal names all three fds, not the first
    the restore happened to open (found by the generator: gen-s77-0154)."""
    other = tmp_path / "other"
    other.write_bytes(bytes(range(256)) * 32)
    setup = (f"a = os.open({str(data)!r}, os.O_RDONLY); os.dup2(a, 500); os.close(a)\n"
             f"a = os.open({str(data)!r}, os.O_RDONLY); os.dup2(a, 501); os.close(a)\n"
             f"b = os.open({str(other)!r}, os.O_RDWR); os.dup2(b, 502); os.close(b)")
    p = start_ready_script(procs, tmp_path, setup, tick=0.05)
    image = str(tmp_path / "img")
    engine_dump(p.pid, image, Options())
    p.wait()
    rewrite_keeping_mtime(data)
    rewrite_keeping_mtime(other)
    with pytest.raises(Exception) as e:
        engine_restore.restore(image, Options())
    if alive(p.pid):
        procs.adopt(p.pid)
    found = getattr(e.value, "refusals", [e.value])
    assert sorted(r.fd for r in found) == [500, 501, 502], [str(r) for r in found]
    assert all(r.reason == "file-changed" and "content differs" in r.detail for r in found)
    assert not alive(p.pid)
