"""The private memory of a *quiet* workload, digested from outside.

Runs in the guest (stdlib only, Python >= 3.9), called by procstate's
snapshot. A workload started with ``quiet`` (harness/workload.py) ticks a
few times and then sleeps in one ``sigwaitinfo`` with no timeout until the
harness's SIGUSR1: from then on nothing in it runs, so every byte it owns
must be the same right before the dump and right after the restore. The
pages a scenario never reads (an interpreter's heap, a library's data, a
buffer the workload filled and forgot) are then judged too, not only the
mappings the workload checks itself.

What may still legitimately change, and is left out of the digest:
  * errno and the rseq area of the thread (the workload publishes their
    addresses): the freeze interrupts the sleep (EINTR, and the call is
    retried, setting errno), and the kernel writes the current CPU into the
    rseq area whenever the thread returns to user space on another CPU;
  * the stack below the stack pointer (minus the red zone): dead bytes
    that the retry of the interrupted call writes again.
The retry also leaves its locals in the live frames above the stack
pointer. So before digesting, the harness *nudges* the process once
(PTRACE_SEIZE, PTRACE_INTERRUPT, detach): the same interruption the freeze
of a dump causes, after which the state is the one a retry leaves, on both
sides of the dump (a second retry writes the same bytes).

Only MAP_PRIVATE mappings are digested (what the process owns; a shared
mapping's bytes belong to its file or to other processes too), but code, per
256 KiB block of addresses, each page with its address: a restore may split
or merge mappings differently, the digest of an address block is the same.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Dict, List, Optional, Tuple

try:
    from _blake2 import blake2b     # the builtin, not OpenSSL (hashlib's import loads libcrypto)
except ImportError:  # pragma: no cover
    from hashlib import blake2b

PAGE = 4096
BLOCK = 64 * PAGE
RED_ZONE = 128          # x86_64 ABI; aarch64 has none (harmless: 128 more bytes compared)
# rt_sigtimedwait, the call sigwaitinfo makes (its 3rd argument, the timeout, NULL)
SIGTIMEDWAIT_NR = {"x86_64": 128, "aarch64": 137}
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class NotQuiet(Exception):
    """The process is not (or not provably) in its quiet sleep."""


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def quiet_call(pid: int) -> Optional[List[str]]:
    """/proc/PID/syscall split, when the process sleeps in sigwaitinfo
    (rt_sigtimedwait with no timeout); else None."""
    text = _read(f"/proc/{pid}/syscall")
    stat = _read(f"/proc/{pid}/stat")
    if not text or not stat or stat.rsplit(")", 1)[1].split()[0] != "S":
        return None
    parts = text.split()
    nr = SIGTIMEDWAIT_NR.get(os.uname().machine)
    if len(parts) < 9 or parts[0] != str(nr) or int(parts[3], 16) != 0:
        return None
    return parts


def nudge(pid: int, seconds: float = 5.0) -> None:
    """Interrupt the sleep once, as a dump's freeze does, and let it go on."""
    if _libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        e = ctypes.get_errno()
        raise NotQuiet(f"PTRACE_SEIZE: {os.strerror(e)}")
    try:
        if _libc.ptrace(PTRACE_INTERRUPT, pid, None, None) != 0:
            e = ctypes.get_errno()
            raise NotQuiet(f"PTRACE_INTERRUPT: {os.strerror(e)}")
        os.waitpid(pid, WALL)
    finally:
        _libc.ptrace(PTRACE_DETACH, pid, None, None)
    end = time.monotonic() + seconds
    while quiet_call(pid) is None:      # back in the call after the retry
        if time.monotonic() > end:
            raise NotQuiet("not back in sigwaitinfo after the nudge")
        time.sleep(0.01)


def _regions(pid: int) -> List[Tuple[int, int]]:
    """The private mappings the process can read, but code: writable ones
    and read-only ones alike (a library's RELRO pages are written by the
    dynamic linker, then made read-only); not the kernel's ([vvar] changes
    by itself, [vdso] and [vsyscall] are the kernel's code)."""
    out = []
    for line in (_read(f"/proc/{pid}/maps") or "").splitlines():
        parts = line.split(None, 5)
        perms, name = parts[1], (parts[5].strip() if len(parts) > 5 else "")
        if perms[0] == "r" and perms[2] != "x" and perms[3] == "p" \
                and not (name.startswith("[") and name not in ("[heap]", "[stack]")):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def digest(pid: int, skip: List[Tuple[int, int]]) -> Dict[str, str]:
    """``{"mem.<block>": hex}`` for every 256 KiB block of addresses holding
    private memory (_regions), the ``skip`` (addr, length) ranges zeroed."""
    blocks: Dict[int, object] = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for lo, hi in _regions(pid):
            try:
                mem.seek(lo)
                data = bytearray(mem.read(hi - lo))
            except OSError:
                data = bytearray()
            if len(data) < hi - lo:       # a page the kernel will not read: say so in its block
                data += b"\xff" * (hi - lo - len(data))
            for a, n in skip:
                s, e = max(a, lo), min(a + n, hi)
                if s < e:
                    data[s - lo:e - lo] = bytes(e - s)
            view = memoryview(data)
            # one update per part of a block the region covers, its address
            # first (not per page: in a TCG guest the calls were most of it)
            addr = lo
            while addr < hi:
                end = min(hi, (addr // BLOCK + 1) * BLOCK)
                h = blocks.get(addr // BLOCK)
                if h is None:
                    h = blocks[addr // BLOCK] = blake2b(digest_size=12)
                h.update(addr.to_bytes(8, "little"))
                h.update(view[addr - lo:end - lo])
                addr = end
    return {f"mem.{b * BLOCK:x}": h.hexdigest() for b, h in sorted(blocks.items())}


def _stack_skip(pid: int, call: List[str]) -> Tuple[int, int]:
    """The dead part of the sleeping thread's stack: from its mapping's
    start to the stack pointer less the red zone."""
    sp = int(call[7], 16)
    for lo, hi in _regions(pid):
        if lo <= sp < hi:
            return lo, max(0, sp - RED_ZONE - lo)
    return 0, 0


def quiet_digest(pid: int, pub: dict, tries: int = 3, seconds: float = 15.0) -> Dict[str, str]:
    """The digest of a quiet workload's memory (``mem`` = ``quiet``), or
    ``{"mem": "not quiet: why"}``: single-threaded only (only its one
    thread's errno and rseq area are published)."""
    q = pub.get("quiet") or {}
    try:
        if q.get("rseq_unknown"):
            raise NotQuiet("its rseq area was not found (the kernel writes there)")
        threads = os.listdir(f"/proc/{pid}/task")
        if len(threads) != 1:
            raise NotQuiet(f"{len(threads)} threads")
        end = time.monotonic() + seconds
        while quiet_call(pid) is None:
            if time.monotonic() > end:
                raise NotQuiet("never asleep in sigwaitinfo")
            time.sleep(0.02)
        nudge(pid)
        skip = [(int(q["errno"]), 4)] + ([(int(q["rseq"]), int(q["rseq_len"]))] if q.get("rseq") else [])
        last: Dict[str, str] = {}
        for _ in range(tries):
            call = quiet_call(pid)
            if call is None:
                raise NotQuiet("woke up while its memory was read")
            now = digest(pid, skip + [_stack_skip(pid, call)])
            if now == last and quiet_call(pid) == call:
                return dict(now, mem="quiet")
            last = now
        raise NotQuiet(f"memory still changing after {tries} reads")
    except (NotQuiet, OSError, KeyError, ValueError) as e:
        return {"mem": f"not quiet: {e}"}
