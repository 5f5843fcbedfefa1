"""The fd kinds of the harness (harness/kinds): every kind is complete (opener,
checker, YAML fields, a scenario, the README), the guest layout runs, and each
strengthened checker FAILS when the state it names is disturbed in a live
workload (through pidfd_getfd, as a faulty engine would leave it) or, where
nothing outside can reach the state, in a process of its own."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import kinds, schema, statediff, sysapi, targets, world
from harness.kinds import process
from test_harness_workload import RICH_FDS, RICH_SETUP, Workload, failed

REPO = Path(__file__).resolve().parent.parent
HOOKS = ("opener", "checker", "fields")


def corpus():
    return [schema.load(str(p)) for p in sorted((REPO / "scenarios").rglob("*.yaml"))]


# -- completeness -------------------------------------------------------------------------

def test_every_kind_is_complete():
    readme = (REPO / "scenarios" / "README.md").read_text()
    used = {kinds.kind_of(e) for sc in corpus() for e in sc["workload"].get("fds", [])}
    for key, mod in kinds.KINDS.items():
        assert mod.KIND == key and mod.__name__.rsplit(".", 1)[1] not in sys.stdlib_module_names, key
        for hook in HOOKS:
            assert callable(getattr(mod, hook, None)), f"kind {key} has no {hook}"
        fields = mod.fields(schema)
        assert key in fields and all(callable(c) for c in fields.values()), key
        assert key in used, f"no scenario uses kind {key}"
        assert f"`{key}`" in readme, f"scenarios/README.md does not list kind {key}"
    assert set(kinds.KINDS) == {m.KIND for m in kinds.MODULES}


def test_process_section_is_complete():
    for hook in ("apply", "observe", "checker", "fields", "validate"):
        assert callable(getattr(process, hook)), hook
    assert any(sc["workload"].get("process") for sc in corpus()), "no scenario sets workload.process"
    assert "workload.process" in (REPO / "scenarios" / "README.md").read_text()


def test_schema_is_built_from_the_registry():
    sc = schema.load("s.yaml", textwrap.dedent("""\
        name: s
        setup: [{file: {path: d, bytes: 10}}]
        workload:
          fds: [{fd: 3, open: d}, {fd: 4, dup: 3}, {fd: 5, timerfd: {value_ms: 5, expirations: 1}}]
        expect: restored
    """))
    assert sc["workload"]["fds"][1] == {"fd": 4, "dup": 3}
    for bad, where in [("{fd: 4, dup: 9}", "dup"), ("{fd: 4, dup: 5}", "dup"),
                       ("{fd: 4, timerfd: {value_ms: 5, interval_ms: 10, expirations: 1}}", "timerfd.expirations")]:
        text = f"name: s\nworkload:\n  fds: [{{fd: 3, open: d}}, {bad}, {{fd: 5, eventfd: {{}}}}]\nexpect: restored\n"
        with pytest.raises(schema.SchemaError) as ei:
            schema.load("s.yaml", text)
        assert ei.value.key.endswith(where), str(ei.value)
    with pytest.raises(schema.SchemaError) as ei:
        schema.load("s.yaml", "name: s\nworkload:\n  process: {pending: [{signal: SIGTERM}]}\nexpect: restored\n")
    assert "must be blocked" in str(ei.value)


# -- the guest layout: flat files plus the kinds package, no harness package --------------

def test_workload_runs_from_the_guest_layout(tmp_path):
    """Lay the files out as GuestTarget.install does and run the workload
    there with no PYTHONPATH and the repo out of reach: it must import
    (kinds as a top-level package) and verify every kind."""
    scripts = tmp_path / "opt"
    for rel in targets.guest_files():
        (scripts / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "harness" / rel, scripts / rel)
    assert {p.name for p in (scripts / "kinds").glob("*.py")} == \
        {p.name for p in (REPO / "harness" / "kinds").glob("*.py")}
    root = tmp_path / "s"
    spec = {"id": "t", "workdir": str(root / "w"), "ctldir": str(root / "c"), "ready": str(root / "c/ready.json"),
            "verdict": str(root / "c/verdict.json"), "setup": RICH_SETUP, "before_dump": [], "between": [],
            "fds": RICH_FDS + [{"fd": 30, "dup": 3}, {"fd": 31, "timerfd": {"value_ms": 5, "expirations": 1}}],
            "mmaps": [], "process": {"umask": 0o027, "blocked": ["SIGTERM"], "pending": [{"signal": "SIGTERM"}]},
            "ready_timeout": 20}
    (root / "c").mkdir(parents=True)
    (root / "c/spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def script(*args):
        r = subprocess.run([sys.executable, str(scripts / "workload.py"), *args], capture_output=True, text=True,
                           timeout=60, close_fds=True, env=env, cwd="/")
        assert r.stdout, r.stderr[-3000:]
        return json.loads(r.stdout)

    ready = script("spawn", str(root / "c/spec.json"), "--setup", "--snap")
    pids = [ready.get("pid")] + ready.get("helpers", [])
    try:
        assert "error" not in ready, ready.get("error")
        with open(f"/proc/{ready['pid']}/cmdline", "rb") as f:
            # the exec'd workload's script (workload.py is imported, from its bytecode)
            assert str(scripts / "workload_run.py").encode() in f.read()
        # spawn --snap: the harness's snapshot before the dump, of this very
        # process (its in-memory secret), the one a `snap` of its own takes
        snap = ready.pop("snap")
        assert hashlib.sha256(bytes.fromhex(snap["proof.secret"])).hexdigest() == ready["proof"]["secret_sha256"]
        again = script("snap", str(ready["pid"]), json.dumps(ready["proof"]))
        assert len(snap) > 100 and statediff.diff(snap, again, set()) == []
        out = script("signal", str(ready["pid"]), spec["verdict"], "20")
        assert out["verdict"]["ok"], failed(out["verdict"])
        whats = {c["what"] for c in out["verdict"]["checks"]}
        assert {"offset moves when fd 3 seeks", "expirations (fdinfo ticks)", "umask"} <= whats
    finally:
        script("kill", *map(str, pids))


#: what the exec'd workload must never import (each one costs every scenario's
#: start about ten times its host import time under TCG): typing and
#: dataclasses (with inspect, ast, dis), ctypes.util (its find_library runs
#: ldconfig -p in a subprocess), hashlib (OpenSSL's libcrypto), json (re and
#: its compiled patterns: harness/jsonio.py), signal (enum, functools,
#: collections: _signal), and the helpers only other subcommands use
NOT_IN_THE_WORKLOAD = ("typing", "dataclasses", "inspect", "ast", "dis", "ctypes.util", "subprocess", "shutil",
                       "hashlib", "_hashlib", "traceback", "threading", "resource", "procstate", "warmfork",
                       "zygote", "importlib", "importlib.util", "json", "re", "enum", "functools", "collections",
                       "signal")


def test_the_exec_workload_imports_only_what_run_needs(tmp_path):
    """The workload's script as spawn execs it (``python3 -S
    workload_run.py run SPEC MARK``), in the guest layout: it builds a
    scenario's fds and mappings, writes its ready file, takes the SIGUSR1
    that was pending from its start (execve keeps it), verifies and exits;
    none of NOT_IN_THE_WORKLOAD was imported on the way. (``-c`` runs the
    script only to add an exit handler that lists ``sys.modules``: -X
    importtime misses what importlib.import_module loads, the kinds.)"""
    from harness import warmfork, workload
    scripts = tmp_path / "opt"
    for rel in targets.guest_files():
        (scripts / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "harness" / rel, scripts / rel)
    root = tmp_path / "s"
    spec = {"id": "t", "workdir": str(root / "w"), "ctldir": str(root / "c"), "ready": str(root / "c/ready.json"),
            "verdict": str(root / "c/verdict.json"),
            "setup": [{"file": {"path": "data", "bytes": 65536, "seed": 1}}, {"dir": {"path": "d"}}],
            "before_dump": [], "between": [],
            "fds": [{"fd": 3, "open": "data", "mode": "r", "seek": 4096}, {"fd": 4, "open": "data", "mode": "a"},
                    {"fd": 5, "dup": 3}, {"fd": 6, "dir": "d"}, {"fd": 7, "device": "/dev/null"},
                    # kinds that once imported signal (its enums: enum, functools, collections)
                    {"pipe": {"read": 8, "write": 9}}, {"fd": 10, "signalfd": {"signals": ["SIGUSR2", "SIGRTMIN"]}}],
            "mmaps": [{"file": "data", "length": 8192, "prot": "rw", "dirty": {"bytes": 100, "seed": 2}},
                      {"anon": True, "length": 4096, "seed": 3}],
            "process": {"umask": 0o027}}
    world.apply_phase(spec, "setup")
    (root / "c/spec.json").write_text(json.dumps(spec))
    argv = warmfork.workload_argv(str(scripts / workload.RUN_SCRIPT), str(root / "c/spec.json"), workload.MARK)
    assert argv[1:3] == ["-S", str(scripts / "workload_run.py")]
    listing = tmp_path / "modules"
    code = (f"import sys, atexit; sys.argv = {argv[2:]!r}; sys.path[0] = {str(scripts)!r}; "
            f"atexit.register(lambda: open({str(listing)!r}, 'w').write(' '.join(sorted(sys.modules)))); "
            "exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'), {'__name__': '__main__'})")

    def pending_sigusr1():    # pragma: no cover - in the child, before the exec
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        os.kill(os.getpid(), signal.SIGUSR1)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([argv[0], "-S", "-c", code], capture_output=True, text=True, timeout=60, close_fds=True,
                       env=env, cwd="/", preexec_fn=pending_sigusr1)
    assert r.returncode == 0, r.stderr[-2000:]
    ready = json.loads((root / "c/ready.json").read_text())
    assert "error" not in ready and ready["fds"] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], ready
    verdict = json.loads((root / "c/verdict.json").read_text())
    assert verdict["ok"], failed(verdict)
    modules = set(listing.read_text().split())
    assert {"workload", "kinds.openfile", "kinds.dup", "kinds.directory", "kinds.device", "kinds.pipe",
            "kinds.outside", "kinds.signalfd", "records"} <= modules
    assert sorted(modules & set(NOT_IN_THE_WORKLOAD)) == []


# -- live workloads disturbed from outside -------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


class Grab:
    """pidfd_getfd(2): the workload's open file description, in this process."""

    def __init__(self, pid: int):
        self.pidfd = _libc.syscall(434, pid, 0)
        assert self.pidfd >= 0, ctypes.get_errno()
        self.fds = []

    def __call__(self, fd: int) -> int:
        got = _libc.syscall(438, self.pidfd, fd, 0)
        assert got >= 0, ctypes.get_errno()
        self.fds.append(got)
        return got

    def close(self):
        for fd in self.fds + [self.pidfd]:
            os.close(fd)


