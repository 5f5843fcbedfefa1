"""A process without a vdso (it unmapped it; zdtm vdso02) is dumped and
restored: injection goes through a syscall instruction found in its
executable memory (refused before: "no [vdso] with a syscall instruction
to inject through"), and it comes back without a vdso, counting on."""

from __future__ import annotations

import os
import signal
import subprocess

from engine.context import Options
from engine.dump import dump
from engine.restore import restore
from engine_core_support import TARGETS, procs, wait_for  # noqa: F401


def _lines(out):
    return open(out).read().splitlines() if os.path.exists(out) else []


def test_process_without_vdso(procs, tmp_path):  # noqa: F811
    exe = str(tmp_path / "novdso")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "novdso.c")], check=True,
                   capture_output=True)
    out = str(tmp_path / "out")
    p = procs.start([exe, out])
    wait_for(lambda: _lines(out) or p.poll() is not None, what="the target")
    assert _lines(out) == ["ready vdso=0"]
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: len(_lines(out)) == 2, what="a report")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: len(_lines(out)) == 3, what="a report after the restore")
    assert _lines(out)[1:] == ["report 1 vdso=0", "report 2 vdso=0"]
    with open(f"/proc/{p.pid}/maps") as f:
        assert "[vdso]" not in f.read()
