"""The warm workload start (harness/warmfork.py): in a fork of the agent,
``workload.py spawn`` turns its child into the workload without an exec, and
that process must look like the exec'd one to everything that reads it from
outside - /proc/PID/cmdline (the mutants re-exec it, pidstate and
workloads_under find the MARK in it), environ, fds, signals, umask, limits,
session - and verify itself alike. Host tier: the agent runs here on a socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import warmfork, workload, world
from harness.agent_client import AgentLink
from test_harness_workload import RICH_FDS, RICH_SETUP

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "harness" / "agent.py"
WORKLOAD = REPO / "harness" / "workload.py"
RUN_SCRIPT = REPO / "harness" / "workload_run.py"      # what spawn execs (it imports workload)
#: /proc/PID/status lines a fork and an exec must agree on
STATUS = ("SigQ", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt", "Umask", "Threads", "NoNewPrivs", "Seccomp",
          "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "Uid", "Gid", "Groups", "Cpus_allowed_list")


#: the agent's python3: Debian's when there is one, as in the guests
AGENT_PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _agent(tmp_path: Path, flags):
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    box = {}
    link = AgentLink(path, alive=lambda: box["p"].poll() is None if "p" in box else True, guest="host")
    link.connect(time.monotonic() + 5)
    conn, _ = srv.accept()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUCIBLE_")}
    box["p"] = subprocess.Popen([AGENT_PY, *flags, str(AGENT), "--stdin"], stdin=conn,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, env=env,
                                cwd="/")
    conn.close()
    srv.close()
    return link, box["p"]


@pytest.fixture
def agent_s(tmp_path):
    """An agent started as the guests start it: python3 -S."""
    link, proc = _agent(tmp_path, ["-S"])
    yield link
    link.close()
    proc.kill()
    proc.wait()


def _spec(root: Path) -> str:
    spec = {"id": "t", "workdir": str(root / "w"), "ctldir": str(root / "c"), "ready": str(root / "c/ready.json"),
            "verdict": str(root / "c/verdict.json"),
            "setup": RICH_SETUP, "before_dump": [], "between": [], "fds": RICH_FDS,
            "mmaps": [], "process": {"umask": 0o027}, "ready_timeout": 30}
    (root / "c").mkdir(parents=True)
    (root / "c/spec.json").write_text(json.dumps(spec))
    return str(root / "c/spec.json")


def _spawn(link: AgentLink, spec: str, *extra: str) -> dict:
    r = link.run([AGENT_PY, str(WORKLOAD), "spawn", spec, "--setup", *extra], timeout=60, script=True)
    assert r["rc"] == 0, r
    return json.loads(r["stdout"])


def _proc(pid: int, root: Path) -> dict:
    base = f"/proc/{pid}"
    status = dict(ln.split(":", 1) for ln in Path(base, "status").read_text().splitlines())
    stat = Path(base, "stat").read_text().rsplit(")", 1)[1].split()
    return {"cmdline": Path(base, "cmdline").read_bytes(), "environ": Path(base, "environ").read_bytes(),
            "status": {k: status[k].split() for k in STATUS if k in status and k != "SigBlk"},
            # sigtimedwait unblocks the signal it waits for while it sleeps: SIGUSR1 comes and goes
            "sigblk": int(status["SigBlk"], 16) & ~(1 << (signal.SIGUSR1 - 1)),
            "fds": sorted(int(x) for x in os.listdir(f"{base}/fd")),
            "fd_kinds": sorted(os.readlink(f"{base}/fd/{x}").split("[")[0].replace(str(root), "ROOT")
                              for x in os.listdir(f"{base}/fd")),
            "cwd": os.readlink(f"{base}/cwd").replace(str(root), "ROOT"),
            "limits": Path(base, "limits").read_text(), "cgroup": Path(base, "cgroup").read_text(),
            "comm": Path(base, "comm").read_text(), "exe": os.readlink(f"{base}/exe"),
            "tasks": os.listdir(f"{base}/task"),
            # session leader of its own session, no controlling tty
            "session": (int(stat[3]) == pid, int(stat[2]) == pid, stat[4])}


def _verdict(pid: int, spec: str) -> dict:
    with open(spec) as f:
        verdict = json.load(f)["verdict"]
    return workload.send_and_wait(pid, verdict, 30)["verdict"]


def _kill(ready: dict) -> None:
    """By PID, not by kill_workloads: with the cmdline rewrite broken a warm
    workload has no MARK, and kill_workloads would (rightly) leave it."""
    for pid in [ready.get("pid")] + ready.get("helpers", []):
        if pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_warm_workload_looks_and_verifies_like_an_exec_d_one(agent_s, tmp_path):
    warm_spec, exec_spec = (_spec(tmp_path / "warm"), _spec(tmp_path / "exec"))
    warm = _spawn(agent_s, warm_spec)
    cold = _spawn(agent_s, exec_spec, "--exec")
    try:
        assert (warm.get("start"), warm.get("cold_why")) == ("warm", None), warm
        assert cold.get("start") == "exec" and "exec requested" in cold["cold_why"], cold
        w, c = _proc(warm["pid"], tmp_path / "warm"), _proc(cold["pid"], tmp_path / "exec")
        # the argv the exec'd one has, byte for byte (its spec path aside)
        argv = [AGENT_PY, "-S", str(RUN_SCRIPT), "run", warm_spec, world.MARK]
        assert w["cmdline"] == b"".join(os.fsencode(a) + b"\0" for a in argv)
        assert w["cmdline"].replace(warm_spec.encode(), exec_spec.encode()) == c["cmdline"]
        for key in ("environ", "status", "sigblk", "fds", "fd_kinds", "cwd", "limits", "cgroup", "comm", "exe", "session"):
            assert w[key] == c[key], key
        # stdio and the scenario's fds, nothing of the agent's (its channel)
        assert w["fds"] == warm["fds"] and w["fds"][:4] == [0, 1, 2, 3] and len(w["tasks"]) == 1
        # found by their MARK as before
        assert world.pidstate(warm["pid"])["workload"]
        for ready, root in ((warm, "warm"), (cold, "exec")):   # its outside peers are forks of it
            assert workload.workloads_under(str(tmp_path / root)) == sorted([ready["pid"]] + ready["helpers"])
        for ready, spec in ((warm, warm_spec), (cold, exec_spec)):
            v = _verdict(ready["pid"], spec)
            assert v and v["ok"], [x for x in (v or {}).get("checks", []) if not x["ok"]]
    finally:
        _kill(warm)
        _kill(cold)


def test_an_agent_with_other_python_options_starts_the_workload_exec_d(tmp_path):
    """The fork would carry the agent's interpreter configuration: only one
    started as the workload's (-S) may fork it."""
    link, proc = _agent(tmp_path, [])
    ready = {}
    try:
        ready = _spawn(link, _spec(tmp_path / "s"))
        assert ready["start"] == "exec" and "options" in ready["cold_why"], ready
    finally:
        _kill(ready)
        link.close()
        proc.kill()
        proc.wait()


