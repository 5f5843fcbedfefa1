"""Kill what a test run started once the run is gone, even if it was killed.

Test targets run in their own sessions (so a signal to pytest's process
group does not reach them) and restored targets are children of nobody the
run controls; a pytest killed half way used to leave them running, some
of them ptrace-stopped. They cannot guard themselves: a thread, a pipe to
the runner or PR_SET_PDEATHSIG would change what is dumped (a pipe peer
outside the dump, a refused pdeath signal).

So the run marks its environment with a token (``CRUCIBLE_LIFEGUARD``):
every process it starts inherits it, and a restored process carries it
too, since the environment block is part of the memory that is restored.
A watchdog in its own session waits on a pidfd of the run and, when the
run has exited for whatever reason, SIGKILLs every process whose initial
environment (/proc/PID/environ) holds exactly that token. Nothing else is
touched: a process that never had the token is never killed.
"""
from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
from typing import List, Optional

VAR = "CRUCIBLE_LIFEGUARD"


def marked(token: str) -> List[int]:
    """PIDs (not this process) whose initial environment holds the token."""
    needle = f"{VAR}={token}".encode()
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            out.append(int(name))
    return out


def sweep(token: str) -> List[int]:
    """SIGKILL every marked process, twice over: one may fork while the first pass runs."""
    killed = set()
    for _ in range(2):
        for pid in marked(token):
            try:
                os.kill(pid, signal.SIGKILL)     # again if still dying: harmless
                killed.add(pid)
            except OSError:
                pass
    return sorted(killed)


def guard(token: Optional[str] = None) -> str:
    """Mark this process's future children with a token and start the
    watchdog that sweeps them when this process exits. Returns the token.
    The watchdog holds no fd of ours and we hold none of its, so nothing a
    target inherits from us changes."""
    token = token or f"{os.getpid()}-{secrets.token_hex(6)}"
    os.environ[VAR] = token
    env = {k: v for k, v in os.environ.items() if k != VAR}   # the watchdog must not sweep itself
    # Detached (the first child forks it and exits): it is not a descendant
    # of the run, which surveys and process-tree tests would otherwise see.
    subprocess.run([sys.executable, "-S", os.path.abspath(__file__), token, str(os.getpid())],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   close_fds=True, start_new_session=True, env=env, timeout=30, check=True)
    return token


def _watch(token: str, pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        sweep(token)
        return
    select.select([fd], [], [])
    sweep(token)


if __name__ == "__main__":
    if os.fork() == 0:
        _watch(sys.argv[1], int(sys.argv[2]))
    os._exit(0)
