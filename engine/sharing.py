"""What processes share without being threads of one process, by kcmp(2)
(kernel/kcmp.c): memory (CLONE_VM), the fd table (CLONE_FILES), fs: cwd,
root, umask (CLONE_FS), signal handlers (CLONE_SIGHAND).

kcmp orders the kernel objects (0 equal, 1 less, 2 greater: kcmp_ptr
compares obfuscated pointers, a total order), so groups() sorts the
processes in n log n calls instead of comparing every pair, and outside()
finds a process of the system holding one of their objects by a binary
search among them. Signal handlers are not looked for outside: two
processes share them only with their memory (README, Known limits), which
is.

The calls go straight to libc.syscall with the number resolved once: the
scan of every process of the system makes thousands of them.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Iterable, List, Tuple

from .pidfd import syscall_nr

KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND = 1, 2, 3, 4
WHAT = {KCMP_VM: "memory (CLONE_VM, or a vfork child)", KCMP_FILES: "fd table (CLONE_FILES)",
        KCMP_FS: "fs: cwd, root, umask (CLONE_FS)", KCMP_SIGHAND: "signal handlers (CLONE_SIGHAND)"}
OUTSIDE_KINDS = (KCMP_VM, KCMP_FILES, KCMP_FS)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_nr: List[int] = []


def _kcmp(a: int, b: int, kind: int) -> int:
    """-1, 0, 1 as a's object is below, the same as, above b's. Raises
    OSError (ESRCH: gone; ENOSYS: no CONFIG_KCMP)."""
    if not _nr:
        _nr.append(syscall_nr("kcmp"))
    r = _libc.syscall(ctypes.c_long(_nr[0]), ctypes.c_int(a), ctypes.c_int(b), ctypes.c_int(kind),
                      ctypes.c_ulong(0), ctypes.c_ulong(0))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return 0 if r == 0 else -1 if r == 1 else 1


def _member_kcmp(a: int, b: int, kind: int) -> int:
    try:
        return _kcmp(a, b, kind)
    except OSError as e:
        from .pidfd import _fail
        raise _fail(f"kcmp(pid {a}, pid {b}, {WHAT[kind]})", e, a) from None


def groups(pids: Iterable[int], kind: int) -> List[List[int]]:
    """Every object of type `kind` the processes hold, in kcmp order, as
    the list of its holders (in the order given). Raises Refusal
    (kernel-missing) or EngineError."""
    pids = list(pids)
    order = {p: i for i, p in enumerate(pids)}
    ranked = sorted(pids, key=functools.cmp_to_key(lambda a, b: _member_kcmp(a, b, kind)))
    out: List[List[int]] = []
    for p in ranked:
        if out and _member_kcmp(out[-1][0], p, kind) == 0:
            out[-1].append(p)
        else:
            out.append([p])
    return [sorted(g, key=order.__getitem__) for g in out]


def outside(pids: Iterable[int], kinds: Tuple[int, ...] = OUTSIDE_KINDS) -> List[Tuple[int, int, int]]:
    """[(pid, kind, other)]: a process of the system, not one of `pids`
    (nor ckpt), that holds the memory, fd table or fs of `pids`' `pid`.
    One per object and kind. Raises Refusal (kernel-missing) or
    EngineError when the processes themselves cannot be compared."""
    pids = list(pids)
    skip = set(pids) | {os.getpid()}
    others = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in skip:
            others.append(int(name))
    found: List[Tuple[int, int, int]] = []
    for kind in kinds:
        reps = [g[0] for g in groups(pids, kind)]
        seen = set()
        for other in others:
            lo, hi = 0, len(reps)
            while lo < hi:
                mid = (lo + hi) // 2
                try:
                    r = _kcmp(reps[mid], other, kind)
                except OSError:
                    break        # gone meanwhile (or a process kcmp may not look at)
                if r == 0:
                    if reps[mid] not in seen:
                        seen.add(reps[mid])
                        found.append((reps[mid], kind, other))
                    break
                if r < 0:
                    lo = mid + 1
                else:
                    hi = mid
    return found


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
