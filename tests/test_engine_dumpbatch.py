"""The dump's batched reads (engine/dumpbatch.py): one run in the frozen
process gives the very values one-by-one injection gives, leaves its
signal state (actions, mask, pending signals) and its mappings as they
were, and steps aside (one by one, as before) where its end could not be
told apart from the process's own signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from engine import dumpbatch, procfs
from engine.context import Options
from engine import membarrier, procattrs
from engine.dump import dump
from engine import landlock
from engine.task import INJECTED
from engine_core_support import procs, wait_for  # noqa: F401

TARGET = os.path.join(os.path.dirname(__file__), "targets", "sigstate.c")
# brk, 62 sigactions, sigaltstack, 2 prctl, 3 getitimer, 5 prctl (engine/procattrs.py), get_mempolicy
# (engine/mempolicy.py), and the optional reads this kernel has (procattrs.OPTIONAL: 4 on x86_64 6.4+;
# membarrier GET_REGISTRATIONS, 6.3+), and the Landlock probe where Landlock runs (the target is root:
# kcmp against ckpt itself, engine/landlock.py reads)
STEPS = 75 + len(procattrs.reads()) - len(procattrs.READS) + len(membarrier.reads()) + (1 if landlock.enabled() else 0)


@pytest.fixture(scope="module")
def sigstate_bin(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("bin") / "sigstate")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, TARGET], check=True)
    return exe


def _start(procs, exe, tmp_path, mode="plain"):
    out = str(tmp_path / f"out-{mode}.txt")
    p = procs.start([exe, mode, out])
    wait_for(lambda: os.path.exists(out) and open(out).read().startswith("ready"), what="the target")
    return p, out


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        st = procfs.parse_status(f.read())
    return {k: st[k] for k in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")}


def _maps(pid):
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _dump(pid, img, monkeypatch, batch: bool):
    monkeypatch.setenv("CKPT_NO_BATCH", "0" if batch else "1")
    before = dict(INJECTED)
    dump(pid, str(img), Options(leave_running=True))
    with open(os.path.join(str(img), "core.json")) as f:
        core = json.load(f)
    return core, INJECTED["round_trips"] - before.get("round_trips", 0), \
        INJECTED["batched_calls"] - before.get("batched_calls", 0)


def _reads(core):
    # The interval timers' remaining values run down between two dumps: their intervals must match.
    return {"sigactions": core["sigactions"], "sigaltstack": core["sigaltstack"],
            "tid_address": core["tid_address"], "brk": core["brk"],
            "itimer_intervals": [t[:2] for t in core["itimers"]], "mempolicy": core["mempolicy"], "attrs": core["attrs"],
            "membarrier": core["membarrier"]}


def test_batched_reads_equal_one_by_one(procs, sigstate_bin, tmp_path, monkeypatch):
    p, _ = _start(procs, sigstate_bin, tmp_path)
    one, trips_one, batched_one = _dump(p.pid, tmp_path / "one", monkeypatch, batch=False)
    many, trips_many, batched_many = _dump(p.pid, tmp_path / "many", monkeypatch, batch=True)
    assert batched_one == 0 and trips_one >= STEPS
    assert batched_many == STEPS + 1, "the batch ran every read and its end"
    assert trips_many <= 4, "mmap, the run, munmap"
    assert _reads(many) == _reads(one)
    acts = many["sigactions"]
    assert acts[str(signal.SIGUSR2)][0] != 0 and acts[str(signal.SIGPIPE)][0] == 1     # a handler; SIG_IGN
    assert acts[str(signal.SIGCHLD)][1] & 1, "SA_NOCLDSTOP under SIG_DFL"
    assert many["sigaltstack"][2] == 65536 and many["itimers"][0][:2] == [1000, 5]


def test_the_process_is_left_exactly_as_it_was(procs, sigstate_bin, tmp_path, monkeypatch):
    """Mask, pending sets, actions (SIGTRAP's handler too) and mappings the
    same after a --leave-running dump; and the process handles signals as
    before (its SIGUSR2 handler, with SA_NODEFER)."""
    p, out = _start(procs, sigstate_bin, tmp_path)
    status, maps = _status(p.pid), _maps(p.pid)
    core, _, batched = _dump(p.pid, tmp_path / "img", monkeypatch, batch=True)
    assert batched == STEPS + 1
    assert _status(p.pid) == status
    assert _maps(p.pid) == maps, "the batch area is gone"
    again, _, _ = _dump(p.pid, tmp_path / "img2", monkeypatch, batch=False)
    assert again["sigactions"] == core["sigactions"], "the actions the batch read are still the process's"
    os.kill(p.pid, signal.SIGUSR1)
    os.kill(p.pid, signal.SIGTRAP)
    wait_for(lambda: f"sig {int(signal.SIGTRAP)} 0 0" in open(out).read(), what="its SIGTRAP handler")


@pytest.mark.parametrize("mode", ["trap-ign", "trap-pending"])
def test_sigtrap_ignored_or_pending_reads_one_by_one(procs, sigstate_bin, tmp_path, monkeypatch, mode):
    """The runner's last resort is a breakpoint: with SIGTRAP ignored (a
    forced SIGTRAP would reset it to SIG_DFL) or pending (ours would merge
    with it), the batch is not used and nothing changes."""
    p, _ = _start(procs, sigstate_bin, tmp_path, mode)
    status = _status(p.pid)
    core, trips, batched = _dump(p.pid, tmp_path / "img", monkeypatch, batch=True)
    assert batched == 0 and trips >= STEPS
    assert _status(p.pid) == status
    trap = core["sigactions"][str(signal.SIGTRAP)]
    assert (trap[0] == 1) == (mode == "trap-ign")


def test_a_pending_real_time_signal_is_not_taken(procs, sigstate_bin, tmp_path, monkeypatch):
    """SIGRTMAX pending (blocked): the run ends with another real-time
    signal, and the process's own is delivered later with its siginfo."""
    p, out = _start(procs, sigstate_bin, tmp_path, "rt-pending")
    status = _status(p.pid)
    rtmax = signal.SIGRTMAX
    assert procfs.parse_sigmask(status["SigPnd"]) | procfs.parse_sigmask(status["ShdPnd"]) == 1 << (rtmax - 1)
    st = procfs.parse_status(open(f"/proc/{p.pid}/status").read())
    assert dumpbatch.usable(type("T", (), {"arch": __import__("engine.arch", fromlist=["current"]).current()}),
                            st) == rtmax - 1
    _, _, batched = _dump(p.pid, tmp_path / "img", monkeypatch, batch=True)
    assert batched == STEPS + 1
    assert _status(p.pid) == status
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: f"sig {int(rtmax)} -1 4242" in open(out).read(), what="its own SIGRTMAX")


