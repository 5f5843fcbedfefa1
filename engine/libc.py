"""The raw layer: libc through ctypes, errors that carry errno and pid.

Everything above this module speaks Python; everything here is a thin,
typed wrapper around one libc call. Failures raise :class:`SysError`, an
:class:`EngineError` naming the call, the errno and the pid it was aimed at.
"""

from __future__ import annotations

import _thread
import ctypes
import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Optional, Sequence, Tuple

from .errors import EngineError

# One handle on the C library already loaded in this process (python-ptrace's
# ctypes_libc does the same); use_errno so ctypes.get_errno() is reliable.
libc = ctypes.CDLL(None, use_errno=True)

c_long = ctypes.c_long
c_ulong = ctypes.c_ulong

_syscall = libc.syscall
_syscall.restype = c_long


class SysError(EngineError):
    """A system call failed. Fields: call, errno, pid."""

    def __init__(self, call: str, err: int, pid: Optional[int] = None, detail: str = ""):
        self.call = call
        what = f"{call}" + (f" (pid {pid})" if pid is not None else "")
        msg = f"{what}: {os.strerror(err)} [errno {err}]" + (f": {detail}" if detail else "")
        super().__init__(msg, pid=pid, errno=err)


def _arg(a) -> c_long:
    if isinstance(a, c_long):
        return a
    if isinstance(a, int):
        # syscall(2) takes longs; an unsigned value above LONG_MAX (an
        # address or -1 as u64) is passed as its two's complement.
        if a >= 1 << 63:
            a -= 1 << 64
        return c_long(a)
    if isinstance(a, (ctypes.Array, ctypes.Structure)):
        return c_long(ctypes.addressof(a))
    if a is None:
        return c_long(0)
    raise TypeError(f"unsupported syscall argument {a!r}")


def syscall(nr: int, *args, name: str = "", pid: Optional[int] = None) -> int:
    """syscall(2) in *this* process. Returns the result; raises SysError."""
    ctypes.set_errno(0)
    r = _syscall(c_long(nr), *[_arg(a) for a in args])
    if r == -1:
        e = ctypes.get_errno()
        if e:
            raise SysError(name or f"syscall {nr}", e, pid)
    return r


def errcheck(r: int, call: str, pid: Optional[int] = None) -> int:
    if r < 0:
        raise SysError(call, ctypes.get_errno(), pid)
    return r


# -- cross-process memory (process_vm_readv(2)) --------------------------------

class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_pvr = libc.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvr.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), c_ulong, ctypes.POINTER(IoVec), c_ulong, c_ulong]
_pvw = libc.process_vm_writev
_pvw.restype = ctypes.c_ssize_t
_pvw.argtypes = _pvr.argtypes

IOV_MAX = 1024


def iovecs(pairs: Sequence[Tuple[int, int]]):
    arr = (IoVec * max(1, len(pairs)))()
    for i, (base, n) in enumerate(pairs):
        arr[i].iov_base = base
        arr[i].iov_len = n
    return arr


def vm_readv(pid: int, local: Sequence[Tuple[int, int]], remote: Sequence[Tuple[int, int]]) -> int:
    """process_vm_readv: copy `remote` ranges of pid into `local` buffers
    (address, length pairs). Returns bytes copied (may be short: the kernel
    stops at the first inaccessible remote page)."""
    lv, rv = iovecs(local), iovecs(remote)
    r = _pvr(pid, lv, len(local), rv, len(remote), 0)
    if r < 0:
        raise SysError("process_vm_readv", ctypes.get_errno(), pid)
    return r


SMALL_READ = 4096
_small_buf = ctypes.create_string_buffer(SMALL_READ)
_small_addr = ctypes.addressof(_small_buf)
_small_local = IoVec(_small_addr, 0)
_small_remote = IoVec(0, 0)
_small_thread = _thread.get_ident()     # the buffer is this (the main) thread's


def vm_read_small(pid: int, addr: int, n: int) -> Optional[bytes]:
    """n <= SMALL_READ bytes of pid's memory at addr through one reused
    buffer and iovec pair (an injected call's out-parameter: fresh ctypes
    arrays cost more than the copy); None when not all of it could be
    read, or when called from another thread."""
    if _thread.get_ident() != _small_thread:
        return None
    _small_local.iov_len = n
    _small_remote.iov_base = addr
    _small_remote.iov_len = n
    if _pvr(pid, _small_local, 1, _small_remote, 1, 0) != n:
        return None
    return ctypes.string_at(_small_addr, n)


def vm_writev(pid: int, local: Sequence[Tuple[int, int]], remote: Sequence[Tuple[int, int]]) -> int:
    """process_vm_writev: the mirror of vm_readv."""
    lv, rv = iovecs(local), iovecs(remote)
    r = _pvw(pid, lv, len(local), rv, len(remote), 0)
    if r < 0:
        raise SysError("process_vm_writev", ctypes.get_errno(), pid)
    return r


def buffer_address(buf) -> int:
    """Address of a writable bytearray / ctypes buffer (for iovecs)."""
    if isinstance(buf, bytearray):
        if buf:
            # a c_char over its first byte: c_char * len(buf) would make a
            # ctypes type for every new length (~8 ms each under TCG)
            return ctypes.addressof(ctypes.c_char.from_buffer(buf))
        return ctypes.addressof((ctypes.c_char * 0).from_buffer(buf))
    return ctypes.addressof(buf)


# -- rlimits (prlimit(2) works on another process: no injection needed) ------

class RLimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]


_prlimit = libc.prlimit64
_prlimit.restype = ctypes.c_int
_prlimit.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(RLimit), ctypes.POINTER(RLimit)]

RLIMIT_NAMES = ["CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK",
                "AS", "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME"]


def get_rlimit(pid: int, res: int) -> Tuple[int, int]:
    old = RLimit()
    if _prlimit(pid, res, None, ctypes.byref(old)) != 0:
        raise SysError(f"prlimit({RLIMIT_NAMES[res]})", ctypes.get_errno(), pid)
    return old.cur, old.max


def set_rlimit(pid: int, res: int, cur: int, mx: int) -> None:
    new = RLimit(cur, mx)
    if _prlimit(pid, res, ctypes.byref(new), None) != 0:
        raise SysError(f"prlimit({RLIMIT_NAMES[res]})", ctypes.get_errno(), pid)


# -- executable memory in this process (the clone3 trampoline) ----------------

_mmap = libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20


def exec_page(code: bytes) -> int:
    """A private RX page in this process holding `code`; returns its address."""
    size = 4096
    addr = _mmap(None, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise SysError("mmap", ctypes.get_errno())
    ctypes.memmove(addr, code, len(code))
    if libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(size), PROT_READ | PROT_EXEC) != 0:
        raise SysError("mprotect", ctypes.get_errno())
    return addr
