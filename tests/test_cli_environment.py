"""ckpt's own environment as an input: the ckpt command run the way a
service manager, a CI runner, a cron job or a container might start it -
no controlling terminal and stdin closed, in a cgroup of its own, with a
low RLIMIT_NOFILE soft limit, umask 077, a cwd that is unreadable or
deleted, an odd environment (LANG, HOME unset; PATH minimal or none) -
dumps and restores a target through the CLI exactly, and none of ckpt's
own state leaks into the restored process (its umask, limits, cgroups,
cwd, environment are the target's)."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys

import pytest

from engine_core_support import check_counter, compile_target, count_lines, procs, proc_facts, wait_for, world  # noqa: F401,E501

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CG_ROOT = "/sys/fs/cgroup"
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_MDWE, PR_SET_THP_DISABLE = 38, 22, 24, 65, 41
PR_SET_TIMERSLACK, PR_MCE_KILL = 29, 33
_IOPRIO_SET, _IOPRIO_GET = {"x86_64": (251, 252), "aarch64": (30, 31)}.get(os.uname().machine, (-1, -1))


def _allow_all_filter() -> None:
    """A seccomp filter that allows everything (as a service manager's
    SystemCallFilter= would install one): inherited by every child."""
    insn = (ctypes.c_uint16 * 4)(0x06, 0, 0x0000, 0x7fff)      # BPF_RET|BPF_K SECCOMP_RET_ALLOW (k little-endian)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = Prog(1, ctypes.addressof(insn))
    if _libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")


def _prctl(*args) -> None:
    if _libc.prctl(*args, *[0] * (5 - len(args))) != 0:
        raise OSError(ctypes.get_errno(), f"prctl{args}")


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
        self.held = -1

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
        elif n == "inherited-fds":
            self.held = os.open(str(self.tmp / "held"), os.O_RDWR | os.O_CREAT, 0o600)
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
        elif n == "std-fds-closed":
            for fd in (0, 1, 2):
                os.close(fd)
        elif n == "signals":
            for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM])
        elif n == "sched":
            os.nice(7)
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
            _prctl(PR_SET_TIMERSLACK, 123456)
        elif n == "personality":
            if _libc.personality(0x0040000) == -1:      # ADDR_NO_RANDOMIZE (setarch -R)
                raise OSError(ctypes.get_errno(), "personality")
        elif n == "rlimits":
            for res, soft in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_STACK, 1 << 20),
                              (resource.RLIMIT_NPROC, 4096), (resource.RLIMIT_MEMLOCK, 1 << 16)):
                resource.setrlimit(res, (soft, resource.getrlimit(res)[1]))
        elif n == "ioprio":
            if _libc.syscall(_IOPRIO_SET, 1, 0, 3 << 13) != 0:     # IOPRIO_WHO_PROCESS, self, IOPRIO_CLASS_IDLE
                raise OSError(ctypes.get_errno(), "ioprio_set")
        elif n == "oom-raised":
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("500")
        elif n == "no-new-privs":
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
        elif n == "seccomp":
            _allow_all_filter()
        elif n == "bounding-set":
            _prctl(PR_CAPBSET_DROP, 27)     # CAP_MKNOD
        elif n == "mdwe":
            _prctl(PR_SET_MDWE, 1)
        elif n == "thp-disable":
            _prctl(PR_SET_THP_DISABLE, 1)
        elif n == "inherited-fds":
            for fd in (3, 7, 100, 900):
                os.dup2(self.held, fd, inheritable=True)

    def run(self, *args) -> subprocess.CompletedProcess:
        cwd = None if self.name == "cwd-deleted" else self.cwd
        if self.name == "std-fds-closed":      # its words are lost: only its status tells
            r = subprocess.run([sys.executable, "-S", "-m", "engine", *map(str, args)], timeout=120, close_fds=True,
                               cwd=cwd, env=self.env, preexec_fn=self.preexec)
            return subprocess.CompletedProcess(r.args, r.returncode, "", "")
        return subprocess.run([sys.executable, "-S", "-m", "engine", *map(str, args)], capture_output=True,
                              text=True, timeout=120, close_fds=self.name != "inherited-fds", cwd=cwd, env=self.env,
                              start_new_session=self.session, preexec_fn=self.preexec,
                              stdin=None if self.name == "no-tty-stdin-closed" else subprocess.DEVNULL)

    def cleanup(self):
        if self.held >= 0:
            os.close(self.held)
        for sub in self.cgroups:
            try:
                os.rmdir(sub)
            except OSError:
                pass
        d = self.tmp / "unreadable"
        if d.exists():
            os.chmod(d, 0o700)


AXES = ["no-tty-stdin-closed", "cgroup", "low-nofile", "umask-077", "cwd-unreadable", "cwd-deleted",
        "env-minimal", "env-empty", "std-fds-closed", "signals", "sched", "thp-disable", "inherited-fds",
        "personality", "rlimits", "ioprio"]
# ckpt's own state a restored process would keep and nothing takes back: refused at the dump, the target
# left running (engine/selfstate.py, engine/creds.py)
REFUSED = {"no-new-privs": "no_new_privs", "seccomp": "seccomp filter", "mdwe": "memory-deny-write-execute",
           "bounding-set": "bounding-set capabilities 27"}


def _cgroups(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def _more_facts(pid: int) -> dict:
    """What a clone of ckpt would inherit from it, beyond proc_facts."""
    with open(f"/proc/{pid}/status") as f:
        st = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/oom_score_adj") as f:
        oom = f.read().strip()
    with open(f"/proc/{pid}/timerslack_ns") as f:
        slack = f.read().strip()
    keys = ("NoNewPrivs", "Seccomp", "Seccomp_filters", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
            "Cpus_allowed_list", "THP_enabled", "SigPnd", "ShdPnd")
    with open(f"/proc/{pid}/personality") as f:
        pers = f.read().strip()
    return {**{k: st.get(k, "").strip() for k in keys}, "nice": stat[18 - 3], "policy": stat[41 - 3],
            "oom_score_adj": oom, "timerslack": slack, "personality": pers,
            "ioprio": _libc.syscall(_IOPRIO_GET, 1, pid)}


@pytest.mark.skipif(os.geteuid() != 0, reason="ckpt runs as root")
@pytest.mark.parametrize("axis", AXES)
def test_a_round_trip_from_an_odd_environment(counter_bin, world, tmp_path, procs, axis):  # noqa: F811
    env = Axis(tmp_path, axis).setup()
    try:
        p = procs.start([counter_bin, world["out"], world["in"], "1", "thread"], cwd=str(world["dir"]))
        wait_for(lambda: count_lines(world["out"]) > 5, what="output")
        facts, cg, more = proc_facts(p.pid), _cgroups(p.pid), _more_facts(p.pid)
        r = env.run("dump", "-t", p.pid, "-D", tmp_path / "img")
        assert r.returncode == 0, r.stdout + r.stderr
        p.wait()
        r = env.run("restore", "-D", tmp_path / "img")
        if r.returncode == 0:
            procs.adopt(p.pid)
        assert r.returncode == 0, r.stdout + r.stderr
        assert proc_facts(p.pid) == facts     # umask, limits, cwd, environ, fds: the target's, not ckpt's
        assert _cgroups(p.pid) == cg
        assert _more_facts(p.pid) == more
        n = count_lines(world["out"])
        wait_for(lambda: count_lines(world["out"]) > n + 10, what="output after the restore")
        check_counter(world["out"], world["in_data"], mib=1)
    finally:
        env.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="ckpt runs as root")
@pytest.mark.parametrize("axis", sorted(REFUSED))
def test_what_a_restore_would_inherit_from_ckpt_is_refused(counter_bin, world, tmp_path, procs, axis):  # noqa: F811
    env = Axis(tmp_path, axis).setup()
    try:
        p = procs.start([counter_bin, world["out"], world["in"], "1"], cwd=str(world["dir"]))
        wait_for(lambda: count_lines(world["out"]) > 5, what="output")
        r = env.run("dump", "-t", p.pid, "-D", tmp_path / "img")
        assert r.returncode == 3 and REFUSED[axis] in r.stderr, r.stdout + r.stderr
        n = count_lines(world["out"])
        wait_for(lambda: count_lines(world["out"]) > n + 5, what="the target going on")
        assert not (tmp_path / "img").exists()
    finally:
        env.cleanup()


PRCTL_TARGET = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
out = open(sys.argv[1], "a", buffering=1)
while True:
    out.write(f"{libc.prctl(34, 0, 0, 0, 0)} {libc.prctl(42, 0, 0, 0, 0)}\n")   # PR_MCE_KILL_GET, PR_GET_THP_DISABLE
    time.sleep(0.02)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="ckpt runs as root")
def test_ckpts_own_prctl_state_does_not_reach_the_restored_process(tmp_path, procs):  # noqa: F811
    """A ckpt started with THP disabled and the early machine-check kill
    policy (both inherited across fork) restores a process that had
    neither: it reads its own defaults back, not ckpt's."""
    env = Axis(tmp_path, "thp-disable").setup()
    (tmp_path / "t.py").write_text(PRCTL_TARGET)
    out = tmp_path / "out"
    p = procs.start([sys.executable, "-S", str(tmp_path / "t.py"), str(out)], cwd=str(tmp_path))
    lines = lambda: out.read_text().splitlines() if out.exists() else []     # noqa: E731
    wait_for(lambda: len(lines()) > 3, what="output")

    thp_off = env.preexec

    def pre():
        thp_off()
        _prctl(PR_MCE_KILL, 1, 1)       # PR_MCE_KILL_SET, PR_MCE_KILL_EARLY
    env.preexec = pre
    r = env.run("dump", "-t", p.pid, "-D", tmp_path / "img")
    assert r.returncode == 0, r.stderr
    p.wait()
    n = len(lines())
    r = env.run("restore", "-D", tmp_path / "img")
    if r.returncode == 0:
        procs.adopt(p.pid)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(lines()) > n + 3, what="output after the restore")
    assert set(lines()) == {lines()[0]}, (lines()[0], lines()[-1])


