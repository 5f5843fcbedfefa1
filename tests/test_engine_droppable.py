"""MAP_DROPPABLE mappings (VmFlags "dp", Linux 6.11): every process of a
Debian 13 guest has one (glibc >= 2.41 keeps its vDSO getrandom state in
it). The restore recreates it droppable, at its address, with its other
flags, and without the dumped process's bytes (a copy would hand two
processes the same random state)."""

from __future__ import annotations

import os

import pytest

from engine.context import Options
from engine.dump import dump
from engine.procfs import Proc
from engine.restore import restore
from engine_core_support import procs, proc_facts, start_ready_script, wait_for  # noqa: F401

MAP_DROPPABLE, MAP_ANONYMOUS = 0x08, 0x20
SIZE = 3 * 4096

SETUP = f"""
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
a = libc.mmap(None, {SIZE}, 3, {MAP_DROPPABLE | MAP_ANONYMOUS}, -1, 0)
if a in (None, ctypes.c_void_p(-1).value):
    open('unsupported', 'w').write(os.strerror(ctypes.get_errno()))
    raise SystemExit(0)
ctypes.memset(a, 0x5a, {SIZE})
open('addr', 'w').write(hex(a))
"""


def _vma(pid: int, addr: int) -> list:
    return Proc(pid).vmflags()[addr]


def _mem(pid: int, addr: int, n: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, n, addr)
    finally:
        os.close(fd)


def test_droppable_mapping_restored_droppable_and_empty(procs, tmp_path):
    p = start_ready_script(procs, tmp_path, SETUP, imports="os, time, ctypes")
    if (tmp_path / "unsupported").exists():
        pytest.skip(f"MAP_DROPPABLE: {(tmp_path / 'unsupported').read_text()} (kernel < 6.11)")
    addr = int((tmp_path / "addr").read_text(), 16)
    flags = _vma(p.pid, addr)
    assert "dp" in flags and {"nr", "dd", "wf"} <= set(flags)   # what MAP_DROPPABLE implies
    assert _mem(p.pid, addr, SIZE) == b"\x5a" * SIZE
    before = proc_facts(p.pid)
    res = dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    assert res["pid"] == p.pid
    out = restore(str(tmp_path / "img"), Options())
    procs.adopt(out["pid"])
    after = proc_facts(p.pid)
    assert after["maps"] == before["maps"]
    assert _vma(p.pid, addr) == flags
    # the pages were not copied: the restored process reads what a dropped page reads
    assert _mem(p.pid, addr, SIZE) == bytes(SIZE)
    wait_for(lambda: open(f"/proc/{p.pid}/stat").read().split(")")[1].split()[0] in "RS",
             what="the restored target to run")
