"""Thin ctypes bindings the workload needs and the stdlib lacks (Python 3.9).

Runs in the guest (stdlib only). Each wrapper raises OSError(errno) like the
os module does, so callers handle failures one way.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

TYPE_CHECKING = False   # annotations only: typing is an import the exec'd workload never needs
if TYPE_CHECKING:
    from typing import Iterable, Optional, Tuple

# glibc's soname on every Linux the guests run (Debian, x86_64 and aarch64):
# ctypes.util.find_library("c") gives the same name, but only after importing
# subprocess and shutil and running ldconfig -p (~5 ms a workload start on the
# host, ten times that under TCG)
LIBC = "libc.so.6"
_libc = ctypes.CDLL(LIBC, use_errno=True)
# The same libc, called with the GIL held: a raw clone() must not run while
# another thread could take the GIL (the child would inherit it taken).
_pylibc = ctypes.PyDLL(LIBC, use_errno=True)

# <sys/inotify.h>
IN_FLAGS = {
    "IN_ACCESS": 0x1, "IN_MODIFY": 0x2, "IN_ATTRIB": 0x4, "IN_CLOSE_WRITE": 0x8,
    "IN_CLOSE_NOWRITE": 0x10, "IN_OPEN": 0x20, "IN_MOVED_FROM": 0x40,
    "IN_MOVED_TO": 0x80, "IN_CREATE": 0x100, "IN_DELETE": 0x200,
    "IN_DELETE_SELF": 0x400, "IN_MOVE_SELF": 0x800, "IN_ONLYDIR": 0x01000000,
    "IN_DONT_FOLLOW": 0x02000000, "IN_EXCL_UNLINK": 0x04000000,
    "IN_ONESHOT": 0x80000000,
}
IN_MASK_ADD = 0x20000000
IN_IGNORED = 0x8000
# <fcntl.h> dnotify (fcntl(2) F_NOTIFY); F_NOTIFY = F_LINUX_SPECIFIC_BASE + 2
F_NOTIFY = 1026
DN_FLAGS = {"DN_ACCESS": 0x1, "DN_MODIFY": 0x2, "DN_CREATE": 0x4, "DN_DELETE": 0x8,
            "DN_RENAME": 0x10, "DN_ATTRIB": 0x20, "DN_MULTISHOT": 0x80000000}
# <sys/fanotify.h>
FAN_FLAGS = {"FAN_ACCESS": 0x1, "FAN_MODIFY": 0x2, "FAN_CLOSE_WRITE": 0x8,
             "FAN_CLOSE_NOWRITE": 0x10, "FAN_OPEN": 0x20}
FAN_CLASS_NOTIF = 0x0
FAN_NONBLOCK = 0x2
FAN_MARK_ADD = 0x1
AT_FDCWD = -100
# eventfd / timerfd / signalfd flags share O_NONBLOCK / O_CLOEXEC values
EFD_SEMAPHORE = 1
CLOCKS = {"realtime": 0, "monotonic": 1, "boottime": 7}


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def inotify_init1(flags: int) -> int:
    return _check(_libc.inotify_init1(flags))


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(fd, os.fsencode(path), ctypes.c_uint32(mask)))


def inotify_rm_watch(fd: int, wd: int) -> None:
    _check(_libc.inotify_rm_watch(fd, wd))


def parse_inotify_events(buf: bytes) -> list:
    """``[(wd, mask, cookie, name)]`` from a read(2) of an inotify fd (inotify(7))."""
    out, off = [], 0
    while off + 16 <= len(buf):
        wd, mask, cookie, n = struct.unpack_from("iIII", buf, off)
        name = buf[off + 16:off + 16 + n].rstrip(b"\0").decode(errors="replace")
        out.append((wd, mask, cookie, name))
        off += 16 + n
    return out


def eventfd(initval: int, flags: int) -> int:
    return _check(_libc.eventfd(ctypes.c_uint(initval), flags))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _ts(ms: int) -> _Timespec:
    return _Timespec(ms // 1000, (ms % 1000) * 1000000)


def timerfd_create(clock: int, flags: int) -> int:
    return _check(_libc.timerfd_create(clock, flags))


def timerfd_settime(fd: int, value_ms: int, interval_ms: int) -> None:
    spec = _Itimerspec(_ts(interval_ms), _ts(value_ms))
    _check(_libc.timerfd_settime(fd, 0, ctypes.byref(spec), None))


def timerfd_gettime(fd: int) -> Tuple[float, float]:
    """``(remaining_s, interval_s)`` of a timerfd (timerfd_gettime(2))."""
    cur = _Itimerspec()
    _check(_libc.timerfd_gettime(fd, ctypes.byref(cur)))
    v, i = cur.it_value, cur.it_interval
    return v.tv_sec + v.tv_nsec / 1e9, i.tv_sec + i.tv_nsec / 1e9


def _sigset(signals: Iterable[int]):
    """A glibc sigset_t (1024 bits) with ``signals`` set."""
    words = (ctypes.c_ulong * 16)()
    for s in signals:
        words[(s - 1) // 64] |= 1 << ((s - 1) % 64)
    return words


def signalfd(signals: Iterable[int], flags: int) -> int:
    return _check(_libc.signalfd(-1, ctypes.byref(_sigset(signals)), flags))


def fanotify_init(flags: int, event_f_flags: int) -> int:
    return _check(_libc.fanotify_init(ctypes.c_uint(flags), ctypes.c_uint(event_f_flags)))


def fanotify_mark(fd: int, flags: int, mask: int, path: str) -> None:
    _libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                    ctypes.c_int, ctypes.c_char_p]
    _check(_libc.fanotify_mark(fd, flags, mask, AT_FDCWD, os.fsencode(path)))


_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
MAP_FAILED = ctypes.c_void_p(-1).value


#: madvise(2) advice a mapping keeps (smaps VmFlags dc, dd, wf, hg, nh): workload.mmaps advise
MADVISE = {"dontfork": 10, "dontdump": 16, "wipeonfork": 18, "hugepage": 14, "nohugepage": 15}


def madvise(addr: int, length: int, advice: int) -> None:
    _check(_libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(advice)))


def mmap(length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """Raw mmap(2): Python's mmap module dup()s the fd, which would add an fd
    the scenario did not ask for."""
    addr = _libc.mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return addr


_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
MREMAP_MAYMOVE, MREMAP_FIXED, MAP_FIXED = 1, 2, 0x10


def mmap_apart(length: int) -> Tuple[int, int]:
    """Private anonymous read-write memory of ``length`` bytes (an even
    number of pages) as two halves the kernel keeps apart though they are
    alike in all /proc/PID/maps shows: the second half is written elsewhere
    first and moved (mremap) beside the first, so each has an anon_vma of
    its own and mm/vma.c refuses to merge them (as it refuses a forked
    child's inherited mapping and one the child makes beside it). An
    inaccessible page on either side keeps other mappings off them, and
    keeps an mremap growing them in place from succeeding. (address, length)."""
    page = os.sysconf("SC_PAGE_SIZE")
    half = length // 2
    if length <= 0 or length % (2 * page):
        raise ValueError(f"{length} bytes do not make two halves of whole pages")
    room = mmap(length + 2 * page, 0, 0x22, -1, 0)         # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS
    lo = room + page
    got = _libc.mmap(lo, half, 3, 0x22 | MAP_FIXED, -1, 0)
    if got != lo:
        raise OSError(ctypes.get_errno(), f"mmap at {lo:#x}: {os.strerror(ctypes.get_errno())}")
    ctypes.memset(lo, 0x5A, half)                           # its anon_vma
    other = mmap(half, 3, 0x22, -1, 0)
    ctypes.memset(other, 0xA5, half)                        # another anon_vma
    got = _libc.mremap(other, half, half, MREMAP_MAYMOVE | MREMAP_FIXED, ctypes.c_void_p(lo + half))
    if got != lo + half:
        raise OSError(ctypes.get_errno(), f"mremap to {lo + half:#x}: {os.strerror(ctypes.get_errno())}")
    return lo, length


def mprotect(addr: int, length: int, prot: int) -> None:
    _check(_libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(prot)))


def mremap_twice(addr: int, length: int) -> int:
    """mremap(addr, 0, length, MREMAP_MAYMOVE): the same shared pages mapped
    a second time, wherever the kernel puts them; that address."""
    got = _libc.mremap(addr, 0, length, MREMAP_MAYMOVE, None)
    if got in (None, MAP_FAILED):
        e = ctypes.get_errno()
        raise OSError(e, f"mremap(old_size 0): {os.strerror(e)}")
    return got


def mremap_errno(addr: int, old: int, new: int) -> int:
    """mremap(2) of [addr, addr+old) to ``new`` bytes in place: 0 if it
    succeeded, else its errno (EFAULT: the range is not one mapping)."""
    got = _libc.mremap(addr, old, new, 0, None)
    return ctypes.get_errno() if got in (None, MAP_FAILED) else 0


# System V shared memory (a workload's `sysv` mapping; engine/sysvshm.py)
IPC_PRIVATE, IPC_CREAT, IPC_RMID, IPC_STAT = 0, 0o1000, 0, 2
SHM_DEST = 0o1000


def shm_attach(length: int) -> Tuple[int, int]:
    """A new IPC_PRIVATE segment of `length` bytes attached read-write:
    (shmid, address)."""
    _libc.shmat.restype = ctypes.c_void_p
    shmid = _check(_libc.shmget(ctypes.c_int(IPC_PRIVATE), ctypes.c_size_t(length), ctypes.c_int(IPC_CREAT | 0o600)))
    addr = _libc.shmat(ctypes.c_int(shmid), None, ctypes.c_int(0))
    if addr is None or addr == MAP_FAILED:
        e = ctypes.get_errno()
        _libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(IPC_RMID), None)
        raise OSError(e, os.strerror(e))
    return shmid, addr


def shm_remove(shmid: int) -> None:
    _check(_libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(IPC_RMID), None))


def shm_stat(shmid: int) -> Optional[dict]:
    """shmctl(IPC_STAT): key, mode, size, nattch (glibc's struct shmid_ds on
    x86_64 and aarch64; mode read as a u32: a u16 and its zero padding on
    x86_64); None: no such segment."""
    buf = ctypes.create_string_buffer(256)
    if _libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(IPC_STAT), buf) != 0:
        return None
    key, mode = struct.unpack_from("<i16xI", buf, 0)
    size, nattch = struct.unpack_from("<Q32xQ", buf, 48)
    return {"key": key, "mode": mode & 0o7777, "size": size, "nattch": nattch}


def peek(addr: int, length: int) -> bytes:
    return ctypes.string_at(addr, length)


def poke(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, data, len(data))


def names_to_mask(names: Iterable[str], table: dict) -> int:
    mask = 0
    for n in names:
        mask |= table[n]
    return mask


# -- epoll with explicit data (select.epoll only ever stores the fd number) ---------------

EPOLL_CTL_ADD = 1
# struct epoll_event is packed on x86 only (<sys/epoll.h> __EPOLL_PACKED)
_EPOLL_PACKED = os.uname().machine in ("x86_64", "i386", "i686")


class _EpollEvent(ctypes.Structure):
    if _EPOLL_PACKED:
        _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


def epoll_ctl_add(epfd: int, fd: int, events: int, data: int) -> None:
    ev = _EpollEvent(events, data)
    _check(_libc.epoll_ctl(epfd, EPOLL_CTL_ADD, fd, ctypes.byref(ev)))


def epoll_wait_now(epfd: int, max_events: int = 64) -> list:
    """``[(data, events)]`` ready now (timeout 0)."""
    evs = (_EpollEvent * max_events)()
    n = _check(_libc.epoll_wait(epfd, evs, max_events, 0))
    return [(evs[i].data, evs[i].events) for i in range(n)]


# -- memfd seals (fcntl(2)) --------------------------------------------------------------

MFD_ALLOW_SEALING = 0x2
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
SEALS = {"F_SEAL_SEAL": 0x1, "F_SEAL_SHRINK": 0x2, "F_SEAL_GROW": 0x4, "F_SEAL_WRITE": 0x8,
         "F_SEAL_FUTURE_WRITE": 0x10}


# -- signals: sigaction with flags and mask, sigqueue, sigtimedwait with the value ----------

SA_FLAGS = {"SA_NOCLDSTOP": 0x1, "SA_NOCLDWAIT": 0x2, "SA_SIGINFO": 0x4, "SA_ONSTACK": 0x08000000,
            "SA_RESTART": 0x10000000, "SA_NODEFER": 0x40000000, "SA_RESETHAND": 0x80000000}
SA_RESTORER = 0x04000000


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction (handler, 1024-bit mask, flags, restorer)."""
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


def sigset_bits(signals: Iterable[int]) -> int:
    """Bit ``s - 1`` per signal (the kernel's sigset_t, as /proc/PID/status shows it)."""
    bits = 0
    for s in signals:
        bits |= 1 << (s - 1)
    return bits


def sigaction_set(sig: int, handler: int, flags: int, mask: Iterable[int]) -> None:
    act = _Sigaction()
    act.handler = handler
    act.mask = _sigset(mask)
    act.flags = flags
    _check(_libc.sigaction(sig, ctypes.byref(act), None))


def sigaction_get(sig: int) -> dict:
    """``{handler, flags, mask}`` of ``sig`` now; the mask as 64 bits (signals 1..64)."""
    old = _Sigaction()
    _check(_libc.sigaction(sig, None, ctypes.byref(old)))
    return {"handler": old.handler or 0, "flags": old.flags & 0xffffffff, "mask": old.mask[0]}


def libc_address(name: str) -> int:
    """The address of a libc function (a handler that stays put across a restore)."""
    return ctypes.cast(getattr(_libc, name), ctypes.c_void_p).value


def sigqueue(pid: int, sig: int, value: int) -> None:
    # union sigval is 8 bytes of INTEGER class: passed like a pointer (and
    # ctypes passes unions by value unreliably), so pass it as one
    _libc.sigqueue.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    _check(_libc.sigqueue(pid, sig, value))


def sigtimedwait_now(signals: Iterable[int]) -> Tuple[int, int, int]:
    """Take one pending signal out of ``signals`` without waiting:
    ``(signo, si_code, si_value)``, or ``(0, 0, 0)`` if none is pending.
    siginfo_t (asm-generic/siginfo.h): signo, errno, code, then (64-bit) the
    union at offset 16: _rt {pid, uid, sigval} puts sigval at 24."""
    info = (ctypes.c_char * 128)()
    zero = _Timespec(0, 0)
    ret = _libc.sigtimedwait(ctypes.byref(_sigset(signals)), info, ctypes.byref(zero))
    if ret < 0:
        e = ctypes.get_errno()
        if e == 11:       # EAGAIN: nothing pending
            return 0, 0, 0
        raise OSError(e, os.strerror(e))
    raw = bytes(info)
    signo, _errno, code = struct.unpack_from("iii", raw, 0)
    (value,) = struct.unpack_from("Q", raw, 24 if ctypes.sizeof(ctypes.c_void_p) == 8 else 20)
    return signo, code, value


# clone(2) and kcmp(2) numbers; clone's flags come first on both
_SYS = {"x86_64": {"clone": 56, "kcmp": 312, "unshare": 272, "set_mempolicy": 238, "get_mempolicy": 239,
                   "membarrier": 324},
        "aarch64": {"clone": 220, "kcmp": 272, "unshare": 97, "set_mempolicy": 237, "get_mempolicy": 236,
                    "membarrier": 283}}
CLONE_FS, CLONE_FILES = 0x200, 0x400
KCMP_FILES, KCMP_FS = 2, 3


def clone_process(flags: int) -> int:
    """A fork made by clone(flags | SIGCHLD) with no new stack (so without
    CLONE_VM): CLONE_FILES / CLONE_FS share the fd table / fs with the
    child. Python's after-fork hooks do not run: the child must stay simple
    (no threads, no imports). Returns the child's pid, 0 in the child."""
    nr = _SYS[os.uname().machine]["clone"]
    return _check(_pylibc.syscall(ctypes.c_long(nr), ctypes.c_ulong(flags | 17), ctypes.c_ulong(0),
                                  ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)))


