"""Shared pieces of the tests that boot real QEMU guests: finding the QEMU
processes this test process started, and a module fixture that fails when
one is left running (after killing it anyway).

Use: ``from vm_support import no_qemu_left_behind  # noqa: F401`` (pytest
picks up an autouse fixture from the module's globals).
"""

from __future__ import annotations

import os
from typing import List

import psutil
import pytest


def qemu_children() -> List[psutil.Process]:
    """Live QEMU processes below this test process. A dead QEMU can show up
    here as a zombie when this process is a child subreaper (the scenario
    harness's LocalTarget makes the pytest process one): it is reaped, not
    counted — it is not running."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "qemu-system" not in p.name():
                continue
            if p.status() == psutil.STATUS_ZOMBIE:
                try:
                    os.waitpid(p.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                continue
            out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module", autouse=True)
def no_qemu_left_behind():
    """Fails the module when a QEMU it started is still running at its end
    (killing and reaping it first)."""
    before = {p.pid for p in qemu_children()}
    yield
    left = [p for p in qemu_children() if p.pid not in before]
    for p in left:  # clean up anyway, then fail loudly
        p.kill()
        p.wait(5)
    assert not left, f"QEMU processes left behind: {[p.pid for p in left]}"
