"""The pages written into a restored process are the bytes whose sha256
was verified, never the file read again. Two ways (engine/imagecheck.py
map_leased):

- a pages file someone has open for writing cannot be leased: it is read
  into memory, and overwriting it after verification, while the restore is
  held just before it writes the pages (CKPT_FAULT_WAIT at restore.pages,
  engine/faults.py), changes nothing in the restored memory. The image on
  disk is then refused, which proves the overwrite was real;
- otherwise it is mapped under a read lease: an open for writing while the
  restore holds it is held off (EWOULDBLOCK here), and the restore, whose
  lease that attempt broke, refuses (image-invalid) and leaves no process,
  rather than write pages it can no longer vouch for."""

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


def _dumped(tmp_path):
    """A memhog of MIB MiB dumped to tmp_path/img; (pid, region start)."""
    ready, img = tmp_path / "ready", tmp_path / "img"
    p = subprocess.Popen([_memhog(tmp_path), str(MIB), str(ready)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                         start_new_session=True)
    try:
        fs.wait_for(lambda: ready.exists() and ready.read_text().endswith("\n"), 30, "memhog ready")
        start = int(ready.read_text().split()[1], 16)
        assert _words_ok(p.pid, start) == len(SAMPLES)
        d = fs.ckpt(["dump", "-t", str(p.pid), "-D", str(img)], timeout=120)
        assert d.returncode == 0, d.stderr
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.pid, start


def _held_restore(img, go: str):
    """ckpt restore, held just before its first page write."""
    r = fs.ckpt_popen(["restore", "-D", str(img)], env={"CKPT_FAULT_WAIT": f"restore.pages:{go}"})
    fs.wait_for(lambda: os.path.exists(go + ".reached") or r.poll() is not None, 120,
                "the restore to reach its page writes")
    assert r.poll() is None, r.communicate()
    return r


def _gone(pid: int) -> bool:
    """No process `pid` (reaped here when it was left to this subreaper)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return not os.path.exists(f"/proc/{pid}")


def _pages(img) -> list:
    pages = sorted(n for n in os.listdir(img) if n.startswith("pages-"))
    assert pages
    return pages


def test_pages_overwritten_after_verification_are_not_used(tmp_path):
    become_subreaper()
    img, go = tmp_path / "img", str(tmp_path / "go")
    pid, start = _dumped(tmp_path)
    # Open for writing before the restore: no lease, the files are copied.
    writers = [open(img / n, "r+b") for n in _pages(img)]
    restored = None
    try:
        r = _held_restore(img, go)
        restored = pid
        for f in writers:     # in place: the same inode the restore opened and verified
            f.write(b"\x55" * os.fstat(f.fileno()).st_size)
            f.flush()
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
        for f in writers:
            f.close()
        if restored:
            fs.kill_reap(restored)


def test_a_leased_pages_file_opened_for_writing_stops_the_restore(tmp_path):
    become_subreaper()
    img, go = tmp_path / "img", str(tmp_path / "go")
    pid, _ = _dumped(tmp_path)
    r = _held_restore(img, go)
    try:
        for n in _pages(img):
            with pytest.raises(BlockingIOError):    # the restore's lease holds the writer off
                os.close(os.open(img / n, os.O_WRONLY | os.O_NONBLOCK))
        open(go, "w").close()
        _, err = r.communicate(timeout=120)
        assert r.returncode == 3 and "image-invalid" in err and "opened for writing" in err, err
        fs.wait_for(lambda: _gone(pid), 10, "no restored process left")
    finally:
        if r.poll() is None:
            r.kill()
            r.wait()
        if os.path.exists(f"/proc/{pid}"):
            fs.kill_reap(pid)
    # The image was not touched: it restores.
    again = fs.ckpt(["restore", "-D", str(img)], timeout=120)
    assert again.returncode == 0, again.stderr
    fs.kill_reap(pid)