def kcmp(pid1: int, pid2: int, kind: int) -> int:
    """kcmp(2) of two processes' objects: 0 when they share it."""
    nr = _SYS[os.uname().machine]["kcmp"]
    return _check(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(pid1), ctypes.c_int(pid2), ctypes.c_int(kind),
                                ctypes.c_ulong(0), ctypes.c_ulong(0)))


def unshare(flags: int) -> None:
    """unshare(2) (os.unshare is Python 3.12)."""
    _check(_libc.syscall(ctypes.c_long(_SYS[os.uname().machine]["unshare"]), ctypes.c_ulong(flags)))


# -- process attributes (workload.process.attrs) -------------------------------
PR = {"get_dumpable": 3, "set_dumpable": 4, "get_keepcaps": 7, "set_keepcaps": 8, "mce_kill": 33,
      "mce_kill_get": 34, "set_child_subreaper": 36, "get_child_subreaper": 37, "set_thp_disable": 41,
      "get_thp_disable": 42, "set_timerslack": 29, "get_timerslack": 30, "set_no_new_privs": 38,
      "get_no_new_privs": 39, "get_tid_address": 40,
      "set_io_flusher": 57}
IOPRIO_NR = {"x86_64": (251, 252), "aarch64": (30, 31)}     # (ioprio_set, ioprio_get)
IOPRIO_CLASSES = {"none": 0, "realtime": 1, "best-effort": 2, "idle": 3}


