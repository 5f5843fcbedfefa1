"""harness/lifeguard.py: what a killed test run started is killed with it,
and nothing it did not start is touched."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from harness import lifeguard
from tests.engine_core_support import become_subreaper

pytestmark = pytest.mark.timeout(60)

# A stand-in for pytest: guards itself, starts a target in its own session
# (as the tests do), reports the target's PID, then waits to be killed.
RUN = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path.insert(0, {repo!r})
    from harness import lifeguard
    {guard}
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         close_fds=True, start_new_session=True)
    print(p.pid, flush=True)
    time.sleep(60)
""")


def _gone(pid, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)    # we are the subreaper of the orphan
            if done == pid:
                return True
        except ChildProcessError:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                        return True
            except OSError:
                return True
        time.sleep(0.05)
    return False


def _run(guard: str):
    become_subreaper()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(lifeguard.__file__)))
    env = {k: v for k, v in os.environ.items() if k != lifeguard.VAR}
    run = subprocess.Popen([sys.executable, "-c", RUN.format(repo=repo, guard=guard)],
                           stdout=subprocess.PIPE, close_fds=True, env=env)
    target = int(run.stdout.readline())
    return run, target


def test_target_of_a_killed_run_is_killed():
    run, target = _run("lifeguard.guard()")
    try:
        assert not _gone(target, 0.3), "the target died while its run was alive"
        run.kill()
        run.wait()
        assert _gone(target, 10), "the killed run's target outlived it"
    finally:
        for pid in (target,):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_unmarked_process_survives():
    run, target = _run("pass")          # no guard: the target carries no token of a dead run
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=True,
                             env={**os.environ, lifeguard.VAR: "someone-else"})
    try:
        assert lifeguard.sweep("no-such-run-token") == []
        run.kill()
        run.wait()
        assert not _gone(target, 1.0)
        assert other.poll() is None
    finally:
        for pid in (target, other.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        other.wait()
        _gone(target, 5)


def test_marked_matches_whole_entries_only():
    token = "t" + os.urandom(4).hex()
    a = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=True,
                         env={**os.environ, lifeguard.VAR: token})
    b = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=True,
                         env={**os.environ, lifeguard.VAR: token + "x"})
    try:
        time.sleep(0.2)
        found = lifeguard.marked(token)
        assert a.pid in found and b.pid not in found
    finally:
        a.kill(); b.kill(); a.wait(); b.wait()


def test_restored_target_is_still_marked(tmp_path):
    """The token lives in the environment block, which a restore brings back."""
    become_subreaper()
    token = "r" + os.urandom(4).hex()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(lifeguard.__file__)))
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = subprocess.Popen(["sleep", "60"], close_fds=True, start_new_session=True,
                         env={lifeguard.VAR: token, "PATH": "/usr/bin:/bin"}, **quiet)
    try:
        time.sleep(0.2)
        img = tmp_path / "img"
        for argv in (["dump", "-t", str(p.pid), "-D", str(img)], ["restore", "-D", str(img)]):
            r = subprocess.run([sys.executable, "-m", "engine", *argv], cwd=repo, close_fds=True,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            if argv[0] == "dump":
                p.wait()
        assert lifeguard.marked(token) == [p.pid]
        assert lifeguard.sweep(token) == [p.pid]
        assert _gone(p.pid, 5)
    finally:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except OSError:
            pass
