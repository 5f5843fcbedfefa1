"""Sessions and groups a restore can rebuild (engine/sessionids.py), ids of
0 included: CI runs ckpt in the kernel's session and group 0 (a runner that
never called setsid), where a target started without setsid is too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.sessionids import dump_problem, restore_problem

REPO = Path(__file__).resolve().parent.parent


def _getsid(table):
    def getsid(pid):
        if pid not in table:
            raise ProcessLookupError(pid)
        return table[pid]
    return getsid


# (pid, sid, pgid, ckpt's sid, {pid: sid} of live processes, initial pid ns) -> problem words or None
DUMP = [
    ((50, 50, 50, 7, {}, True), None),                         # its own session
    ((50, 7, 50, 7, {}, True), None),                          # ckpt's session, its own group
    ((50, 7, 40, 7, {40: 7}, True), None),                     # a group with a leader in the session
    ((50, 7, 40, 7, {}, True), "no leader in session 7"),      # a group whose leader is gone
    ((50, 7, 40, 7, {40: 9}, True), "no leader in session 7"),
    ((50, 9, 50, 7, {}, True), "neither its own nor ckpt's"),
    ((50, 0, 0, 7, {}, True), "neither its own nor ckpt's"),   # session 0, ckpt elsewhere
    ((50, 0, 0, 0, {}, True), None),                           # the kernel's session and group, as ckpt
    ((50, 0, 40, 0, {40: 0}, True), None),                     # CI: session 0, a group of the runner's
    ((50, 0, 0, 0, {}, False), "outside ckpt's pid namespace"),
    ((50, 0, 40, 0, {40: 0}, False), "outside ckpt's pid namespace"),
    ((50, 50, 50, 0, {}, False), None),                        # its own session: nothing outside
]


@pytest.mark.parametrize("args, want", DUMP)
def test_dump_rules(args, want):
    pid, sid, pgid, ckpt_sid, live, initial = args
    got = dump_problem(pid, sid, pgid, ckpt_sid, _getsid(live), zero_one=initial)
    assert (got is None) if want is None else (got is not None and want in got), got


# (pid, sid, pgid, restorer's sid, restorer's pgid, live, initial pid ns)
RESTORE = [
    ((50, 50, 50, 7, 7, {}, True), None),
    ((50, 7, 40, 7, 7, {40: 7}, True), None),
    ((50, 7, 40, 7, 7, {}, True), "no longer exists"),
    ((50, 9, 9, 7, 7, {}, True), "not its own, not ckpt's 7"),
    ((50, 0, 0, 7, 7, {}, True), "not its own, not ckpt's 7"),
    ((50, 0, 0, 0, 0, {}, True), None),                        # inherited from the restorer
    ((50, 0, 0, 0, 33, {33: 0}, True), "process group 0"),    # restorer in another group of session 0
    ((50, 0, 33, 0, 0, {33: 0}, True), None),                  # joins a live group of session 0
    ((50, 0, 0, 0, 0, {}, False), "outside ckpt's pid namespace"),
]


@pytest.mark.parametrize("args, want", RESTORE)
def test_restore_rules(args, want):
    pid, sid, pgid, my_sid, my_pgid, live, initial = args
    got = restore_problem(pid, sid, pgid, my_sid, my_pgid, _getsid(live), zero_one=initial)
    assert (got is None) if want is None else (got is not None and want in got), got


@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare(1)")
def test_a_session_outside_ckpts_pid_namespace_is_refused(tmp_path):
    """In a child pid namespace, a target and ckpt both in sessions whose
    leaders are outside read session 0: not known to be the same one."""
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"], close_fds=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        assert os.getsid(p.pid) == 0, os.getsid(p.pid)
        r = subprocess.run([sys.executable, "-S", "-m", "engine", "check", "-t", str(p.pid)],
                           capture_output=True, text=True, cwd={str(REPO)!r}, close_fds=True, timeout=60)
        p.kill()
        p.wait()
        print(r.returncode)
        print(r.stdout + r.stderr)
    """)
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-S", "-c", script],
                       capture_output=True, text=True, timeout=120, close_fds=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rc, _, out = r.stdout.partition("\n")
    assert rc == "3", r.stdout + r.stderr
    assert "unsupported-state" in out and "outside ckpt's pid namespace" in out, out
