"""EFD_SEMAPHORE of an eventfd whose fdinfo does not show it (Linux < 6.6),
found by reading the eventfd once, on the same open file.

The flag is only in the eventfd's ctx->flags, and it decides what read(2)
takes (fs/eventfd.c, 6.1 and 6.6 alike: eventfd_ctx_do_read gives 1 to a
semaphore, the whole count otherwise). So with the count at n >= 2, one
read returns 1 from a semaphore and n from a plain eventfd. The probe:

1. count c from fdinfo (the target frozen). If c < 2, write 2 - c (a write
   only adds: eventfd_write), so n = max(c, 2).
2. read 8 bytes on a pidfd_getfd duplicate (the same struct file: no
   syscall is injected). preadv2(RWF_NOWAIT) never blocks (eventfd_read
   returns -EAGAIN under IOCB_NOWAIT; the file's O_NONBLOCK is shared with
   the target and is not touched). It cannot find n == 0 anyway: nobody
   else reads it (step 0).
3. put the count back: a plain eventfd was emptied, so write back what was
   read less what step 1 added; a semaphore lost 1, so write 1 (c >= 2),
   nothing (c == 1) or read 1 more (c == 0). This runs in a ``finally``,
   with the fault point ``dump.eventfd-probe`` before it: a fault or an
   abort there still leaves the count as it was.
4. fdinfo again: eventfd-count must be c, else refused (something outside
   the dump changed it meanwhile).

0. Before all that: no process outside the dump may hold the eventfd (it
   could read between steps 1 and 2 and get a count it never had, or turn
   the verdict): every outside fd on the anon inode is compared with kcmp
   KCMP_FILE (all anon-inode files share one inode; an eventfd's ctx has
   exactly one struct file, so the same file is the same eventfd).
   Refused, naming it. The members of the dump are frozen (ptrace stops:
   none of their threads sits in a read or poll on it any more).

Side effects, each as harmless as a write of 0 by any holder (which wakes
the same wait queue with the count unchanged): eventfd_write/read wake
ctx->wqh (EPOLLIN / EPOLLOUT keys). An epoll watching the eventfd queues
its item on its ready list; epoll_wait polls it again before reporting
(ep_send_events: ep_item_poll), sees the count it had before and reports
nothing new - edge-triggered too (a ready ET target is refused anyway by
engine/fds/epoll.py). The frozen members see the count only after step 4.

Not seen: a kernel user holding the ctx (io_uring/aio/KVM irqfd registered
by a process that then closed its fd) has no fd in /proc; one signalling
during the probe changes the count and step 4 refuses. A SIGKILL of ckpt
between steps 1 and 3 (microseconds) leaves the count off by at most 2.
"""

from __future__ import annotations

import errno
import os
import struct

from .. import faults, pidfd
from ..errors import EngineError
from ._util import check_held_outside, refuse

_WHY = "this kernel does not show EFD_SEMAPHORE in fdinfo (Linux < 6.6)"


def semaphore(info, ctx, count: int) -> bool:
    """Whether the eventfd at `info` is EFD_SEMAPHORE, by the probe (once
    per eventfd per dump). Raises unsupported-fd (held outside the dump;
    the count moved meanwhile), EngineError."""
    key = f"eventfd-semaphore:{info.fdinfo.get('eventfd-id') or f'{info.pid}:{info.fd}'}"
    if key in ctx.shared:
        return ctx.shared[key]
    # nobody outside may hold it: it could read between the probe's write and read
    check_held_outside(info, ctx, "eventfd")
    sem = _probe(info, count)
    after = _count_now(info)
    if after != count:
        raise refuse(info, "unsupported-fd", f"{_WHY}; its count went from {count} to {after} while it was probed: "
                     "something outside the dump (a kernel user of the eventfd: io_uring, aio, KVM) changed it")
    ctx.shared[key] = sem
    return sem


def _probe(info, count: int) -> bool:
    add = max(0, 2 - count)
    try:
        with pidfd.target_fd(info.pid, info.fd) as d:
            if add:
                _write(d, add)
            got = _read(d)          # n = count + add >= 2
            sem = got == 1
            try:
                faults.point("dump.eventfd-probe")
            finally:
                _put_back(d, sem, got, add)
    except OSError as e:
        raise EngineError(f"pid {info.pid} fd {info.fd}: probing the eventfd: {e.strerror or e}",
                          pid=info.pid, errno=e.errno) from e
    return sem


def _put_back(d: int, sem: bool, got: int, add: int) -> None:
    if not sem:
        if got - add:
            _write(d, got - add)     # emptied: what it held, less what step 1 added
    elif add == 0:
        _write(d, 1)
    elif add == 2:
        _read(d)                     # count 1 here: takes the last of the 2 added


def _write(d: int, n: int) -> None:
    os.write(d, struct.pack("Q", n))


def _read(d: int) -> int:
    buf = bytearray(8)
    try:
        n = os.preadv(d, [buf], -1, os.RWF_NOWAIT)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        # An eventfd without FMODE_NOWAIT (older kernels): the count is >= 1
        # here and nobody else reads it, so a plain read does not block.
        n = os.readv(d, [buf])
    if n != 8:
        raise OSError(errno.EIO, f"short read of {n} bytes")
    return struct.unpack("Q", bytes(buf))[0]


def _count_now(info) -> int:
    path = f"/proc/{info.pid}/fdinfo/{info.fd}"
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "eventfd-count":
                    return int(v.strip(), 16)
    except OSError as e:
        raise EngineError(f"reading {path}: {e.strerror}", pid=info.pid, errno=e.errno) from e
    raise EngineError(f"{path} has no eventfd-count", pid=info.pid)