def prctl(option: str, arg2: int = 0, arg3: int = 0) -> int:
    return _check(_libc.prctl(PR[option], ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0))


def raw_read(fd: int, n: int) -> str:
    """One read(2), not retried on EINTR (os.read retries it): the bytes
    read as text, or "errno N (NAME)"."""
    buf = ctypes.create_string_buffer(n)
    got = _libc.read(ctypes.c_int(fd), buf, ctypes.c_size_t(n))
    if got < 0:
        e = ctypes.get_errno()
        return f"errno {e} ({errno.errorcode.get(e, '?')})"
    return buf.raw[:got].decode(errors="replace")


# harness/regprobe.S, assembled (gcc -c; objcopy -O binary -j .text; tests/test_harness_regprobe.py
# assembles it again and compares): long probe(int fd, void *buf, long n, unsigned long out[2])
REGPROBE_X86_64 = bytes.fromhex(
    "535541544155415641575148bb111111111111111148bd222222222222222249bc333333333333333349bd4444444444"
    "44444449be555555555555555549bf666666666666666649b8777777777777777749b9888888888888888849ba999999"
    "9999999999f3440f6f05f200000031c00f0531c949bb11111111111111114c39db740383c90149bb2222222222222222"
    "4c39dd740383c90249bb33333333333333334d39dc740383c90449bb44444444444444444d39dd740383c90849bb5555"
    "5555555555554d39de740383c91049bb66666666666666664d39df740383c92049bb77777777777777774d39d8740383"
    "c94049bb88888888888888884d39d9740681c98000000049bb99999999999999994d39da740681c900010000664c0f7e"
    "c2483b1538000000740681c90002000066450f70c04e664c0f7ec2483b1526000000740681c9000400005a4889024889"
    "4a08415f415e415d415c5d5bc30f1f00aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbb")
