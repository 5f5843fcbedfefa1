"""`ckpt dump` refuses in its pre-flight what `ckpt restore`, run the same
way on the unchanged machine, would refuse (issue 10 item 4): the target is
left running and no image is made, instead of a dump that kills the target
and an image that can never be restored."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine_core_support import alive, procs, python_exe, wait_for  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLEEPER = ("import os, sys, time\nopen(sys.argv[1] + '.tmp', 'w').close(); os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
           "while True: time.sleep(1)\n")


def _ready(tmp_path, name="ready"):
    return str(tmp_path / name)


def _refusals(e):
    return getattr(e, "refusals", [e])


def _sleeper_pid(tmp_path) -> int:
    """PID of the python sleeper started by a shell (read from /proc)."""
    ready = _ready(tmp_path)
    wait_for(lambda: os.path.exists(ready), what="the sleeper")
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                with open(f"/proc/{n}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if ready.encode() in argv:
                return int(n)
    raise AssertionError("sleeper not found")


def test_third_session_is_refused_at_dump(procs, tmp_path):
    """In a session neither its own nor ckpt's. Before: dumped (and
    killed), then restore refused it (unsupported-state: session)."""
    sh = procs.start(["/bin/sh", "-c", f'{python_exe()} -c "$0" {_ready(tmp_path)} & wait', SLEEPER])
    pid = _sleeper_pid(tmp_path)
    procs.adopt(pid)
    assert os.getsid(pid) == sh.pid != pid and os.getsid(pid) != os.getsid(0)
    with pytest.raises((Refusal, Refusals)) as e:
        dump(pid, str(tmp_path / "img"), Options())
    got = _refusals(e.value)
    assert [r.reason for r in got] == ["unsupported-state"] and "session" in got[0].message
    assert alive(pid) and not (tmp_path / "img").exists()


def test_process_group_without_leader_is_refused_at_dump(procs, tmp_path):
    """In ckpt's session, in a process group whose leader has exited: the
    group would not exist any more for the restore."""
    sh = subprocess.Popen(["/bin/sh", "-c", f'{python_exe()} -c "$0" {_ready(tmp_path)} &', SLEEPER],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          close_fds=True, process_group=0)
    procs.popens.append(sh)
    sh.wait()                                      # the group leader is gone
    pid = _sleeper_pid(tmp_path)
    procs.adopt(pid)                               # reparented to us, the subreaper
    assert os.getsid(pid) == os.getsid(0) and os.getpgid(pid) == sh.pid != pid
    with pytest.raises((Refusal, Refusals)) as e:
        dump(pid, str(tmp_path / "img"), Options())
    got = _refusals(e.value)
    assert [r.reason for r in got] == ["unsupported-state"] and "process group" in got[0].message
    assert alive(pid) and not (tmp_path / "img").exists()


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = int([ln.split()[1] for ln in f if ln.startswith("CapEff")][0], 16)
    return bool(eff >> 24 & 1)


def test_hard_rlimit_above_ckpts_is_refused_at_dump(procs, tmp_path):
    """`ckpt dump` run with a lower hard RLIMIT_NOFILE than the target's
    and no CAP_SYS_RESOURCE: before, it dumped and killed the target, and
    `ckpt restore` run the same way refused (capability)."""
    if _has_cap_sys_resource():
        pytest.skip("ckpt has CAP_SYS_RESOURCE here: it may raise hard limits")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, hard, 1024) - 1
    p = procs.start([python_exe(), "-c", SLEEPER, _ready(tmp_path)])
    wait_for(lambda: os.path.exists(_ready(tmp_path)), what="the sleeper")

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, low))
    out = subprocess.run([sys.executable, "-m", "engine", "dump", "-t", str(p.pid), "-D", str(tmp_path / "img")],
                         cwd=ROOT, preexec_fn=lower, capture_output=True, text=True, timeout=60, close_fds=True)
    assert out.returncode == 3, out.stderr
    assert "capability" in out.stderr and "RLIMIT_NOFILE" in out.stderr
    assert p.poll() is None and not (tmp_path / "img").exists()


def test_unforeseen_system_error_at_restore_is_a_clean_engine_error(procs, tmp_path, monkeypatch):
    """Every restore failure is a refusal or an EngineError (exit 4 with
    errno), never a Python exception: before, a raw OSError from opening a
    file (NotADirectoryError: '/proc/self/fd/3') escaped as an internal error."""
    from engine import restore as engine_restore
    from engine.errors import EngineError
    from engine.fds import regular
    p = procs.start([python_exe(), "-c", "import os\nfd = os.open('/etc/hostname', os.O_RDONLY)\n" + SLEEPER,
                     _ready(tmp_path)])
    wait_for(lambda: os.path.exists(_ready(tmp_path)), what="the sleeper")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()

    def crash(rec, ctx):
        raise NotADirectoryError(20, "Not a directory", "/proc/self/fd/3")
    monkeypatch.setattr(regular, "restore", crash)
    try:
        with pytest.raises(EngineError) as e:
            engine_restore.restore(str(tmp_path / "img"), Options())
    finally:
        if alive(p.pid):
            procs.adopt(p.pid)
    assert not isinstance(e.value, OSError) and e.value.errno == 20
    assert "/proc/self/fd/3" in str(e.value) and not alive(p.pid)


@pytest.mark.parametrize("kind", ["pipe", "fifo"])
def test_pipe_buffer_above_pipe_max_size_is_refused_at_dump(procs, tmp_path, monkeypatch, kind):
    """A pipe buffer larger than pipe-max-size cannot be remade without
    CAP_SYS_RESOURCE: restore refused it (capability) after the dump had
    killed the target. pipe-max-size is simulated below the pipe's 64 KiB
    (lowering the real sysctl would disturb the whole machine)."""
    if _has_cap_sys_resource():
        pytest.skip("ckpt has CAP_SYS_RESOURCE here")
    from engine.fds import _pipebuf
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        setup = "r = os.open('fifo', os.O_RDONLY | os.O_NONBLOCK); w = os.open('fifo', os.O_WRONLY)\n"
    else:
        setup = "r, w = os.pipe()\n"
    p = procs.start([python_exe(), "-c", "import os\n" + setup + SLEEPER, _ready(tmp_path)], cwd=str(tmp_path))
    wait_for(lambda: os.path.exists(_ready(tmp_path)), what="the target")
    monkeypatch.setattr(_pipebuf, "pipe_max_size", lambda: 4096)
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    got = _refusals(e.value)
    assert {r.reason for r in got} == {"capability"} and "pipe-max-size" in got[0].message
    assert p.poll() is None and not (tmp_path / "img").exists()


def test_a_record_restore_would_reject_fails_the_dump_before_the_kill(procs, tmp_path, monkeypatch):
    """A handler that writes a path restore's image check rejects (a unix
    socket bound to "./agent.sock" once recorded "<cwd>/./agent.sock")
    fails the dump: the target lives, no image."""
    from engine.errors import EngineError
    from engine.fds import regular
    sock = tmp_path / "held"
    sock.write_text("x")
    p = procs.start([python_exe(), "-c", "import os, sys, time\nf = open(sys.argv[1])\n"
                     "open(sys.argv[2] + '.tmp', 'w').close(); os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n"
                     "while True: time.sleep(1)\n", str(sock), _ready(tmp_path)])
    wait_for(lambda: os.path.exists(_ready(tmp_path)), what="the holder")
    real = regular.dump

    def dotted(info, ctx):
        rec = real(info, ctx)
        rec["file"]["path"] = os.path.dirname(rec["file"]["path"]) + "/./held"
        return rec
    monkeypatch.setattr(regular, "dump", dotted)
    img = str(tmp_path / "img")
    with pytest.raises(EngineError) as e:
        dump(p.pid, img, Options())
    assert "would be rejected by restore" in str(e.value) and "not a plain absolute path" in str(e.value)
    assert alive(p.pid) and not os.path.exists(img)
