"""The per-run memos that spare a TCG guest's dump and restore repeated
syscalls (issue 15): files.record_identity asks whether a path names the
open inode once per (path, inode) in a run, and digestcache's statfs is
taken once per device in a run (ctx.shared) - never across runs, where a
renamed-over path or a reused device number must be seen afresh."""

from __future__ import annotations

import os

import pytest

from engine import digestcache, files, fstype
from engine.context import DumpContext, Options
from engine.errors import Refusal
from engine.files import generation, sha256_fd


def _counting_stat(monkeypatch, path: str) -> list:
    calls = []
    real = os.stat

    def stat(p, *a, **kw):
        if str(p).startswith(path):
            calls.append(str(p))
        return real(p, *a, **kw)
    monkeypatch.setattr(files.os, "stat", stat)
    return calls


def test_path_checked_once_per_inode_in_a_run(tmp_path, monkeypatch):
    f = tmp_path / "lib.so"
    f.write_bytes(b"x" * 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        opened = f"/proc/self/fd/{fd}"
        calls = _counting_stat(monkeypatch, str(tmp_path))
        ctx = DumpContext(pid=os.getpid(), options=Options(file_validation="size"))
        first = files.record_identity(str(f), opened, ctx)
        for _ in range(4):      # a library's other mappings
            assert files.record_identity(str(f), opened, ctx) == first
        assert len(calls) == 1
        # Another run asks again, and sees the path now names another file.
        os.rename(f, tmp_path / "old.so")
        f.write_bytes(b"y" * 100)
        with pytest.raises(Refusal) as e:
            files.record_identity(str(f), opened, DumpContext(pid=os.getpid(), options=Options()))
        assert e.value.reason == "file-changed" and len(calls) == 2
        # Another name within the run is checked too: one that names the
        # inode passes, one that names another file is refused.
        assert files.record_identity(str(tmp_path / "old.so"), opened, ctx)["path"] == str(tmp_path / "old.so")
        assert len(calls) == 3
        (tmp_path / "other.so").write_bytes(b"w")
        with pytest.raises(Refusal):
            files.record_identity(str(tmp_path / "other.so"), opened, ctx)
        assert len(calls) == 4
    finally:
        os.close(fd)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("CKPT_DIGEST_CACHE", str(d / "digests.json"))
    monkeypatch.setattr(digestcache, "_cache", None)
    return d / "digests.json"


def _statfs_calls(monkeypatch) -> list:
    calls = []
    real = fstype.magic

    def magic(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(fstype, "magic", magic)
    return calls


def test_statfs_once_per_device_in_a_run_never_across(cache, tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"z" * (1000 + i))
        paths.append(p)
    calls = _statfs_calls(monkeypatch)

    def digests(memo):
        out = []
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                out.append(digestcache.digest(fd, generation(fd), sha256_fd, memo))
            finally:
                os.close(fd)
        return out
    want = [sha256_fd(os.open(p, os.O_RDONLY)) for p in paths]
    if generation(os.open(paths[0], os.O_RDONLY)) is None:
        pytest.skip("tmp_path has no inode generations: the cache is not consulted")
    assert digests({}) == want and len(calls) == 1       # one device: one statfs
    assert digests(None) == want and len(calls) == 4     # no memo: one per file, as before
    assert digests({}) == want and len(calls) == 5       # a new run asks again


def test_memo_answer_untrusted_is_not_cached(cache, tmp_path, monkeypatch):
    """The memo keeps the statfs answer itself, so an untrusted file system
    stays untrusted for every file of the run: nothing stored, every one hashed."""
    p = tmp_path / "f"
    p.write_bytes(b"q" * 5000)
    old = os.stat(p).st_mtime - 3600
    os.utime(p, (old, old))
    monkeypatch.setattr(digestcache, "SETTLED_NS", 0)
    fd = os.open(p, os.O_RDONLY)
    try:
        if generation(fd) is None:
            pytest.skip("no inode generations here")
        memo = {f"fsmagic:{os.fstat(fd).st_dev}": 0x65735546}     # FUSE
        computed = []

        def compute(f):
            computed.append(f)
            return sha256_fd(f)
        for _ in range(2):
            digestcache.digest(fd, generation(fd), compute, memo)
        assert len(computed) == 2 and not cache.exists()
    finally:
        os.close(fd)


def test_restore_check_asks_the_generation_once_and_uses_it_for_the_cache(cache, tmp_path, monkeypatch):
    """check_identity on the fd restore opened: the generation it compared
    is the one the digest cache is keyed on (one ioctl, not two), and a
    settled file is then found in the cache, not hashed again."""
    from engine.context import RestoreContext
    f = tmp_path / "lib.so"
    f.write_bytes(b"L" * 20000)
    old = os.stat(f).st_mtime - 3600
    os.utime(f, (old, old))
    monkeypatch.setattr(digestcache, "SETTLED_NS", 0)
    fd = os.open(f, os.O_RDONLY)
    try:
        if generation(fd) is None:
            pytest.skip("no inode generations here")
        ident = files.record_identity(str(f), f"/proc/self/fd/{fd}",
                                      DumpContext(pid=os.getpid(), options=Options()))
        asked, hashed = [], []
        real_gen, real_hash = files.generation, files.sha256_fd
        monkeypatch.setattr(files, "generation", lambda x: asked.append(x) or real_gen(x))
        monkeypatch.setattr(files, "sha256_fd", lambda x: hashed.append(x) or real_hash(x))
        monkeypatch.setattr(digestcache, "_cache", None)      # a new run: reads the cache file
        ctx = RestoreContext(options=Options(), image=None, same_node=True)
        files.check_identity(ident, ctx, opened=fd)
        assert asked == [fd] and hashed == []
        # on another machine the generation is not compared, but still keys the cache
        files.check_identity(ident, RestoreContext(options=Options(), image=None, same_node=False), opened=fd)
        assert asked == [fd, fd] and hashed == []
        # and a changed generation is still refused (the value compared is the fd's)
        with pytest.raises(Refusal) as e:
            files.check_identity(dict(ident, generation=ident["generation"] + 1), ctx, opened=fd)
        assert e.value.reason == "file-changed"
    finally:
        os.close(fd)
