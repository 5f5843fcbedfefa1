"""Support for the interrupted-syscall and pending-signal tests: the
blocker target (tests/targets/blocker.c), its output, and signal senders
with an exact siginfo (sigqueue, rt_tgsigqueueinfo)."""

from __future__ import annotations

import ctypes
import os
import re
import struct
import subprocess
import time
from typing import List, Optional

import pytest

from engine_core_support import TARGETS, wait_for

_libc = ctypes.CDLL(None, use_errno=True)
SI_QUEUE = -1
SIGRTMIN = 34       # glibc keeps 32 and 33 for itself
NR = {"poll": 7, "read": 0, "nanosleep": 35, "select": 23, "futex": 202, "restart_syscall": 219,
      "clock_nanosleep": 230, "epoll_wait": 232, "pselect6": 270, "rt_sigtimedwait": 128}


@pytest.fixture(scope="session")
def blocker_bin(tmp_path_factory) -> str:
    exe = str(tmp_path_factory.mktemp("blocker-bin") / "blocker")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "blocker.c")],
                   check=True, capture_output=True)
    return exe


def lines(path: str) -> List[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def start_blocker(procs, exe: str, out: str, mode: str, ms: int = 1000, nr: Optional[int] = None,
                  sa_restart: bool = False):
    p = procs.start([exe, out, mode, str(ms)] + (["restart"] if sa_restart else []), cwd=os.path.dirname(out))
    wait_for(lambda: "ready" in lines(out), what=f"blocker {mode} ready")
    if nr is not None:
        wait_for(lambda: syscall_nr(p.pid) == nr, what=f"blocker {mode} blocked in syscall {nr}")
    return p


def syscall_nr(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.lstrip("-").isdigit() else None


def done_line(out: str, timeout: float = 10.0) -> dict:
    line = wait_for(lambda: next((x for x in lines(out) if x.startswith("done ")), None),
                    timeout=timeout, what="the call to return")
    d = dict(re.findall(r"(\w+)=(\S*)", line))
    return {k: (int(v) if v.lstrip("-").isdigit() else v) for k, v in d.items()}


def sig_lines(out: str) -> List[tuple]:
    """(signo, code, pid, uid, value) of every handler run, in order."""
    got = []
    for x in lines(out):
        m = re.match(r"sig (\d+) code=(-?\d+) pid=(\d+) uid=(\d+) value=(-?\d+)", x)
        if m:
            got.append(tuple(int(g) for g in m.groups()))
    return got


def write_pipe(pid: int, data: bytes) -> None:
    """Into the target's own pipe (its write end is fd 5): opening
    /proc/PID/fd/5 opens that pipe, not a copy."""
    fd = os.open(f"/proc/{pid}/fd/5", os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _siginfo(sig: int, value: int) -> bytes:
    # si_signo, si_errno, si_code, pad, si_pid, si_uid, si_value
    return struct.pack("<iiiiiIq", sig, 0, SI_QUEUE, 0, os.getpid(), os.getuid(), value).ljust(128, b"\0")


def sigqueue(pid: int, sig: int, value: int) -> None:
    """Process-wide (shared queue), like sigqueue(3)."""
    buf = ctypes.create_string_buffer(_siginfo(sig, value), 128)
    if _libc.syscall(129, pid, sig, buf) != 0:      # rt_sigqueueinfo
        raise OSError(ctypes.get_errno(), "rt_sigqueueinfo")


def tgsigqueue(pid: int, sig: int, value: int) -> None:
    """To the thread (per-thread queue)."""
    buf = ctypes.create_string_buffer(_siginfo(sig, value), 128)
    if _libc.syscall(297, pid, pid, sig, buf) != 0:  # rt_tgsigqueueinfo
        raise OSError(ctypes.get_errno(), "rt_tgsigqueueinfo")


def pending_sets(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        st = dict(x.split(":\t", 1) for x in f.read().splitlines() if ":\t" in x)
    return {k: int(st[k], 16) for k in ("SigPnd", "ShdPnd", "SigBlk")}


def monotonic_ms() -> float:
    return time.monotonic() * 1000
