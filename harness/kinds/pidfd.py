"""``pidfd``: an fd naming a process (pidfd_open(2)).

``of: self`` names the workload itself; ``of: dead`` a child it forked,
that died (``exit: N``, or ``signal: NAME``) and was reaped while the
pidfd was open (fdinfo "Pid: -1"); ``of: outside`` a process outside the
dump (kinds/outside.py: refused, ``pidfd-outside``).

The checker compares what the pidfd names (fdinfo Pid) with what it named
before the dump, its O_NONBLOCK, a signal 0 sent through it (delivered to a
live process, ESRCH for a dead one), and, where the kernel shows it
(PIDFD_INFO_EXIT, 6.15+), the dead child's wait status.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import struct

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import List, Optional

from .core import Ctx, Opened, check, fdinfo

KIND = "pidfd"
TAGS = ("pidfd",)
SIGNALS = ("SIGKILL", "SIGTERM", "SIGHUP", "SIGUSR1")
NR_PIDFD_SEND_SIGNAL = 424          # one number on every arch (asm-generic, 424+)
PIDFD_GET_INFO = (3 << 30) | (64 << 16) | (0xFF << 8) | 11    # _IOWR(0xFF, 11, struct pidfd_info) v0
PIDFD_INFO_EXIT = 8


def fields(s) -> dict:
    return {"pidfd": s.Map({"of": s.Enum(("self", "dead", "outside")), "exit": s.Int(0, 255),
                            "signal": s.Enum(SIGNALS), "flags": s.List_(s.Enum(("PIDFD_NONBLOCK",)))},
                           required=("of",))}


def validate(e: dict, fds: dict) -> List[tuple]:
    spec = e["pidfd"]
    if spec["of"] != "dead" and ("exit" in spec or "signal" in spec):
        return [("pidfd", "exit and signal are how a dead process died: only with of: dead")]
    if "exit" in spec and "signal" in spec:
        return [("pidfd", "a process dies of an exit or of a signal, not both")]
    return []


def _wait_status(spec: dict) -> int:
    if "signal" in spec:
        return int(getattr(signal, spec["signal"]))
    return int(spec.get("exit", 0)) << 8


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    spec = e["pidfd"]
    flags = os.O_NONBLOCK if "PIDFD_NONBLOCK" in spec.get("flags", []) else 0
    if spec["of"] == "self":
        return [Opened(os.pidfd_open(os.getpid(), flags), int(e["fd"]), "pidfd")]
    if spec["of"] == "outside":
        from . import outside
        pid = outside.spawn(lambda ready: ready(), keep=-1)     # holding none of the workload's fds
        ctx.helpers.append(pid)
        return [Opened(os.pidfd_open(pid, flags), int(e["fd"]), "pidfd", {"outsider": pid})]
    r, w = os.pipe()
    child = os.fork()
    if child == 0:      # pragma: no cover - the child: dies as told once the pidfd is open
        os.close(w)
        os.read(r, 1)
        if "signal" in spec:
            sig = getattr(signal, spec["signal"])
            if sig != signal.SIGKILL:       # the workload's handler and mask are the child's too
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        os._exit(int(spec.get("exit", 0)))
    os.close(r)
    fd = os.pidfd_open(child, flags)
    os.close(w)
    _, status = os.waitpid(child, 0)
    if status != _wait_status(spec):
        raise RuntimeError(f"pidfd fd {e['fd']}: the child died with status {status:#x}, "
                           f"the scenario says {_wait_status(spec):#x}")
    return [Opened(fd, int(e["fd"]), "pidfd")]


def named(fd: int) -> int:
    return int(fdinfo(fd).get("Pid", "0"))


def exit_status(fd: int) -> Optional[int]:
    """The dead process's wait status (PIDFD_INFO_EXIT), None where the kernel has none to show."""
    buf = bytearray(64)
    struct.pack_into("Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(fd, PIDFD_GET_INFO, buf)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL, errno.ESRCH):
            return None
        raise
    return struct.unpack_from("i", buf, 60)[0] if struct.unpack_from("Q", buf, 0)[0] & PIDFD_INFO_EXIT else None


def send0(fd: int) -> int:
    """pidfd_send_signal(fd, 0): 0, or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.syscall(ctypes.c_long(NR_PIDFD_SEND_SIGNAL), ctypes.c_int(fd), ctypes.c_int(0), None, ctypes.c_uint(0))
    return 0 if ret == 0 else ctypes.get_errno()


def extras(rec: dict) -> None:
    rec["extra"].update(named=named(rec["fd"]), pid=os.getpid())


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    rec = recs[0]
    fd, spec, seen = rec["fd"], e["pidfd"], rec["extra"]
    if phase == "inspect":
        want = {"self": seen["pid"], "outside": seen.get("outsider"), "dead": -1}[spec["of"]]
        out = [check(fd, "the process it names (fdinfo Pid)", want, named(fd)),
               check(fd, "what it named before the dump", want, seen["named"]),
               check(fd, "O_NONBLOCK", "PIDFD_NONBLOCK" in spec.get("flags", []),
                     bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK))]
        if spec["of"] == "dead":
            got = exit_status(fd)
            if got is not None:
                out.append(check(fd, "the dead process's wait status (PIDFD_INFO_EXIT)", _wait_status(spec), got))
        return out
    if phase == "mutate":
        return [check(fd, "pidfd_send_signal(0): errno", errno.ESRCH if spec["of"] == "dead" else 0, send0(fd))]
    return []