@pytest.fixture
def live(tmp_path):
    made = []

    def make(**kw):
        w = Workload(tmp_path, **kw)
        made.append(w)
        return w, Grab(w.pid)
    yield make
    for w in made:
        w.close()


def bad_whats(v, fd=None):
    return {c["what"] for c in failed(v) if fd is None or c["fd"] == fd}


def test_untouched_new_kinds_pass(live):
    w, g = live(fds=[{"fd": 3, "open": "data", "mode": "a", "seek": 700},
                     {"fd": 4, "open": "data", "mode": "r", "seek": 700}, {"fd": 5, "dup": 4},
                     {"fd": 6, "timerfd": {"value_ms": 5, "interval_ms": 3600000, "expirations": 1}},
                     {"fd": 7, "memfd": "m", "bytes": 100, "seals": ["F_SEAL_GROW"]},
                     {"fd": 8, "socket": "unix-pair", "peer_fd": 9, "data": {"bytes": 10},
                      "peer_data": {"bytes": 20, "seed": 2}},
                     {"fd": 10, "eventfd": {}}, {"fd": 11, "epoll": {"targets": [{"fd": 10}, {"fd": 8}]}}])
    g.close()
    v = w.verdict()
    assert v["ok"], failed(v)


def test_append_offset_reset_is_caught(live):
    w, g = live(fds=[{"fd": 3, "open": "data", "mode": "a", "seek": 2500}])
    os.lseek(g(3), 0, os.SEEK_SET)
    g.close()
    v = w.verdict()
    assert "offset" in bad_whats(v, 3)


