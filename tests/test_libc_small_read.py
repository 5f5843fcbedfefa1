"""libc.vm_read_small (Task.read_mem's path for an injected call's
out-parameter) reuses one buffer: it must hand back only bytes it has
just read, never what an earlier read left there."""

import ctypes
import mmap
import os
import threading

from engine import libc

PAGE = mmap.PAGESIZE
_c = ctypes.CDLL(None, use_errno=True)     # its own handle: argtypes set here stay here


def test_reads_what_is_there():
    a = ctypes.create_string_buffer(b"first value.....", 16)
    b = ctypes.create_string_buffer(b"second value....", 16)
    assert libc.vm_read_small(os.getpid(), ctypes.addressof(a), 16) == a.raw
    assert libc.vm_read_small(os.getpid(), ctypes.addressof(b), 16) == b.raw
    assert libc.vm_read_small(os.getpid(), ctypes.addressof(a), 5) == b"first"
    assert libc.vm_read_small(os.getpid(), ctypes.addressof(a), 0) == b""


def test_a_short_read_is_none_not_an_earlier_reads_bytes():
    m = mmap.mmap(-1, 2 * PAGE)
    m[:] = b"x" * (2 * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    # the buffer now holds "y"s from an earlier read ...
    y = ctypes.create_string_buffer(b"y" * 64, 64)
    assert libc.vm_read_small(os.getpid(), ctypes.addressof(y), 64) == b"y" * 64
    # ... and a read whose tail is in an unmapped page copies only its head
    _c.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert _c.munmap(ctypes.c_void_p(base + PAGE), PAGE) == 0
    try:
        assert libc.vm_read_small(os.getpid(), base + PAGE - 16, 64) is None
        assert libc.vm_read_small(os.getpid(), base + PAGE - 16, 16) == b"x" * 16
    finally:
        _c.mmap.restype = ctypes.c_void_p   # put a page back for mmap's own unmap
        _c.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
        _c.mmap(ctypes.c_void_p(base + PAGE), PAGE, 3, 0x32, -1, 0)   # MAP_PRIVATE|ANON|FIXED
        del y
        m.close()


def test_another_thread_takes_the_general_path():
    a = ctypes.create_string_buffer(b"z" * 16, 16)
    got = []
    t = threading.Thread(target=lambda: got.append(libc.vm_read_small(os.getpid(), ctypes.addressof(a), 16)))
    t.start()
    t.join()
    assert got == [None]