#: what each bit of the probe's mask names (a register that came back changed from its read(2))
REGPROBE_BITS = ("rbx", "rbp", "r12", "r13", "r14", "r15", "r8", "r9", "r10", "xmm8 low", "xmm8 high")
_REGPROBE: list = []


def reg_probe_read(fd: int, n: int) -> str:
    """One read(2) made by machine code that holds known values in nine
    general-purpose registers and xmm8 across the call (the kernel keeps
    all of them but rax, rcx and r11) and compares them after it: the
    bytes read as text, or what went wrong - an errno (an EINTR a restore
    handed it) or the registers that came back changed. x86_64 only
    (elsewhere: raw_read)."""
    if os.uname().machine != "x86_64":
        return raw_read(fd, n)
    if not _REGPROBE:
        size = len(REGPROBE_X86_64)
        addr = mmap(4096, 3, 0x22, -1, 0)                   # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
        poke(addr, REGPROBE_X86_64)
        _check(_libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(4096), 5))   # PROT_READ|EXEC
        assert size <= 4096
        _REGPROBE.append(ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                                          ctypes.c_void_p)(addr))
    buf = ctypes.create_string_buffer(n)
    out = (ctypes.c_uint64 * 2)()
    _REGPROBE[0](fd, buf, n, out)
    ret, mask = ctypes.c_int64(out[0]).value, out[1]
    if mask:
        return "registers changed: " + ", ".join(b for i, b in enumerate(REGPROBE_BITS) if mask >> i & 1)
    if ret < 0:
        return f"errno {-ret} ({errno.errorcode.get(-ret, '?')})"
    return buf.raw[:ret].decode(errors="replace")


