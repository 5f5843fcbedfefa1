"""imagecheck.fork_copies_ptes: a verified pages mapping's page table goes
with the fork of the restorer, so it reads the pages without faulting them
in again; the bytes, the mapping's and the file's, stay what they were."""

from __future__ import annotations

import hashlib
import mmap
import os
import resource

from engine import imagecheck

SIZE = 64 << 20


def _child_faults(buf, touch: bool = True) -> int:
    """Minor faults of a forked child reading one byte of every page (or,
    not touch, of the same loop over a buffer of its own: the child's own
    faults, Python's)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mv = memoryview(buf if touch else bytes(64))
        total = 0
        for off in range(0, len(buf), mmap.PAGESIZE):
            total += mv[off if touch else 0]
        mv.release()
        os.write(w, str(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before).encode())
        os._exit(0)
    os.close(w)
    got = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(got)


def test_fork_copies_the_page_table(tmp_path):
    path = tmp_path / "pages-000.img"
    data = os.urandom(1 << 20) * (SIZE >> 20)
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    fd = os.open(str(path), os.O_RDONLY)
    try:
        plain = mmap.mmap(fd, SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        kept = mmap.mmap(fd, SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        for buf in (plain, kept):
            # page-table entries, not huge-page ones: a fork never copies a
            # file's PMD mapping (mm/huge_memory.c copy_huge_pmd: refilled
            # on fault, one fault per 2 MiB: nothing to save there)
            buf.madvise(mmap.MADV_NOHUGEPAGE)
            buf.madvise(imagecheck.MADV_POPULATE_READ)
        imagecheck.fork_copies_ptes(kept)
        base = min(_child_faults(plain, touch=False) for _ in range(3))
        without, with_ = _child_faults(plain) - base, _child_faults(kept) - base
        # with large folios in the page cache (6.x) ~one fault per folio,
        # else one per 16 pages (fault-around): either way, many more
        assert without >= 8 and with_ * 4 < without, (with_, without, base)
        assert hashlib.sha256(kept).hexdigest() == want
        plain.close()
        kept.close()
    finally:
        os.close(fd)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want, "the file was written"
