"""Copy a pipe's buffered bytes without consuming them, and put bytes back.

tee(2) duplicates pipe buffers from one pipe into another without
advancing the source: the target (and any peer) still reads every byte
(fs/splice.c: link_pipe takes page references, the source is untouched).
tee needs a read-capable source and a pipe of ours large enough to take
everything in ONE call: tee always starts at the head of the source, so it
cannot be resumed at an offset.
"""

from __future__ import annotations

import fcntl
import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Callable, List, Optional

from .. import pidfd
from ..errors import EngineError, Refusal
from . import _sys
from ._util import end_of, refuse


def pipe_max_size() -> int:
    """/proc/sys/fs/pipe-max-size: the largest F_SETPIPE_SZ allowed without
    CAP_SYS_RESOURCE (fs/pipe.c: pipe_set_size)."""
    with open("/proc/sys/fs/pipe-max-size") as f:
        return int(f.read())


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, _sys.F_GETPIPE_SZ)


def peek(reader: int, count: int, who: Refusal) -> bytes:
    """The first `count` bytes buffered in the pipe `reader` (a read-capable
    fd on it), left in place. `who` is a template refusal (pid/fd/path) for
    the case the bytes cannot be copied exactly.

    Raises Refusal unsupported-fd when they cannot; EngineError on system
    errors."""
    if count == 0:
        return b""
    r, w = os.pipe()
    try:
        if count > pipe_size(w):
            try:
                fcntl.fcntl(w, _sys.F_SETPIPE_SZ, count)
            except OSError as e:
                raise Refusal("unsupported-fd",
                              f"pipe holds {count} bytes, more than a pipe of this engine can take "
                              f"(pipe-max-size {pipe_max_size()}): {e.strerror}",
                              pid=who.pid, fd=who.fd, path=who.path) from e
        try:
            got = _sys.tee(reader, w, count)
        except OSError as e:
            raise EngineError(f"tee from pid {who.pid} fd {who.fd}: {e.strerror}", pid=who.pid,
                              errno=e.errno) from e
        if got != count:
            raise EngineError(f"tee from pid {who.pid} fd {who.fd} copied {got} of {count} bytes "
                              f"(the target is not frozen?)", pid=who.pid)
        os.close(w)
        w = -1
        chunks = []
        while True:
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        _sys.close_all(x for x in (r, w) if x >= 0)


def fill(wfd: int, size: int, data: bytes) -> None:
    """Give the pipe behind `wfd` the buffer size `size` and queue `data`.

    Raises OSError (EPERM: size above pipe-max-size without
    CAP_SYS_RESOURCE; EAGAIN: data does not fit)."""
    if size and pipe_size(wfd) != size:
        fcntl.fcntl(wfd, _sys.F_SETPIPE_SZ, size)
    fl = fcntl.fcntl(wfd, fcntl.F_GETFL)
    # Nonblocking, so a buffer that somehow does not fit fails instead of
    # hanging the restorer.
    fcntl.fcntl(wfd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    try:
        view = memoryview(data)
        while view:
            n = os.write(wfd, view)
            view = view[n:]
    finally:
        fcntl.fcntl(wfd, fcntl.F_SETFL, fl)


def check_size(size: int) -> str:
    """'' when a pipe of `size` bytes can be made here, else why not."""
    try:
        limit = pipe_max_size()
    except OSError:
        return ""
    if size > limit and not _sys.has_capability(_sys.CAP_SYS_RESOURCE):
        return f"pipe buffer of {size} bytes is above pipe-max-size {limit} (needs CAP_SYS_RESOURCE)"
    return ""


def copy_buffer(info, ends: List, count: int) -> bytes:
    """The first `count` bytes buffered in the pipe or fifo of `info` (an
    FdInfo), left in place; `ends` are the process's fds on it. Raises as
    peek(); EngineError when no reader can be opened."""
    tmpl = refuse(info, "unsupported-fd", "")
    readers = [e for e in ends if end_of(e.flags) != "w"]
    if readers:
        with pidfd.target_fd(info.pid, readers[0].fd) as dup:
            return peek(dup, count, tmpl)
    # Only write ends are left: tee needs a readable file, so open a new
    # read end through /proc/PID/fd/N (fs/proc/base.c proc_fd_link +
    # fifo_open on the pipe inode), non-blocking. It is closed right after;
    # no reader existed to notice it (and for a fifo nobody outside holds
    # it with bytes queued, or classify refused).
    try:
        rfd = os.open(info.proc_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise EngineError(f"cannot open a reader on {info.link} of pid {info.pid}: {e.strerror}",
                          pid=info.pid, errno=e.errno) from e
    try:
        return peek(rfd, count, tmpl)
    finally:
        os.close(rfd)


def save_once(info, ctx, key: str, name: str, count: int, ends: Callable[[], List]) -> Optional[str]:
    """The image file (`name`) holding the `count` bytes buffered in the
    pipe or fifo of `info`, written once per pipe (`key` in ctx.shared), or
    None when nothing is buffered. `ends()` lists the process's fds on it.
    Raises as copy_buffer()."""
    if key not in ctx.shared:
        saved = None
        if count:
            ctx.image.write_bytes(name, copy_buffer(info, ends(), count))
            saved = name
        ctx.shared[key] = saved
    return ctx.shared[key]
