"""ckpt SIGKILLed at random instants (the small version of `make
reliability`, bench/reliability.py): 20 dumps, 20 restores.

Killed mid-dump, ckpt's worker stops at its next fault point and lets the
target go as it was (engine/guard.py); killed after the commit, the image
is complete and restores. Killed mid-restore, the half-built process is
killed and the image is untouched. Every run is judged by the target's own
check of its fds, secret and counters, and by /proc (tests/fault_support.py).
"""

from __future__ import annotations

import random

import pytest

from engine_core_support import become_subreaper

pytestmark = pytest.mark.timeout(600)
KILLS = 20


@pytest.fixture(scope="module")
def rel():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import reliability
    become_subreaper()
    return reliability


def test_kill_ckpt_during_dumps(rel, tmp_path):
    out = rel.kill_dumps(KILLS, str(tmp_path), random.Random(13))
    print(rel.render_kills("kill ckpt dump", out))
    assert out["kills"] == KILLS
    assert out["failures"] == [], rel.render_kills("kill ckpt dump", out)
    assert out["aborted_target_intact"] > 0     # the kills did land mid-dump


def test_kill_ckpt_during_restores(rel, tmp_path):
    out = rel.kill_restores(KILLS, str(tmp_path), random.Random(17))
    print(rel.render_kills("kill ckpt restore", out))
    assert out["kills"] == KILLS
    assert out["failures"] == [], rel.render_kills("kill ckpt restore", out)
    assert out["aborted_no_process"] > 0


@pytest.mark.parametrize("command", ["check", "dump"])
def test_ctrl_c_at_any_instant(rel, tmp_path, command):
    out = rel.interrupt_runs(10, str(tmp_path), random.Random(19), command)
    print(rel.render_kills(f"^C ckpt {command}", out))
    assert out["failures"] == [], rel.render_kills(f"^C ckpt {command}", out)


def test_kill_ckpt_check(rel, tmp_path):
    import signal
    out = rel.interrupt_runs(10, str(tmp_path), random.Random(23), "check", signal.SIGKILL)
    print(rel.render_kills("kill ckpt check", out))
    assert out["failures"] == [], rel.render_kills("kill ckpt check", out)
