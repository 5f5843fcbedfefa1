"""Raw ptrace(2) requests and wait-status decoding.

Each function is one request; failures raise :class:`engine.libc.SysError`
naming the request and the pid.
"""

from __future__ import annotations

import ctypes
import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Optional

from .libc import IoVec, SysError, libc

TRACEME = 0
PEEKDATA = 2
CONT = 7
KILL = 8
DETACH = 17
SYSCALL = 24
SETOPTIONS = 0x4200
GETSIGINFO = 0x4202
GETREGSET = 0x4204
SETREGSET = 0x4205
SEIZE = 0x4206
INTERRUPT = 0x4207
GETSIGMASK = 0x420A
SETSIGMASK = 0x420B
GET_RSEQ_CONFIGURATION = 0x420F

O_TRACESYSGOOD = 0x1
O_TRACECLONE = 0x8
O_EXITKILL = 0x100000
EVENT_STOP = 128
EVENT_CLONE = 3

_ptrace = libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

_NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int) and not k.startswith("O_")}


def request(req: int, pid: int, addr=None, data=None) -> int:
    """ptrace(req, pid, addr, data); raises SysError."""
    ctypes.set_errno(0)
    r = _ptrace(req, pid, addr, data)
    if r == -1:
        e = ctypes.get_errno()
        if e:
            raise SysError(f"ptrace({_NAMES.get(req, req)})", e, pid)
    return r


def seize(pid: int, options: int = O_TRACESYSGOOD) -> None:
    request(SEIZE, pid, None, options)


def interrupt(pid: int) -> None:
    request(INTERRUPT, pid)


def set_options(pid: int, options: int) -> None:
    request(SETOPTIONS, pid, None, options)


def cont(pid: int, sig: int = 0) -> None:
    request(CONT, pid, None, sig)


def syscall(pid: int, sig: int = 0) -> None:
    request(SYSCALL, pid, None, sig)


def detach(pid: int, sig: int = 0) -> None:
    request(DETACH, pid, None, sig)


def get_regset(pid: int, nt: int, buf) -> int:
    """Fill ctypes buffer `buf` with regset `nt`; returns the size the kernel wrote."""
    iov = IoVec(ctypes.addressof(buf), ctypes.sizeof(buf))
    request(GETREGSET, pid, nt, ctypes.addressof(iov))
    return iov.iov_len


def set_regset(pid: int, nt: int, buf, size: Optional[int] = None) -> None:
    iov = IoVec(ctypes.addressof(buf), ctypes.sizeof(buf) if size is None else size)
    request(SETREGSET, pid, nt, ctypes.addressof(iov))


def get_sigmask(pid: int) -> int:
    m = ctypes.c_uint64()
    request(GETSIGMASK, pid, 8, ctypes.addressof(m))
    return m.value


def set_sigmask(pid: int, mask: int) -> None:
    m = ctypes.c_uint64(mask)
    request(SETSIGMASK, pid, 8, ctypes.addressof(m))


class RseqConfig(ctypes.Structure):
    """struct ptrace_rseq_configuration (linux/ptrace.h)."""
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def get_rseq(pid: int) -> dict:
    """{pointer, size, signature, flags}; pointer 0 = no rseq registered."""
    c = RseqConfig()
    request(GET_RSEQ_CONFIGURATION, pid, ctypes.sizeof(c), ctypes.addressof(c))
    return {"pointer": c.rseq_abi_pointer, "size": c.rseq_abi_size,
            "signature": c.signature, "flags": c.flags}


# -- wait statuses -------------------------------------------------------------

class Stop:
    """A decoded waitpid status."""

    def __init__(self, status: int):
        self.status = status
        self.exited = os.WIFEXITED(status) or os.WIFSIGNALED(status)
        self.stopped = os.WIFSTOPPED(status)
        self.sig = os.WSTOPSIG(status) if self.stopped else 0
        self.event = (status >> 16) & 0xFF if self.stopped else 0

    @property
    def syscall_stop(self) -> bool:
        # PTRACE_O_TRACESYSGOOD marks syscall stops with SIGTRAP | 0x80.
        return self.stopped and self.sig == (5 | 0x80)

    @property
    def event_stop(self) -> bool:
        """PTRACE_EVENT_STOP: an interrupt or group stop of a seized task."""
        return self.stopped and self.event == EVENT_STOP

    @property
    def signal_stop(self) -> bool:
        """A signal-delivery stop: self.sig is about to be delivered."""
        return self.stopped and self.event == 0 and not self.syscall_stop

    def __repr__(self) -> str:
        if self.exited:
            return (f"exited({os.WEXITSTATUS(self.status)})" if os.WIFEXITED(self.status)
                    else f"killed(sig {os.WTERMSIG(self.status)})")
        return f"stopped(sig {self.sig}, event {self.event})"


def wait(pid: int) -> Stop:
    """waitpid(pid, __WALL), retried on EINTR; raises SysError."""
    try:
        _, status = os.waitpid(pid, os.__dict__.get("__WALL", 0x40000000))
    except ChildProcessError as e:
        raise SysError("waitpid", e.errno, pid) from None
    return Stop(status)


def wait_nohang(pid: int) -> Optional[Stop]:
    try:
        p, status = os.waitpid(pid, 0x40000000 | os.WNOHANG)
    except ChildProcessError:
        return None
    return Stop(status) if p else None
