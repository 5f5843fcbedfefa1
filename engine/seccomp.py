"""seccomp: strict mode and filter programs.

Dump: the target is traced with PTRACE_O_SUSPEND_SECCOMP first, so the
injected syscalls that read its state are not judged by its filters (a
filter that kills on getitimer would otherwise kill it mid-dump). Each
filter's classic-BPF program comes from PTRACE_SECCOMP_GET_FILTER (index 0
is the oldest: kernel/seccomp.c get_nth_filter counts back from the
newest) and its flags from PTRACE_SECCOMP_GET_METADATA (only
SECCOMP_FILTER_FLAG_LOG is kept by the kernel).

Restore: the new process is traced with PTRACE_O_SUSPEND_SECCOMP too, and
the filters are installed oldest first with seccomp(SECCOMP_SET_MODE_FILTER)
before the credentials are dropped (installing needs no_new_privs or
CAP_SYS_ADMIN; the new process still has ckpt's capabilities then), strict
mode with SECCOMP_SET_MODE_STRICT. The remaining injected syscalls run
unfiltered; PTRACE_DETACH ends the suspension, so the first instruction the
program runs is filtered exactly as before.

Refused: a filter that can return SECCOMP_RET_USER_NOTIF (its listener, a
supervisor's fd, cannot be carried over). Install flags the kernel does
not keep: TSYNC/TSYNC_ESRCH (one thread: nothing to sync), NEW_LISTENER and
WAIT_KILLABLE_RECV (only with USER_NOTIF), SPEC_ALLOW (see README Known
limits).
"""

from __future__ import annotations

import ctypes
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List

from . import libc, ptrace
from .errors import Refusal

PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
O_SUSPEND_SECCOMP = 0x200000
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_RET_USER_NOTIF = 0x7FC00000
BPF_RET_K = 0x06        # BPF_RET | BPF_K
INSN = 8                # struct sock_filter {u16 code; u8 jt, jf; u32 k}
PAGE = 4096


def mode_of(status: dict) -> int:
    return int(status.get("Seccomp", "0") or 0)


def suspend(task, options: int = 0) -> None:
    """Stop the task's filters judging the syscalls ckpt injects (until
    detach); `options`: the other ptrace options to keep. Raises
    Refusal(capability) when the kernel will not."""
    try:
        ptrace.set_options(task.pid, ptrace.O_TRACESYSGOOD | O_SUSPEND_SECCOMP | options)
    except libc.SysError as e:
        raise Refusal("capability", f"PTRACE_O_SUSPEND_SECCOMP: {e.message} (needs CAP_SYS_ADMIN, "
                      "ckpt itself outside seccomp, CONFIG_CHECKPOINT_RESTORE)", pid=task.pid) from None


def _filter(pid: int, index: int) -> bytes:
    n = ptrace.request(PTRACE_SECCOMP_GET_FILTER, pid, index, None)
    buf = ctypes.create_string_buffer(n * INSN)
    got = ptrace.request(PTRACE_SECCOMP_GET_FILTER, pid, index, ctypes.addressof(buf))
    return buf.raw[:got * INSN]


def _flags(pid: int, index: int) -> int:
    md = (ctypes.c_uint64 * 2)(index, 0)
    try:
        ptrace.request(PTRACE_SECCOMP_GET_METADATA, pid, ctypes.sizeof(md), ctypes.addressof(md))
    except libc.SysError:
        return 0
    return int(md[1])


def dump(pid: int, mode: int) -> dict:
    """{"mode": 0|1|2, "filters": [{"prog": hex, "flags": int}] oldest first}.
    Raises Refusal for what cannot be reinstalled."""
    filters: List[dict] = []
    if mode == 2:
        i = 0
        while True:
            try:
                prog = _filter(pid, i)
            except libc.SysError as e:
                if e.errno == 2:     # ENOENT: past the newest filter
                    break
                if e.errno in (1, 22):
                    raise Refusal("capability", f"PTRACE_SECCOMP_GET_FILTER: {e.message}", pid=pid) from None
                raise
            for j in range(0, len(prog), INSN):
                code, _, _, k = struct.unpack_from("<HBBI", prog, j)
                if code == BPF_RET_K and k & 0xFFFF0000 == SECCOMP_RET_USER_NOTIF:
                    raise Refusal("unsupported-state", f"seccomp filter {i} can return SECCOMP_RET_USER_NOTIF: "
                                  "its listener cannot be carried over", pid=pid)
            filters.append({"prog": prog.hex(), "flags": _flags(pid, i) & SECCOMP_FILTER_FLAG_LOG})
            i += 1
    elif mode not in (0, 1):
        raise Refusal("unsupported-state", f"seccomp mode {mode}", pid=pid)
    return {"mode": mode, "filters": filters}


def validate(rec: dict) -> List[Refusal]:
    """Before the process exists: can the restorer suspend the filters it
    installs (PTRACE_O_SUSPEND_SECCOMP: CAP_SYS_ADMIN, ckpt itself not
    under seccomp)?"""
    if not rec or rec["mode"] == 0:
        return []
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    why = []
    if not (int(status.get("CapEff", "0").strip(), 16) >> 21) & 1:
        why.append("CAP_SYS_ADMIN")
    if status.get("Seccomp", "0").strip() != "0":
        why.append("ckpt itself outside seccomp")
    if why:
        return [Refusal("capability", f"restoring seccomp ({describe(rec)}) needs PTRACE_O_SUSPEND_SECCOMP: "
                        + ", ".join(why))]
    return []


def describe(rec: dict) -> str:
    if rec["mode"] == 0:
        return "none"
    if rec["mode"] == 1:
        return "strict"
    return f"{len(rec['filters'])} filter(s) of " + ", ".join(
        str(len(f["prog"]) // (2 * INSN)) for f in rec["filters"]) + " instructions"


def check_record(rec) -> bool:
    try:
        return rec["mode"] in (0, 1, 2) and all(
            isinstance(f["prog"], str) and len(f["prog"]) % (2 * INSN) == 0 and isinstance(f["flags"], int)
            for f in rec["filters"]) and (rec["mode"] == 2) == bool(rec["filters"])
    except (KeyError, TypeError):
        return False


def install(b, rec: dict) -> None:
    """Builder stage: install strict mode or the filters in the new process."""
    if not rec or rec["mode"] == 0:
        return
    suspend(b.task, ptrace.O_EXITKILL)
    if rec["mode"] == 1:
        b.call("seccomp", SECCOMP_SET_MODE_STRICT, 0, 0)
        return
    progs = [bytes.fromhex(f["prog"]) for f in rec["filters"]]
    size = (max(len(p) for p in progs) + 16 + PAGE - 1) & ~(PAGE - 1)
    from .build import MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, _free_gap, _maps
    busy = [(v["start"], v["end"]) for v in b.job.vmas] + [(v["start"], v["end"]) for v in _maps(b.pid)]
    area = _free_gap(busy, size)
    got = b.call("mmap", area, size, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    try:
        for f, prog in zip(rec["filters"], progs):
            # struct sock_fprog {unsigned short len; struct sock_filter *filter}
            b.task.write_mem(got + 16, prog)
            b.task.write_mem(got, struct.pack("<H6xQ", len(prog) // INSN, got + 16))
            b.call("seccomp", SECCOMP_SET_MODE_FILTER, f["flags"], got)
    finally:
        b.call("munmap", got, size)
