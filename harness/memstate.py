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
    that the retry of the interrupted call writes again;
  * droppable mappings (MAP_DROPPABLE, Linux 6.11; glibc >= 2.41's vDSO
    getrandom state): the kernel may zero them at any moment.
The retry also leaves its locals in the live frames above the stack
pointer. So before digesting, the harness *nudges* the process once
(PTRACE_SEIZE, PTRACE_INTERRUPT, detach): the same interruption the freeze
of a dump causes, after which the state is the one a retry leaves, on both
sides of the dump (a second retry writes the same bytes).

Only MAP_PRIVATE mappings are digested (what the process owns; a shared
mapping's bytes belong to its file or to other processes too), but code, per
256 KiB block of addresses, its non-zero pages with their addresses: a
restore may split or merge mappings differently, and may or may not map a
page of zeros, the digest of an address block is the same. Pages of an
anonymous mapping in neither memory nor swap (/proc/PID/pagemap) are zeros
and not read at all.

One read makes the digest, bracketed by the process's context switch
counts (_switches): unchanged, it did not run while its memory was read.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from typing import Dict, List, Optional, Tuple


PAGE = 4096
BLOCK = 64 * PAGE
_ZERO = bytes(PAGE)
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


def _regions(pid: int) -> List[Tuple[int, int, bool]]:
    """The private mappings the process can read, but code: writable ones
    and read-only ones alike (a library's RELRO pages are written by the
    dynamic linker, then made read-only); not the kernel's ([vvar] changes
    by itself, [vdso] and [vsyscall] are the kernel's code). Each as (lo,
    hi, anonymous): a page of an anonymous one that is in neither memory
    nor swap holds zeros, a file's holds the file's bytes."""
    out = []
    droppable = _droppable(pid)
    for line in (_read(f"/proc/{pid}/maps") or "").splitlines():
        parts = line.split(None, 5)
        perms, name = parts[1], (parts[5].strip() if len(parts) > 5 else "")
        if perms[0] == "r" and perms[2] != "x" and perms[3] == "p" \
                and not (name.startswith("[") and name not in ("[heap]", "[stack]")):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo not in droppable:
                out.append((lo, hi, name in ("", "[heap]", "[stack]")))
    return out


def _droppable(pid: int) -> set:
    """The starts of the process's droppable mappings (VmFlags "dp",
    mmap MAP_DROPPABLE, Linux 6.11): the kernel may zero their pages at any
    moment, so their bytes are not the process's to keep, and an exact
    restore leaves them out (glibc >= 2.41 keeps its vDSO getrandom state in
    one: a copy would hand two processes the same random bytes; engine/dump.py).
    Read from smaps, which only kernels that have such mappings need."""
    if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (6, 11):
        return set()
    out, start = set(), None
    for line in (_read(f"/proc/{pid}/smaps") or "").splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            start = int(head.split("-")[0], 16)
        elif head == "VmFlags:" and start is not None and "dp" in line.split()[1:]:
            out.add(start)
    return out


def _populated(pagemap, lo: int, hi: int) -> List[Tuple[int, int]]:
    """The runs of pages of [lo, hi) in memory or in swap (/proc/PID/pagemap
    bits 63 and 62). Read through /proc/PID/mem, a page in neither would be
    mapped to the zero page: a warm workload's heap holds 64 MB never
    touched (harness/warmfork.py HEAP_PAD), which cost seconds to read and
    hash in a TCG guest, and which the engine then dumped as 64 MB of
    present zero pages."""
    pagemap.seek(lo // PAGE * 8)
    raw = pagemap.read((hi - lo) // PAGE * 8)
    out: List[Tuple[int, int]] = []
    for i in range(7, len(raw), 8):
        if raw[i] & 0xc0:
            a = lo + (i // 8) * PAGE
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], a + PAGE)
            else:
                out.append((a, a + PAGE))
    if len(raw) < (hi - lo) // PAGE * 8:     # not told: read the rest
        out.append((lo + len(raw) // 8 * PAGE, hi))
    return out


def _md5():
    """Against a bug, not an adversary, any 128-bit digest will do: MD5 is
    the one a TCG guest computes fastest (harness/world.py digest_tree);
    OpenSSL's, loaded in the agent this runs in a fork of (BLAKE2b took
    ~0.1 s of every quiet snapshot there)."""
    import hashlib
    return hashlib.md5(usedforsecurity=False)


class _Blocks:
    """The digests per block of addresses, fed with the memory's non-zero
    pages in address order: each maximal run of contiguous non-zero pages
    within a block as its address, its length and its bytes. A zero page
    adds nothing, read or known to be zero without reading (never touched):
    the digest is one of the bytes at each address, whether a page is
    present, how the mappings are split or merged (a restore may do either
    differently)."""

    def __init__(self) -> None:
        self.hashes: Dict[int, object] = {}
        self.run_lo = self.run_hi = -1
        self.parts: List[memoryview] = []

    def add(self, addr: int, data: bytearray) -> None:
        """``data`` (whole pages) at ``addr``; called in address order."""
        view, n, off = memoryview(data), len(data), 0
        while off < n:
            if data.startswith(_ZERO, off):
                off += PAGE
                continue
            a = addr + off
            if a != self.run_hi or a % BLOCK == 0:
                self.flush()
                self.run_lo = a
            # as far as non-zero pages go on, within the block: one update
            end, limit = off + PAGE, min(n, off + BLOCK - a % BLOCK)
            while end < limit and not data.startswith(_ZERO, end):
                end += PAGE
            self.parts.append(view[off:end])
            self.run_hi, off = addr + end, end

    def flush(self) -> None:
        if not self.parts:
            return
        b = self.run_lo // BLOCK
        h = self.hashes.get(b)
        if h is None:
            h = self.hashes[b] = _md5()
        h.update(self.run_lo.to_bytes(8, "little") + (self.run_hi - self.run_lo).to_bytes(8, "little"))
        for p in self.parts:
            h.update(p)
        self.parts = []

    def result(self) -> Dict[str, str]:
        self.flush()
        return {f"mem.{b * BLOCK:x}": h.hexdigest() for b, h in sorted(self.hashes.items())}


def digest(pid: int, skip: List[Tuple[int, int]]) -> Dict[str, str]:
    """``{"mem.<block>": hex}`` for every 256 KiB block of addresses holding
    non-zero private memory (_regions), the ``skip`` (addr, length) ranges
    zeroed."""
    blocks = _Blocks()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, \
            open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for lo, hi, anon in _regions(pid):
            for a, b in (_populated(pagemap, lo, hi) if anon else [(lo, hi)]):
                data = bytearray(b - a)
                try:
                    mem.seek(a)
                    got = mem.readinto(data) or 0
                except OSError:
                    got = 0
                if got < b - a:     # a page the kernel will not read: say so in its block
                    data[got:] = b"\xff" * (b - a - got)
                for s, n in skip:
                    s, e = max(s, a), min(s + n, b)
                    if s < e:
                        data[s - a:e - a] = bytes(e - s)
                blocks.add(a, data)
    return blocks.result()


def _stack_skip(pid: int, call: List[str]) -> Tuple[int, int]:
    """The dead part of the sleeping thread's stack: from its mapping's
    start to the stack pointer less the red zone."""
    sp = int(call[7], 16)
    for lo, hi, _ in _regions(pid):
        if lo <= sp < hi:
            return lo, max(0, sp - RED_ZONE - lo)
    return 0, 0


def _switches(pid: int) -> Optional[List[str]]:
    """The process's voluntary and involuntary context switch counts: a
    task that runs at all, however briefly, leaves the CPU again by one or
    the other (kernel/sched/core.c __schedule), and /proc/PID/syscall
    answers only once the task is off the CPU (task_current_syscall waits
    for it). Read before ``quiet_call`` on the way in and after it on the
    way out, unchanged counts mean the process did not run in between: one
    read of its memory is then one moment, where it took two equal reads
    (each seconds in a TCG guest)."""
    text = _read(f"/proc/{pid}/status") or ""
    got = [line for line in text.splitlines() if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt"))]
    if len(got) != 2:
        raise NotQuiet("no context switch counts in /proc/PID/status")
    return got


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
        for _ in range(tries):
            switches = _switches(pid)
            call = quiet_call(pid)
            if call is None:
                raise NotQuiet("woke up while its memory was read")
            now = digest(pid, skip + [_stack_skip(pid, call)])
            if quiet_call(pid) == call and _switches(pid) == switches:
                return dict(now, mem="quiet")
        raise NotQuiet(f"it ran while its memory was read, {tries} times")
    except (NotQuiet, OSError, KeyError, ValueError) as e:
        return {"mem": f"not quiet: {e}"}
