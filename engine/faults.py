"""Fault points: a named, test-only failure at every step of dump and restore.

``point("dump.fd", kind)`` marks a step that can fail. It raises
:class:`FaultInjected` (an EngineError: exit 4, no traceback) only when the
environment variable ``CKPT_FAULT`` names it: ``dump.fd.pipe`` (its first
hit) or ``dump.fd.pipe:3`` (its third). The id is the name, plus ``.detail``
when one is given (an fd kind, a mapping kind, a syscall name, an image file
name with its digits dropped). Unset, a point costs one global lookup.

``CKPT_FAULT_WAIT=ID:PATH`` holds the step at ID (creating PATH.reached)
until PATH exists, for tests that need two runs to overlap there.

``CKPT_FAULT_TRACE=FILE`` appends every point reached, one id per line,
with the engine file and line of the call: tests learn from a real run which
points exist (a family such as one point per fd kind expands to what the run
passed), and compare the call sites with :func:`call_sites`, a scan of the
source for ``faults.point(`` - so a new step with a point is tested without
anyone listing it (tests/test_fault_points.py).

The same points are where a dump or restore gives up when asked to stop
(:func:`request_abort`: ckpt was killed or interrupted, engine/guard.py): a
point is a place where an exception is proven to be handled cleanly (the
fault test runs every one), so stopping there is as safe as a fault.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

from .errors import EngineError

ENV = "CKPT_FAULT"
TRACE_ENV = "CKPT_FAULT_TRACE"
WAIT_ENV = "CKPT_FAULT_WAIT"      # ID:PATH - at ID, create PATH.reached and wait for PATH (race tests)


class FaultInjected(EngineError):
    """A failure injected by CKPT_FAULT (tests only)."""


class Aborted(EngineError):
    """The dump or restore was asked to stop (ckpt killed or interrupted)."""


def _parse(spec: str) -> Tuple[str, int]:
    name, _, nth = spec.partition(":")
    return name.strip(), int(nth) if nth.strip().isdigit() else 1


_TARGET: Optional[Tuple[str, int]] = _parse(os.environ[ENV]) if os.environ.get(ENV) else None
_TRACE: Optional[str] = os.environ.get(TRACE_ENV) or None
_WAIT: Optional[Tuple[str, str]] = tuple(os.environ[WAIT_ENV].split(":", 1)) \
    if ":" in os.environ.get(WAIT_ENV, "") else None      # type: ignore[assignment]
_ABORT: Optional[str] = None
_hits: Dict[str, int] = {}
# Read by point() on every call: False keeps a point to one global lookup.
_ACTIVE = bool(_TARGET or _TRACE or _WAIT)


def point(name: str, detail=None) -> None:
    """A step that can fail: raise when CKPT_FAULT names it, or when an
    abort was requested."""
    if _ACTIVE:
        _hit(name, detail)


def fault_id(name: str, detail=None) -> str:
    if detail is None:
        return name
    if isinstance(detail, int):
        return f"{name}.{_syscall_name(detail)}"
    # An image file name: pages-3.img and pages-4.img are one step.
    import re       # here, not at the top: re costs every ckpt run ~20 ms under TCG
    return name + "." + re.sub(r"\d+", "N", str(detail)).replace("/", ".")


def _syscall_name(nr: int) -> str:
    import platform
    from .arch import current
    from .pidfd import _SYSCALLS
    for table in (current().SYS, _SYSCALLS.get(platform.machine(), {})):
        for k, v in table.items():
            if v == nr:
                return k
    return f"nr{nr}"


def _hit(name: str, detail) -> None:
    if _ABORT is not None:
        raise Aborted(f"stopped: {_ABORT}")
    fid = fault_id(name, detail)
    if _TRACE:
        f = sys._getframe(2)
        site = f"{os.path.relpath(f.f_code.co_filename, _ENGINE_PARENT)}:{f.f_lineno}:{f.f_code.co_name}"
        fd = os.open(_TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{fid} {site}\n".encode())
        finally:
            os.close(fd)
    if _WAIT is not None and _WAIT[0] == fid:
        _wait_for(_WAIT[1])
    if _TARGET is not None and _TARGET[0] == fid:
        n = _hits[fid] = _hits.get(fid, 0) + 1
        if n == _TARGET[1]:
            raise FaultInjected(f"fault injected at {fid} ({ENV})")


def _wait_for(path: str, timeout: float = 60.0) -> None:
    """Hold this step until a test says go (a file appears): two ckpt can
    then be made to overlap exactly where a test wants them to."""
    import time
    open(path + ".reached", "w").close()
    end = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < end:
        if _ABORT is not None:
            raise Aborted(f"stopped: {_ABORT}")
        time.sleep(0.01)


def request_abort(why: str) -> None:
    """Make the next point raise Aborted (safe from a signal handler: it
    only sets two globals)."""
    global _ABORT, _ACTIVE
    _ABORT = why
    _ACTIVE = True


def abort_requested() -> Optional[str]:
    return _ABORT


# -- the registry ------------------------------------------------------------------

_ENGINE = os.path.dirname(os.path.abspath(__file__))
_ENGINE_PARENT = os.path.dirname(_ENGINE)
_CALL = r"\bfaults\.point\(\s*([^,)\s]+)"


def call_sites() -> List[Tuple[str, str]]:
    """Every ``faults.point(`` call in engine/, from the source:
    [(file:line:function, first argument as written)]."""
    import re
    out = []
    for root, _, names in os.walk(_ENGINE):
        for n in sorted(names):
            path = os.path.join(root, n)
            if not n.endswith(".py") or path == os.path.abspath(__file__):
                continue
            stack: List[Tuple[int, str]] = []     # enclosing defs: (indent, name)
            with open(path) as f:
                for lineno, line in enumerate(f, 1):
                    body = line.lstrip()
                    if not body or body.startswith("#"):
                        continue
                    indent = len(line) - len(body)
                    while stack and indent <= stack[-1][0]:
                        stack.pop()
                    m = re.match(r"(?:async\s+)?def (\w+)", body)
                    if m:
                        stack.append((indent, m.group(1)))
                    func = stack[-1][1] if stack else "<module>"
                    for c in re.finditer(_CALL, line):
                        out.append((f"{os.path.relpath(path, _ENGINE_PARENT)}:{lineno}:{func}", c.group(1)))
    return sorted(out)


def read_trace(path: str) -> Dict[str, str]:
    """{fault id: call site} of the points a traced run reached, in order."""
    out: Dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                fid, _, site = line.strip().partition(" ")
                out.setdefault(fid, site)
    except FileNotFoundError:
        pass
    return out
