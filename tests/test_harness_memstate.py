"""harness/memstate.py: the judge's digest of a quiet process's private
memory. Equal while nothing runs in it (its ptrace nudge included), one
block different for one byte changed in a page the process never reads,
blind only to the bytes that legitimately change (errno, the rseq area,
the dead stack below the stack pointer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import memstate
from harness.targets import REPO

# Like a quiet workload (harness/workload.py): publishes where its errno and
# rseq area are and a buffer it never reads again, then sleeps with no timeout.
SRC = r"""
import ctypes, json, mmap, signal, sys
from harness import workload
buf = ctypes.create_string_buffer(b"\x5a" * 65536, 65536)
untouched = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE)  # anonymous, never written: no page of it in memory
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
drop = libc.mmap(None, 8192, 3, 0x08 | 0x20, -1, 0)    # MAP_DROPPABLE | MAP_ANONYMOUS (Linux 6.11)
drop = None if drop in (None, ctypes.c_void_p(-1).value) else drop
if drop:
    ctypes.memmove(drop, b"\xa7" * 8192, 8192)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
sys.stdout.write(json.dumps({"quiet": workload.quiet_facts(), "buf": ctypes.addressof(buf),
                             "untouched": ctypes.addressof(ctypes.c_char.from_buffer(untouched)),
                             "drop": drop}) + "\n")
sys.stdout.flush()
if sys.argv[1] == "quiet":
    signal.sigwaitinfo({signal.SIGUSR1})
else:
    while True:
        signal.sigtimedwait({signal.SIGUSR1}, 0.05)
"""


def _start(mode):
    p = subprocess.Popen([sys.executable, "-c", SRC, mode], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         close_fds=True, text=True, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    p.pub = json.loads(p.stdout.readline())
    return p


@pytest.fixture
def quiet():
    p = _start("quiet")
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def poke(pid, addr, data):
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
        f.seek(addr)
        f.write(data)


def peek(pid, addr, n):
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def test_the_rseq_area_is_found_where_the_kernel_confirms_it(quiet):
    q = quiet.pub["quiet"]
    assert q["errno"] and q["rseq"] and q["rseq_len"] >= 32
    cpu_id_start, cpu_id = memstate_u32(quiet.pid, q["rseq"]), memstate_u32(quiet.pid, q["rseq"] + 4)
    assert cpu_id_start == cpu_id < os.cpu_count()      # the kernel keeps the CPU there


def memstate_u32(pid, addr):
    return int.from_bytes(peek(pid, addr, 4), "little")


def test_a_quiet_process_digests_alike_and_one_unread_byte_shows(quiet):
    pub = {"quiet": quiet.pub["quiet"]}
    a = memstate.quiet_digest(quiet.pid, pub)
    assert a["mem"] == "quiet" and sum(k.startswith("mem.") for k in a) > 10
    assert memstate.quiet_digest(quiet.pid, pub) == a          # the nudge changes nothing
    buf = quiet.pub["buf"]
    poke(quiet.pid, buf + 40000, b"\x5b")
    b = memstate.quiet_digest(quiet.pid, pub)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert differ == [f"mem.{(buf + 40000) // memstate.BLOCK * memstate.BLOCK:x}"]


def test_errno_rseq_and_the_dead_stack_are_left_out(quiet):
    pub = {"quiet": quiet.pub["quiet"]}
    q = quiet.pub["quiet"]
    a = memstate.quiet_digest(quiet.pid, pub)
    poke(quiet.pid, q["errno"], b"\x07\0\0\0")
    poke(quiet.pid, q["rseq"] + 4, (memstate_u32(quiet.pid, q["rseq"] + 4) ^ 1).to_bytes(4, "little"))
    sp = int(open(f"/proc/{quiet.pid}/syscall").read().split()[7], 16)
    poke(quiet.pid, sp - 4096, b"dead bytes")
    assert memstate.quiet_digest(quiet.pid, pub) == a
    # live stack: the environment strings at its top (a retry of the call
    # rewrites the few bytes of its own frames just above the pointer)
    env_start = int(open(f"/proc/{quiet.pid}/stat").read().rsplit(")", 1)[1].split()[47])
    assert env_start > sp
    poke(quiet.pid, env_start, bytes(x ^ 0xff for x in peek(quiet.pid, env_start, 1)))
    assert memstate.quiet_digest(quiet.pid, pub) != a


def test_a_process_that_wakes_is_not_quiet():
    p = _start("ticking")
    try:
        got = memstate.quiet_digest(p.pid, {"quiet": p.pub["quiet"]}, seconds=0.5)
        assert got == {"mem": "not quiet: never asleep in sigwaitinfo"}
    finally:
        p.kill()
        p.wait()


def _present(pid, addr, n):
    """How many of the n pages from addr are in memory (pagemap bit 63)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // 4096 * 8)
        raw = f.read(n * 8)
    return sum(raw[i] >> 7 for i in range(7, len(raw), 8))


