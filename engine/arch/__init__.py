"""Per-machine facts (register layout, syscall numbers, code snippets).

A machine without a module is refused (`unsupported-arch`, exit 3) naming
it: never a silent fallback to another machine's numbers.
"""

from __future__ import annotations

import os
TYPE_CHECKING = False   # annotations only
if TYPE_CHECKING:
    from types import ModuleType

from ..errors import Refusal

SUPPORTED = ("x86_64", "aarch64")


_MACHINE: list = []


def machine() -> str:
    """os.uname().machine, asked once per process: a run wants it ~20
    times, and each uname(2) is ~10x dearer under TCG."""
    if not _MACHINE:
        _MACHINE.append(os.uname().machine)
    return _MACHINE[0]


def current() -> ModuleType:
    """The module for this machine. Raises the unsupported-arch Refusal."""
    return for_machine(machine())


def for_machine(machine: str) -> ModuleType:
    """The module for `machine` (as os.uname().machine names it).
    Raises the unsupported-arch Refusal for machines it has no table for."""
    if machine == "x86_64":
        from . import x86_64
        return x86_64
    if machine in ("aarch64", "arm64"):
        from . import aarch64
        return aarch64
    raise Refusal("unsupported-arch", f"this engine has no support for {machine} yet "
                  f"(supported: {', '.join(SUPPORTED)})")