def test_epoll_data_swap_is_caught(live):
    w, g = live(fds=[{"fd": 3, "eventfd": {"initval": 1}}, {"fd": 4, "eventfd": {"initval": 0}},
                     {"fd": 5, "epoll": {"targets": [{"fd": 3, "data": 11}, {"fd": 4, "data": 22}]}}])
    ep, a, b = g(5), g(3), g(4)
    # swap the data words, same targets and events: EPOLL_CTL_MOD through our
    # copy of the epoll, from a child that holds the targets at their numbers
    # (a registration is keyed by file and fd number)
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        rc = [1]
        try:
            os.dup2(a, 3)
            os.dup2(b, 4)
            rc = [_libc.epoll_ctl(ep, 3, t, ctypes.byref(sysapi._EpollEvent(1, d))) for t, d in ((3, 22), (4, 11))]
        finally:
            os._exit(1 if any(rc) else 0)
    assert os.waitpid(child, 0)[1] == 0
    g.close()
    assert {"epoll registrations (tfd, events, data)", "epoll data per target, as registered",
            "epoll readiness (data, events)"} <= bad_whats(failed_verdict(w), 5)


def failed_verdict(w):
    v = w.verdict()
    assert not v["ok"]
    return v


def test_a_lost_owner_or_signal_is_caught(live):
    w, g = live(fds=[{"pipe": {"read": 3, "write": 4}, "owner_signal": 40}])
    fcntl.fcntl(g(3), 10, 0)                  # F_SETSIG: back to SIGIO
    fcntl.fcntl(g(4), fcntl.F_SETOWN, 0)      # no owner
    g.close()
    v = failed_verdict(w)
    assert bad_whats(v) == {"owner and signal (F_GETOWN_EX, F_GETSIG)"}
    assert {c["fd"] for c in failed(v)} == {3, 4}


