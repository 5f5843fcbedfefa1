"""ckpt's own environment as an input: the ckpt command run the way a
service manager, a CI runner, a cron job or a container might start it -
no controlling terminal and stdin closed, in a cgroup of its own, with a
low RLIMIT_NOFILE soft limit, umask 077, a cwd that is unreadable or
deleted, an odd environment (LANG, HOME unset; PATH minimal or none) -
dumps and restores a target through the CLI exactly, and none of ckpt's
own state leaks into the restored process (its umask, limits, cgroups,
cwd, environment are the target's)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from engine_core_support import check_counter, compile_target, count_lines, procs, proc_facts, wait_for, world  # noqa: F401,E501

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CG_ROOT = "/sys/fs/cgroup"


@pytest.fixture(scope="module")
def counter_bin(tmp_path_factory):
    return compile_target(tmp_path_factory, "counter", "-pthread")


def _cgroup_dirs() -> list:
    """Writable hierarchies to put ckpt in a child cgroup of (v1 named or
    controller hierarchies and the unified one), by their mount."""
    out = []
    for name in ("pids", "unified"):
        d = os.path.join(CG_ROOT, name)
        if os.path.exists(os.path.join(d, "cgroup.procs")):
            out.append(d)
    if not out and os.path.exists(os.path.join(CG_ROOT, "cgroup.procs")):
        out.append(CG_ROOT)     # a pure cgroup2 machine
    return out


class Axis:
    """How the ckpt command is started: env, cwd, and what its child does
    before the exec."""

    def __init__(self, tmp_path, name: str):
        self.name, self.tmp = name, tmp_path
        self.env = {**os.environ, "PYTHONPATH": REPO}
        self.cwd = str(tmp_path)
        self.cgroups: list = []
        self.session = False

    def setup(self):
        n = self.name
        if n == "no-tty-stdin-closed":
            self.session = True
        elif n == "cgroup":
            for d in _cgroup_dirs():
                sub = os.path.join(d, f"ckpt-env-{os.getpid()}")
                os.makedirs(sub, exist_ok=True)
                self.cgroups.append(sub)
            if not self.cgroups:
                pytest.skip("no writable cgroup hierarchy")
        elif n == "umask-077":
            pass
        elif n == "cwd-unreadable":
            d = self.tmp / "unreadable"
            d.mkdir()
            os.chmod(d, 0)
            self.cwd = str(d)
        elif n == "cwd-deleted":
            self.cwd = str(self.tmp / "deleted")
        elif n == "env-minimal":
            self.env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO}
        elif n == "env-empty":
            self.env = {"PYTHONPATH": REPO}
        return self

    def preexec(self):
        n = self.name
        if n == "no-tty-stdin-closed":
            os.close(0)
        elif n == "cgroup":
            for sub in self.cgroups:
                with open(os.path.join(sub, "cgroup.procs"), "w") as f:
                    f.write("0")
        elif n == "low-nofile":
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))
        elif n == "umask-077":
            os.umask(0o077)
        elif n == "cwd-deleted":
            os.mkdir(self.cwd)
            os.chdir(self.cwd)
            os.rmdir(self.cwd)

    def run(self, *args) -> subprocess.CompletedProcess:
        cwd = None if self.name == "cwd-deleted" else self.cwd
        return subprocess.run([sys.executable, "-S", "-m", "engine", *map(str, args)], capture_output=True,
                              text=True, timeout=120, close_fds=True, cwd=cwd, env=self.env,
                              start_new_session=self.session, preexec_fn=self.preexec,
                              stdin=None if self.name == "no-tty-stdin-closed" else subprocess.DEVNULL)

    def cleanup(self):
        for sub in self.cgroups:
            try:
                os.rmdir(sub)
            except OSError:
                pass
        d = self.tmp / "unreadable"
        if d.exists():
            os.chmod(d, 0o700)


AXES = ["no-tty-stdin-closed", "cgroup", "low-nofile", "umask-077", "cwd-unreadable", "cwd-deleted",
        "env-minimal", "env-empty"]


def _cgroups(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="ckpt runs as root")
@pytest.mark.parametrize("axis", AXES)
def test_a_round_trip_from_an_odd_environment(counter_bin, world, tmp_path, procs, axis):  # noqa: F811
    env = Axis(tmp_path, axis).setup()
    try:
        p = procs.start([counter_bin, world["out"], world["in"], "1", "thread"], cwd=str(world["dir"]))
        wait_for(lambda: count_lines(world["out"]) > 5, what="output")
        facts, cg = proc_facts(p.pid), _cgroups(p.pid)
        r = env.run("dump", "-t", p.pid, "-D", tmp_path / "img")
        assert r.returncode == 0, r.stdout + r.stderr
        p.wait()
        r = env.run("restore", "-D", tmp_path / "img")
        if r.returncode == 0:
            procs.adopt(p.pid)
        assert r.returncode == 0, r.stdout + r.stderr
        assert proc_facts(p.pid) == facts     # umask, limits, cwd, environ, fds: the target's, not ckpt's
        assert _cgroups(p.pid) == cg
        n = count_lines(world["out"])
        wait_for(lambda: count_lines(world["out"]) > n + 10, what="output after the restore")
        check_counter(world["out"], world["in_data"], mib=1)
    finally:
        env.cleanup()
