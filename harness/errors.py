"""One root exception for the harness, with structured fields."""

from __future__ import annotations

from typing import Optional


class HarnessError(Exception):
    """The harness could not run a scenario (not a verdict on the engine).

    ``step`` names where it happened (setup, ready, dump, ...); ``detail``
    carries what a person needs (a command's stderr, a guest's error).
    """

    def __init__(self, message: str, *, step: Optional[str] = None, detail: str = ""):
        self.message = message
        self.step = step
        self.detail = detail
        text = f"[{step}] {message}" if step else message
        super().__init__(f"{text}\n{detail}".rstrip())


class StepTimeout(HarnessError):
    """A command ran past its timeout (the scenario outcome is ``hung``)."""

    def __init__(self, argv, timeout: float, *, step: Optional[str] = None, detail: str = ""):
        self.argv = list(argv)
        self.timeout = timeout
        super().__init__(f"timed out after {timeout:g} s: {' '.join(map(str, argv))}", step=step, detail=detail)


class GuestLost(HarnessError):
    """The guest under a scenario died, stopped answering, lost its channel
    or ran out of disk (the scenario outcome is ``crashed``, or ``hung`` for
    ``hung``; the worker gets a fresh guest)."""

    def __init__(self, message: str, *, step: Optional[str] = None, detail: str = "", hung: bool = False):
        self.hung = hung
        super().__init__(message, step=step, detail=detail)
