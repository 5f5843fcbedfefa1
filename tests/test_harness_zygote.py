"""The warm ckpt (harness/zygote.py, served by harness/agent.py): a command
forked from the agent's warm engine must be indistinguishable from the
exec'd wrapper - output, exit status, reason codes, and the process state
the command starts in - and no command may leave anything to the next.

Host tier: the agent serves a socket (as in test_harness_agent.py) and
``ckpt`` is the guest's wrapper text (vm/recipe.py) in a temp dir, over a
probe package named ``engine`` that prints its own state, or over the
real engine."""

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

from harness import zygote
from harness.agent_client import AgentLink, agent_flags
from vm.recipe import CKPT_WRAPPER, CKPT_WRAPPER_FAST

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "harness" / "agent.py"

# The probe: prints the state a freshly exec'd wrapper's python3 starts
# in, then changes every piece of it (a leak would show in the next run),
# and exits with the code it is told.
PROBE_MAIN = r'''
import ctypes, json, os, resource, signal, sys, warnings
from . import STATE
libc = ctypes.CDLL(None, use_errno=True)
pdeath = ctypes.c_int(0)
libc.prctl(2, ctypes.byref(pdeath), 0, 0, 0)          # PR_GET_PDEATHSIG
dispositions = {}
for s in range(1, signal.NSIG):
    try:
        h = signal.getsignal(s)
    except ValueError:
        continue
    dispositions[s] = h if isinstance(h, int) else getattr(h, "__name__", repr(h))
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
state = {
    "argv": sys.argv[1:], "argv0": os.path.basename(sys.argv[0]), "orig_argv": sys.orig_argv[1:],
    "path": list(sys.path), "env": dict(os.environ), "cwd": os.getcwd(),
    "umask": os.umask(0o022), "fds": sorted(os.listdir("/proc/self/fd")),
    "sigmask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "ignored": status["SigIgn"].strip(), "caught": status["SigCgt"].strip(), "dispositions": dispositions,
    "pgid_is_pid": os.getpgid(0) == os.getpid(), "sid_is_pid": os.getsid(0) == os.getpid(),
    "pdeathsig": pdeath.value, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    "state": dict(STATE), "main": sorted(k for k in vars(sys.modules["__main__"]) if not k.startswith("__")),
    "stdin": sys.stdin.read(), "streams": [(s.encoding, s.errors, s.line_buffering, s.write_through, s.name)
                                           for s in (sys.stdin, sys.stdout, sys.stderr)],
    "warnings": [str(f) for f in warnings.filters], "flags": str(sys.flags),
    "excepthook": sys.excepthook is sys.__excepthook__,
}
# now spoil all of it for a next run to inherit, if it could
STATE["runs"] += 1
os.environ["PROBE_LEAK"] = "1"
os.umask(0o077)
os.chdir("/")
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
signal.signal(signal.SIGTERM, lambda *a: None)
warnings.simplefilter("error")
os.open("/dev/null", os.O_RDONLY)          # an fd left open
sys.path.append("/leak")
print(json.dumps(state, sort_keys=True))
sys.stderr.write("probe says bye\n")
mode = sys.argv[1] if len(sys.argv) > 1 else "0"
if mode == "raise":
    raise RuntimeError("probe failure")
if mode == "text":
    sys.exit("a text exit")
sys.exit(int(mode))
'''


def _agent(tmp_path: Path, env: dict, flags=()):
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    box = {}
    link = AgentLink(path, alive=lambda: box["p"].poll() is None if "p" in box else True, guest="host")
    link.connect(time.monotonic() + 5)
    conn, _ = srv.accept()
    box["p"] = subprocess.Popen([sys.executable, *flags, str(AGENT), "--stdin"], stdin=conn,
                                stdout=subprocess.DEVNULL, close_fds=True, env=env, cwd=str(tmp_path))
    conn.close()
    srv.close()
    return link, box["p"]


