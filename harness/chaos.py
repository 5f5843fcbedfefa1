"""Test-only faults in the harness's own machinery (issue 13, "Harness
chaos"): ``CRUCIBLE_CHAOS=KIND@STEP[,KIND@STEP...]`` makes the guest
target break itself in the Nth scenario a pytest process runs (the Nth
entry; ``-`` for none), just before the first command of the runner's step
STEP (setup, ready, dump, between, restore, verify):

* ``kill``      SIGKILL QEMU (a crashed host-side VM)
* ``stop``      QMP ``stop`` (the guest freezes; QEMU still answers)
* ``sigstop``   SIGSTOP QEMU (nothing answers, not even QMP)
* ``diskfull``  fill the guest's root filesystem
* ``drop``      drop the channel the steps go over (the agent's socket, SSH)

Unset, nothing here runs. The tests are tests/test_harness_chaos.py.
"""

from __future__ import annotations

import os
import signal
from typing import Any

KINDS = ("kill", "stop", "sigstop", "diskfull", "drop")
_STATE = {"scenario": 0, "fired": 0}


def scenario_begins() -> None:
    _STATE["scenario"] += 1


def before_step(target: Any, step: str) -> None:
    spec = os.environ.get("CRUCIBLE_CHAOS")
    n = _STATE["scenario"]
    if not spec or _STATE["fired"] >= n:
        return
    entries = spec.split(",")
    if n > len(entries):
        return
    kind, _, at = entries[n - 1].partition("@")
    if kind not in KINDS or at != step:
        return
    _STATE["fired"] = n
    guest = target.guest
    if kind == "kill":
        os.kill(guest.pid(), signal.SIGKILL)
        guest._proc.wait()  # noqa: SLF001 - the test wants it dead before the step, not racing it
    elif kind == "sigstop":
        os.kill(guest.pid(), signal.SIGSTOP)
    elif kind == "stop":
        guest._qmp.command("stop")  # noqa: SLF001
    elif kind == "drop":
        if target.agent is not None:
            target.agent.close()
        if guest._ssh is not None:  # noqa: SLF001
            guest._ssh.close()  # noqa: SLF001
    elif kind == "diskfull":
        # one big file over every free block (root may use the reserved ones
        # too), then whatever is left; ENOSPC ends both
        target.run(["sh", "-c", "fallocate -l $(( $(stat -f -c '%f*%S' /) - 1048576 )) /fill; "
                    "dd if=/dev/zero of=/fill2 bs=64k 2>/dev/null; sync; true"], timeout=120, step="chaos")
