"""PageSource (engine/memory.py): the restorer frees each piece of the
verified page buffers once it is written into the new process, only when
no other run can read that piece again; ckpt's own copy is dropped after
the fork and can no longer be written from."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from engine.errors import EngineError
from engine.memory import PAGE, PageSource


def _source(npages: int = 3):
    buf = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE)     # as imagecheck.read_file makes them
    for i in range(npages):
        buf[i * PAGE:(i + 1) * PAGE] = bytes([0x11 * (i + 1)]) * PAGE
    return buf, PageSource([buf])


def _dest(npages: int):
    """A page-aligned region of this process to write into (process_vm_writev to ourselves)."""
    m = mmap.mmap(-1, npages * PAGE)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_written_pieces_are_freed(tmp_path):
    buf, src = _source()
    dest, addr = _dest(2)
    runs = [[addr, 1, 0, 0], [addr + PAGE, 1, 0, 2 * PAGE]]
    src.check_runs(runs)
    assert src.write_runs(os.getpid(), runs) == 2 * PAGE
    assert dest[:PAGE] == b"\x11" * PAGE and dest[PAGE:] == b"\x33" * PAGE
    assert buf[:PAGE] == bytes(PAGE) and buf[2 * PAGE:] == bytes(PAGE)    # freed: reads as zeros
    assert buf[PAGE:2 * PAGE] == b"\x22" * PAGE                          # never written: kept
    src.close()


def test_a_piece_two_runs_share_is_kept_for_the_second(tmp_path):
    # Not what a dump writes, but a verified image may say it: the second
    # run must still get the bytes, not the zeros of a freed page.
    buf, src = _source()
    dest, addr = _dest(2)
    first, second = [addr, 1, 0, PAGE], [addr + PAGE, 1, 0, PAGE]
    src.check_runs([first, second])
    assert not src.recyclable()
    src.write_runs(os.getpid(), [first])
    src.write_runs(os.getpid(), [second])
    assert dest[:] == b"\x22" * (2 * PAGE)
    src.close()


def test_nothing_is_written_from_the_copy_ckpt_dropped():
    buf, src = _source()
    dest, addr = _dest(1)
    src.check_runs([[addr, 1, 0, 0]])
    src.drop()
    with pytest.raises(EngineError):
        src.write_runs(os.getpid(), [[addr, 1, 0, 0]])
    assert dest[:] == bytes(PAGE)
    src.close()


def test_writes_are_cut_so_each_freed_piece_is_small():
    # One process_vm_writev of a whole 1 GiB mapping would free nothing
    # until the new process holds all its pages: twice the memory at the peak.
    from engine.memory import WRITE_STEP, _batches
    mib = (1 << 20) // PAGE
    runs = [[i << 20, mib, 0, i << 20] for i in range(40)] + [[100 << 20, 2 * WRITE_STEP // PAGE, 1, 0]]
    batches = list(_batches(runs))
    assert [r for b in batches for r in b] == runs
    assert all(sum(r[1] for r in b) * PAGE <= WRITE_STEP for b in batches if len(b) > 1)
    assert batches[-1] == [runs[-1]]        # a run bigger than a step is written alone
    assert len(batches) == 4


def test_children_of_the_restorer_get_no_page_mappings():
    """keep_from_children: the new process, a clone of the restorer, does
    not get (copy, then unmap) the page buffers; the restorer keeps them."""
    buf, src = _source()
    addr = src.addrs[0]
    src.keep_from_children()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:      # pragma: no cover - the child
        try:
            maps = open("/proc/self/maps").read()
            os.write(w, b"mapped" if f"{addr:x}-" in maps else b"absent")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 16) == b"absent"
    finally:
        os.close(r)
        os.waitpid(child, 0)
    assert buf[:PAGE] == b"\x11" * PAGE
    src.close()


def _rss_kib(addr: int) -> int:
    """Rss of this process's mapping that starts at `addr` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Size")):
            inside = line.startswith(f"{addr:x}-")
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping at {addr:#x}")


def test_dropping_lets_go_of_a_leased_files_page_table_and_keeps_its_bytes(tmp_path):
    """drop() in ckpt, once the restorer is forked: the page table of a file
    mapped under a lease is torn down then (beside the restorer's work, not
    at the end), the mapping stays readable, its bytes the file's."""
    from engine import imagecheck
    npages = 64
    data = b"".join(bytes([i + 1]) * PAGE for i in range(npages))
    path = tmp_path / "pages-000.img"
    path.write_bytes(data)
    fd = os.open(str(path), os.O_RDONLY)
    try:
        buf = imagecheck.map_leased(fd, len(data))
        if buf is None:
            pytest.skip("no read lease on this file system")
        src = PageSource([buf], [fd])
        addr = src.addrs[0]
        assert bytes(buf) == data       # every page read: mapped in this process
        assert _rss_kib(addr) >= npages * PAGE // 1024
        src.drop()
        assert _rss_kib(addr) == 0
        assert bytes(buf) == data
        src.close()
        buf.close()
    finally:
        os.close(fd)