def test_lost_timerfd_ticks_are_caught(live):
    w, g = live(fds=[{"fd": 3, "timerfd": {"value_ms": 5, "interval_ms": 3600000, "expirations": 1}}])
    assert struct.unpack("Q", os.read(g(3), 8))[0] == 1       # someone consumed the expiration
    g.close()
    assert {"expirations (fdinfo ticks)", "read() expirations"} <= bad_whats(failed_verdict(w), 3)


def test_timerfd_next_expiry_out_of_tolerance_is_caught(live):
    w, g = live(fds=[{"fd": 3, "timerfd": {"value_ms": 3600000, "expirations": 0}}])
    sysapi.timerfd_settime(g(3), 3700000, 0)                 # later than it was: not a restore
    g.close()
    assert any(x.startswith("next expiry") for x in bad_whats(failed_verdict(w), 3))


def test_unix_pair_peer_queue_is_checked(live):
    w, g = live(fds=[{"fd": 3, "socket": "unix-pair", "peer_fd": 4, "data": {"bytes": 50},
                      "peer_data": {"bytes": 70, "seed": 5}}])
    assert len(os.read(g(4), 10)) == 10                        # 10 bytes gone from the peer's queue
    g.close()
    assert bad_whats(failed_verdict(w)) == {"queued stream bytes (peer end)"}


def test_memfd_seals_are_checked(live):
    w, g = live(fds=[{"fd": 3, "memfd": "m", "bytes": 100, "seals": ["F_SEAL_SHRINK"]}])
    fcntl.fcntl(g(3), sysapi.F_ADD_SEALS, sysapi.SEALS["F_SEAL_GROW"])
    g.close()
    assert bad_whats(failed_verdict(w), 3) == {"seals (F_GET_SEALS)"}


GHOST_SETUP = [{"file": {"path": "data", "bytes": 3000, "seed": 1}},
               {"chown": {"path": "data", "uid": 1234, "gid": 5678}},
               {"chmod": {"path": "data", "mode": 0o6755}}, {"utime": {"path": "data", "mtime": 1000000000}}]