def personality(persona: int = 0xffffffff) -> int:
    """personality(2): set `persona`, or (0xffffffff) only read; the previous one."""
    return _check(_libc.personality(ctypes.c_ulong(persona)))


def tid_address() -> int:
    """PR_GET_TID_ADDRESS: the calling thread's clear_child_tid (what the
    kernel zeroes and wakes when the thread exits: pthread_join waits on it)."""
    v = ctypes.c_void_p(0)
    _check(_libc.prctl(PR["get_tid_address"], ctypes.byref(v), 0, 0, 0))
    return v.value or 0


def seccomp_allow_all() -> None:
    """Install a seccomp filter that allows every call (one BPF_RET
    SECCOMP_RET_ALLOW): the process shows Seccomp 2 and one filter, as a
    sandboxed service does, and nothing it does changes."""
    insn = struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)       # BPF_RET|BPF_K, SECCOMP_RET_ALLOW
    buf = ctypes.create_string_buffer(insn)
    prog = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(buf))  # struct sock_fprog {len; filter*}
    pbuf = ctypes.create_string_buffer(prog)
    _check(_libc.prctl(22, 2, pbuf, 0, 0))                      # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def child_subreaper() -> int:
    v = ctypes.c_int(-1)
    _check(_libc.prctl(PR["get_child_subreaper"], ctypes.byref(v), 0, 0, 0))
    return v.value


