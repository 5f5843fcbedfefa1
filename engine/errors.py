"""One root exception for the engine, with structured fields.

Exit codes are part of the CLI contract (DESIGN.md):
0 done, 2 usage, 3 refused, 4 failed.
"""

from __future__ import annotations

TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Optional

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_FAILED = 4


class EngineError(Exception):
    """A system failure: the operation could not be carried out (exit 4)."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, pid: Optional[int] = None, errno: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.pid = pid
        self.errno = errno

    def as_dict(self) -> dict:
        return {"error": "failed", "message": self.message, "pid": self.pid, "errno": self.errno}

    def __reduce__(self):
        # Pickled whole (engine/guard.py hands a worker's exception to
        # ckpt): the subclasses' __init__ take other arguments than args.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    e = cls.__new__(cls)
    Exception.__init__(e, *args)
    e.__dict__.update(state)
    return e


class UsageError(EngineError):
    """Bad command-line input: a missing PID, a DIR that exists, ... (exit 2)."""

    exit_code = EXIT_USAGE

    def as_dict(self) -> dict:
        return {"error": "usage", "message": self.message}


class Refusal(EngineError):
    """The engine will not do this, for a stable reason code (exit 3).

    One refusal renders as one line:
    ``pid 1234 fd 3 (/data/a): file-changed: size 4096 -> 8192``
    """

    exit_code = EXIT_REFUSED

    def __init__(self, reason: str, detail: str = "", *, pid: Optional[int] = None,
                 fd: Optional[int] = None, path: Optional[str] = None):
        from .reasons import REASONS  # late: reasons imports nothing of ours
        if reason not in REASONS:
            raise ValueError(f"undefined reason code {reason!r}")
        self.reason = reason
        self.detail = detail
        self.fd = fd
        self.path = path
        super().__init__(self._render(pid), pid=pid)

    def _render(self, pid: Optional[int]) -> str:
        where = []
        if pid is not None:
            where.append(f"pid {pid}")
        if self.fd is not None:
            where.append(f"fd {self.fd}")
        head = " ".join(where)
        if self.path is not None:
            head = f"{head} ({self.path})" if head else f"({self.path})"
        text = f"{head}: {self.reason}" if head else self.reason
        return f"{text}: {self.detail}" if self.detail else text

    def with_pid(self, pid: int) -> "Refusal":
        """The same refusal, attributed to `pid` (handlers often do not know it)."""
        return Refusal(self.reason, self.detail, pid=pid, fd=self.fd, path=self.path)

    def as_dict(self) -> dict:
        return {"reason": self.reason, "detail": self.detail, "pid": self.pid,
                "fd": self.fd, "path": self.path, "message": self.message}


class Refusals(EngineError):
    """Several refusals found in one pre-flight; all are reported, one line each."""

    exit_code = EXIT_REFUSED

    def __init__(self, refusals: list):
        self.refusals = list(refusals)
        super().__init__("\n".join(r.message for r in self.refusals))

    def as_dict(self) -> dict:
        return {"error": "refused", "refusals": [r.as_dict() for r in self.refusals]}