def _setup_root(tmp_path: Path, probe: bool, wrapper_text: str = CKPT_WRAPPER_FAST) -> tuple:
    """A bin dir with the guest's ckpt wrapper over ROOT (the probe package
    or this repo's engine), and the agent's environment."""
    root = tmp_path / "root"
    if probe:
        (root / "engine").mkdir(parents=True)
        (root / "engine" / "__init__.py").write_text("STATE = {'runs': 0}\n")
        (root / "engine" / "__main__.py").write_text(PROBE_MAIN)
        root_s = str(root)
    else:
        root_s = str(REPO)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "ckpt"
    wrapper.write_text(wrapper_text.replace("/opt/crucible", root_s))
    wrapper.chmod(0o755)
    # python3 on PATH must be this interpreter (the wrapper execs `python3`)
    (bindir / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "CKPT_", "PYTHON"))}
    env.update(PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", CRUCIBLE_ZYGOTE_COMMAND="ckpt",
               CRUCIBLE_ZYGOTE_ROOT=root_s)
    return root_s, env


#: the guests' wrapper (python3 -S, the agent started so too) and the image's own
WRAPPERS = {"fast": (CKPT_WRAPPER_FAST, ["-S"]), "plain": (CKPT_WRAPPER_FAST.replace("python3 -S -c", "python3 -c"), [])}


@pytest.fixture(params=sorted(WRAPPERS))
def probe_agent(tmp_path, request):
    text, flags = WRAPPERS[request.param]
    root, env = _setup_root(tmp_path, probe=True, wrapper_text=text)
    link, proc = _agent(tmp_path, env, flags)
    yield link, root
    link.close()
    proc.kill()
    proc.wait()


@pytest.fixture
def engine_agent(tmp_path):
    root, env = _setup_root(tmp_path, probe=False)
    link, proc = _agent(tmp_path, env, agent_flags())
    yield link, env
    link.close()
    proc.kill()
    proc.wait()


def test_the_wrapper_the_zygote_mirrors_is_the_guests():
    """The guests' ckpt wrapper (vm/recipe.py) is of the form the zygote
    mirrors, and the agent is started with the options it gives python3;
    another form of wrapper turns warmth off (below), it is never guessed."""
    assert zygote.wrapper_flags(CKPT_WRAPPER_FAST, "/opt/crucible") == agent_flags() == ["-S"]
    assert zygote.wrapper_text("/opt/crucible", ["-S"]) == CKPT_WRAPPER_FAST
    assert zygote.wrapper_flags(CKPT_WRAPPER_FAST.replace("python3 -S", "python3 -X importtime"), "/opt/crucible") is None
    assert zygote.wrapper_flags(CKPT_WRAPPER_FAST.replace("exec", "export PYTHONHOME\nexec"), "/opt/crucible") is None
    assert zygote.wrapper_flags(CKPT_WRAPPER_FAST, "/opt/other") is None
    # the image's own wrapper (-m engine: replaced at every launch) is not mirrored: exec'd
    assert zygote.wrapper_flags(CKPT_WRAPPER, "/opt/crucible") is None


def test_a_warm_command_starts_as_the_exec_d_one_and_leaks_nothing(probe_agent, tmp_path):
    link, root = probe_agent
    assert link.zygote_note() == ""
    work = tmp_path / "work"
    work.mkdir()
    runs = []
    # alternate: exec, warm, warm, exec, warm - each must see the pristine state
    for warm in (False, True, True, False, True):
        r = link.run(["ckpt", "7", "x y"], timeout=30, warm=warm, stdin=b"to stdin\n", cwd=str(work))
        assert r["warm"] is warm and "cold_why" not in r, r
        assert r["rc"] == 7 and r["stderr"] == b"probe says bye\n", r
        runs.append(json.loads(r["stdout"]))
    cold, warm = runs[0], runs[1]
    assert cold["state"] == {"runs": 0} and cold["stdin"] == "to stdin\n" and cold["cwd"] == str(work)
    assert cold["argv"] == ["7", "x y"] and cold["argv0"] == "-c"
    assert cold["fds"] == ["0", "1", "2", "3"]       # 3: the listdir's own
    assert cold["sigmask"] == [] and cold["pdeathsig"] == 0 and cold["sid_is_pid"]
    assert "PROBE_LEAK" not in cold["env"] and "PYTHONPATH" not in cold["env"]
    assert cold["path"][0] == root and str(work) not in cold["path"] and "" not in cold["path"]
    assert "/leak" not in cold["path"]
    for other in runs[1:]:
        diff = {k: (cold[k], other.get(k)) for k in cold if cold[k] != other.get(k)}
        if "env" in diff:
            diff["env"] = set(cold["env"].items()) ^ set(other["env"].items())
        assert not diff
    assert warm == cold


