"""Syscall user dispatch (prctl PR_SET_SYSCALL_USER_DISPATCH, Linux 5.11;
Wine, emulators, sandboxes): per thread, a selector byte in the process's
memory and a code range that is always allowed; while the byte says BLOCK, a
system call from anywhere else raises SIGSYS (SYS_USER_DISPATCH) instead.
No /proc file shows it; ptrace reads and sets it
(PTRACE_{GET,SET}_SYSCALL_USER_DISPATCH_CONFIG, Linux 6.4).

At the freeze each thread's configuration is read and dispatch turned off
for the tracer (an injected call of the dump would otherwise be a SIGSYS
for the process when its selector says BLOCK); release() puts it back, in
the original (after `ckpt check`, `--leave-running`, a refusal) and, from
the image, in the restored threads, as the last thing before they run (the
restore's own injected calls come first). Before Linux 6.4 it cannot be
read: not carried (README "Known limits").
"""

from __future__ import annotations

import ctypes

from . import ptrace
from .libc import SysError

SET_CONFIG, GET_CONFIG = 0x4210, 0x4211
MODE_OFF = 0        # 1: on (exclusive range); 2: inclusive range (Linux 6.16)


class Config(ctypes.Structure):
    """struct ptrace_sud_config (linux/ptrace.h)."""
    _fields_ = [("mode", ctypes.c_uint64), ("selector", ctypes.c_uint64),
                ("offset", ctypes.c_uint64), ("len", ctypes.c_uint64)]


def read(pid: int) -> "dict | None":
    """The thread's configuration when dispatch is on, else None (also
    where the kernel cannot tell: EIO before 6.4). Raises SysError."""
    c = Config()
    try:
        ptrace.request(GET_CONFIG, pid, ctypes.sizeof(c), ctypes.addressof(c))
    except SysError as e:
        if e.errno == 5:
            return None
        raise
    if c.mode == MODE_OFF:
        return None
    return {"mode": c.mode, "selector": c.selector, "offset": c.offset, "len": c.len}


def put(pid: int, conf: "dict | None") -> None:
    """Set the thread's configuration (None: off). Raises SysError."""
    c = Config(MODE_OFF, 0, 0, 0) if conf is None else \
        Config(conf["mode"], conf["selector"], conf["offset"], conf["len"])
    ptrace.request(SET_CONFIG, pid, ctypes.sizeof(c), ctypes.addressof(c))


def freeze(task) -> "dict | None":
    """At the freeze, before any injected call: the configuration, turned
    off for the tracer (release() puts task.sud back)."""
    conf = read(task.pid)
    if conf is not None:
        put(task.pid, None)
    return conf


def check_record(conf) -> bool:
    if conf is None:
        return True
    try:
        return conf["mode"] in (1, 2) and all(isinstance(conf[k], int) and 0 <= conf[k] < 1 << 64
                                               for k in ("selector", "offset", "len"))
    except (KeyError, TypeError):
        return False
