"""ctypes wrappers the fd handlers share (Python 3.9 has no os.eventfd,
os.tee, os.timerfd_*, signalfd or inotify). Each raises OSError(errno)
like the os module does; callers translate it at their boundary."""

from __future__ import annotations

import ctypes
import os
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Iterable, List, Tuple

_libc = ctypes.CDLL(None, use_errno=True)

F_SETPIPE_SZ = 1031      # include/uapi/linux/fcntl.h (F_LINUX_SPECIFIC_BASE + 7)
F_GETPIPE_SZ = 1032
F_NOTIFY = 1026
F_GETSIG = 11
FIONREAD = 0x541B
SPLICE_F_NONBLOCK = 0x02

TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2
EFD_SEMAPHORE = 1


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def kdev_to_dev(kdev: int) -> int:
    """The kernel's internal dev_t (MAJOR << 20 | MINOR, include/linux/kdev_t.h),
    as printed in fdinfo "sdev:", to the userspace st_dev encoding."""
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)


def tee(fd_in: int, fd_out: int, length: int, flags: int = SPLICE_F_NONBLOCK) -> int:
    """tee(2): duplicate up to `length` bytes of pipe `fd_in` into pipe
    `fd_out` WITHOUT consuming them from fd_in."""
    _libc.tee.restype = ctypes.c_ssize_t
    return _check(_libc.tee(ctypes.c_int(fd_in), ctypes.c_int(fd_out), ctypes.c_size_t(length),
                            ctypes.c_uint(flags)))


def fionread(fd: int) -> int:
    """Bytes queued for reading (pipe buffer, inotify queue, socket queue)."""
    import fcntl
    buf = fcntl.ioctl(fd, FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def eventfd(initval: int, flags: int) -> int:
    return _check(_libc.eventfd(ctypes.c_uint(initval), ctypes.c_int(flags)))


def signalfd(sigmask: int, flags: int) -> int:
    """signalfd(-1, mask, flags) for a 64-bit kernel sigset (bit n-1 = signal n).
    glibc's sigset_t is 1024 bits; only the first 64 matter to the kernel."""
    mask = (ctypes.c_uint64 * 16)()
    mask[0] = sigmask
    return _check(_libc.signalfd(ctypes.c_int(-1), mask, ctypes.c_int(flags)))


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]


def _ns(ts: Timespec) -> int:
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def _ts(ns: int) -> Timespec:
    return Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


def timerfd_create(clockid: int, flags: int) -> int:
    return _check(_libc.timerfd_create(ctypes.c_int(clockid), ctypes.c_int(flags)))


def timerfd_gettime(fd: int) -> Tuple[int, int]:
    """(remaining ns, interval ns) of a timerfd; remaining 0 = disarmed."""
    cur = Itimerspec()
    _check(_libc.timerfd_gettime(ctypes.c_int(fd), ctypes.byref(cur)))
    return _ns(cur.it_value), _ns(cur.it_interval)


def timerfd_settime(fd: int, flags: int, value_ns: int, interval_ns: int) -> None:
    new = Itimerspec(_ts(interval_ns), _ts(value_ns))
    _check(_libc.timerfd_settime(ctypes.c_int(fd), ctypes.c_int(flags), ctypes.byref(new), None))


def clock_gettime_ns(clockid: int) -> int:
    ts = Timespec()
    _check(_libc.clock_gettime(ctypes.c_int(clockid), ctypes.byref(ts)))
    return _ns(ts)


def inotify_init1(flags: int) -> int:
    return _check(_libc.inotify_init1(ctypes.c_int(flags)))


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(ctypes.c_int(fd), os.fsencode(path), ctypes.c_uint32(mask)))


def inotify_rm_watch(fd: int, wd: int) -> None:
    _check(_libc.inotify_rm_watch(ctypes.c_int(fd), ctypes.c_int(wd)))


def inotify_events(data: bytes) -> List[Tuple[int, int, int, bytes]]:
    """Parse struct inotify_event records: [(wd, mask, cookie, name)]."""
    out = []
    off = 0
    while off + 16 <= len(data):
        wd, mask, cookie, length = struct.unpack_from("iIII", data, off)
        name = data[off + 16:off + 16 + length].rstrip(b"\0")
        out.append((wd, mask, cookie, name))
        off += 16 + length
    return out


def epoll_create1(flags: int) -> int:
    return _check(_libc.epoll_create1(ctypes.c_int(flags)))


def epoll_event_bytes(events: int, data: int) -> bytes:
    """struct epoll_event as the kernel reads it: packed (12 bytes) on x86_64
    (include/uapi/linux/eventpoll.h: EPOLL_PACKED), naturally aligned (16)
    elsewhere."""
    if os.uname().machine == "x86_64":
        return struct.pack("=IQ", events, data)
    return struct.pack("IxxxxQ", events, data)


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2); needs CAP_DAC_READ_SEARCH."""
    from ..pidfd import raw_syscall
    fh = FileHandle()
    fh.handle_bytes = len(handle)
    fh.handle_type = handle_type
    ctypes.memmove(fh.f_handle, handle, len(handle))
    return raw_syscall("open_by_handle_at", ctypes.c_int(mount_fd), ctypes.byref(fh), ctypes.c_int(flags))


AT_EMPTY_PATH = 0x1000


def name_to_handle_at(dirfd: int, path: str, flags: int = 0) -> Tuple[int, bytes]:
    """name_to_handle_at(2): (handle_type, handle bytes) of the inode at
    path (not following a final symlink). The handle holds the inode's
    generation on ext4/tmpfs/xfs..., so unlike (dev, ino) it tells a new
    file that reused an inode number from the old one."""
    from ..pidfd import raw_syscall
    fh = FileHandle()
    fh.handle_bytes = 128
    mnt = ctypes.c_int()
    raw_syscall("name_to_handle_at", ctypes.c_int(dirfd), os.fsencode(path), ctypes.byref(fh),
                ctypes.byref(mnt), ctypes.c_int(flags))
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# fcntl(F_SETFL) can change only these (fs/fcntl.c: SETFL_MASK).
SETFL_MASK = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME | getattr(os, "O_ASYNC", 0o20000)
O_ASYNC = getattr(os, "O_ASYNC", 0o20000)


def set_status_flags(fd: int, flags: int) -> None:
    """Make fd's F_GETFL status flags those of `flags` (masked to SETFL_MASK).
    O_ASYNC is never set here: it needs the F_SETOWN owner, which handlers
    refuse instead."""
    import fcntl
    cur = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = (cur & ~SETFL_MASK) | (flags & SETFL_MASK & ~O_ASYNC)
    if want != cur:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)


def has_capability(bit: int) -> bool:
    """Whether this process has capability number `bit` in its effective set."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


CAP_SYS_RESOURCE = 24