def test_a_warm_command_exits_as_python3_would(probe_agent):
    link, _ = probe_agent
    for mode in ("0", "3", "300", "raise", "text"):
        cold = link.run(["ckpt", mode], timeout=30)
        hot = link.run(["ckpt", mode], timeout=30, warm=True)
        assert hot["warm"] and (hot["rc"], hot["stderr"]) == (cold["rc"], cold["stderr"]), (mode, cold, hot)
        assert json.loads(hot["stdout"]) == json.loads(cold["stdout"])
    assert cold["rc"] == 1 and cold["stderr"].endswith(b"probe says bye\na text exit\n")


def test_what_the_fork_cannot_mirror_is_exec_d(probe_agent, tmp_path):
    """Another environment (a fault point, say): exec'd, and the reply says
    why. A cwd holding a module's name is no reason: neither way imports
    from the cwd."""
    link, _ = probe_agent
    base = dict(json.loads(link.run(["ckpt"], timeout=30)["stdout"])["env"])
    r = link.run(["ckpt"], timeout=30, warm=True, env=dict(base, CKPT_FAULT="dump.fd"))
    assert not r["warm"] and "CKPT_FAULT" in r["cold_why"], r
    assert json.loads(r["stdout"])["env"]["CKPT_FAULT"] == "dump.fd"
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "json.py").write_text("raise SystemExit('the cwd was imported from')\n")
    for warm in (False, True):
        r = link.run(["ckpt"], timeout=30, warm=warm, cwd=str(shadow))
        assert r["warm"] is warm and r["rc"] == 0 and json.loads(r["stdout"])["cwd"] == str(shadow), r
    # the same environment given explicitly is warm
    assert link.run(["ckpt"], timeout=30, warm=True, env=base)["warm"]
    # not the ckpt command: run as always
    r = link.run(["sh", "-c", "echo hi"], timeout=30, warm=True)
    assert not r["warm"] and r["stdout"] == b"hi\n"


@pytest.mark.parametrize("change, why", [
    (lambda t: t.replace("python3 -S -c", "python3 -X importtime -c"), "not the wrapper"),
    (lambda t: t.replace("exec python3", "export LC_ALL=C\nexec python3"), "not the wrapper"),
    (lambda t: t.replace("python3 -S -c", "python3 -c"), "options"),      # the agent runs -S
])
def test_a_changed_wrapper_turns_warmth_off(tmp_path, change, why):
    root, env = _setup_root(tmp_path, probe=True)
    w = tmp_path / "bin" / "ckpt"
    w.write_text(change(w.read_text()))
    link, proc = _agent(tmp_path, env, ["-S"])
    try:
        assert why in link.zygote_note()
        r = link.run(["ckpt", "5"], timeout=30, warm=True)
        assert (r["warm"], r["rc"]) == (False, 5) and why in r["cold_why"]
    finally:
        link.close()
        proc.kill()
        proc.wait()


