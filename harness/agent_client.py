"""The host's end of the resident agent (harness/agent.py): JSON lines over
the unix socket QEMU gives the guest's virtio-serial port.

One :class:`AgentLink` per guest, connected once before the golden snapshot
and kept across every revert (the chardev is host state). A request that
gets no reply in its time (plus a grace for a loaded host) is a hung guest
or agent; a closed socket or a dead QEMU is a crashed one: both raise
:class:`AgentError` with that ``kind`` and the caller decides (the runner:
outcome ``hung``/``crashed``, a fresh guest next).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import select
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from vm.argv import AGENT_PORT

#: Seconds a reply may come after the request's own timeout (the agent kills
#: the command at ``timeout`` and answers; a loaded TCG guest needs slack).
def grace_for(timeout: float) -> float:
    return 5.0 + 0.25 * timeout

_IDS = itertools.count(1)


class AgentError(Exception):
    """``kind``: ``timeout`` (no reply in time), ``died`` (QEMU is gone),
    ``broken`` (the socket closed or failed), ``agent`` (it answered an error)."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        self.message = message
        super().__init__(message)


class AgentLink:
    """JSON-lines requests to one guest's agent."""

    def __init__(self, path: str, alive: Callable[[], bool], guest: str = "guest"):
        self.path = path
        self.alive = alive
        self.guest = guest
        self._sock: Optional[socket.socket] = None
        self._buf = bytearray()
        self._scanned = 0        # bytes of _buf known to hold no newline

    def connect(self, deadline: float) -> None:
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise AgentError("died", f"guest {self.guest}: QEMU exited")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                self._sock = s
                return
            except OSError as e:
                last = e
                s.close()
            time.sleep(0.05)
        raise AgentError("broken", f"guest {self.guest}: agent socket {self.path}: {last}")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def request(self, op: str, timeout: float, grace: Optional[float] = None, bulk: Optional[bytes] = None,
                **args: Any) -> Dict[str, Any]:
        """Send one request (``bulk``: raw bytes after its line), wait
        ``timeout + grace`` for its reply; a reply's raw bytes are its
        ``bulk`` (bytes).

        Raises:
            AgentError: see the class; ``agent`` when the agent reports an error.
        """
        if self._sock is None:
            raise AgentError("broken", f"guest {self.guest}: agent not connected")
        rid = next(_IDS)
        head = {"id": rid, "op": op, "timeout": timeout, **args}
        if bulk is not None:
            head["bulk"] = len(bulk)
        line = (json.dumps(head) + "\n").encode()
        try:
            self._sock.sendall(line)
            if bulk:
                self._sock.sendall(bulk)
        except OSError as e:
            self.close()
            raise AgentError("broken" if self.alive() else "died", f"guest {self.guest}: agent send: {e}") from None
        grace = grace_for(timeout) if grace is None else grace
        deadline = time.monotonic() + timeout + grace
        pending: Optional[Dict[str, Any]] = None      # a reply line whose raw bytes are still coming
        while True:
            # a reply can carry a whole file: search only what came since
            while True:
                if pending is not None:
                    need = pending["bulk"]
                    if len(self._buf) < need:
                        break
                    rep, pending = pending, None
                    rep["bulk"] = bytes(self._buf[:need])
                    del self._buf[:need]
                    self._scanned = 0
                    if rep.get("id") == rid:
                        return rep
                    continue          # a stale reply's bytes: skipped whole
                nl = self._buf.find(b"\n", self._scanned)
                if nl < 0:
                    self._scanned = len(self._buf)
                    break
                raw = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                self._scanned = 0
                try:
                    rep = json.loads(raw)
                except ValueError:
                    continue          # a line cut by a revert
                if not isinstance(rep, dict):
                    continue
                if isinstance(rep.get("bulk"), int) and rep["bulk"] > 0:
                    pending = rep
                    continue
                if rep.get("id") != rid:
                    continue          # a reply to a request from before a revert
                if "error" in rep:
                    raise AgentError("agent", f"guest {self.guest}: agent: {rep['error']}")
                if "bulk" in rep:
                    rep["bulk"] = b""
                return rep
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError("timeout", f"guest {self.guest}: no agent reply to {op} in {timeout + grace:g} s")
            if not self.alive():
                self.close()
                raise AgentError("died", f"guest {self.guest}: QEMU exited during {op}")
            r, _, _ = select.select([self._sock], [], [], min(0.2, left))
            if r:
                try:
                    chunk = self._sock.recv(1 << 20)
                except OSError as e:
                    chunk, err = b"", e
                else:
                    err = None
                if not chunk:
                    self.close()
                    kind = "broken" if self.alive() else "died"
                    raise AgentError(kind, f"guest {self.guest}: agent socket closed during {op}"
                                     + (f" ({err})" if err else ""))
                self._buf += chunk

    def drain(self) -> None:
        """Forget bytes already received (replies nobody will ask for)."""
        self._buf = bytearray()
        self._scanned = 0
        if self._sock is None:
            return
        while select.select([self._sock], [], [], 0)[0]:
            try:
                if not self._sock.recv(1 << 20):
                    return
            except OSError:
                return

    # -- the ops ------------------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float, stdin: Optional[bytes] = None,
            script: bool = False, warm: bool = False, env: Optional[Dict[str, str]] = None,
            cwd: Optional[str] = None) -> Dict[str, Any]:
        """``warm``: a ckpt command runs in a fork of the agent's warm engine
        when that is exact (the reply's ``warm``; ``cold_why`` when not)."""
        extra: Dict[str, Any] = {}
        if stdin:
            extra["stdin_b64"] = base64.b64encode(stdin).decode()
        if warm:
            extra["warm"] = True
        if env is not None:
            extra["env"] = dict(env)
        if cwd is not None:
            extra["cwd"] = cwd
        rep = self.request("script" if script else "run", timeout, argv=[str(a) for a in argv], **extra)
        rep["stdout"] = base64.b64decode(rep.pop("stdout_b64", ""))
        rep["stderr"] = base64.b64decode(rep.pop("stderr_b64", ""))
        return rep

    def put(self, data: bytes, path: str, mode: Optional[int] = None, timeout: float = 120,
            fresh: Optional[str] = None) -> None:
        """``fresh``: a directory the agent removes first (harness/agent.py)."""
        extra: Dict[str, Any] = {}
        if mode is not None:
            extra["mode"] = mode
        if fresh:
            extra["fresh"] = fresh
        self.request("put", timeout, bulk=bytes(data), path=path, **extra)

    def gone(self, pids: List[int], seconds: float, timeout: float) -> List[int]:
        """Wait in the guest until ``pids`` are gone (at most ``seconds``);
        the ones still there."""
        return [int(p) for p in self.request("gone", timeout, pids=[int(p) for p in pids],
                                             seconds=seconds).get("left") or []]

    def get(self, path: str, timeout: float = 120) -> bytes:
        return self.request("get", timeout, path=path)["bulk"]

    def ping(self, timeout: float = 10, grace: Optional[float] = None) -> int:
        return int(self.request("ping", timeout, grace=grace)["pid"])

    def zygote_note(self, timeout: float = 10) -> str:
        """Why the agent's warm engine is off ("" = on)."""
        return str(self.request("ping", timeout).get("zygote", "an agent without a warm engine"))

    def set_clock(self, timeout: float = 10) -> None:
        self.request("clock", timeout, t=time.time())