def test_untouched_ghost_passes_every_attribute_check(live):
    w, g = live(fds=[{"fd": 3, "open": "data", "mode": "r"}, {"fd": 4, "open": "data", "mode": "r"}],
                setup=GHOST_SETUP, before_dump=[{"chmod": {"path": "data", "mode": 0o4700}},
                                                {"unlink": {"path": "data"}}])
    g.close()
    world.apply_phase(w.spec, "before_dump")
    v = w.verdict()
    assert v["ok"], failed(v)
    got = {c["what"]: c["expected"] for c in v["checks"] if c["fd"] == 3}
    assert got["ghost mode"] == oct(0o104700) and got["ghost uid"] == 1234 and got["ghost gid"] == 5678
    assert got["ghost mtime_ns"] == 10**18
    assert got["ghost: name in /proc/self/fd"] == os.path.join(w.spec["workdir"], "data") + " (deleted)"
    assert "own offset: unmoved when fd 3 seeks" in {c["what"] for c in v["checks"] if c["fd"] == 4}


@pytest.mark.parametrize("steps, name", [
    ([{"unlink": {"path": "data"}}], "data"),
    ([{"file": {"path": "new", "bytes": 5}}, {"rename-over": {"from": "new", "to": "data"}}], "data"),
    ([{"dir": {"path": "d"}}, {"rename": {"from": "data", "to": "d/moved"}}, {"hardlink": {"from": "d/moved", "to": "x"}},
      {"unlink": {"path": "d/moved"}}, {"unlink": {"path": "x"}}], "d/moved"),
])
def test_ghost_name_follows_the_dentry_as_the_kernel_does(live, steps, name):
    """The model's dentry names agree with /proc (renames move the name; the
    fd keeps the dentry it was opened through, not another link's)."""
    w, g = live(fds=[{"fd": 3, "open": "data", "mode": "r"}], setup=GHOST_SETUP[:1], before_dump=steps)
    g.close()
    world.apply_phase(w.spec, "before_dump")
    v = w.verdict()
    assert v["ok"], failed(v)
    got = next(c for c in v["checks"] if c["what"] == "ghost: name in /proc/self/fd")
    assert got["got"] == os.path.join(w.spec["workdir"], name) + " (deleted)"


@pytest.mark.parametrize("what", ["ghost mode", "ghost gid", "ghost mtime_ns"])
def test_ghost_attribute_disturbances_fail(live, what):
    w, g = live(fds=[{"fd": 3, "open": "data", "mode": "r"}], setup=GHOST_SETUP,
                before_dump=[{"unlink": {"path": "data"}}])
    world.apply_phase(w.spec, "before_dump")
    fd = g(3)
    {"ghost mode": lambda: os.fchmod(fd, 0o755), "ghost gid": lambda: os.fchown(fd, 1234, 1),
     "ghost mtime_ns": lambda: os.utime(fd, ns=(0, 5))}[what]()
    g.close()
    # chown(2) clears set-user-ID too: a gid change shows as both
    assert what in bad_whats(failed_verdict(w), 3) <= {what, "ghost mode"}


def test_rlimit_changed_from_outside_is_caught(live):
    w, g = live(fds=[], process={"rlimits": {"RLIMIT_CORE": [0, -1], "RLIMIT_NOFILE": [200, 4096]}})
    import resource
    resource.prlimit(w.pid, resource.RLIMIT_NOFILE, (256, 4096))
    g.close()
    assert bad_whats(failed_verdict(w)) == {"RLIMIT_NOFILE (soft, hard)"}


# -- what no other process can reach: checkers against a disturbed process of their own ---------