MPOL = {"preferred": 1, "bind": 2, "interleave": 3, "local": 4}


def set_mempolicy(mode: int, nodes: int) -> None:
    """set_mempolicy(2); nodes a bit mask (set_mempolicy reads maxnode - 1 bits)."""
    mask = ctypes.c_ulong(nodes)
    _check(_libc.syscall(ctypes.c_long(_SYS[os.uname().machine]["set_mempolicy"]), ctypes.c_long(mode),
                         ctypes.byref(mask) if nodes else None, ctypes.c_ulong(65 if nodes else 0)))


def membarrier_private_expedited(register: bool = False) -> int:
    """membarrier(2) MEMBARRIER_CMD_PRIVATE_EXPEDITED (or its registration):
    0, or the errno (EPERM: not registered)."""
    cmd = 1 << 4 if register else 1 << 3
    r = _libc.syscall(ctypes.c_long(_SYS[os.uname().machine]["membarrier"]), ctypes.c_long(cmd), 0, 0)
    return 0 if r == 0 else ctypes.get_errno()


def get_mempolicy() -> tuple:
    """(mode with its flags, node mask of the first 1024 nodes) of this thread."""
    mode, mask = ctypes.c_int(-1), (ctypes.c_ulong * 16)()
    _check(_libc.syscall(ctypes.c_long(_SYS[os.uname().machine]["get_mempolicy"]), ctypes.byref(mode), mask,
                         ctypes.c_ulong(1024), None, ctypes.c_ulong(0)))
    return mode.value, sum(w << (64 * i) for i, w in enumerate(mask))


def ioprio_get(tid: int = 0) -> int:
    return _check(_libc.syscall(IOPRIO_NR[os.uname().machine][1], 1, tid))


def ioprio_set(value: int, tid: int = 0) -> None:
    _check(_libc.syscall(IOPRIO_NR[os.uname().machine][0], 1, tid, value))



# POSIX timers (timer_create(2); in libc since glibc 2.34). struct sigevent is
# 64 bytes: sigev_value, sigev_signo, sigev_notify, then the notify union.
SIGEV_SIGNAL, SIGEV_NONE = 0, 1


def timer_create(clock: int, signo: int, value: int) -> int:
    """A process timer notifying by ``signo`` (0: none, SIGEV_NONE); its
    timer_t (glibc: the kernel's timer ID)."""
    ev = struct.pack("<qii", value, signo, SIGEV_SIGNAL if signo else SIGEV_NONE).ljust(64, b"\0")
    tid = ctypes.c_void_p()
    _check(_libc.timer_create(ctypes.c_int(clock), ctypes.c_char_p(ev), ctypes.byref(tid)))
    return tid.value or 0


