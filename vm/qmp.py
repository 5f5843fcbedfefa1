"""QMP control of one QEMU: status, snapshots (through HMP), quit.

A thin layer over ``qemu.qmp.legacy.QEMUMonitorProtocol`` (synchronous) that
turns every failure into :class:`VmError` with kind ``qmp``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from .errors import VmError


class Qmp:
    """One QMP connection to a QEMU started with ``-qmp unix:PATH,server=on,wait=off``."""

    def __init__(self, path: str, guest: str):
        self.path = path
        self.guest = guest
        self._mon: Any = None

    def connect(self, deadline: float, alive: Any) -> None:
        """Connect, retrying until the socket exists or ``deadline`` passes.

        ``alive()`` is polled so that a QEMU that exits early fails fast.

        Raises:
            VmError(kind="qmp"): QEMU died or the socket never answered.
        """
        from qemu.qmp.legacy import QEMUMonitorProtocol  # harness-only dependency

        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if not alive():
                raise VmError("QEMU exited before QMP answered", kind="qmp", guest=self.guest)
            if os.path.exists(self.path):
                mon = QEMUMonitorProtocol(self.path)
                try:
                    mon.connect(negotiate=True)
                    self._mon = mon
                    return
                except Exception as exc:  # noqa: BLE001 - QMP raises many kinds; retried
                    last = exc
                    mon.close()
            time.sleep(0.02)
        raise VmError(f"QMP socket {self.path} did not answer: {last}", kind="qmp", guest=self.guest)

    def command(self, name: str, timeout: float = 30.0, **args: Any) -> Any:
        """Execute a QMP command, return its ``return`` value.

        Raises:
            VmError(kind="qmp"): not connected, QEMU error reply, or socket failure.
        """
        if self._mon is None:
            raise VmError(f"QMP not connected (command {name})", kind="qmp", guest=self.guest)
        try:
            self._mon.settimeout(timeout)
            return self._mon.cmd(name, **args)
        except Exception as exc:  # noqa: BLE001 - ExecuteError, EOF, timeouts alike
            raise VmError(f"QMP {name} {args or ''} failed: {type(exc).__name__}: {exc}",
                          kind="qmp", guest=self.guest) from exc

    def hmp(self, line: str, timeout: float = 60.0) -> str:
        """Run a human-monitor command (savevm/loadvm have no QMP twin in 7.2).

        HMP reports errors as text, not as a QMP error: any output of
        savevm/loadvm/delvm means it failed.
        """
        return str(self.command("human-monitor-command", timeout=timeout, **{"command-line": line}))

    def close(self) -> None:
        """Close the connection; never raises."""
        if self._mon is not None:
            try:
                self._mon.close()
            except Exception:  # noqa: BLE001 - closing a dead socket
                pass
            self._mon = None
