"""pidfd_open(2) + pidfd_getfd(2) + kcmp(2) through ctypes.

``pidfd_getfd`` gives the engine a duplicate of one of the *target's* open
file descriptions (the same ``struct file``: shared offset, flags, owner,
buffered data). On that duplicate the engine can ask read-only questions
that /proc does not answer: FIONREAD, tee(2) of a pipe, MSG_PEEK on a
socket, getsockopt, timerfd_gettime, F_GETOWN/F_GETSIG, F_GETPIPE_SZ.
Anything that *changes* the file (a read, an lseek, F_SETFL) through the
duplicate changes it for the target too, so callers must not do that.

``kcmp(KCMP_FILE)`` tells whether two fds name the same open file
description, which is how dup'ed fds are found (kernel/kcmp.c).

Requires Linux 5.6 (pidfd_getfd) and CONFIG_KCMP (kcmp). All functions
raise :class:`engine.errors.EngineError` (with ``pid`` and ``errno``) on
failure; :class:`engine.errors.Refusal` ``kernel-missing`` when the kernel
lacks the syscall.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Iterator, Optional

from .errors import EngineError, Refusal

# Syscall numbers. pidfd_open/pidfd_getfd were added after the syscall tables
# were unified (asm-generic + x86 share 424+), so they are equal everywhere;
# the older ones differ per arch (arch/x86/entry/syscalls/syscall_64.tbl,
# include/uapi/asm-generic/unistd.h).
_SYSCALLS = {
    "x86_64": {"pidfd_open": 434, "pidfd_getfd": 438, "kcmp": 312,
               "open_by_handle_at": 304, "name_to_handle_at": 303, "epoll_ctl": 233,
               "fcntl": 72, "flock": 73, "dup3": 292, "close": 3},
    "aarch64": {"pidfd_open": 434, "pidfd_getfd": 438, "kcmp": 272,
                "open_by_handle_at": 265, "name_to_handle_at": 264, "epoll_ctl": 21,
                "fcntl": 25, "flock": 32, "dup3": 24, "close": 57},
}

KCMP_FILE = 0
KCMP_EPOLL_TFD = 7

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def syscall_nr(name: str) -> int:
    """The number of syscall `name` on this machine's architecture.

    Raises Refusal ``arch-mismatch`` on an architecture the engine has no
    table for."""
    from .arch import machine
    table = _SYSCALLS.get(machine())
    if table is None:
        raise Refusal("arch-mismatch", f"no syscall table for {os.uname().machine}")
    return table[name]


def raw_syscall(name: str, *args) -> int:
    """syscall(2) by name; returns the result or raises OSError(errno)."""
    ret = _libc.syscall(ctypes.c_long(syscall_nr(name)), *args)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _fail(what: str, e: OSError, pid: Optional[int]) -> EngineError:
    if e.errno == _errno.ENOSYS:
        return Refusal("kernel-missing", f"{what}: the kernel has no such syscall", pid=pid)
    return EngineError(f"{what}: {e.strerror}", pid=pid, errno=e.errno)


def pidfd_open(pid: int) -> int:
    """A pidfd for `pid` (close it yourself). Raises EngineError (ESRCH when
    the process is gone) or Refusal kernel-missing."""
    try:
        return raw_syscall("pidfd_open", ctypes.c_int(pid), ctypes.c_uint(0))
    except OSError as e:
        raise _fail(f"pidfd_open(pid {pid})", e, pid) from e


def pidfd_getfd(pidfd: int, targetfd: int, pid: Optional[int] = None) -> int:
    """A duplicate (O_CLOEXEC) of the target's fd `targetfd` in this process.

    Raises EngineError (EBADF: no such fd; EPERM: no ptrace access)."""
    try:
        return raw_syscall("pidfd_getfd", ctypes.c_int(pidfd), ctypes.c_int(targetfd), ctypes.c_uint(0))
    except OSError as e:
        raise _fail(f"pidfd_getfd(pid {pid}, fd {targetfd})", e, pid) from e


class target_fd:
    """``with target_fd(pid, fd) as dup:`` a duplicate of the target's open
    file description, closed on exit. Raises as :func:`pidfd_getfd`.
    (A class, not contextlib.contextmanager: contextlib costs every ckpt
    run ~0.5 ms to import.)"""

    def __init__(self, pid: int, fd: int):
        self.pid, self.fd = pid, fd

    def __enter__(self) -> int:
        pfd = pidfd_open(self.pid)
        try:
            self.dup = pidfd_getfd(pfd, self.fd, self.pid)
        finally:
            os.close(pfd)
        return self.dup

    def __exit__(self, *exc) -> None:
        os.close(self.dup)


def kcmp(pid1: int, pid2: int, kind: int, idx1: int, idx2: int) -> int:
    """kcmp(2): 0 equal, 1 less, 2 greater, 3 not equal (not ordered).

    Raises EngineError (EBADF: an fd does not exist) or Refusal
    kernel-missing (no CONFIG_KCMP)."""
    try:
        return raw_syscall("kcmp", ctypes.c_int(pid1), ctypes.c_int(pid2), ctypes.c_int(kind),
                           ctypes.c_ulong(idx1), ctypes.c_ulong(idx2))
    except OSError as e:
        raise _fail(f"kcmp(pid {pid1} fd {idx1}, pid {pid2} fd {idx2})", e, pid1) from e


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether the two fds share one open file description (dup'ed)."""
    return kcmp(pid1, pid2, KCMP_FILE, fd1, fd2) == 0


class _EpollSlot(ctypes.Structure):
    # struct kcmp_epoll_slot (include/uapi/linux/kcmp.h)
    _fields_ = [("efd", ctypes.c_uint32), ("tfd", ctypes.c_uint32), ("toff", ctypes.c_uint32)]


def epoll_target_is(pid: int, epfd: int, tfd: int, fd: int, toff: int = 0) -> bool:
    """Whether the file registered in `pid`'s epoll `epfd` under number `tfd`
    (the `toff`-th such registration) is the file `pid` holds at `fd`.

    kcmp(KCMP_EPOLL_TFD) compares pid1's fd idx1 with the epoll target
    slot given in idx2 (kernel/kcmp.c: kcmp_epoll_target). Returns False
    when there is no such registration (ENOENT)."""
    slot = _EpollSlot(epfd, tfd, toff)
    try:
        return raw_syscall("kcmp", ctypes.c_int(pid), ctypes.c_int(pid), ctypes.c_int(KCMP_EPOLL_TFD),
                           ctypes.c_ulong(fd), ctypes.c_void_p(ctypes.addressof(slot))) == 0
    except OSError as e:
        if e.errno == _errno.ENOENT:
            return False
        raise _fail(f"kcmp(EPOLL_TFD, pid {pid} epoll {epfd} tfd {tfd})", e, pid) from e