def _has_cap(bit: int) -> bool:
    with open("/proc/self/status") as f:
        eff = [ln.split()[1] for ln in f if ln.startswith("CapEff:")][0]
    return bool(int(eff, 16) >> bit & 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="ckpt runs as root")
def test_an_oom_score_adj_below_ckpts_own(counter_bin, world, tmp_path, procs):  # noqa: F811
    """ckpt with a higher oom_score_adj than the target's: without
    CAP_SYS_RESOURCE the restore could not lower the clone's; refused at
    the dump (the target left running), not by the restore after the kill.
    With it: restored with the target's."""
    env = Axis(tmp_path, "oom-raised").setup()
    p = procs.start([counter_bin, world["out"], world["in"], "1"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) > 5, what="output")
    r = env.run("dump", "-t", p.pid, "-D", tmp_path / "img")
    if not _has_cap(24):        # CAP_SYS_RESOURCE
        assert r.returncode == 3 and "oom_score_adj 0 is below ckpt's 500" in r.stderr, r.stdout + r.stderr
        n = count_lines(world["out"])
        wait_for(lambda: count_lines(world["out"]) > n + 5, what="the target going on")
        return
    assert r.returncode == 0, r.stderr
    p.wait()
    r = env.run("restore", "-D", tmp_path / "img")
    if r.returncode == 0:
        procs.adopt(p.pid)
    assert r.returncode == 0, r.stderr
    with open(f"/proc/{p.pid}/oom_score_adj") as f:
        assert f.read().strip() == "0"