def test_outside_the_agent_spawn_execs(tmp_path):
    spec = _spec(tmp_path / "s")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-S", str(WORKLOAD), "spawn", spec, "--setup"], capture_output=True,
                       text=True, timeout=60, close_fds=True, env=env)
    ready = json.loads(r.stdout)
    try:
        assert ready["start"] == "exec" and ready["cold_why"] == "not in a fork of the agent", ready
    finally:
        _kill(ready)


def test_set_args_env_rewrites_cmdline_and_environ(tmp_path):
    """PR_SET_MM_MAP moves only the argv/env boundaries (no CAP_SYS_RESOURCE
    needed); the process keeps running normally after (malloc, brk)."""
    code = (
        "import sys, os; sys.path.insert(0, %r)\n"
        "from harness import warmfork\n"
        "warmfork.set_args_env(warmfork.block([b'python3', b'-S', b'x y', b'']), warmfork.block([b'A=1', b'B=']))\n"
        "junk = [bytearray(200000) for _ in range(50)]\n"
        "sys.stdout.write(repr((open('/proc/self/cmdline','rb').read(), open('/proc/self/environ','rb').read())))\n"
    ) % str(REPO)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == repr((b"python3\0-S\0x y\0\0", b"A=1\0B=\0"))


#: Debian's python3 (the guests'): libpython linked in, `environ` copy-relocated
PYTHONS = sorted({sys.executable} | ({"/usr/bin/python3"} if os.path.exists("/usr/bin/python3") else set()))


