"""engine/digestcache.py: a remembered sha256 is used only for the same
version of the same inode, and never for a file whose ctime had not
settled when it was hashed (a same-size rewrite within one clock tick)."""

from __future__ import annotations

import os
import time

import pytest

from engine import digestcache
from engine.files import generation, sha256_fd


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("CKPT_DIGEST_CACHE", str(d / "digests.json"))
    monkeypatch.setattr(digestcache, "_cache", None)
    monkeypatch.setattr(digestcache, "TRUSTED_FS", dict(digestcache.TRUSTED_FS))
    return d / "digests.json"


def _settled(path, data: bytes):
    path.write_bytes(data)
    old = time.time() - 3600
    os.utime(path, (old, old))


def _counting():
    calls = []

    def compute(fd):
        calls.append(fd)
        return sha256_fd(fd)
    return calls, compute


def _digest(path, compute):
    fd = os.open(path, os.O_RDONLY)
    try:
        return digestcache.digest(fd, generation(fd), compute)
    finally:
        os.close(fd)


def _on_trusted_fs(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return generation(fd) is not None and digestcache._fs_trusted(fd)
    finally:
        os.close(fd)


def test_settled_file_is_hashed_once_across_runs(cache, tmp_path, monkeypatch):
    f = tmp_path / "lib.so"
    _settled(f, b"a" * 100000)
    if not _on_trusted_fs(f):
        pytest.skip("tmp_path is not on ext4/xfs/btrfs/tmpfs with generations")
    # utime changed ctime just now: not settled yet, so not stored
    monkeypatch.setattr(digestcache, "SETTLED_NS", 0)
    calls, compute = _counting()
    want = sha256_fd(os.open(f, os.O_RDONLY))
    assert _digest(f, compute) == want and len(calls) == 1
    monkeypatch.setattr(digestcache, "_cache", None)     # a new ckpt run: read from the file
    assert _digest(f, compute) == want and len(calls) == 1
    assert cache.exists() and (cache.stat().st_mode & 0o777) == 0o600


def test_unsettled_file_is_not_remembered(cache, tmp_path):
    f = tmp_path / "fresh"
    f.write_bytes(b"b" * 5000)           # ctime: now, within SETTLED_NS
    if not _on_trusted_fs(f):
        pytest.skip("tmp_path is not on a trusted file system")
    calls, compute = _counting()
    _digest(f, compute)
    _digest(f, compute)
    assert len(calls) == 2 and not cache.exists()


def test_same_size_rewrite_with_mtime_put_back_is_seen(cache, tmp_path, monkeypatch):
    f = tmp_path / "lib2.so"
    _settled(f, b"c" * 4096)
    if not _on_trusted_fs(f):
        pytest.skip("tmp_path is not on a trusted file system")
    monkeypatch.setattr(digestcache, "SETTLED_NS", 0)
    calls, compute = _counting()
    first = _digest(f, compute)
    st = os.stat(f)
    with open(f, "r+b") as w:            # same size, other bytes, mtime put back as it was
        w.write(b"d" * 4096)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    second = _digest(f, compute)
    assert second != first and len(calls) == 2


def test_cache_file_writable_by_others_is_ignored(cache, tmp_path, monkeypatch):
    f = tmp_path / "lib3.so"
    _settled(f, b"e" * 4096)
    if not _on_trusted_fs(f):
        pytest.skip("tmp_path is not on a trusted file system")
    st = os.fstat(os.open(f, os.O_RDONLY))
    fd = os.open(f, os.O_RDONLY)
    k = digestcache.key(os.fstat(fd), generation(fd))
    os.close(fd)
    cache.write_text('{"%s": {"sha256": "%s", "at": 0}}' % (k, "0" * 64))
    os.chmod(cache, 0o666)
    calls, compute = _counting()
    assert _digest(f, compute) != "0" * 64 and len(calls) == 1
    assert st.st_size == 4096