_PROCESS_BREAK = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from harness.kinds import process
from harness import sysapi
p = json.loads(sys.argv[2])
process.apply(p)
seen = json.loads(json.dumps(process.observe(p)))
exec(sys.argv[3])
bad = [c["what"] for ph in ("inspect", "consume") for c in process.checker(p, seen, ph) if not c["ok"]]
print(json.dumps(bad))
"""
STATE = {"umask": 0o027, "rlimits": {"RLIMIT_CORE": [0, -1]},
         "sigactions": {"SIGUSR2": {"handler": "libc", "flags": ["SA_RESTART", "SA_SIGINFO"], "mask": ["SIGINT"]},
                        "SIGHUP": {"handler": "ignore"}},
         "blocked": ["SIGTERM", "SIGWINCH", "SIGRTMIN+2"],
         "pending": [{"signal": "SIGTERM"}, {"signal": "SIGRTMIN+2", "value": 5}, {"signal": "SIGRTMIN+2", "value": 6}],
         "itimers": {"real": {"value_ms": 3000000, "interval_ms": 1000000}, "prof": {"value_ms": 600000}}}


@pytest.mark.parametrize("disturb, whats", [
    ("pass", set()),
    ("os.umask(0o022)", {"umask"}),
    ("import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 1 << 30))", {"RLIMIT_CORE (soft, hard)"}),
    ("sysapi.sigaction_set(12, sysapi.libc_address('getppid'), 0x10000004, [2])", {"SIGUSR2 action: handler address"}),
    ("sysapi.sigaction_set(12, sysapi.libc_address('getpid'), 0x4, [2])",
     {"SIGUSR2 action: flags", "SIGUSR2 action: flags asked for are set"}),
    ("sysapi.sigaction_set(12, sysapi.libc_address('getpid'), 0x10000004, [2, 15])", {"SIGUSR2 action: mask"}),
    ("signal.signal(signal.SIGHUP, signal.SIG_DFL)", {"SIGHUP action: handler address", "SIGHUP action: flags"}),
    ("signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGWINCH])",
     {"signal mask (SigBlk)", "the scenario's signals are blocked"}),
    ("sysapi.sigtimedwait_now([signal.SIGRTMIN + 2])",
     {"pending signals taken by sigtimedwait ([signo, value], in order)"}),
    ("sysapi.sigtimedwait_now([signal.SIGTERM])",
     {"pending signals (SigPnd | ShdPnd)", "pending signals taken by sigtimedwait ([signo, value], in order)"}),
    ("signal.setitimer(signal.ITIMER_REAL, 3000, 999)",
     {"itimer real: interval (s)", "itimer real: interval as asked (ms)"}),
    ("signal.setitimer(signal.ITIMER_PROF, 700, 0)", {"itimer prof: value (s): V0 - elapsed - 2 s .. V0 + 50 ms"}),
])
def test_process_checks_fail_on_exactly_what_changed(disturb, whats):
    r = subprocess.run([sys.executable, "-c", _PROCESS_BREAK, str(REPO), json.dumps(STATE), disturb],
                       capture_output=True, text=True, timeout=30, close_fds=True)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == whats


def test_anon_inode_type_is_compared_whole(tmp_path):
    """An eventfd where a timerfd was: same S_IFMT, same flags, different type."""
    from harness import workload
    efd = sysapi.eventfd(0, 0)
    tfd = sysapi.timerfd_create(1, 0)
    try:
        obs = workload.observe(tfd)
        assert obs["link"] == "anon_inode:[timerfd]"
        os.dup2(efd, tfd)
        bad = [c for c in workload.common_checks({"fd": tfd, "kind": "timerfd", "obs": obs}) if not c["ok"]]
        assert [c["what"] for c in bad] == ["object type"]
    finally:
        os.close(efd)
        os.close(tfd)


def test_dup_checker_tells_shared_from_separate(tmp_path):
    from harness.kinds import dup, openfile
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    a = os.open(path, os.O_RDONLY)
    shared, separate = os.dup(a), os.open(path, os.O_RDONLY)
    try:
        model = world.Model()
        model.apply({"file": {"path": "f", "bytes": 10000}})
        recs = [{"fd": a, "kind": "open", "entry": 0, "extra": {"ino": 1}},
                {"fd": separate, "kind": "open", "entry": 1, "extra": {"ino": 1}}]
        ctx = kinds.Ctx(str(tmp_path), model, entries=[{"fd": a, "open": "f"}, {"fd": separate, "open": "f"}],
                        recs=recs)
        ok = dup.checker({"fd": shared, "dup": a}, [{"fd": shared}], ctx, "inspect")
        assert ok and all(c["ok"] for c in ok)
        assert not any(c["ok"] for c in dup.checker({"fd": separate, "dup": a}, [{"fd": separate}], ctx,
                                                    "inspect")[1:])
        assert all(c["ok"] for c in openfile._independence_checks(ctx.entries[0], recs[:1], ctx))
        recs[1]["fd"] = shared                      # "separately opened", but one description
        assert not any(c["ok"] for c in openfile._independence_checks(ctx.entries[0], recs[:1], ctx))
    finally:
        for fd in (a, shared, separate):
            os.close(fd)


_THREADS_BREAK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from harness.kinds import process
p = {"threads": [{"blocked_in": h} for h in ("sleep", "read", "lock", "cond", "join")]}
process.apply(p)
seen = json.loads(json.dumps(process.observe(p)))
exec(sys.argv[2])
bad = [c["what"] for ph in ("inspect", "consume", "mutate") for c in process.checker(p, seen, ph) if not c["ok"]]
print(json.dumps(bad))
"""