@pytest.mark.parametrize("python", PYTHONS)
def test_c_environ_is_what_an_exec_passes(python):
    code = (
        "import os, subprocess, sys; sys.path.insert(0, %r)\n"
        "from harness import warmfork\n"
        "os.environ['CRUCIBLE_WARMFORK_PROBE'] = '1'\n"
        "env = warmfork.c_environ()\n"
        "r = subprocess.run(['/usr/bin/env', '-0'], capture_output=True, close_fds=True, timeout=30)\n"
        "print(b'CRUCIBLE_WARMFORK_PROBE=1' in env, warmfork.block(env) == r.stdout)\n"
    ) % str(REPO)
    r = subprocess.run([python, "-S", "-c", code], capture_output=True, text=True, timeout=60, close_fds=True)
    assert (r.returncode, r.stdout.strip()) == (0, "True True"), r.stderr


def test_become_resets_what_the_agent_set(tmp_path):
    """In a fork of a process with handlers, an exit handler and extra
    buffered streams: after become(), dispositions are exec's, no exit
    handler runs, argv is the workload's, and brk can no longer grow the
    heap (wall_heap)."""
    code = (
        "import sys, os, signal, atexit; sys.path.insert(0, %r)\n"
        "from harness import warmfork\n"
        "signal.signal(signal.SIGUSR2, lambda *a: None); signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "atexit.register(lambda: os.write(1, b'AGENT-EXIT-HANDLER'))\n"
        "import types; sys.modules['engine'] = types.ModuleType('engine')\n"
        "sys.modules['engine.dump'] = types.ModuleType('engine.dump')\n"
        "warmfork.become(['/usr/bin/python3', '-S', '/x/workload.py', 'run', 'SPEC', 'MARK'])\n"
        "maps = [ln.split() for ln in open('/proc/self/maps')]\n"
        "end = max(int(m[0].split('-')[1], 16) for m in maps if m[-1] == '[heap]' and m[1] != '---p')\n"
        "walled = any(int(m[0].split('-')[0], 16) == end and m[1] == '---p' for m in maps)\n"
        "out = (signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL, signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,"
        " sys.argv, open('/proc/self/cmdline','rb').read(), walled)\n"
        "assert not [n for n in sys.modules if n.startswith('engine')], 'the agent-only engine stayed'\n"
        "print(repr(out)); sys.stdout.flush()\n"
    ) % str(REPO)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr((True, True, ["/x/workload.py", "run", "SPEC", "MARK"],
                                     b"/usr/bin/python3\0-S\0/x/workload.py\0run\0SPEC\0MARK\0", True))
    assert "AGENT-EXIT-HANDLER" not in r.stdout


def _in_a_fork(prepared: bool, child: str) -> subprocess.CompletedProcess:
    """`child` (lines of Python) run in a fork of the agent's interpreter,
    after warmfork.prepare_parent() in the parent when `prepared`."""
    body = "".join("    " + ln + "\n" for ln in child.splitlines())
    code = (f"import os, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from harness import warmfork\n"
            f"if {prepared!r}: warmfork.prepare_parent()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n" + body + "    os._exit(0)\n"
            "os.waitpid(pid, 0)\n")
    return subprocess.run([AGENT_PY, "-S", "-c", code], capture_output=True, text=True, timeout=60, close_fds=True)


