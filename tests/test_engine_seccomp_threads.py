"""Seccomp filters in a multi-threaded process (engine/seccomp.py share,
engine/threads.py _create_filtered), proven from inside the restored
process by tests/targets/secthreads.c: each thread's filters still act,
and which threads share which filter is as it was - a TSYNC from a thread
whose chain another thread is not on fails naming that thread, one from a
thread every other thread's filters are on succeeds and reaches them all.
Identical filters installed separately (no restore can tell them from
shared ones) are refused, the target unharmed and left with no probe
thread."""

from __future__ import annotations

import json
import os
import signal

import pytest

from engine import seccomp
from engine.context import Options
from engine.dump import dump
from engine.errors import EngineError, Refusal, Refusals
from engine.restore import restore
from engine_core_support import compile_target, lines_of, procs, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def secthreads_bin(tmp_path_factory) -> str:
    return compile_target(tmp_path_factory, "secthreads", "-pthread")


def _start(procs, exe, tmp_path, mode):
    out = str(tmp_path / "out")
    p = procs.start([exe, out, mode], cwd=str(tmp_path))
    wait_for(lambda: lines_of(out, "ready") or p.poll() is not None, what="the target to start")
    assert p.poll() is None
    tids = {int(ln.split()[1]): int(ln.split()[2]) for ln in lines_of(out, "tid ")}
    assert len(tids) == 4 and not lines_of(out, "FAIL")
    return p, out, tids


def _run_checks(p, out) -> list:
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: lines_of(out, "done"), what="the target's checks")
    text = open(out).read().splitlines()
    return text[text.index("ready") + 1:]


def _expected(tids, nested=False) -> list:
    return (["see 0 getppid=33 uname=0 getsid=0", "see 1 getppid=33 uname=34 getsid=0",
             "see 2 getppid=33 uname=0 getsid=0", f"see 3 getppid=33 uname={34 if nested else 0} getsid=0",
             f"tsync 2 ret={tids[1]} errno=0", "tsync 1 ret=0 errno=0"]
            + [f"after {i} getppid=33 uname=34 getsid=18" for i in range(4)] + ["done"])


@pytest.mark.parametrize("mode", ["shared", "nested"])
def test_the_target_checks_what_it_should_without_a_restore(procs, secthreads_bin, tmp_path, mode):
    p, out, tids = _start(procs, secthreads_bin, tmp_path, mode)
    assert _run_checks(p, out) == _expected(tids, mode == "nested")


@pytest.mark.parametrize("mode", ["shared", "nested"])
def test_shared_and_own_filters_restored_with_their_sharing(procs, secthreads_bin, tmp_path, mode, monkeypatch):
    """nested: t3 was started by t1 after t1's own filter, so the restore
    clones t3 from t1 (a thread, not the leader) once that filter is in."""
    p, out, tids = _start(procs, secthreads_bin, tmp_path, mode)
    real, log = seccomp.plan, tmp_path / "plan.json"

    def spy(order, recs):   # in the forked restorer: its steps go to a file
        steps = real(order, recs)
        log.write_text(json.dumps([s[:2] + ((s[2],) if s[0] == "clone" else (s[2]["node"],)) for s in steps]))
        return steps
    monkeypatch.setattr(seccomp, "plan", spy)
    modes = {t: seccomp.thread_mode(p.pid, t) for t in tids.values()}
    assert set(modes.values()) == {2}
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert sorted(int(t) for t in os.listdir(f"/proc/{p.pid}/task")) == sorted(tids.values())
    assert _run_checks(p, out) == _expected(tids, mode == "nested")
    clones = {s[2]: s[1] for s in json.loads(log.read_text()) if s[0] == "clone"}
    assert clones == {tids[1]: p.pid, tids[2]: p.pid, tids[3]: tids[1] if mode == "nested" else p.pid}


def test_identical_filters_installed_separately_restored_apart(procs, secthreads_bin, tmp_path):
    """t1 and t2 each installed the same program: two objects, which the
    dump's probe tells apart (t1's TSYNC check names t2) and the restore
    installs twice: a TSYNC names the same thread as before."""
    p, out, tids = _start(procs, secthreads_bin, tmp_path, "separate")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert _run_checks(p, out) == [
        "see 0 getppid=0 uname=0 getsid=0", "see 1 getppid=33 uname=0 getsid=0",
        "see 2 getppid=33 uname=0 getsid=0", "see 3 getppid=0 uname=0 getsid=0",
        f"tsync 2 ret={tids[1]} errno=0", f"tsync 1 ret={tids[2]} errno=0",
        "after 0 getppid=0 uname=0 getsid=0", "after 1 getppid=33 uname=0 getsid=0",
        "after 2 getppid=33 uname=0 getsid=0", "after 3 getppid=0 uname=0 getsid=0", "done"]


