"""`ckpt` on a real arm64 kernel: round trips in an aarch64 guest (TCG).

Needs the cached aarch64 image (``make vm-image ARCH=aarch64``) and skips
only when it is not there. One guest for the module; every target is a
python3 program in the guest (no compiler there), killed by PID at the end
of its test; the guest is shut down (and checked gone) whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest

from engine.arch import aarch64 as a64

pytestmark = [pytest.mark.guest, pytest.mark.aarch64]

ENGINE_DIR = Path(__file__).resolve().parent.parent / "engine"

COUNTER = """
import sys, time
f = open(sys.argv[1], "a")
i = 0
while True:
    f.write(f"{i}\\n"); f.flush(); i += 1
    time.sleep(0.05)
"""

FIFO_READER = """
import sys
f = open(sys.argv[1], "rb", buffering=0)
out = open(sys.argv[2], "a")
while True:
    d = f.read(100)
    if not d:
        break
    out.write(d.decode()); out.flush()
out.write("EOF\\n"); out.flush()
"""

SLEEPER = """
import sys, time
t0 = time.monotonic()
time.sleep(float(sys.argv[2]))
open(sys.argv[1], "w").write(f"{time.monotonic() - t0:.3f}\\n")
"""

# Spins with live SVE register state (TIF_SVE stays set in user mode; any
# syscall would discard it, zeroing P0 on the next SVE instruction):
#   ptrue p0.b; cntp x1, p0, p0.b
#   loop: cntp x2, p0, p0.b; cmp x2, x1; b.eq loop
#   mov x0, x2; ret            -- only if P0 lost its bits
# (assembled with llvm-mc -mattr=+sve). If it ever returns, it says so.
SVE_SPINNER = """
import ctypes, mmap, sys
code = bytes.fromhex("e0e31825" "01802025" "02802025" "5f0001eb" "c0ffff54" "e00302aa" "c0035fd6")
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
open(sys.argv[1], "w").write("spinning\\n")
r = ctypes.CFUNCTYPE(ctypes.c_long)(addr)()
open(sys.argv[1], "a").write(f"P0 lost: {r}\\n")
"""


def _qemu_children() -> list:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "qemu-system" in p.name():
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _missing(why: str) -> None:
    """Skip for want of the aarch64 image or QEMU; where CI built them
    (CRUCIBLE_REQUIRE_AARCH64, make test-aarch64-guest) that is a failure."""
    if os.environ.get("CRUCIBLE_REQUIRE_AARCH64"):
        pytest.fail(f"CRUCIBLE_REQUIRE_AARCH64 is set but: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    if shutil.which("qemu-system-aarch64") is None:
        _missing("qemu-system-aarch64 not installed (make setup ARCH=aarch64)")
    from vm import Guest
    from vm.image import image_paths
    img = image_paths("aarch64", "6.1")
    if not img.exists():
        _missing(f"aarch64 image not cached ({img.dir}); build it with: make vm-image ARCH=aarch64")
    before = {p.pid for p in _qemu_children()}
    with Guest(arch="aarch64", accel="tcg", name="t-eng-a64", image=img, engine_dir=ENGINE_DIR,
               log_dir=tmp_path_factory.mktemp("guest-eng-a64")) as g:
        for name, src in (("counter", COUNTER), ("fifo_reader", FIFO_READER), ("sleeper", SLEEPER),
                          ("sve_spinner", SVE_SPINNER)):
            g.put_bytes(src.encode(), f"/root/t/{name}.py")
        yield g
    left = [p for p in _qemu_children() if p.pid not in before]
    for p in left:
        p.kill()
        p.wait(5)
    assert not left, "QEMU left behind"


class Targets:
    """PIDs started in the guest by one test; all SIGKILLed at its end."""

    def __init__(self, g):
        self.g = g
        self.pids: list = []

    def start(self, script: str, *args: str) -> int:
        argv = " ".join(["python3", f"/root/t/{script}.py", *args])
        res = self.g.run(f"cd /root/t; setsid {argv} </dev/null >/dev/null 2>&1 & echo $!",
                         timeout=60, check=True)
        pid = int(res.stdout.split()[-1])
        self.pids.append(pid)
        return pid

    def kill_all(self) -> None:
        if self.pids:
            self.g.run("kill -9 " + " ".join(map(str, self.pids)) + " 2>/dev/null; true", timeout=60)


@pytest.fixture
def targets(guest):
    t = Targets(guest)
    try:
        yield t
    finally:
        t.kill_all()


def ckpt(g, *args: str, timeout: float = 180):
    return g.run(["ckpt", *args], timeout=timeout)


def wait_for(g, cmd: str, pred, timeout: float = 60):
    end = time.monotonic() + timeout
    while True:
        out = g.run(cmd, timeout=60).stdout
        if pred(out):
            return out
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting on {cmd!r}; last output {out!r}")
        time.sleep(0.5)


def counts(g, path: str) -> list:
    return [int(x) for x in g.run(f"cat {path}", timeout=60, check=True).stdout.split()]


def maps(g, pid: int) -> str:
    return g.run(f"cat /proc/{pid}/maps", timeout=60, check=True).stdout


def test_counter_round_trip_exact_maps_no_gap_no_repeat(guest, targets):
    g = guest
    g.run("rm -rf /root/img-c /root/t/c.txt", timeout=60)
    pid = targets.start("counter", "/root/t/c.txt")
    wait_for(g, "wc -l < /root/t/c.txt 2>/dev/null || echo 0", lambda o: int(o.split()[0]) >= 5)
    chk = ckpt(g, "check", "-t", str(pid), "--json")
    assert chk.rc == 0, chk
    items = {i["what"]: i for i in json.loads(chk.stdout)["result"]["items"]}
    assert "paca_keys" in items["registers"]["detail"] and items["rseq"]["detail"] == "registered"
    before = maps(g, pid)
    d = ckpt(g, "dump", "-t", str(pid), "-D", "/root/img-c")
    assert d.rc == 0, d
    n_dumped = len(counts(g, "/root/t/c.txt"))
    r = ckpt(g, "restore", "-D", "/root/img-c", "--json")
    assert r.rc == 0, r
    # Its syscalls ran in batches (engine/batch.py: the arm64 runner).
    inj = json.loads(r.stdout)["result"]["injected"]
    assert inj["batched_calls"] > 20 and inj["round_trips"] < 12, inj
    assert maps(g, pid) == before
    wait_for(g, "wc -l < /root/t/c.txt", lambda o: int(o.split()[0]) >= n_dumped + 10)
    got = counts(g, "/root/t/c.txt")
    assert got == list(range(len(got)))
    # The restored process has rseq registered again (glibc's area).
    chk = ckpt(g, "check", "-t", str(pid), "--json")
    items = {i["what"]: i for i in json.loads(chk.stdout)["result"]["items"]}
    assert chk.rc == 0 and items["rseq"]["detail"] == "registered", chk


def _regsets(g, image: str) -> dict:
    return a64.parse_xstate(g.get_bytes(f"{image}/xstate.bin"))


def test_restore_dump_restore_again_keeps_pac_keys(guest, targets):
    g = guest
    g.run("rm -rf /root/img-r1 /root/img-r2 /root/t/r.txt", timeout=60)
    pid = targets.start("counter", "/root/t/r.txt")
    other = targets.start("counter", "/root/t/r2.txt")
    wait_for(g, "wc -l < /root/t/r.txt 2>/dev/null || echo 0", lambda o: int(o.split()[0]) >= 3)
    before = maps(g, pid)
    assert ckpt(g, "dump", "-t", str(pid), "-D", "/root/img-r1").rc == 0
    assert ckpt(g, "restore", "-D", "/root/img-r1").rc == 0
    time.sleep(1)
    assert ckpt(g, "dump", "-t", str(pid), "-D", "/root/img-r2").rc == 0
    r = ckpt(g, "restore", "-D", "/root/img-r2")
    assert r.rc == 0, r
    assert maps(g, pid) == before
    n = len(counts(g, "/root/t/r.txt"))
    wait_for(g, "wc -l < /root/t/r.txt", lambda o: int(o.split()[0]) >= n + 10)
    got = counts(g, "/root/t/r.txt")
    assert got == list(range(len(got)))
    # The pointer-authentication keys went into the restored process: the
    # second image holds the first one's. They are per-process random (the
    # other counter's differ), so this is not a tautology.
    k1, k2 = _regsets(g, "/root/img-r1"), _regsets(g, "/root/img-r2")
    assert k1["paca_keys"][0] == 0 and len(k1["paca_keys"][1]) == 64
    assert k1["paca_keys"] == k2["paca_keys"] and k1["pacg_keys"] == k2["pacg_keys"]
    assert k1["tls"] == k2["tls"] and k1["pac_enabled_keys"] == k2["pac_enabled_keys"]
    g.run("rm -rf /root/img-o", timeout=60)
    assert ckpt(g, "dump", "--leave-running", "-t", str(other), "-D", "/root/img-o").rc == 0
    assert _regsets(g, "/root/img-o")["paca_keys"] != k1["paca_keys"]


def test_fifo_read_restarts_after_restore(guest, targets):
    g = guest
    g.run("rm -rf /root/img-f /root/t/f.txt /root/t/ff; mkfifo /root/t/ff", timeout=60)
    pid = targets.start("fifo_reader", "/root/t/ff", "/root/t/f.txt")
    # A writer that keeps the fifo open (and is itself left alone by ckpt).
    writer = g.run("cd /root/t; setsid sh -c 'exec 7>/root/t/ff; sleep 600' </dev/null >/dev/null 2>&1 & "
                   "echo $!", timeout=60, check=True)
    targets.pids.append(int(writer.stdout.split()[-1]))
    wait_for(g, f"cat /proc/{pid}/syscall", lambda o: o.split()[0] == "63")   # blocked in read()
    d = ckpt(g, "dump", "-t", str(pid), "-D", "/root/img-f")
    assert d.rc == 0, d
    core = json.loads(g.get_bytes("/root/img-f/core.json"))
    # Dumped inside read(): the kernel had already rewound pc onto the svc
    # and forgotten the syscall (arm64 do_signal before get_signal).
    assert core["regs"]["x8"] == a64.SYS["read"] and core["regs"]["syscallno"] == -1
    assert ckpt(g, "restore", "-D", "/root/img-f").rc == 0
    wait_for(g, f"cat /proc/{pid}/syscall", lambda o: o.split()[0] == "63")
    g.run(f"echo hello > /proc/{targets.pids[-1]}/fd/7", timeout=60, check=True)
    assert wait_for(g, "cat /root/t/f.txt", lambda o: "hello" in o) == "hello\n"


def test_absolute_sleep_is_resumed_not_restarted(guest, targets):
    """CPython's time.sleep is clock_nanosleep(TIMER_ABSTIME): re-executed
    after restore it ends at the original instant."""
    g = guest
    g.run("rm -rf /root/img-s /root/t/s.txt", timeout=60)
    pid = targets.start("sleeper", "/root/t/s.txt", "20")
    wait_for(g, f"cat /proc/{pid}/syscall", lambda o: o.split()[0] == "115")   # clock_nanosleep
    t0 = time.monotonic()
    assert ckpt(g, "dump", "-t", str(pid), "-D", "/root/img-s").rc == 0
    assert ckpt(g, "restore", "-D", "/root/img-s").rc == 0
    assert time.monotonic() - t0 < 16, "dump+restore too slow for this test's margin"
    out = wait_for(g, "cat /root/t/s.txt 2>/dev/null || true", lambda o: o.strip() != "", timeout=60)
    assert 20.0 <= float(out) < 23.0, out


def test_live_sve_state_is_refused_and_target_untouched(guest, targets):
    g = guest
    g.run("rm -rf /root/img-v /root/t/v.txt", timeout=60)
    pid = targets.start("sve_spinner", "/root/t/v.txt")
    wait_for(g, "cat /root/t/v.txt 2>/dev/null || true", lambda o: "spinning" in o)
    # "spinning" is written just before the ctypes call: give it time to get
    # into the loop (user mode, no syscall: /proc/PID/syscall says "running").
    time.sleep(3)
    wait_for(g, f"cat /proc/{pid}/syscall", lambda o: o.strip() == "running")
    d = ckpt(g, "dump", "-t", str(pid), "-D", "/root/img-v", "--json")
    assert d.rc == 3, d
    assert "unsupported-state" in d.stdout + d.stderr and "SVE" in d.stdout + d.stderr
    assert g.run("test -e /root/img-v", timeout=60).rc != 0
    # The freeze ran syscalls in it (which discard SVE state); the released
    # process must have its P0 back: still spinning, nothing reported.
    time.sleep(2)
    st = g.run(f"cat /proc/{pid}/stat", timeout=60, check=True).stdout
    assert st.split(") ")[1][0] == "R"     # not stopped or traced
    assert g.run("cat /root/t/v.txt", timeout=60).stdout == "spinning\n"
    chk = ckpt(g, "check", "-t", str(pid))
    assert chk.rc == 3 and "SVE" in chk.stdout + chk.stderr, chk
    time.sleep(1)
    assert g.run("cat /root/t/v.txt", timeout=60).stdout == "spinning\n"


def test_check_does_not_restart_a_relative_sleep(guest, targets):
    """/bin/sleep is a relative clock_nanosleep: interrupted, it returns
    -ERESTART_RESTARTBLOCK. `ckpt check` (freeze, inspect, release) must
    let it continue with its remaining time (restart_syscall), not sleep
    the full 8 s again."""
    g = guest
    res = g.run("setsid sleep 8 </dev/null >/dev/null 2>&1 & echo $!", timeout=60, check=True)
    pid = int(res.stdout.split()[-1])
    targets.pids.append(pid)
    t0 = time.monotonic()
    wait_for(g, f"cat /proc/{pid}/syscall", lambda o: o.split()[0] == "115")
    chk = ckpt(g, "check", "-t", str(pid))
    assert chk.rc == 0, chk
    assert time.monotonic() - t0 < 6, "check too slow for this test's margin"
    wait_for(g, f"test -e /proc/{pid} && echo alive || echo gone", lambda o: "gone" in o, timeout=30)
    assert time.monotonic() - t0 < 11.5     # a full restart would end at >= 8 s after the check
