"""harness/procstate.quiet_snapshot: the judge's snapshot of a process
that is awake most of the time and sleeps briefly in sigtimedwait (which
unblocks the waited-for signal while it sleeps) must show one moment, the
sleeping one, even when a whole snapshot takes longer than the sleep (TCG on
a busy host): a mixed snapshot judged restores corrupted (SigBlk)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from harness import procstate

# Like a workload (harness/workload.py): a counter each tick and a secret,
# published by address, so the judge sees a tick between two reads.
SRC = r"""
import ctypes, json, os, signal, sys, time
counter = ctypes.c_uint64(0)
secret = ctypes.create_string_buffer(os.urandom(16), 16)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
sys.stdout.write(json.dumps({"counter_addr": ctypes.addressof(counter), "secret_addr": ctypes.addressof(secret),
                             "secret_len": 16}) + "\n")
sys.stdout.flush()
while True:
    end = time.monotonic() + 0.04
    while time.monotonic() < end:       # awake: SIGUSR1 blocked
        pass
    signal.sigtimedwait({signal.SIGUSR1}, 0.02)    # asleep: the kernel unblocks it meanwhile
    counter.value += 1
"""

USR1 = 1 << (signal.SIGUSR1 - 1)


@pytest.fixture
def waiter():
    p = subprocess.Popen([sys.executable, "-c", SRC], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         close_fds=True, text=True)
    try:
        p.pub = json.loads(p.stdout.readline())
        yield p
    finally:
        p.kill()
        p.wait()


def test_a_slow_snapshot_still_shows_the_sleeping_moment(waiter, monkeypatch):
    real = procstate.snapshot

    def slow(pid, pub=None):
        time.sleep(0.1)          # longer than a tick: a whole snapshot never holds still
        return real(pid, pub)
    monkeypatch.setattr(procstate, "snapshot", slow)
    for _ in range(5):
        t0 = time.monotonic()
        snap = procstate.quiet_snapshot(waiter.pid, waiter.pub, seconds=10)
        assert time.monotonic() - t0 < 10, "never found a quiet moment"
        assert int(snap["status.SigBlk"], 16) & USR1 == 0, snap["status.SigBlk"]   # the sleeping moment
        assert snap["tids"] == str(waiter.pid) and any(k.startswith("maps.") for k in snap)   # the rest too


def test_awake_moment_is_what_the_process_shows_outside_the_wait(waiter):
    seen = set()
    end = time.monotonic() + 5
    while time.monotonic() < end and len(seen) < 2:
        seen.add(int(procstate._moment(waiter.pid)["status.SigBlk"], 16) & USR1)
    assert seen == {0, USR1}       # the control: both moments exist, so the test above can fail


# (the line /proc/PID/syscall shows, the task's state): never the quiet
# moment, however still they hold (the snapshot falls back at its deadline)
NOT_ASLEEP = {
    # blocked but in no system call (a page fault), with an awake process's masks
    "outside a call": ("-1 0x7ffd0000 0x7f000000", "S"),
    # the call's line, read before it woke, and runnable, read after: its
    # mask is back (in a TCG guest, one vCPU: 3 of 137 judged corrupted on SigBlk)
    "in the call but runnable": ("128 0x1 0x2 0x3 0x0 0x0 0x0 0x7ffd0000 0x7f000000", "R"),
}


@pytest.mark.parametrize("case", sorted(NOT_ASLEEP))
def test_a_task_not_asleep_in_its_call_is_never_the_quiet_moment(monkeypatch, case):
    line, state = NOT_ASLEEP[case]
    calls = []
    monkeypatch.setattr(procstate, "_syscall", lambda pid: line)
    monkeypatch.setattr(procstate, "_state", lambda pid: state)
    monkeypatch.setattr(procstate, "proof", lambda pid, pub: {"counter": "7"})
    monkeypatch.setattr(procstate, "snapshot", lambda pid, pub=None: calls.append("full") or {"status.SigBlk": "x"})
    monkeypatch.setattr(procstate, "_moment", lambda pid: calls.append("moment") or {"status.SigBlk": "x"})
    t0 = time.monotonic()
    procstate.quiet_snapshot(1, {"counter_addr": 1}, seconds=0.3)
    assert time.monotonic() - t0 >= 0.3 and calls.count("moment") > 1
    # asleep in a real call: quiet at once
    monkeypatch.setattr(procstate, "_syscall", lambda pid: "128 0x1 0x2 0x3 0x0 0x0 0x0 0x7ffd0000 0x7f000000")
    monkeypatch.setattr(procstate, "_state", lambda pid: "S")
    calls.clear()
    procstate.quiet_snapshot(1, {"counter_addr": 1}, seconds=0.3)
    assert calls == ["full"]


class Timeline:
    """A workload whose every /proc read by the judge is one step of time:
    each read sees the phase the process is in at that step (the last one
    from then on). A phase: (line of /proc/PID/syscall, state, counter,
    SigBlk)."""

    def __init__(self, monkeypatch, phases):
        self.phases, self.step = phases, 0
        monkeypatch.setattr(procstate, "_syscall", lambda pid: self.read()[0])
        monkeypatch.setattr(procstate, "_state", lambda pid: self.read()[1])
        monkeypatch.setattr(procstate, "proof", lambda pid, pub: {"counter": self.read()[2]})
        monkeypatch.setattr(procstate, "snapshot", lambda pid, pub=None: {"status.SigBlk": self.read()[3]})
        monkeypatch.setattr(procstate, "_moment", lambda pid: {"status.SigBlk": self.read()[3]})

    def read(self):
        phase = self.phases[min(self.step, len(self.phases) - 1)]
        self.step += 1
        return phase


CALL = "128 0x1 0x2 0x3 0x8 0x0 0x0 0x7ffd0000 0x7f000000"     # rt_sigtimedwait, args, SP, PC
ASLEEP, AWAKE = "0000000000000000", "%016x" % USR1


def test_a_wake_and_tick_between_two_reads_is_never_the_quiet_moment(monkeypatch):
    """Six reads around the snapshot, the process waking once among them:
    asleep in the call for the first three; awake (its mask back) while the
    status is read; then blocked on its way out of the call (a page fault:
    /proc/PID/syscall still shows the call, the counter not yet advanced),
    and asleep again after its tick. Read in the order before
    (call, counter, state on both sides), the two ends matched and the
    awake mask was the snapshot's; bracketed by the counter, they do not,
    and the next try finds it asleep."""
    Timeline(monkeypatch, [(CALL, "S", "7", ASLEEP)] * 3 + [(CALL, "R", "7", AWAKE)]
             + [(CALL, "D", "7", AWAKE)] * 2 + [(CALL, "S", "8", ASLEEP)])
    snap = procstate.quiet_snapshot(1, {"counter_addr": 1}, seconds=5)
    assert snap["status.SigBlk"] == ASLEEP


def test_a_tick_between_the_call_and_the_counter_is_never_the_quiet_moment(monkeypatch):
    """The first read sees the call of the sleep before a tick, the next
    one the counter after it, the status is read while the process is still
    awake, and it sleeps again with that counter: compared on the call and
    the counter alone (the judge before the state was read), both sides
    matched, two sleeps with a wake-up in between taken for one."""
    Timeline(monkeypatch, [(CALL, "S", "7", ASLEEP)] + [("running", "R", "8", AWAKE)] * 2
             + [(CALL, "S", "8", ASLEEP)])
    snap = procstate.quiet_snapshot(1, {"counter_addr": 1}, seconds=5)
    assert snap["status.SigBlk"] == ASLEEP
