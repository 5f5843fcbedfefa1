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

import sys
# collections.abc's own Mapping: _collections_abc comes with os at start-up,
# collections.abc would import the collections package (and its imports)
from _collections_abc import Mapping

TYPE_CHECKING = False   # annotations only: the exec'd workload imports this package at every start
if TYPE_CHECKING:
    from typing import Iterator, List

from . import process
from .core import Ctx, Opened, bytes_check, check  # noqa: F401 - the workload's API

# KIND -> module name. Imported on first use: a workload imports only the
# kinds its scenario has (each python3 start of a workload costs about a
# second under TCG, and the kinds were half of its imports).
_MODULE_OF = {"open": "openfile", "memfd": "memfd", "dir": "directory", "device": "device", "fifo": "fifo",
              "pipe": "pipe", "socket": "sockets", "inotify": "inotify", "dnotify": "dnotify",
              "fanotify": "fanotify", "eventfd": "eventfd", "timerfd": "timerfd", "signalfd": "signalfd",
              "epoll": "epoll", "dup": "dup", "lock": "locks", "pty": "terminal", "pidfd": "pidfd"}


class _Kinds(Mapping):
    def __getitem__(self, kind: str):
        name = f"{__name__}.{_MODULE_OF[kind]}"
        __import__(name)
        return sys.modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULE_OF)

    def __len__(self) -> int:
        return len(_MODULE_OF)


KINDS: Mapping[str, object] = _Kinds()
PROCESS = process


def __getattr__(name: str):
    if name == "MODULES":       # every kind module, imported (the schema and the tests)
        return tuple(KINDS[k] for k in KINDS)
    raise AttributeError(name)


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
