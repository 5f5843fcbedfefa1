"""Per-machine facts (register layout, syscall numbers, code snippets).

Only x86_64 exists so far. Any other machine is an explicit error naming
it, never a silent fallback to x86_64's numbers.
"""

from __future__ import annotations

import platform
from types import ModuleType

from ..errors import EngineError

SUPPORTED = ("x86_64",)


def current() -> ModuleType:
    """The module for this machine. Raises EngineError on an unsupported one."""
    return for_machine(platform.machine())


def for_machine(machine: str) -> ModuleType:
    """The module for `machine` (as platform.machine() names it).
    Raises EngineError for machines the engine has no table for."""
    if machine == "x86_64":
        from . import x86_64
        return x86_64
    raise EngineError(f"architecture {machine!r} is not supported by this engine "
                      f"(supported: {', '.join(SUPPORTED)})")
