"""Commands and file copies over one long-lived paramiko connection.

A new SSH connection to a TCG guest costs ~0.7-1.1 s (key exchange runs
emulated); a command on an open one ~0.1-0.15 s. So a guest keeps one
:class:`SshLink` open and drops it only around ``loadvm``.
"""

from __future__ import annotations

import select
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

from .errors import VmError

Command = Union[str, Sequence[str]]

#: After the exit status arrived, how long to wait for the channel's EOF.
EOF_GRACE = 0.3


@dataclass(frozen=True)
class RunResult:
    """What a command in the guest did."""

    rc: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


def as_shell(cmd: Command) -> str:
    """A command line for the guest's shell; a list is shlex-quoted word by word."""
    if isinstance(cmd, str):
        return cmd
    return shlex.join(list(cmd))


def _quiet_paramiko() -> None:
    # Connecting while sshd is not up yet fails on purpose (we retry); paramiko
    # logs each such failure with a traceback at ERROR. Our VmError says it.
    import logging
    logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


class SshLink:
    """One paramiko SSHClient to root@127.0.0.1:port with the image's key."""

    def __init__(self, port: int, key_path: Path, guest: str):
        self.port = port
        self.key_path = key_path
        self.guest = guest
        self._client: Any = None

    @property
    def connected(self) -> bool:
        t = self._client.get_transport() if self._client is not None else None
        return bool(t is not None and t.is_active())

    def connect(self, deadline: float, alive: Callable[[], bool]) -> float:
        """Connect, retrying until ``deadline``; returns the seconds it took.

        Raises:
            VmError(kind="ssh"): still no connection at the deadline.
            VmError(kind="died"): the guest died meanwhile.
        """
        import paramiko  # harness-only dependency

        _quiet_paramiko()
        key = paramiko.Ed25519Key.from_private_key_file(str(self.key_path))
        t0 = time.monotonic()
        last: Optional[BaseException] = None
        while True:
            if not alive():
                raise VmError("guest died while waiting for SSH", kind="died", guest=self.guest)
            client = paramiko.SSHClient()
            # The guest's host key is generated per image and the port is
            # local: there is nothing to verify it against.
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            left = max(0.5, deadline - time.monotonic())
            try:
                client.connect("127.0.0.1", port=self.port, username="root", pkey=key,
                               allow_agent=False, look_for_keys=False, compress=False,
                               timeout=min(5.0, left), banner_timeout=min(10.0, left),
                               auth_timeout=min(10.0, left))
                self._client = client
                return time.monotonic() - t0
            except (paramiko.SSHException, OSError, EOFError) as exc:
                last = exc
                client.close()
            if time.monotonic() >= deadline:
                raise VmError(f"no SSH connection on 127.0.0.1:{self.port}: {type(last).__name__}: {last}",
                              kind="ssh", guest=self.guest)
            time.sleep(0.05)

    def close(self) -> None:
        """Drop the connection; never raises."""
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a dead transport
                pass
            self._client = None

    def exec(self, cmd: Command, timeout: float, stdin: Optional[bytes] = None) -> "tuple[int, bytes, bytes, float]":
        """Run ``cmd``; return (rc, stdout bytes, stderr bytes, seconds).

        Raises:
            VmError(kind="timeout"): still running after ``timeout`` s (the
                channel is closed; the remote command is not killed).
            VmError(kind="ssh"): the connection broke.
        """
        if not self.connected:
            raise VmError("SSH connection is not open", kind="ssh", guest=self.guest)
        line = as_shell(cmd)
        t0 = time.monotonic()
        deadline = t0 + timeout
        out: List[bytes] = []
        err: List[bytes] = []
        status_at: Optional[float] = None
        try:
            chan = self._client.get_transport().open_session(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - paramiko raises SSHException/EOFError/socket errors
            raise VmError(f"cannot open an SSH channel: {type(exc).__name__}: {exc}",
                          kind="ssh", guest=self.guest) from exc
        try:
            chan.exec_command(line)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            while True:
                while chan.recv_ready():
                    out.append(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(65536))
                # Done at exit status *and* EOF: sshd may send the exit-status
                # before the last of the output (RFC 4254 6.10 does not order
                # them). But a background child that inherited stdout
                # (`cmd &`) keeps the EOF away forever: after the exit status,
                # wait EOF_GRACE at most.
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    if status_at is None:
                        status_at = time.monotonic()
                    if chan.eof_received or time.monotonic() - status_at > EOF_GRACE:
                        break
                if time.monotonic() >= deadline:
                    raise VmError(f"command did not finish: {line}", kind="timeout", guest=self.guest,
                                  timeout=timeout, stdout=b"".join(out).decode(errors="replace")[-2000:],
                                  stderr=b"".join(err).decode(errors="replace")[-2000:])
                if chan.closed and not chan.exit_status_ready():
                    raise VmError(f"SSH channel closed during: {line}", kind="ssh", guest=self.guest)
                # Wait for data or the exit status: a Channel has a fileno()
                # that becomes readable on either (paramiko docs, Channel.fileno).
                select.select([chan], [], [], min(0.05 if status_at else 0.2, max(0.0, deadline - time.monotonic())))
            rc = chan.recv_exit_status()
        except VmError:
            raise
        except Exception as exc:  # noqa: BLE001 - broken transport mid-command
            raise VmError(f"SSH failed during: {line}: {type(exc).__name__}: {exc}",
                          kind="ssh", guest=self.guest) from exc
        finally:
            chan.close()
        return rc, b"".join(out), b"".join(err), time.monotonic() - t0