@pytest.mark.parametrize("prepared", [False, True])
def test_a_fork_s_heap_stays_one_vma_only_when_the_parent_left_it_room(prepared):
    """The kernel rule warmfork.prepare_parent works around: a heap a fork
    inherits does not merge with what the child's own growth adds (two
    [heap] VMAs, which no restore reproduces); with the parent's free top
    the child's mallocs do not grow it."""
    r = _in_a_fork(prepared, (
        "keep = [bytearray(100000) for _ in range(100)]\n"
        "n = sum(1 for ln in open('/proc/self/maps') if ln.rstrip().endswith('[heap]'))\n"
        "os.write(1, str(n).encode())\n"))
    assert (r.returncode, r.stdout) == (0, "1" if prepared else "2"), r.stderr


@pytest.mark.parametrize("walled", [False, True])
def test_a_fork_that_outgrows_the_parent_s_room_keeps_one_heap_only_when_walled(walled):
    """prepare_parent's free top is finite: a fork that mallocs past it
    grows the inherited heap by brk into a second [heap] VMA (what no
    restore reproduces). With wall_heap brk cannot grow: the same mallocs
    succeed from anonymous mmaps, and the heap stays one VMA, the wall
    right at its end."""
    r = _in_a_fork(True, (
        f"if {walled!r}: warmfork.wall_heap()\n"
        "libc = warmfork._libc\n"
        "got = [libc.malloc(100 << 10) for _ in range((warmfork.HEAP_PAD >> 10) // 100 + 400)]\n"
        "maps = [ln.split() for ln in open('/proc/self/maps')]\n"
        "heap = [m for m in maps if m[-1] == '[heap]' and m[1] != '---p']\n"
        "end = int(heap[-1][0].split('-')[1], 16)\n"
        "wall = [m for m in maps if int(m[0].split('-')[0], 16) == end and m[1] == '---p']\n"
        "os.write(1, repr((len(heap), len(wall), all(got))).encode())\n"))
    assert (r.returncode, r.stdout) == (0, repr((1, 1, True)) if walled else repr((2, 0, True))), r.stderr


def test_warm_workloads_are_forked_from_a_lean_seed_that_dies_with_the_agent(tmp_path):
    """Not from the agent: a fork of it carried the agent's memory (its
    engine, its helpers) into every image. The seed is a python3 started as
    the exec'd workload is, the warm workload's parent; the workload's heap
    is one VMA with the wall at its end, and the seed goes with the agent."""
    link, proc = _agent(tmp_path, ["-S"])
    ready = {}
    seed = None
    try:
        ready = _spawn(link, _spec(tmp_path / "s"))
        assert ready["start"] == "warm", ready
        status = dict(ln.split(":", 1) for ln in Path(f"/proc/{ready['pid']}/status").read_text().splitlines())
        seed = int(status["PPid"])
        argv = Path(f"/proc/{seed}/cmdline").read_bytes().split(b"\0")
        assert argv[:4] == [AGENT_PY.encode(), b"-S", str(RUN_SCRIPT).encode(), b"seed"], argv
        assert int(Path(f"/proc/{seed}/stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid
        maps = [ln.split() for ln in Path(f"/proc/{ready['pid']}/maps").read_text().splitlines()]
        heap = [m for m in maps if m[-1] == "[heap]" and m[1] != "---p"]
        assert len(heap) == 1, heap
    finally:
        _kill(ready)
        link.close()
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while seed is not None and os.path.exists(f"/proc/{seed}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seed is None or not os.path.exists(f"/proc/{seed}") or \
        Path(f"/proc/{seed}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