AGENT_LOG = "/var/log/crucible-agent.log"


def agent_flags() -> List[str]:
    """python3's options for the agent: those the guest's ckpt wrapper gives
    its python3 (vm/recipe.py CKPT_WRAPPER_FAST), so that the agent's warm
    engine runs in the same interpreter configuration (harness/zygote.py)."""
    from vm.recipe import CKPT_WRAPPER_FAST
    from .zygote import wrapper_flags
    return wrapper_flags(CKPT_WRAPPER_FAST, "/opt/crucible") or []


def start_line(python: str, scripts: str) -> str:
    """The guest shell line (for SSH) that loads virtio_console where it is a
    module and starts the agent detached, its stdio off the SSH channel.
    (The engine and the guest scripts are byte-compiled at install:
    harness/guestinstall.py.)"""
    flags = "".join(f + " " for f in agent_flags())
    return (f"(test -d /sys/class/virtio-ports || modprobe virtio_console) && "
            f"setsid -f {python} {flags}{scripts}/agent.py {AGENT_PORT} </dev/null >/dev/null 2>>{AGENT_LOG}")


def env_ok() -> bool:
    """CRUCIBLE_AGENT=0 turns the agent off (every step over SSH, as before)."""
    return os.environ.get("CRUCIBLE_AGENT", "1") != "0"


def warm_ok() -> bool:
    """CRUCIBLE_WARM_CKPT=0 execs every ckpt (no warm engine, as before it)."""
    return os.environ.get("CRUCIBLE_WARM_CKPT", "1") != "0"
