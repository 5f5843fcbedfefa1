"""The pages written into a restored process are the bytes whose sha256
was verified, never the file read again: a pages file overwritten after
verification, while the restore is held just before it writes the pages
(CKPT_FAULT_WAIT at restore.pages, engine/faults.py), changes nothing in
the restored memory. The image on disk is then refused, which proves the
overwrite was real."""

from __future__ import annotations

import os
import struct
import subprocess

import pytest

import fault_support as fs
from engine_core_support import become_subreaper

pytestmark = pytest.mark.timeout(300)
HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 8             # above imagecheck.BIG: the pages file is held in an anonymous mmap
GOLDEN = 0x9E3779B97F4A7C15
SAMPLES = range(1, (MIB << 20) // 8, 1021)


def _memhog(tmp_path) -> str:
    exe = str(tmp_path / "memhog")
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "targets", "memhog.c")], check=True)
    return exe


def _words_ok(pid: int, start: int) -> int:
    """How many of memhog's words (word i = i * GOLDEN; word 0 ticks) are
    as it wrote them, checked every 1021st word."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        data = os.pread(fd, MIB << 20, start)
    finally:
        os.close(fd)
    return sum(struct.unpack_from("<Q", data, i * 8)[0] == (i * GOLDEN) & ((1 << 64) - 1) for i in SAMPLES)


def test_pages_overwritten_after_verification_are_not_used(tmp_path):
    become_subreaper()
    ready, img, go = tmp_path / "ready", tmp_path / "img", str(tmp_path / "go")
    p = subprocess.Popen([_memhog(tmp_path), str(MIB), str(ready)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                         start_new_session=True)
    restored = None
    try:
        fs.wait_for(lambda: ready.exists() and ready.read_text().endswith("\n"), 30, "memhog ready")
        start = int(ready.read_text().split()[1], 16)
        want = _words_ok(p.pid, start)
        assert want == len(SAMPLES)
        d = fs.ckpt(["dump", "-t", str(p.pid), "-D", str(img)], timeout=120)
        assert d.returncode == 0, d.stderr
        p.wait(timeout=30)
        r = fs.ckpt_popen(["restore", "-D", str(img)], env={"CKPT_FAULT_WAIT": f"restore.pages:{go}"})
        fs.wait_for(lambda: os.path.exists(go + ".reached") or r.poll() is not None, 120,
                    "the restore to reach its page writes")
        assert r.poll() is None, r.communicate()
        restored = p.pid
        pages = [n for n in os.listdir(img) if n.startswith("pages-")]
        assert pages
        for n in pages:     # in place: the same inode the restore opened and verified
            with open(img / n, "r+b") as f:
                f.write(b"\x55" * os.fstat(f.fileno()).st_size)
        open(go, "w").close()
        _, err = r.communicate(timeout=120)
        assert r.returncode == 0, err
        assert os.path.exists(f"/proc/{restored}/mem"), "the restored process died: not the memory dumped"
        assert _words_ok(restored, start) == len(SAMPLES)
        fs.kill_reap(restored)
        restored = None
        again = fs.ckpt(["restore", "-D", str(img)], timeout=120)
        assert again.returncode != 0 and "image-invalid" in again.stderr, again.stderr
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if restored:
            fs.kill_reap(restored)
