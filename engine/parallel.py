"""Run n independent jobs on a few threads, the calling thread one of them.

For the bulk work on pages (dump: process_vm_readv, write, CRC; verify:
CRC; restore: process_vm_writev), which releases the GIL: cut in pieces
of a few MiB, it keeps both cores busy even for one 64 MiB file. Plain
threads, not concurrent.futures (whose import pulls in logging: more
than a small process's whole page work)."""

from __future__ import annotations


def run(n: int, job, threads: int = 2, make_state=None, close_state=None) -> None:
    """job(i, state) for every i in range(n), in order of i, on up to
    `threads` threads; state = make_state() once per thread (a buffer...),
    close_state(state) when that thread is done. The first exception stops
    the handing out of jobs and is raised here once every thread ended."""
    threads = max(1, min(threads, n))
    if threads == 1:
        state = make_state() if make_state else None
        try:
            for i in range(n):
                job(i, state)
        finally:
            if close_state:
                close_state(state)
        return
    import threading
    lock = threading.Lock()
    nxt = [0]
    errors: list = []

    def worker() -> None:
        state = None
        try:
            state = make_state() if make_state else None
            while not errors:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= n:
                    return
                job(i, state)
        except BaseException as e:      # re-raised by the caller's thread
            errors.append(e)
        finally:
            if close_state and state is not None:
                close_state(state)

    others = [threading.Thread(target=worker, daemon=True) for _ in range(threads - 1)]
    for t in others:
        t.start()
    try:
        worker()
    finally:
        for t in others:
            t.join()
    if errors:
        raise errors[0]
