"""Load: many ckpt at once, and two ckpt on one process.

20 faultee targets (tests/targets/faultee.py: an fd of every kind, a
thread, a secret and counters held only in memory) dumped by 20 concurrent
`ckpt dump` and restored by 20 concurrent `ckpt restore`: every one must
come back with its own check ok and its counters going on from the dump.
Two `ckpt dump` of one PID, the second started while the first holds the
target frozen (CKPT_FAULT_WAIT, engine/faults.py): the second is refused
`ptraced`, the first completes, the target carries on intact.
"""

from __future__ import annotations

import os
import time

import pytest

import fault_support as fs
from engine_core_support import become_subreaper

pytestmark = pytest.mark.timeout(600)
N = 20


@pytest.fixture(autouse=True)
def _subreaper():
    become_subreaper()


def test_twenty_concurrent_dumps_and_restores(tmp_path):
    targets = []
    restored = []
    try:
        for i in range(N):
            targets.append(fs.Target(str(tmp_path / f"t{i}")))
        dumps = [fs.ckpt_popen(["dump", "-t", str(t.pid), "-D", str(tmp_path / f"img{i}")])
                 for i, t in enumerate(targets)]
        outs = [p.communicate(timeout=400) for p in dumps]
        for i, (p, (_, err)) in enumerate(zip(dumps, outs)):
            assert p.returncode == 0, f"dump {i}: {err}"
        for t in targets:
            t.popen.wait(timeout=30)
        restores = [fs.ckpt_popen(["restore", "-D", str(tmp_path / f"img{i}")]) for i in range(N)]
        outs = [p.communicate(timeout=400) for p in restores]
        for i, (p, (_, err)) in enumerate(zip(restores, outs)):
            if p.returncode == 0:
                restored.append(targets[i].pid)
        for i, (p, (_, err)) in enumerate(zip(restores, outs)):
            assert p.returncode == 0, f"restore {i}: {err}"
        for t in targets:
            v = fs.verdict(t.dir, t.pid, timeout=30)
            assert v["ok"], (t.pid, v["errors"])
            assert v["secret"] == t.secret
            assert v["counter"] >= t.first["counter"] and v["thread_counter"] >= t.first["thread_counter"]
    finally:
        for pid in restored:
            fs.kill_reap(pid)
        for t in targets:
            t.kill()


def test_two_ckpt_on_one_pid(tmp_path):
    t = fs.Target(str(tmp_path / "t"))
    go = str(tmp_path / "go")
    try:
        first = fs.ckpt_popen(["dump", "-t", str(t.pid), "-D", str(tmp_path / "a"), "--leave-running"],
                              env={"CKPT_FAULT_WAIT": f"dump.surveyed:{go}"})
        fs.wait_for(lambda: os.path.exists(go + ".reached") or first.poll() is not None, 60,
                    "the first dump to hold the target")
        assert first.poll() is None, first.communicate()
        second = fs.ckpt(["dump", "-t", str(t.pid), "-D", str(tmp_path / "b"), "--leave-running"])
        assert second.returncode == 3 and "ptraced" in second.stderr, second.stderr
        assert not os.path.lexists(tmp_path / "b") and not os.path.lexists(str(tmp_path / "b") + ".partial")
        open(go, "w").close()
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert os.path.exists(tmp_path / "a" / "manifest.json")
        time.sleep(0.05)
        assert t.intact() == []
    finally:
        t.kill()
