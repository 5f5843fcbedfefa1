"""The workload's fd kinds, one module per kind (as the engine's engine/fds/).

Runs in the guest (stdlib only, Python >= 3.9): on the host this is
``harness.kinds``; in a guest, where the harness files sit flat in one
directory (targets.GuestTarget.install), it is the top-level package
``kinds`` next to workload.py. Kind modules import each other's shared code
from :mod:`.core` and the harness's own modules with the same two-way
import (``from .. import seeded`` / ``import seeded``).

Each kind module has:

- ``KIND``: its key in a workload fd entry (``{fd: 3, open: data}``);
- ``fields(s)``: its YAML fields, built from the schema module ``s`` that
  is passed in (harness/schema.py needs PyYAML, which the guest lacks);
- ``opener(entry, ctx) -> [Opened]``: fds at temporary numbers, which the
  workload moves to the numbers the scenario gives;
- ``checker(entry, recs, ctx, phase) -> [check]``: called after restore (or
  after a refused dump, in the original) in three phases so that checks of
  one fd never disturb another's: ``inspect`` (nothing consumed),
  ``consume`` (reads that move offsets or drain buffers), ``mutate``
  (writes, triggers);

and optionally ``TAGS`` (scenario tags it belongs to), ``REQUIRED`` (keys an
entry must have, default ``("fd",)``), ``OPEN_ORDER`` / ``CHECK_ORDER``
(default 0; lower first), ``fd_numbers(entry)`` (every fd it occupies),
``validate(entry, fds) -> [(key, message)]`` (cross-field rules; ``fds``
maps fd number -> entry), ``finish(entry, fd)`` (once the fd is at its
number) and ``extras(rec)`` (facts only the kernel knows before the dump,
saved in the ready file).

:mod:`.process` is not an fd kind: the ``workload.process`` section
(``fields(s)``, ``apply`` at the start, ``observe`` before the dump,
``checker`` after).
"""

from __future__ import annotations

from typing import Dict, List

from . import (device, directory, dnotify, dup, epoll, eventfd, fanotify, fifo, inotify, locks, memfd, openfile,
               pipe, process, signalfd, sockets, terminal, timerfd)
from .core import Ctx, Opened, bytes_check, check  # noqa: F401 - the workload's API

MODULES = (openfile, memfd, directory, device, fifo, pipe, sockets, inotify, dnotify, fanotify, eventfd,
           timerfd, signalfd, epoll, dup, locks, terminal)
KINDS: Dict[str, object] = {m.KIND: m for m in MODULES}
PROCESS = process


def kind_of(entry: dict) -> str:
    """The kind key of a workload fd entry (the schema guarantees exactly one).

    Raises ValueError for an entry with none.
    """
    for k in KINDS:
        if k in entry:
            return k
    raise ValueError(f"no fd kind in {entry!r}")


def module_of(entry: dict):
    return KINDS[kind_of(entry)]


def fd_numbers(entry: dict) -> List[int]:
    """Every fd number an entry occupies."""
    m = module_of(entry)
    if hasattr(m, "fd_numbers"):
        return m.fd_numbers(entry)
    return [entry["fd"]]


def open_order(entry: dict) -> int:
    return getattr(module_of(entry), "OPEN_ORDER", 0)


def check_order(entry: dict) -> int:
    return getattr(module_of(entry), "CHECK_ORDER", 0)
