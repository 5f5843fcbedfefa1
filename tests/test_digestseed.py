"""harness/digestseed.py: a guest image's ckpt digest cache kept between runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import digestseed
from harness.targets import REPO

ENTRY = {"1:2:3:4:5:6": {"sha256": "ab" * 32, "at": 7}}


def _image(tmp_path: Path):
    files = []
    for n in ("rootfs.ext4", "vmlinuz", "initrd.img"):
        p = tmp_path / n
        p.write_bytes(n.encode())
        files.append(p)
    return files


def test_the_key_follows_every_image_file_and_every_part(tmp_path):
    files = _image(tmp_path)
    k = digestseed.key(files, "warm", "py")
    assert digestseed.key(files, "warm", "py") == k
    assert digestseed.key(files, "warm2", "py") != k
    assert digestseed.key(files, "warm", "py2") != k
    for f in files:                      # a rebuilt image file: another seed
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert digestseed.key(files, "warm", "py") != k
        k = digestseed.key(files, "warm", "py")
    files[0].unlink()
    files[0].write_bytes(b"rootfs.ext4")   # a new inode
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert digestseed.key(files, "warm", "py") != k


def test_store_keeps_only_a_cache_file_and_load_gives_it_back(tmp_path):
    root = tmp_path / "seeds"
    assert digestseed.load(root, "k") is None
    for bad in (b"", b"not json", b"[]", b"{}", json.dumps({"k": {"sha": "x"}}).encode()):
        assert not digestseed.store(root, "k", bad)
        assert digestseed.load(root, "k") is None
    data = json.dumps(ENTRY).encode()
    assert digestseed.store(root, "k", data)
    assert digestseed.load(root, "k") == data
    (root / "k.json").write_bytes(b"{truncated")
    assert digestseed.load(root, "k") is None


def test_the_placed_seed_is_one_ckpt_trusts_and_reads(tmp_path):
    """place_line writes it with the modes engine/digestcache.py requires
    (else it ignores the file): ckpt's own loader must see the entry."""
    path = tmp_path / "cache" / "ckpt" / "digests.json"
    r = subprocess.run(["sh", "-c", digestseed.place_line(str(path))], input=json.dumps(ENTRY).encode(),
                       capture_output=True, close_fds=True)
    assert r.returncode == 0, r.stderr
    assert not (path.stat().st_mode & 0o077) and not (path.parent.stat().st_mode & 0o022)
    probe = "from engine import digestcache; print(len(digestcache._load()))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=str(REPO), close_fds=True,
                         env=dict(os.environ, CKPT_DIGEST_CACHE=str(path), PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "1", out.stderr
