"""What a local scenario run leaves on the host: a System V segment its
processes left (attached by none, last used by one of them) is removed by
the local target's cleanup; anybody else's is not."""

from __future__ import annotations

import ctypes
import os

import pytest

from harness import targets

pytestmark = pytest.mark.timeout(30)

IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p


def segments() -> set:
    with open("/proc/sysvipc/shm") as f:
        return {int(r.split()[1]) for r in f.read().splitlines()[1:]}


def used_by_child(shmid: int) -> int:
    """A child attaches the segment, detaches it and exits: its pid is the
    segment's last user (lpid)."""
    pid = os.fork()
    if pid == 0:
        addr = libc.shmat(shmid, None, 0)
        os._exit(0 if addr not in (None, ctypes.c_void_p(-1).value) and libc.shmdt(ctypes.c_void_p(addr)) == 0
                 else 1)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    return pid


def test_cleanup_removes_only_the_scenarios_unattached_segments():
    left = libc.shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
    other = libc.shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
    held = libc.shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
    assert min(left, other, held) >= 0
    addr = None
    try:
        mine = used_by_child(left)
        used_by_child(other)                    # somebody else's scenario
        addr = libc.shmat(held, None, 0)        # still attached: in use
        targets._remove_left_segments([mine, os.getpid()])
        now = segments()
        assert left not in now
        assert other in now and held in now
    finally:
        if addr:
            libc.shmdt(ctypes.c_void_p(addr))
        for s in (left, other, held):
            libc.shmctl(s, IPC_RMID, None)
