"""The gadget area of a process being restored, and the clone that
starts it (engine/build.py).

The area is mapped by one injected mmap in a hole of the image's layout
(of every member's, for a tree: the members inherit it through fork) and
unmapped by the last injected call (Builder.finish), so nothing of it
is left in the restored process. Its first page holds `syscall; int3`
(every one-by-one injection goes through it), the stages' scratch
(Builder.put) and the fd handlers' scratch (HANDLER_SCRATCH); where the
arch has a batch runner (engine/batch.py), the next BATCH_PAGES hold the
runner and its table.
"""

from __future__ import annotations

import ctypes
import os
import _signal      # not signal: signal.py builds its enums at import (enum: ~20 ms of a run under TCG)
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Tuple

from . import libc
from .errors import EngineError, Refusal
from .libc import SysError

PAGE = 4096
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
CLONE_CLEAR_SIGHAND = 0x100000000     # linux/sched.h (5.5, as clone3's set_tid)
HANDLER_SCRATCH = 2048    # offset in the gadget page of task.scratch
BATCH_PAGES = 15          # the batch runner and its table, after the gadget page (engine/batch.py)


def _maps(pid: int) -> List[dict]:
    from .procfs import parse_maps
    with open(f"/proc/{pid}/maps") as f:
        return parse_maps(f.read())


def gadget_size(arch) -> int:
    """The gadget area: its first page (the `syscall` gadget, the stages'
    scratch, the fd handlers' scratch), then, where the arch has a batch
    runner, the runner and its table (engine/batch.py)."""
    return PAGE * (1 + (BATCH_PAGES if getattr(arch, "BATCH_BLOB", None) else 0))


def place_gadget(b, busy: List[Tuple[int, int]]) -> None:
    """Map the gadget area in b's process at the lowest address clear of
    `busy` (the image's mappings: of every member, for a tree, which
    inherits it through fork) and of what the process holds now, and
    write the gadget and the batch runner into it."""
    busy = list(busy)
    size = gadget_size(b.arch)
    from .procfs import parse_maps
    from .procfs import read_all
    lines = read_all(f"/proc/{b.pid}/maps").decode("utf-8", "surrogateescape").splitlines()
    for ln in lines:
        lo, _, rest = ln.partition("-")
        hi = int(rest[:rest.index(" ")], 16)
        if hi <= b.arch.TASK_SIZE:
            busy.append((int(lo, 16), hi))
    addr = _free_gap(busy, size)
    got = b.call("mmap", addr, size, 7, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if got != addr:
        raise EngineError(f"gadget page landed at {got:#x}, not {addr:#x}", pid=b.pid)
    # Its vdso blocks as they are now (the gadget's mmap, in a gap, moved
    # none): clear_address_space and move_vdso take them from here instead
    # of reading the ~150 lines of maps twice more (Builder.vdso_now).
    names = b.VDSO_NAMES
    b.vdso_now = [v for v in parse_maps("\n".join(ln for ln in lines if ln.endswith(names)))
                  if v["path"] in names]
    b.task.write_mem(addr, b.arch.GADGET)
    if size > PAGE:
        # Through /proc/PID/mem: a ptrace write into an executable mapping
        # keeps the instruction cache coherent (arm64 flush_ptrace_access),
        # which process_vm_writev does not promise.
        os.pwrite(b.task.mem_fd(), b.arch.BATCH_BLOB, addr + PAGE)
    b.use_gadget(addr, size)


def _free_gap(busy: List[Tuple[int, int]], size: int, low: int = 0x10000000) -> int:
    """Lowest address >= low with `size` bytes clear of every busy range."""
    addr = low
    for s, e in sorted(busy):
        if e <= addr:
            continue
        if s >= addr + size:
            break
        addr = (e + PAGE - 1) & ~(PAGE - 1)
    return addr


def clone_with_pid(pid: int, arch) -> Tuple[int, int]:
    """clone3 with set_tid=[pid]; returns (child pid, address of a syscall
    instruction in the child). Raises Refusal(pid-in-use | capability).

    With CLONE_CLEAR_SIGHAND: the child's sigactions are then known
    without reading the restorer's 62 one by one (signals.cleared_actions),
    and none of them points into the restorer's code."""
    tramp = libc.exec_page(arch.CLONE3_TRAMPOLINE)
    fn = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t)(tramp)
    tid = (ctypes.c_int * 1)(pid)
    args = arch.CloneArgs(flags=CLONE_CLEAR_SIGHAND, exit_signal=_signal.SIGCHLD, set_tid=ctypes.addressof(tid),
                          set_tid_size=1)
    ret = fn(ctypes.addressof(args), ctypes.sizeof(args))
    if ret < 0:
        err = -ret
        if err == 17:     # EEXIST
            raise Refusal("pid-in-use", f"PID {pid} was taken before it could be restored", pid=pid)
        if err == 1:      # EPERM
            raise Refusal("capability", "clone3 set_tid needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE", pid=pid)
        raise SysError("clone3", err, pid)
    return ret, tramp + arch.TRAMPOLINE_SYSCALL_OFFSET
