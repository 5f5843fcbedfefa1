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


def _key_of(path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return digestcache.key(os.fstat(fd), generation(fd))
    finally:
        os.close(fd)


def _many(k: str, want: str, n: int = 2000) -> bytes:
    """A cache file as _save writes it: n other entries around `k`'s."""
    import json
    d = {f"1:{i}:0:4096:1:1": {"sha256": "%064x" % i, "at": i} for i in range(n)}
    d[k] = {"sha256": want, "at": 1}
    d.update({f"2:{i}:0:4096:1:1": {"sha256": "%064x" % i, "at": i} for i in range(n)})
    return json.dumps(d, separators=(",", ":")).encode()


def test_lookup_reads_its_entry_not_the_whole_file(cache, tmp_path, monkeypatch):
    """A hit in a cache of thousands of entries parses that entry only (the
    whole file's parse was most of the cache's cost to a small process's
    dump and restore); the digest is the one stored."""
    f = tmp_path / "lib5.so"
    _settled(f, b"g" * 4096)
    if not _on_trusted_fs(f):
        pytest.skip("tmp_path is not on a trusted file system")
    want = "ab" * 32
    cache.write_bytes(_many(_key_of(f), want))
    os.chmod(cache, 0o600)
    parsed = []
    real = digestcache.fastjson.loads
    monkeypatch.setattr(digestcache.fastjson, "loads", lambda s: parsed.append(len(s)) or real(s))
    calls, compute = _counting()
    assert _digest(f, compute) == want and not calls
    assert parsed and max(parsed) < 200


def test_torn_cache_file_is_ignored(cache, tmp_path):
    """A cache file that does not end as a JSON object ends (cut short by
    anything but our own whole-file rename) is not searched: its entries
    are not used."""
    f = tmp_path / "lib6.so"
    _settled(f, b"h" * 4096)
    if not _on_trusted_fs(f):
        pytest.skip("tmp_path is not on a trusted file system")
    whole = _many(_key_of(f), "cd" * 32, n=10)
    cache.write_bytes(whole[:-1])
    os.chmod(cache, 0o600)
    calls, compute = _counting()
    assert _digest(f, compute) == sha256_fd(os.open(f, os.O_RDONLY)) and len(calls) == 1


def test_last_of_two_entries_wins_as_in_json(cache, tmp_path):
    f = tmp_path / "lib7.so"
    _settled(f, b"i" * 4096)
    if not _on_trusted_fs(f):
        pytest.skip("tmp_path is not on a trusted file system")
    k = _key_of(f)
    cache.write_text('{"%s":{"sha256":"%s","at":0},"%s":{"sha256":"%s","at":1}}' % (k, "1" * 64, k, "2" * 64))
    os.chmod(cache, 0o600)
    calls, compute = _counting()
    assert _digest(f, compute) == "2" * 64 and not calls
