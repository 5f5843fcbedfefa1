"""A process outside the workload's tree: the other holder a boundary
scenario needs (the far end of a pipe, a lock, a connection).

Double fork: the grandchild is re-parented to init and leads its own
session, so the workload has no children and the engine sees a real
outsider. Its body runs with SIGUSR1 blocked (the workload's signals are
not its own) and says ``ready()`` once it holds what it must; the caller
gets its PID only then, so nothing is dumped before the outsider exists."""

from __future__ import annotations

import os
import time
# the C module the signal package wraps: signal's enums cost the workload's
# start (enum, functools, collections) ~0.1 s under TCG (harness/workload.py)
import _signal as signal

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import Callable, Optional

    Body = Callable[[Callable[[], None]], None]


def _close_all_but(*keep: int) -> None:
    for fd in range(3, 1024):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def spawn(body: Body, keep: Optional[int] = None, timeout: float = 10.0) -> int:
    """Run ``body(ready)`` in an outsider; when it returns, the outsider
    pauses until killed. With ``keep``, the outsider holds that fd and no
    other (``keep=-1``: none, a bare process to be named from outside).
    Its PID, once it said ready."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            grandchild = os.fork()
            if grandchild == 0:
                os.setsid()
                os.close(r)
                if keep is not None:
                    _close_all_but(keep, w)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
                try:
                    body(lambda: os.write(w, b"ready\n"))
                except OSError:
                    pass
                while True:
                    signal.pause()
            os.write(w, f"pid {grandchild}\n".encode())
        finally:
            os._exit(0)
    os.close(w)
    got = b""
    deadline = time.monotonic() + timeout
    try:
        # two lines, in either order: "pid N" (the child) and "ready" (the outsider)
        while got.count(b"\n") < 2 and time.monotonic() < deadline:
            chunk = os.read(r, 64)
            if not chunk:
                break
            got += chunk
    finally:
        os.close(r)
        os.waitpid(child, 0)
    lines = got.decode().splitlines()
    pid = int(next(x for x in lines if x.startswith("pid "))[4:])
    if "ready" not in lines:
        os.kill(pid, signal.SIGKILL)
        raise RuntimeError(f"outsider {pid} never got ready: {got!r}")
    return pid
