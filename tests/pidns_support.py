"""Running targets and ckpt inside a child pid namespace, as in a container
(`docker exec`): `unshare --pid --fork --mount-proc` on the host, root.

in_pidns(script) runs a Python script as PID 1 of a new pid namespace
(with its own /proc, hence its own mount namespace), with a prelude that
gives it:
  ckpt(*args)      python3 -S -m engine ARGS from the repository: (rc, out)
  start(argv, **)  a target (close_fds, its own session unless session=False)
  wait_for(pred)   poll up to 10 s
  stat(pid)        {state, ppid, pgid, sid} from /proc/PID/stat
  gone(pids)       reap (as the namespace's init does) until every pid is gone
  done(obj)        the script's result: printed as the last line, JSON
The script's last line is returned parsed. Everything in the namespace is
killed by the kernel when the script (its init) ends, restored processes
too: nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_unshare = pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0,
                                   reason="needs unshare(1) and root")

PRELUDE = textwrap.dedent(f"""
    import json, os, subprocess, sys, time
    REPO = {REPO!r}

    def ckpt(*args, cwd=REPO):
        r = subprocess.run([sys.executable, "-S", "-m", "engine", *map(str, args)], capture_output=True, text=True,
                           cwd=cwd, close_fds=True, timeout=120, env={{**os.environ, "PYTHONPATH": REPO}})
        return r.returncode, r.stdout + r.stderr

    def start(argv, session=True, cwd=None):
        return subprocess.Popen(argv, close_fds=True, start_new_session=session, cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for(pred, timeout=10.0, what="condition"):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            time.sleep(0.01)
        raise AssertionError("timed out waiting for " + what)

    def stat(pid):
        with open(f"/proc/{{pid}}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return {{"state": rest[0], "ppid": int(rest[1]), "pgid": int(rest[2]), "sid": int(rest[3])}}

    def gone(pids):
        # this script is the namespace's init: orphans come to it, and a dump's
        # killed tree leaves its members' pids held by zombies until it waits
        def reaped():
            while True:
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
            return not any(os.path.exists(f"/proc/{{x}}") for x in pids)
        wait_for(reaped, what="the dumped processes to be gone")

    def done(obj):
        print(json.dumps(obj), flush=True)
""")


def in_pidns(script: str, *, mount_proc: bool = True, extra=(), timeout: float = 180, pass_fds=()) -> dict:
    argv = ["unshare", "--pid", "--fork", "--kill-child", *(["--mount-proc"] if mount_proc else []), *extra,
            sys.executable, "-S", "-c", PRELUDE + textwrap.dedent(script)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, close_fds=True, pass_fds=pass_fds)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])