@pytest.mark.parametrize("disturb, whats", [
    ("pass", set()),
    # a thread that came back with another TID (a new thread in its place)
    ("seen['threads'][2]['tid'] += 100000",
     {"threads: every recorded TID is a thread of this process",
      "thread 2 (lock): native id (gettid) is the recorded TID"}),
    # a thread whose stack is not its own any more
    ("seen['threads'][3]['value'] = '0' * 16", {"thread 3 (cond): the value in its own frame"}),
    # a read that returned early (EINTR-like: the pipe got its byte from elsewhere); join
    # returns before the kernel's task leaves /proc/self/task (1 run in 4 saw it still there)
    ("import os, time; os.write(process._THREADS[1].wfd, b'x'); process._THREADS[1].thread.join(5)\n"
     "while os.path.exists(f'/proc/self/task/{process._THREADS[1].tid}'): time.sleep(0.01)",
     {"thread 1 (read): still blocked", "thread 1 (read): its call returned",
      "threads: every recorded TID is a thread of this process"}),
])
def test_thread_checks_fail_on_exactly_what_changed(disturb, whats):
    r = subprocess.run([sys.executable, "-c", _THREADS_BREAK, str(REPO), disturb],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == whats


IN_FLIGHT = {"fd": 3, "socket": "unix-pair", "peer_fd": 4, "data": {"bytes": 40}, "carry": ["file", "memfd", "eventfd"],
             "passcred": True}


def test_untouched_files_and_credentials_in_flight_pass(live):
    w, g = live(fds=[dict(IN_FLIGHT)])
    g.close()
    v = w.verdict()
    assert v["ok"], failed(v)
    got = {c["what"]: c["got"] for c in v["checks"] if c["fd"] == 3}
    assert [t[0].split("/")[-1] for t in got["files in flight: name, status flags, offset, contents"]] == \
        ["carried-0", "memfd:carried-1 (deleted)", "anon_inode:[eventfd]"]


def test_a_file_in_flight_replaced_is_caught(live):
    # the message with the files is read, and one with other files of the
    # same kinds (another offset, counter) put back in its place
    w, g = live(fds=[dict(IN_FLIGHT, carry=["memfd", "eventfd"])])
    s = socket.socket(fileno=os.dup(g(3)))
    data = b""
    while True:
        try:
            data += s.recv(1 << 20, socket.MSG_DONTWAIT)   # stops where the sender's credentials change
        except BlockingIOError:
            break
    m = os.memfd_create("carried-0")
    os.write(m, b"a memfd in flight 0")
    e = os.eventfd(7)
    p = socket.socket(fileno=os.dup(g(4)))
    p.send(data[:-len(b"|carried")])
    p.sendmsg([b"|carried"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("ii", m, e))])
    for x in (s, p):
        x.close()
    os.close(m)
    os.close(e)
    g.close()
    assert bad_whats(failed_verdict(w), 3) == {"files in flight: name, status flags, offset, contents",
                                              "SCM_CREDENTIALS of the queued writes (the exited child's, then ours)"}


LEASE_SETUP = [{"file": {"path": "db", "bytes": 100, "seed": 3}}]


def test_untouched_lease_passes(live):
    w, g = live(fds=[{"fd": 3, "lock": "lease", "path": "db", "mode": "read"}], setup=LEASE_SETUP)
    g.close()
    v = w.verdict()
    assert v["ok"], failed(v)
    assert "the lease turns away an open that would break it" in {c["what"] for c in v["checks"]}


