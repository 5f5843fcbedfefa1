"""A shared file mapping comes back backed by a file opened as the
original's was (zdtm maps_file_prot): a MAP_SHARED mapping of a file
opened O_RDWR, mapped read-only, may be made writable later (VM_MAYWRITE,
VmFlags "mw"); restored from a read-only open it could not (mprotect:
EACCES). Proven from inside: the restored process's own mprotect, and its
VmFlags from outside."""

from __future__ import annotations

import os
import signal

import pytest

from engine.context import Options
from engine.dump import dump
from engine.restore import restore
from engine_core_support import procs, start_ready_script, wait_for  # noqa: F401

SETUP = """
import ctypes, signal
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
if {memfd}:
    fd = os.memfd_create('mapaccess')
else:
    fd = os.open('data', os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 8192)
addr = libc.mmap(None, 8192, 1, 1, fd, 0)          # PROT_READ, MAP_SHARED
os.close(fd)
open('addr', 'w').write('%x' % addr)
def probe(*a):
    r = libc.mprotect(addr, 4096, 3)
    err = ctypes.get_errno()
    if r == 0:
        ctypes.c_char.from_address(addr).value = b'x'
    libc.mprotect(addr, 4096, 1)
    open('result.tmp', 'w').write('ok' if r == 0 else 'errno %d' % err)
    os.rename('result.tmp', 'result')
signal.signal(signal.SIGUSR1, probe)
"""


def _vmflags(pid: int, addr: int) -> list:
    with open(f"/proc/{pid}/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line.startswith("VmFlags"):
                inside = int(line.split("-", 1)[0], 16) == addr
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return []


def _probe(pid: int, cwd) -> str:
    res = cwd / "result"
    if res.exists():
        res.unlink()
    os.kill(pid, signal.SIGUSR1)
    wait_for(res.exists, what="the mprotect probe")
    return res.read_text()


@pytest.mark.parametrize("memfd", [False, True])
def test_shared_mapping_may_still_be_made_writable(procs, tmp_path, memfd):  # noqa: F811
    p = start_ready_script(procs, tmp_path, SETUP.format(memfd=memfd))
    addr = int((tmp_path / "addr").read_text(), 16)
    before = _vmflags(p.pid, addr)
    assert "mw" in before and "wr" not in before, before
    assert _probe(p.pid, tmp_path) == "ok"       # the original may
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert _vmflags(p.pid, addr) == before
    assert _probe(p.pid, tmp_path) == "ok"
