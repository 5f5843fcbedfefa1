"""One root exception for the guest package, with structured fields.

Every failure a person can act on carries what they need to act: the guest's
name, QEMU's exit code, the command line, QEMU's stderr and the tail of the
serial console (like QEMU's own ``VMLaunchFailure(exitcode, command, output)``).
"""

from __future__ import annotations

import shlex
from typing import Optional, Sequence


class VmError(Exception):
    """A guest could not be built, launched, reached or controlled.

    Fields are all optional; the message is built from those that are set.
    ``kind`` is a short stable word for programs: ``launch``, ``timeout``,
    ``died``, ``command``, ``ssh``, ``qmp``, ``image``, ``host-tools``,
    ``unsupported``, ``usage``.
    """

    def __init__(self, message: str, *, kind: str = "error", guest: Optional[str] = None,
                 exit_code: Optional[int] = None, command: Optional[Sequence[str]] = None,
                 stderr: Optional[str] = None, serial_tail: Optional[str] = None,
                 timeout: Optional[float] = None, rc: Optional[int] = None,
                 stdout: Optional[str] = None):
        self.message = message
        self.kind = kind
        self.guest = guest
        self.exit_code = exit_code
        self.command = list(command) if command is not None else None
        self.stderr = stderr
        self.serial_tail = serial_tail
        self.timeout = timeout
        self.rc = rc
        self.stdout = stdout
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"guest {self.guest}: {self.message}" if self.guest else self.message
        parts = [head]
        if self.timeout is not None:
            parts.append(f"timeout: {self.timeout:g} s")
        if self.exit_code is not None:
            parts.append(f"QEMU exit code: {self.exit_code}")
        if self.rc is not None:
            parts.append(f"exit status: {self.rc}")
        if self.command is not None:
            parts.append("command: " + shlex.join(self.command))
        for label, text in (("stdout", self.stdout), ("stderr", self.stderr),
                            ("serial console (tail)", self.serial_tail)):
            if text:
                parts.append(f"--- {label} ---\n{text.rstrip()}")
        return "\n".join(parts)


class HostToolsMissing(VmError):
    """Host programs the image build or the guests need are not installed."""

    def __init__(self, missing: Sequence[tuple[str, str]]):
        self.missing = list(missing)
        names = ", ".join(f"{tool} (Debian package {pkg})" for tool, pkg in self.missing)
        pkgs = " ".join(sorted({pkg for _, pkg in self.missing}))
        super().__init__(f"missing host tools: {names}. `make setup` installs them "
                         f"(or: apt-get install {pkgs})", kind="host-tools")
