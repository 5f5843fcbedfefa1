"""A process in the session ckpt runs in - the usual `prog & ckpt dump -t $!`
from one shell - is dumped by the ckpt command, whose tracer is a worker
in a session of its own (engine/guard.py): the target's session is
compared with the command's, not the worker's. (In-process dump() has no
worker: only the command shows this.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine_core_support import procs, wait_for  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def _ckpt(*args, cwd):
    return subprocess.run([sys.executable, "-S", "-m", "engine", *args, "--json"], capture_output=True,
                          timeout=120, cwd=str(REPO), close_fds=True)


def _sleeper(procs, tmp_path):
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-S", "-c",
                          f"import os, time\nopen({str(ready)!r}, 'w').close()\nwhile True: time.sleep(1)\n"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         close_fds=True, process_group=0)       # its own group, in this session
    procs.popens.append(p)
    wait_for(lambda: ready.exists(), what="the target")
    assert os.getsid(p.pid) == os.getsid(0) and os.getpgid(p.pid) == p.pid
    return p


def test_a_process_of_ckpts_own_session_is_dumped(procs, tmp_path):
    p = _sleeper(procs, tmp_path)
    r = _ckpt("check", "-t", str(p.pid), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _ckpt("dump", "-t", str(p.pid), "-D", str(tmp_path / "img"), "--leave-running", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "img" / "core.json") as f:
        assert json.load(f)["session"]["sid"] == os.getsid(0)


def test_another_session_is_still_refused(procs, tmp_path):
    """The session a restore could not rejoin: the target's is neither its
    own nor the command's (run the command in a session of its own)."""
    p = _sleeper(procs, tmp_path)
    r = subprocess.run([sys.executable, "-S", "-m", "engine", "check", "-t", str(p.pid), "--json"],
                       capture_output=True, timeout=120, cwd=str(REPO), close_fds=True, start_new_session=True)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "neither its own nor ckpt's" in r.stdout.decode()
