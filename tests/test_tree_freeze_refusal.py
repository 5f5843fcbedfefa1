"""A tree member refused in the middle of a freeze pass (engine/tree.py)
must not leave the others seized or stopped; a tree of sleeping siblings
dumps and restores whole. (Members forking during the freeze:
test_engine_tree.py test_forking_tree_frozen_consistently; threads
created during it: test_engine_threads.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine_core_support import TARGETS, procs, wait_for  # noqa: F401
from test_engine_tree import _descendants, _status_field, _stat, _dump_restore, session_killer  # noqa: F401

N = 8


@pytest.fixture
def swarm(tmp_path):
    exe = str(tmp_path / "swarm")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, os.path.join(TARGETS, "swarm.c")], check=True,
                   capture_output=True, timeout=60)
    return exe


def _start(procs, session_killer, swarm, tmp_path):  # noqa: F811
    ready = tmp_path / "ready"
    p = procs.start([swarm, "tree", str(N), str(ready)], cwd=str(tmp_path))
    session_killer.append(p.pid)
    wait_for(lambda: ready.exists(), what="the swarm")
    kids = _descendants(p.pid)
    assert len(kids) == N - 1
    return p, kids


def _stopped(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: _stat(pid)["state"] == "T", what=f"pid {pid} stopped")


@pytest.mark.parametrize("how", ["check", "dump"])
def test_member_refused_mid_pass_leaves_every_member_untraced(procs, session_killer, swarm, tmp_path, how):  # noqa: F811
    """One child of the root, in the middle of the pass that freezes the
    root's children together, is traced by another process (its
    PTRACE_SEIZE fails in the pass; a job-control stop, which refused it
    there before, is restored now: engine/jobstop.py): refused, and every
    other member is let go (not traced by this process, which is the
    tracer and still alive, not stopped)."""
    p, kids = _start(procs, session_killer, swarm, tmp_path)
    victim = kids[len(kids) // 2]
    tracer = subprocess.Popen([sys.executable, "-c", "import ctypes, sys, time\n"
                               "assert ctypes.CDLL(None).ptrace(0x4206, int(sys.argv[1]), 0, 0) == 0\n"
                               "print('seized', flush=True)\ntime.sleep(120)\n", str(victim)],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, close_fds=True)
    try:
        assert tracer.stdout.readline() == b"seized\n"
        with pytest.raises((Refusal, Refusals)) as e:
            if how == "check":
                res = check(p.pid, Options())
                raise Refusals([Refusal(r["reason"], r.get("detail", "")) for r in res["refusals"]])
            dump(p.pid, str(tmp_path / "img"), Options())
        rs = e.value.refusals if isinstance(e.value, Refusals) else [e.value]
        assert any(r.reason == "ptraced" for r in rs), rs
        assert not (tmp_path / "img").exists()
        assert _status_field(victim, "TracerPid") == str(tracer.pid)
    finally:
        tracer.kill()
        tracer.wait()
    for pid in [p.pid] + kids:
        wait_for(lambda: _status_field(pid, "TracerPid") == "0", timeout=5, what=f"pid {pid} untraced")
        assert _stat(pid)["state"] not in ("t", "T"), pid


def test_tree_frozen_side_by_side_dumps_and_restores_whole(procs, session_killer, swarm, tmp_path):  # noqa: F811
    p, kids = _start(procs, session_killer, swarm, tmp_path)
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] == N
    assert _descendants(p.pid) == kids
    for pid in [p.pid] + kids:
        assert _status_field(pid, "TracerPid") == "0" and _stat(pid)["state"] not in ("t", "T"), pid
