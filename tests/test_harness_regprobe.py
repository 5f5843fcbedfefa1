"""The register probe of the `regs` workload thread (harness/regprobe.S,
harness/sysapi.py reg_probe_read): its bytes are the assembled source, it
reads normally, and a register changed under it while it sleeps in its
read(2) is named - changed from outside by ptrace, as a restore that got
it wrong would leave it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from harness import sysapi
from harness.targets import REPO

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="the probe is x86_64 machine code")

CHILD = r"""
import sys, threading
from harness import sysapi
out = []
t = threading.Thread(target=lambda: out.append(sysapi.reg_probe_read(0, 16)))
t.start()
t.join()
print(out[0], flush=True)
"""


def test_the_embedded_bytes_are_the_assembled_source(tmp_path):
    if not shutil.which("gcc") or not shutil.which("objcopy"):
        pytest.skip("no gcc/objcopy")
    obj, binary = tmp_path / "p.o", tmp_path / "p.bin"
    subprocess.run(["gcc", "-c", str(REPO / "harness" / "regprobe.S"), "-o", str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True)
    assert binary.read_bytes() == sysapi.REGPROBE_X86_64


def _reader():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         close_fds=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:      # its thread asleep in read(0, ...)
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            line = open(f"/proc/{p.pid}/task/{tid}/syscall").read().split()
            if int(tid) != p.pid and line[:2] == ["0", "0x0"]:
                return p, int(tid)
        time.sleep(0.02)
    p.kill()
    raise AssertionError("the probe's thread never slept in its read")


@pytest.mark.parametrize("change", [None, "r12", "r9"])
def test_a_register_changed_during_the_read_is_named(change):
    from engine import ptrace
    from engine.arch import x86_64
    p, tid = _reader()
    try:
        if change:
            ptrace.seize(tid)
            ptrace.interrupt(tid)
            ptrace.wait(tid)
            regs = x86_64.get_regs(tid)
            setattr(regs, change, getattr(regs, change) ^ 1)
            x86_64.set_regs(tid, regs)
            ptrace.detach(tid)          # its read restarts (no signal): only the register differs
        out, _ = p.communicate(b"wake", timeout=20)
    finally:
        p.kill()
        p.wait()
    assert out.decode().strip() == (f"registers changed: {change}" if change else "wake")