def test_usable_rules():
    arch = __import__("engine.arch", fromlist=["current"]).current()
    task = type("T", (), {"arch": arch})
    base = {"SigPnd": "0", "ShdPnd": "0", "SigIgn": "0", "SigQ": "0/1000"}
    assert dumpbatch.usable(task, base) == 64
    assert dumpbatch.usable(task, dict(base, SigQ="999/1000")) == 0, "the queue has no room for the end"
    assert dumpbatch.usable(task, dict(base, SigIgn="%x" % (1 << 4))) == 0, "SIGTRAP ignored"
    assert dumpbatch.usable(task, dict(base, ShdPnd="%x" % (1 << 4))) == 0, "SIGTRAP pending"
    every_rt = sum(1 << (s - 1) for s in range(34, 65))
    assert dumpbatch.usable(task, dict(base, SigPnd="%x" % every_rt)) == 0
    assert dumpbatch.usable(task, dict(base, SigPnd="%x" % (1 << 63), ShdPnd="%x" % (1 << 62))) == 62


def test_a_tree_reads_each_member_in_one_run(procs, tmp_path, monkeypatch):
    """A tree's members (engine/dump.py prefetch_injected): one run each,
    side by side; the same values as one by one, every member's mappings
    as they were."""
    from test_engine_tree import _descendants, _session
    exe = str(tmp_path / "swarm")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, os.path.join(os.path.dirname(TARGET), "swarm.c")],
                   check=True)
    p = procs.start([exe, "tree", "4", str(tmp_path / "ready")])
    try:
        wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the swarm")
        pids = sorted([p.pid] + _descendants(p.pid))
        assert len(pids) == 4
        maps = {x: _maps(x) for x in pids}
        monkeypatch.setenv("CKPT_NO_BATCH", "1")
        before = dict(INJECTED)
        dump(p.pid, str(tmp_path / "one"), Options(leave_running=True))
        assert INJECTED["batched_calls"] == before["batched_calls"]
        monkeypatch.setenv("CKPT_NO_BATCH", "0")
        dump(p.pid, str(tmp_path / "many"), Options(leave_running=True))
        assert INJECTED["batched_calls"] - before["batched_calls"] == 4 * (STEPS + 1)
        assert {x: _maps(x) for x in pids} == maps

        def cores(img):
            out = {}
            for root, _, names in os.walk(str(img)):
                if "core.json" in names:
                    with open(os.path.join(root, "core.json")) as f:
                        c = json.load(f)
                    out[c["pid"]] = _reads(c)
            return out
        one, many = cores(tmp_path / "one"), cores(tmp_path / "many")
        assert sorted(one) == pids and one == many
    finally:
        for x in sorted(set(_session(p.pid)) | set(_descendants(p.pid)), reverse=True):
            try:
                os.kill(x, signal.SIGKILL)
            except ProcessLookupError:
                pass
