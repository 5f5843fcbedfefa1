"""A thread stopped inside an rseq critical section (tests/targets/rseqcs.c).

The freeze preempts it, so the kernel owes it an abort: on its next return
to user space it must continue at the section's abort handler, whether the
dumped process goes on (--leave-running, a refused dump, ckpt check) or a
restored one starts. Left inside the section with its rseq_cs cleared (what
an injected call's return to user space does: the kernel clears rseq_cs when
the IP is outside the section), the section would go on as if never
preempted: a per-CPU algorithm would commit for the wrong CPU.

The target's section never ends by itself; its abort handler counts and
re-arms rseq_cs before entering again. So "rseq_cs is set again" is the
proof that the abort ran, and a section continued unaborted shows as a
cleared rseq_cs that stays cleared.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess

import pytest

from engine import rseqcs
from engine.context import Options
from engine.errors import Refusal
from engine.dump import check, dump
from engine.restore import restore
from engine_core_support import procs, wait_for  # noqa: F401

TARGET = os.path.join(os.path.dirname(__file__), "targets", "rseqcs.c")


@pytest.fixture(scope="module")
def rseqcs_bin(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("bin") / "rseqcs")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, TARGET], check=True)
    return exe


def _start(procs, exe, tmp_path):
    out = str(tmp_path / "rseqcs.out")
    p = procs.start([exe, out])
    wait_for(lambda: os.path.exists(out) and open(out).read().endswith("\n"), what="the rseq target")
    words = open(out).read().split()
    if words[0] == "norseq":
        pytest.skip("glibc registered no rseq area here")
    aborts, cs_field = int(words[1], 16), int(words[2], 16)
    wait_for(lambda: _word(p.pid, cs_field) != 0, what="the target inside its section")
    return p, aborts, cs_field


def _word(pid, addr):
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return struct.unpack("Q", os.pread(fd, 8, addr))[0]
    finally:
        os.close(fd)


def _aborted_after(pid, aborts, cs_field, floor):
    """The abort handler ran (count above `floor`) and re-armed rseq_cs."""
    wait_for(lambda: _word(pid, aborts) > floor and _word(pid, cs_field) != 0, timeout=5,
             what="the section aborted and entered again (rseq_cs set)")


def _in_section(pid):
    # The thread spins on `pause; jmp` between the labels: its IP is in the
    # section unless the handler is running right now (a few instructions).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "R"


def test_leave_running_dump_aborts_the_section(procs, rseqcs_bin, tmp_path):
    p, aborts, cs_field = _start(procs, rseqcs_bin, tmp_path)
    for i in range(3):
        before = _word(p.pid, aborts)
        dump(p.pid, str(tmp_path / f"img{i}"), Options(leave_running=True))
        _aborted_after(p.pid, aborts, cs_field, before)
    assert _in_section(p.pid)


def test_check_aborts_the_section(procs, rseqcs_bin, tmp_path):
    p, aborts, cs_field = _start(procs, rseqcs_bin, tmp_path)
    before = _word(p.pid, aborts)
    check(p.pid, Options())
    _aborted_after(p.pid, aborts, cs_field, before)


def test_restored_process_aborts_the_section(procs, rseqcs_bin, tmp_path):
    p, aborts, cs_field = _start(procs, rseqcs_bin, tmp_path)
    img = str(tmp_path / "img")
    dump(p.pid, img, Options())
    p.wait()
    # What the image holds: the abort counted at the freeze is the floor
    # the restored process must pass (it continues at the handler).
    out = restore(img, Options())
    procs.adopt(out["pid"])
    _aborted_after(out["pid"], aborts, cs_field, 0)
    n = _word(out["pid"], aborts)
    os.kill(out["pid"], signal.SIGSTOP)       # a preemption: the section is aborted again
    os.kill(out["pid"], signal.SIGCONT)
    _aborted_after(out["pid"], aborts, cs_field, n)


def test_check_reports_the_abort(procs, rseqcs_bin, tmp_path):
    p, aborts, cs_field = _start(procs, rseqcs_bin, tmp_path)
    # The thread is inside its section nearly all the time, but a freeze
    # can land just after the kernel aborted it on a preemption (IP at the
    # handler's first instruction, rseq_cs cleared): nothing left to abort
    # then. So: several checks, at least one inside, each row one of the two.
    details = []
    for _ in range(10):
        out = check(p.pid, Options())
        assert out["ok"], out["refusals"]
        (row,) = [i for i in out["items"] if i["what"] == "rseq"]
        details.append(row["detail"])
        if "abort handler" in row["detail"]:
            break
    assert "abort handler" in details[-1], details
    assert all(d == "registered" or "abort handler" in d for d in details), details


# -- the kernel's rules, on a stand-in task (a live target breaking them is
#    killed by the kernel at its next preemption, before any test could look)

class _FakeArch:
    def __init__(self, ip, in_call=False):
        self.ip, self.call = ip, in_call

    def pc(self, regs):
        return self.ip

    def in_call(self, regs):
        return self.call

    def set_pc(self, regs, v):
        regs["pc"] = v


class _Regs(dict):
    def copy(self):
        return _Regs(self)


class _FakeTask:
    AREA, CS, SIG = 0x7000, 0x5000, 0x53053053

    def __init__(self, ip, desc, sig=SIG, in_call=False, cs=CS):
        self.pid = 1
        self.arch = _FakeArch(ip, in_call)
        self.orig_regs = self.resume_regs = self.image_regs = _Regs(pc=ip)
        self.mem = {self.AREA + 8: struct.pack("<Q", cs), self.CS: rseqcs.DESCRIPTOR.pack(*desc),
                    desc[4] - 4: struct.pack("<I", sig)}
        self.writes = []

    def read_mem(self, addr, n):
        if addr not in self.mem:
            raise OSError(14, "Bad address")
        return self.mem[addr][:n]

    def write_mem(self, addr, data):
        self.writes.append((addr, data))


@pytest.fixture
def fake_rseq(monkeypatch):
    monkeypatch.setattr(rseqcs.ptrace, "get_rseq", lambda pid: {"pointer": _FakeTask.AREA, "size": 32,
                                                              "signature": _FakeTask.SIG, "flags": 0})


GOOD = (0, 0, 0x1000, 0x20, 0x1040)      # version, flags, start, length, abort


@pytest.mark.parametrize("ip, inside", [(0x1000, True), (0x101f, True), (0x1020, False), (0xfff, False)])
def test_inside_is_the_kernels_range(fake_rseq, ip, inside):
    t = _FakeTask(ip, GOOD)
    found = rseqcs.inspect(t)
    assert (found is not None) == inside
    if inside:
        rseqcs.abort(t, found)
        assert t.resume_regs["pc"] == t.image_regs["pc"] == 0x1040 and t.orig_regs["pc"] == ip
        assert t.writes == [(_FakeTask.AREA + 8, bytes(8))]


@pytest.mark.parametrize("desc, sig, ip, why", [
    (GOOD, 0x1234, 0x1000, "signature"),
    (GOOD, 0x1234, 0x2000, "signature"),                 # checked outside the section too
    ((1, 0, 0x1000, 0x20, 0x1040), _FakeTask.SIG, 0x1000, "version"),
    ((0, 1, 0x1000, 0x20, 0x1040), _FakeTask.SIG, 0x1000, "flags"),
    ((0, 0, 0x1000, 0x20, 0x1010), _FakeTask.SIG, 0x1000, "abort"),     # abort inside the section
])
def test_what_the_kernel_kills_for_is_refused(fake_rseq, desc, sig, ip, why):
    with pytest.raises(Refusal) as e:
        rseqcs.inspect(_FakeTask(ip, desc, sig=sig))
    assert e.value.reason == "unsupported-state" and "SIGSEGV" in str(e.value)


def test_flags_outside_the_section_are_the_kernels_business(fake_rseq):
    assert rseqcs.inspect(_FakeTask(0x3000, (0, 1, 0x1000, 0x20, 0x1040))) is None


def test_a_call_inside_the_section_is_refused(fake_rseq):
    with pytest.raises(Refusal, match="system call inside an rseq"):
        rseqcs.inspect(_FakeTask(0x1008, GOOD, in_call=True))


def test_unreadable_descriptor_is_refused(fake_rseq):
    with pytest.raises(Refusal, match="cannot be read"):
        rseqcs.inspect(_FakeTask(0x1008, GOOD, cs=0x9000))
