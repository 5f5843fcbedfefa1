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

from ..errors import EngineError, Refusal
from . import _sys


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
