"""A process without a vdso (it unmapped it; zdtm vdso02) is dumped and
restored: injection goes through a syscall instruction found in its
executable memory (refused before: "no [vdso] with a syscall instruction
to inject through"), and it comes back without a vdso, counting on."""

from __future__ import annotations

import os
import signal

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import build_target, procs, wait_for  # noqa: F401


def _lines(out):
    return open(out).read().splitlines() if os.path.exists(out) else []


def test_process_without_vdso(procs, tmp_path):  # noqa: F811
    exe = _build(tmp_path)
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


def _special(pid):
    with open(f"/proc/{pid}/maps") as f:
        return [(ln.split()[0], ln.split()[-1]) for ln in f if ln.rstrip().endswith(("[vdso]", "[vvar]", "[vvar_vclock]"))]


def _build(tmp_path):
    return build_target(tmp_path, "novdso")


def test_process_that_dropped_only_its_vdso_code(procs, tmp_path):  # noqa: F811
    """valgrind's shape (found by a survey of real programs: `valgrind
    prog` was dumped, killed, and its restore refused - the process lost):
    the [vdso] unmapped, the [vvar] pages kept. It comes back with the
    [vvar] pages where they were and no [vdso]."""
    exe = _build(tmp_path)
    out = str(tmp_path / "out")
    p = procs.start([exe, out, "code"])
    wait_for(lambda: _lines(out) or p.poll() is not None, what="the target")
    before = _special(p.pid)
    assert before and all(name.startswith("[vvar") for _, name in before), before
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: len(_lines(out)) == 2, what="a report after the restore")
    assert _lines(out)[1] == "report 1 vdso=1"     # its [vvar] pages
    assert _special(p.pid) == before


def test_vdso_moved_apart_from_its_vvar_is_refused_before_the_kill(procs, tmp_path):  # noqa: F811
    """A block the restorer cannot be made into (the [vdso] moved away
    from its [vvar]: a new process gets them side by side, and they move
    as one) is refused by the dump, the process left running - not dumped,
    killed, and then refused by the restore, or given a vdso elsewhere."""
    exe = _build(tmp_path)
    out = str(tmp_path / "out")
    p = procs.start([exe, out, "apart"])
    wait_for(lambda: _lines(out) or p.poll() is not None, what="the target")
    assert p.poll() is None, "the target could not move its vdso"
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    got = e.value.refusals if isinstance(e.value, Refusals) else [e.value]
    assert [r.reason for r in got] == ["unsupported-mapping"] and "vdso" in str(e.value), e.value
    assert not os.path.exists(tmp_path / "img")
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: len(_lines(out)) == 2, what="a report after the refusal")
    assert p.poll() is None
