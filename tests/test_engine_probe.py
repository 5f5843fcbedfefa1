"""State a process reads back from inside (tests/targets/prober.c), compared
before a dump and after the restore, after `ckpt check` and in an original
left running: each case is a piece of state the engine must restore exactly
or refuse. The prober says what it set, so each comparison is checked to
prove something (the value before differs from what a fresh process has)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusals
from engine.restore import restore
from engine_core_support import TARGETS, procs, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def prober_bin(tmp_path_factory) -> str:
    exe = str(tmp_path_factory.mktemp("prober-bin") / "prober")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "prober.c")], check=True,
                   capture_output=True)
    return exe


def _lines(out: str, prefix: str):
    try:
        with open(out) as f:
            return [line.rstrip("\n") for line in f if line.startswith(prefix)]
    except FileNotFoundError:
        return []


def start(procs, exe, out, *words) -> subprocess.Popen:
    err = out + ".err"
    with open(err, "w") as ef:
        p = subprocess.Popen([exe, out, *words], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=ef, close_fds=True, start_new_session=True)
    procs.popens.append(p)
    wait_for(lambda: _lines(out, "ready") or p.poll() is not None, what="the prober to start")
    assert p.poll() is None, open(err).read()
    return p


def report(pid: int, out: str, prefix: str = "report") -> str:
    n = len(_lines(out, prefix))
    os.kill(pid, signal.SIGUSR1)
    return wait_for(lambda: (lambda r: r[n] if len(r) > n else None)(_lines(out, prefix)),
                    what=f"a {prefix} line")


def fields(line: str) -> dict:
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def roundtrip(procs, exe, tmp_path, *words, how: str = "restore") -> tuple:
    """(report before, report after) of a prober started with `words`."""
    out = str(tmp_path / "out.txt")
    p = start(procs, exe, out, *words)
    before = report(p.pid, out)
    if how == "restore":
        dump(p.pid, str(tmp_path / "img"), Options())
        p.wait()
        restore(str(tmp_path / "img"), Options())
        procs.adopt(p.pid)
    elif how == "leave-running":
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    else:
        check(p.pid, Options())
    return before, report(p.pid, out)
