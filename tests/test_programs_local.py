"""The program workload on this host (harness/program.py, programrun.py):
the scenarios of scenarios/programs/ whose programs this host has, run
whole through LocalTarget with the real engine — vm/programs/cthreads.c
compiled by the host's gcc, python3, sh pipelines, sqlite3, less, xz.
(tests/test_engine_threads.py and test_engine_tree.py check the engine on
their own targets; here it is the YAML program path and its judge.) A
restart of the program must be judged corrupted, and nothing may be left
running."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import engines, program, programrun, runner, schema
from harness.targets import LocalTarget
from vm import recipe

REPO = Path(__file__).resolve().parent.parent
SCEN = REPO / "scenarios" / "programs"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    bindir = tmp_path_factory.mktemp("programs")
    for name in recipe.PROGRAMS:
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(bindir / name), str(recipe.program_source(name))],
                       check=True, capture_output=True)
    t = LocalTarget()
    t.programs_dir = str(bindir)
    yield t
    t.close()


def run(target, name: str, engine: str = "ckpt", verify: float = 0) -> runner.Result:
    sc = schema.load(str(SCEN / name))
    if verify:      # a faker never answers: judge it within this many seconds
        sc["timeouts"] = dict(sc.get("timeouts") or {}, verify=verify)
    why = programrun.missing_here(sc, target.programs_dir)
    if why:
        pytest.skip(why)
    res = runner.run_scenario(sc, f"local-{name[:-5]}-{engine.replace(':', '-')}", engines.make(engine), target)
    left = [p for p in program.programs_under(target.base) if program.world.pidstate(p)["exists"]]
    assert not left, f"processes left behind: {left}"
    return res


@pytest.mark.parametrize("name", ["cthreads.yaml", "python-pool.yaml", "shell-loop.yaml", "pipeline.yaml",
                                  "sqlite-transaction.yaml", "less-shell-job.yaml", "vim-shell-job.yaml",
                                  "less-pty.yaml"])
def test_program_restored_and_proved(target, name):
    res = run(target, name)
    assert res.outcome == "restored", res.detail
    checks = res.verdict["checks"]
    assert checks and all(c["ok"] for c in checks)
    # the proof was looked at: the PID, and the program's own state after the restore
    assert any(c["what"].startswith("proof: the program runs") for c in checks)
    assert any(c["what"].startswith("after[") for c in checks)


@pytest.mark.parametrize("mutant", ["restart", "restart-same-pid"])
def test_a_restart_of_the_program_is_judged_corrupted(target, mutant):
    res = run(target, "cthreads.yaml", f"mutant:{mutant}", verify=8)
    assert res.outcome == "corrupted", res.detail
    failed = [c["what"] for c in res.failed_checks()]
    if mutant == "restart":
        assert any(w.startswith("proof: pid") for w in failed), failed
    else:
        # same PID: its TIDs, its tokens and its ticks give it away
        assert any("tids" in w for w in failed) and any(w.startswith("after[0] sequence") for w in failed), failed


def test_step_failure_reports_what_the_program_printed(target, tmp_path):
    """A wrong expectation is a failed check naming the step (not a hang):
    the judge can fail, on a program that really was restored."""
    text = (SCEN / "shell-loop.yaml").read_text().replace("advance: 10}", "advance: 10}\n      - wait: {output: '^never$', timeout: 1}")
    sc = schema.load("bad.yaml", text)
    res = runner.run_scenario(sc, "local-bad-wait", engines.make("ckpt"), target)
    assert res.outcome == "corrupted"
    assert [c["what"] for c in res.failed_checks()] == ["after[1] wait: output lines"]
    assert "tick" in res.detail
    assert not [p for p in program.programs_under(target.base) if program.world.pidstate(p)["exists"]]