def test_sharing_no_probe_can_tell_is_refused_target_unharmed(procs, secthreads_bin, tmp_path):
    """t1, t2 and t3 each installed the same program: t2's and t3's TSYNC
    checks both name t1 first, so whether t2 and t3 share is never seen."""
    p, out, tids = _start(procs, secthreads_bin, tmp_path, "separate3")
    before = sorted(os.listdir(f"/proc/{p.pid}/task"))
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    text = str(e.value)
    assert [r.reason for r in getattr(e.value, "refusals", [e.value])] == ["threads"]
    assert "cannot be told" in text, text
    assert not os.path.exists(tmp_path / "img")
    # no probe thread left behind, every thread untraced, filters unchanged
    assert sorted(os.listdir(f"/proc/{p.pid}/task")) == before
    for t in before:
        with open(f"/proc/{p.pid}/task/{t}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
    lines = _run_checks(p, out)
    assert lines[:4] == ["see 0 getppid=0 uname=0 getsid=0", "see 1 getppid=33 uname=0 getsid=0",
                         "see 2 getppid=33 uname=0 getsid=0", "see 3 getppid=33 uname=0 getsid=0"]
    assert lines[4] == f"tsync 2 ret={tids[1]} errno=0"


def test_a_restore_that_builds_other_filters_fails_before_the_target_runs(procs, secthreads_bin, tmp_path,
                                                                          monkeypatch):
    p, out, tids = _start(procs, secthreads_bin, tmp_path, "shared")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    real = seccomp.plan
    # t1's own filter never installed: the chains read back tell
    monkeypatch.setattr(seccomp, "plan", lambda order, recs: [
        s for s in real(order, recs) if not (s[0] == "install" and s[1] == tids[1] and s[2]["node"] == 1)])
    with pytest.raises(EngineError) as e:
        restore(str(tmp_path / "img"), Options())
    assert "seccomp filters read back" in str(e.value)
    assert not os.path.exists(f"/proc/{p.pid}")
    assert not lines_of(out, "see ")


def test_plan_installs_each_shared_filter_once():
    f = lambda n: {"prog": "06000000" "0000ff7f", "flags": 0, "node": n}     # noqa: E731
    recs = {10: {"mode": 2, "filters": [f(0)]}, 11: {"mode": 2, "filters": [f(0), f(1)]},
            12: {"mode": 2, "filters": [f(0)]}, 13: {"mode": 0, "filters": []},
            14: {"mode": 2, "filters": [f(2), f(3)]}, 15: {"mode": 2, "filters": [f(2), f(3), f(4)]}}
    steps = [(s[0], s[1], s[2] if s[0] == "clone" else s[2]["node"]) for s in seccomp.plan(list(recs), recs)]
    assert steps == [("clone", 10, 13), ("clone", 10, 14), ("install", 14, 2), ("install", 14, 3),
                     ("clone", 14, 15), ("install", 15, 4), ("install", 10, 0), ("clone", 10, 12),
                     ("clone", 10, 11), ("install", 11, 1)]
    assert seccomp.tree_problem(recs) is None
    recs[12]["filters"] = [f(1)]
    assert "not one filter" in seccomp.tree_problem(recs)


def test_a_restore_that_copies_shared_filters_fails_before_the_target_runs(procs, secthreads_bin, tmp_path,
                                                                            monkeypatch):
    """Every thread installing its own copy of its chain (the programs read
    back right, the sharing does not): the restore's probes tell."""
    p, out, tids = _start(procs, secthreads_bin, tmp_path, "shared")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()

    def copies(order, recs):
        steps = [("clone", order[0], t) for t in order[1:]]
        for t in order:
            steps += [("install", t, f) for f in recs[t]["filters"]]
        return steps
    monkeypatch.setattr(seccomp, "plan", copies)
    with pytest.raises(EngineError) as e:
        restore(str(tmp_path / "img"), Options())
    assert "sharing reads back otherwise" in str(e.value)
    assert not os.path.exists(f"/proc/{p.pid}")
    assert not lines_of(out, "see ")
