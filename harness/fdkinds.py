"""The workload's fd kinds: one opener and one checker per kind.

Runs in the guest (stdlib only, Python >= 3.9). Each kind has an opener,
``open_<kind>(entry, ctx) -> [Opened]`` (fds created at temporary numbers;
the workload moves them to the numbers the scenario gives), and a checker,
``check_<kind>(entry, recs, ctx, phase) -> [check]``, called after restore
(or, after a refused dump, in the original) in three phases so that checks of
one fd never disturb another's: ``inspect`` (nothing consumed), ``consume``
(reads that move offsets or drain buffers), ``mutate`` (writes, triggers).

What a check expects comes from the scenario (the seeded model of the world)
or from what the process observed of itself before the dump (the ready file,
on disk, not in the engine's image).
"""

from __future__ import annotations

from typing import Dict

try:
    from . import fd_events as ev
    from . import fd_files as files
    from . import fd_ipc as ipc
    from .fdcore import Ctx, Opened, bytes_check, check  # noqa: F401 - the workload's API
except ImportError:  # pragma: no cover - in the guest, run as a script
    import fd_events as ev  # type: ignore[no-redef]
    import fd_files as files  # type: ignore[no-redef]
    import fd_ipc as ipc  # type: ignore[no-redef]
    from fdcore import Ctx, Opened, bytes_check, check  # type: ignore[no-redef] # noqa: F401

inotify_fdinfo = ev.inotify_fdinfo
epoll_fdinfo = ev.epoll_fdinfo
epoll_ready = ev.epoll_ready
sockname_of = ipc.sockname_of

# run once the fd sits at its final number
FINISH = {"dnotify": ev.finish_dnotify}

KINDS: Dict[str, tuple] = {
    "open": (files.open_file, files.check_file),
    "memfd": (files.open_memfd, files.check_memfd),
    "dir": (files.open_dir, files.check_dir),
    "device": (files.open_device, files.check_device),
    "fifo": (ipc.open_fifo, ipc.check_fifo),
    "pipe": (ipc.open_pipe, ipc.check_pipe),
    "socket": (ipc.open_socket, ipc.check_socket),
    "inotify": (ev.open_inotify, ev.check_inotify),
    "dnotify": (ev.open_dnotify, ev.check_dnotify),
    "fanotify": (ev.open_fanotify, ev.check_fanotify),
    "eventfd": (ev.open_eventfd, ev.check_eventfd),
    "timerfd": (ev.open_timerfd, ev.check_timerfd),
    "signalfd": (ev.open_signalfd, ev.check_signalfd),
    "epoll": (ev.open_epoll, ev.check_epoll),
}


def kind_of(entry: dict) -> str:
    """The kind key of a workload fd entry (the schema guarantees exactly one).

    Raises ValueError for an entry with none.
    """
    for k in KINDS:
        if k in entry:
            return k
    raise ValueError(f"no fd kind in {entry!r}")