def _target(tmp_path: Path, pipe_out: bool):
    """A sleeping process to dump; with ``pipe_out`` it holds a pipe whose
    other end this test keeps (refused: pipe-peer-outside)."""
    code = "import time\nwhile True: time.sleep(0.05)\n"
    if pipe_out:
        r, w = os.pipe()
        p = subprocess.Popen([sys.executable, "-c", code], pass_fds=(w,), close_fds=True, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        os.close(w)
        return p, r
    return subprocess.Popen([sys.executable, "-c", code], close_fds=True, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True), None


def _norm(out: bytes) -> dict:
    doc = json.loads(out)
    res = doc.get("result") or {}
    for k in list(res):
        if k.endswith("_ms") or k in ("image", "pid"):
            res.pop(k)
    return doc


@pytest.mark.timeout(300)
def test_the_real_engine_refuses_and_dumps_alike_warm_and_exec_d(engine_agent, tmp_path):
    """ckpt itself, both ways: a usage error, a refusal with its reason
    code, and a dump + restore of a live process."""
    link, env = engine_agent
    assert link.zygote_note() == ""
    for argv in (["ckpt", "dump"], ["ckpt", "--version"], ["ckpt", "show", "-D", str(tmp_path / "none"), "--json"]):
        cold, hot = link.run(argv, timeout=60), link.run(argv, timeout=60, warm=True)
        assert hot["warm"] and (hot["rc"], hot["stdout"], hot["stderr"]) == (cold["rc"], cold["stdout"], cold["stderr"])
    target, keep = _target(tmp_path, pipe_out=True)
    try:
        outs = []
        for n, warm in enumerate((False, True)):
            r = link.run(["ckpt", "dump", "-t", str(target.pid), "-D", str(tmp_path / f"img{n}"), "--json",
                          "--leave-running"], timeout=120, warm=warm)
            assert r["warm"] is warm
            outs.append((r["rc"], _norm(r["stdout"]), r["stderr"].replace(b"img1", b"img0")))
        assert outs[0] == outs[1] and outs[0][0] == 3
        assert outs[0][1]["refusals"][0]["reason"] == "pipe-peer-outside"
    finally:
        target.kill()
        target.wait()
        os.close(keep)
    for n, warm in enumerate((False, True)):
        target, _ = _target(tmp_path, pipe_out=False)
        try:
            img = tmp_path / f"live{n}"
            d = link.run(["ckpt", "dump", "-t", str(target.pid), "-D", str(img), "--json"], timeout=120, warm=warm)
            assert d["warm"] is warm and d["rc"] == 0, d
            target.wait(timeout=30)
            r = link.run(["ckpt", "restore", "-D", str(img), "--json"], timeout=120, warm=warm)
            assert r["warm"] is warm and r["rc"] == 0, r
            assert json.loads(r["stdout"])["result"]["pid"] == target.pid
        finally:
            try:
                os.kill(target.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# What a module computes at import from the process it imports in: in the
# zygote that is the agent, not the command (its pid, cwd, clock; PWD is the
# one variable of the environment the zygote does not compare).
_PER_PROCESS = {"getpid", "getppid", "getcwd", "getcwdb", "time", "monotonic", "perf_counter", "time_ns",
                "monotonic_ns", "getpgrp", "getsid", "umask", "getrlimit", "abspath", "realpath"}


def _import_time_reads(tree) -> list:
    import ast
    found = []

    def visit(node, top: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            # a default argument value is evaluated at import
            for d in node.args.defaults + node.args.kw_defaults:
                if d is not None:
                    visit(d, True)
            for d in getattr(node, "decorator_list", []):
                visit(d, True)
            return
        if top and isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            file_arg = any(isinstance(a, ast.Name) and a.id == "__file__" for a in node.args) or \
                any(isinstance(a, ast.Call) for a in node.args)   # abspath(dirname(__file__)) and the like
            if name in _PER_PROCESS and not (name in ("abspath", "realpath") and file_arg):
                found.append(f"line {node.lineno}: {name}()")
        if top and isinstance(node, ast.Constant) and node.value == "PWD":
            found.append(f"line {node.lineno}: PWD")
        for child in ast.iter_child_nodes(node):
            visit(child, top)

    visit(tree, True)
    return found


def test_the_engine_computes_nothing_per_process_at_import():
    """The warm engine's modules were imported in the agent: a value taken
    from the importing process at import (its pid, cwd, the time, PWD)
    would be the agent's in every warm command."""
    import ast
    bad = {}
    for path in sorted((REPO / "engine").rglob("*.py")):
        found = _import_time_reads(ast.parse(path.read_text()))
        if found:
            bad[str(path.relative_to(REPO))] = found
    assert not bad, bad
    # the check sees such a read
    assert _import_time_reads(ast.parse("import os\nME = os.getpid()\ndef f(x=os.getcwd()): return os.getpid()\n")) \
        == ["line 2: getpid()", "line 3: getcwd()"]