def test_pages_never_touched_are_not_read_and_a_zero_page_is_one_never_touched(quiet):
    pub = {"quiet": quiet.pub["quiet"]}
    big = quiet.pub["untouched"]
    a = memstate.quiet_digest(quiet.pid, pub)
    # read through /proc/PID/mem they would be mapped (to the zero page),
    # and an engine would dump them: 16 MB of zeros
    assert _present(quiet.pid, big, 4096) == 0
    poke(quiet.pid, big + 5 * 4096, bytes(4096))    # in memory now, zeros still
    assert _present(quiet.pid, big, 4096) == 1
    assert memstate.quiet_digest(quiet.pid, pub) == a
    poke(quiet.pid, big + 5 * 4096 + 17, b"\x01")
    b = memstate.quiet_digest(quiet.pid, pub)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert differ == [f"mem.{(big + 5 * 4096) // memstate.BLOCK * memstate.BLOCK:x}"]


def test_one_read_counts_only_if_the_process_did_not_run_during_it(quiet, monkeypatch):
    pub = {"quiet": quiet.pub["quiet"]}
    want = memstate.quiet_digest(quiet.pid, pub)
    real, calls = memstate.digest, []

    def run_once_during_the_first_read(pid, skip):
        calls.append(pid)
        if len(calls) == 1:
            memstate.nudge(pid)     # it runs (the call's retry) and sleeps again
        return real(pid, skip)
    monkeypatch.setattr(memstate, "digest", run_once_during_the_first_read)
    assert memstate.quiet_digest(quiet.pid, pub) == want and len(calls) == 2

    def run_during_every_read(pid, skip):
        memstate.nudge(pid)
        return real(pid, skip)
    monkeypatch.setattr(memstate, "digest", run_during_every_read)
    assert memstate.quiet_digest(quiet.pid, pub) == {"mem": "not quiet: it ran while its memory was read, 3 times"}


def test_a_droppable_mapping_is_left_out(quiet):
    """MAP_DROPPABLE (glibc >= 2.41's vDSO getrandom state): the kernel may
    zero it at any moment and ckpt rightly does not copy it (engine/dump.py),
    so its bytes are not judged; an ordinary mapping's still are."""
    drop = quiet.pub["drop"]
    if not drop:
        pytest.skip("no MAP_DROPPABLE here (Linux < 6.11 or not x86_64/aarch64)")
    pub = {"quiet": quiet.pub["quiet"]}
    a = memstate.quiet_digest(quiet.pid, pub)
    poke(quiet.pid, drop + 4096 + 5, bytes(4096 - 5))        # as the kernel dropping a page
    assert memstate.quiet_digest(quiet.pid, pub) == a
    poke(quiet.pid, quiet.pub["buf"] + 5, b"\x00")
    assert memstate.quiet_digest(quiet.pid, pub) != a