def test_a_lost_lease_is_caught(live):
    w, g = live(fds=[{"fd": 3, "lock": "lease", "path": "db", "mode": "write"}], setup=LEASE_SETUP)
    fcntl.fcntl(g(3), 1024, fcntl.F_UNLCK)          # the lease is gone, the open file stays
    g.close()
    # (removing a lease also clears the O_ASYNC and the signal that setting it set)
    assert bad_whats(failed_verdict(w), 3) == {"the lease, as fdinfo shows it", "flags (F_GETFL)",
                                              "F_GETLEASE, owner (F_GETOWN), F_GETSIG",
                                              "owner and signal (F_GETOWN_EX, F_GETSIG)",
                                              "the lease turns away an open that would break it"}


_CHILDREN_BREAK = r"""
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
from harness.kinds import process
p = json.loads(sys.argv[2])
process.apply(p)
seen = json.loads(json.dumps(process.observe(p)))
exec(sys.argv[3])
bad = [c["what"] for ph in ("inspect", "consume", "mutate") for c in process.checker(p, seen, ph) if not c["ok"]]
print(json.dumps(bad))
"""
SHARING = {"children": [{"blocked_in": "sleep", "share": ["files"]}, {"blocked_in": "read", "share": ["fs"]},
                        {"blocked_in": "sleep", "share": ["files", "fs"]}, {"blocked_in": "read"}]}


@pytest.mark.parametrize("disturb, whats", [
    ("pass", set()),
    # a child that was given a table of its own (its memfd is not here)
    ("process._CHILDREN[3].share = ['files']",
     {"child 3 (read): shares this process's files (kcmp)", "child 3 (read): the memfd it opened is open here"}),
    # a child sharing what it should not
    ("process._CHILDREN[0].share = []", {"child 0 (sleep): shares this process's files (kcmp)"}),
    # this process left the fs it shared with child 1 and child 2 (their umask is not its own)
    ("ctypes.CDLL(None).unshare(0x200)",
     {"child 1 (read): shares this process's fs (kcmp)", "child 1 (read): the umask it set is this process's",
      "child 2 (sleep): shares this process's fs (kcmp)", "child 2 (sleep): the umask it set is this process's"}),
])
def test_child_sharing_checks_fail_on_exactly_what_changed(disturb, whats):
    r = subprocess.run([sys.executable, "-c", _CHILDREN_BREAK, str(REPO), json.dumps(SHARING), disturb],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == whats


LEAVING = {"leave": ["files", "fs"],
           "children": [{"blocked_in": "sleep", "share": ["files", "fs"]}, {"blocked_in": "read", "share": ["files"]},
                        {"blocked_in": "sleep", "share": ["fs"]}, {"blocked_in": "read"}]}


@pytest.mark.parametrize("disturb, whats", [
    ("pass", set()),
    # the checker told the workload never left (as if a restore had rejoined it with its children)
    ("p['leave'] = ['fs']",
     {"child 0 (sleep): shares this process's files (kcmp)", "child 1 (read): shares this process's files (kcmp)",
      "child 0 (sleep): the memfd it opened is open here", "child 1 (read): the memfd it opened is open here"}),
    # a child with a table of its own, where the scenario has it share the left one
    ("process._CHILDREN[3].share = ['files']", {"children 1 and 3: share one files (kcmp)"}),
])
def test_children_left_sharing_checks_fail_on_exactly_what_changed(disturb, whats):
    r = subprocess.run([sys.executable, "-c", _CHILDREN_BREAK, str(REPO), json.dumps(LEAVING), disturb],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == whats


HIDDEN = {"fd": 3, "socket": "unix-pair", "peer_fd": 4, "data": {"bytes": 40}, "passcred": True, "passcred_off": True}


def test_untouched_hidden_credentials_pass(live):
    w, g = live(fds=[dict(HIDDEN)])
    g.close()
    v = w.verdict()
    assert v["ok"], failed(v)


def test_hidden_credentials_lost_are_caught(live):
    # what a restore that ignored them would do: the same bytes, re-sent
    # with SO_PASSCRED off at both ends (no credentials)
    w, g = live(fds=[dict(HIDDEN)])
    s = socket.socket(fileno=os.dup(g(3)))
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 0
    data = b""
    while True:
        try:
            data += s.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    p = socket.socket(fileno=os.dup(g(4)))
    p.send(data)
    for x in (s, p):
        x.close()
    g.close()
    assert bad_whats(failed_verdict(w), 3) == {"SCM_CREDENTIALS of the queued writes (the exited child's, then ours)"}
