"""The restorer's CPU: the restorer and the processes it builds share one.

A restore is a long exchange of short turns between the restorer (the
tracer) and each new task: inject, wait, look, inject again. When the two
sit on different CPUs, every turn is a cross-CPU wake-up, and on a busy
machine the woken side waits for the other CPU's running task to yield
(a tree of 50 processes on this 2-CPU host: its forks took 10 to 95 ms
from one run to the next). On one CPU the tracer's wait hands that CPU
straight to the tracee and back.

So the restorer pins itself to the CPU it runs on (pin); every task it
creates inherits that mask, and each gets its own from the image at the
end anyway (sched.apply sets every live task's affinity; a zombie is given
the restorer's original mask back before it dies, restore_mask). Bulk work
on more than one thread (the page writers) runs with the original mask
(spread). Purely a matter of speed: any failure here leaves the
placement as it was, never failing a restore.
"""

from __future__ import annotations

import ctypes
import os

_ORIGINAL: list = []    # the restorer's mask before pin(), when pinned


def pin() -> None:
    """This (single-threaded) process onto the CPU it is running on."""
    try:
        mask = os.sched_getaffinity(0)
        cpu = ctypes.CDLL(None).sched_getcpu()
        if len(mask) > 1 and cpu in mask:
            os.sched_setaffinity(0, {cpu})
            _ORIGINAL[:] = [mask]
    except (OSError, AttributeError):
        pass


def original():
    """The mask the restorer had before pin() (None: not pinned)."""
    return _ORIGINAL[0] if _ORIGINAL else None


def restore_mask(pid: int) -> None:
    """Task `pid` (made while pinned) gets the restorer's original mask."""
    mask = original()
    if mask is not None:
        try:
            os.sched_setaffinity(pid, mask)
        except OSError:
            pass


class spread:
    """with spread(): the calling thread, and the threads it starts, on
    the original mask; pinned again after."""

    def __enter__(self):
        self.was = None
        mask = original()
        if mask is not None:
            try:
                self.was = os.sched_getaffinity(0)
                os.sched_setaffinity(0, mask)
            except OSError:
                self.was = None
        return self

    def __exit__(self, *exc):
        if self.was is not None:
            try:
                os.sched_setaffinity(0, self.was)
            except OSError:
                pass
        return False