def timer_settime(timer: int, value_ms: int, interval_ms: int) -> None:
    spec = struct.pack("<qqqq", interval_ms // 1000, interval_ms % 1000 * 1000000,
                       value_ms // 1000, value_ms % 1000 * 1000000)
    _check(_libc.timer_settime(ctypes.c_void_p(timer), 0, ctypes.c_char_p(spec), None))


def timer_gettime(timer: int) -> Tuple[float, float]:
    """(remaining, interval) in seconds."""
    buf = ctypes.create_string_buffer(32)
    _check(_libc.timer_gettime(ctypes.c_void_p(timer), buf))
    isec, insec, vsec, vnsec = struct.unpack("<qqqq", buf.raw)
    return vsec + vnsec / 1e9, isec + insec / 1e9


def prctl_set_name(name: str) -> None:
    """prctl(PR_SET_NAME): the calling thread's name (comm, 15 bytes)."""
    _check(_libc.prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0))


#: glibc's RSEQ_SIG, the signature its rseq(2) registration uses
RSEQ_SIG = {"x86_64": 0x53053053, "aarch64": 0xd428bc00}
RSEQ_NR = {"x86_64": 334, "aarch64": 293}
EBUSY = 16


def rseq_probe(addr: int, length: int) -> int:
    """rseq(2) registering (addr, length) with glibc's signature for the
    calling thread: 0 (it was not registered: now it is), or the errno -
    EBUSY when exactly that is registered, EINVAL when another area is."""
    machine = os.uname().machine
    r = _libc.syscall(ctypes.c_long(RSEQ_NR[machine]), ctypes.c_void_p(addr), ctypes.c_uint(length),
                      ctypes.c_int(0), ctypes.c_uint(RSEQ_SIG[machine]))
    return 0 if r == 0 else ctypes.get_errno()


def rseq_area() -> "Optional[Tuple[int, int]]":
    """(address, length) of the calling thread's rseq registration, found by
    asking the kernel (rseq_probe answers EBUSY only for the registered
    one); (0, 0) when glibc registers none (before 2.35, or told not to);
    None when registered where this does not look. Call it only while the
    thread is registered: a probe of an unregistered thread registers it."""
    try:
        size = ctypes.c_uint.in_dll(_libc, "__rseq_size").value
        offset = ctypes.c_ssize_t.in_dll(_libc, "__rseq_offset").value
    except ValueError:      # a glibc before 2.35: no registration
        return (0, 0)
    if not size or os.uname().machine not in RSEQ_NR:
        return (0, 0)
    _libc.pthread_self.restype = ctypes.c_void_p
    me = _libc.pthread_self()
    # the thread pointer is pthread_self on x86_64; elsewhere the area lies
    # inside struct pthread, which starts at pthread_self
    cands = [me + offset] + [me + 32 * k for k in range(256)]
    for n in sorted({32, size, (size + 31) // 32 * 32}):
        for addr in cands:
            if rseq_probe(addr, n) == EBUSY:
                return (addr, n)
    return None


def rseq_still(area: "Optional[Tuple[int, int]]") -> str:
    """What became of the calling thread's registration `area` (from
    rseq_area, before the dump): "registered", "none" (there was none),
    "unknown", or what went wrong - the probe registers an unregistered
    thread, so call it once, at the end."""
    if area is None:
        return "unknown"
    if not area[0]:
        return "none"
    err = rseq_probe(*area)
    return {EBUSY: "registered", 0: "not registered (this check registered it)"}.get(
        err, f"another area registered (errno {err})")


# sigaltstack(2): stack_t {void *ss_sp; int ss_flags; size_t ss_size} (24 bytes on 64-bit)
_STACK_T = struct.Struct("PiP")


def sigaltstack_set(addr: int, size: int) -> None:
    _check(_libc.sigaltstack(ctypes.c_char_p(_STACK_T.pack(addr, 0, size)), None))


def sigaltstack_get() -> Tuple[int, int, int]:
    """(ss_sp, ss_flags, ss_size) of the calling thread's alternate stack."""
    buf = ctypes.create_string_buffer(_STACK_T.size)
    _check(_libc.sigaltstack(None, buf))
    return _STACK_T.unpack(buf.raw)
