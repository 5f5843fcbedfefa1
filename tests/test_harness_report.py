"""Judging outcomes, reading the engine's answers, and the summary table/JSON."""

from __future__ import annotations

import json
import os

from harness import engines, report, runner
from harness.targets import RunResult

RESTORED = {"restored": True}
REFUSED = {"refused": {"reason": "file-changed", "fd": 3, "at": "restore"}}


def result(outcome, **kw) -> runner.Result:
    return runner.Result(scenario="s", engine="ckpt", outcome=outcome, **kw)


def test_judge_restored():
    assert runner.judge(RESTORED, result("restored")).passed
    j = runner.judge(RESTORED, result("refused", at="dump", refusals=[{"reason": "socket"}]))
    assert not j.passed and "expected restored, got refused socket at dump" in j.note


def test_judge_refusal_needs_the_reason_fd_and_stage():
    ok = result("refused", at="restore", refusals=[{"reason": "file-changed", "fd": 3, "message": "m"}])
    assert runner.judge(REFUSED, ok).passed
    wrong_fd = result("refused", at="restore", refusals=[{"reason": "file-changed", "fd": 4, "message": "m"}])
    assert not runner.judge(REFUSED, wrong_fd).passed
    wrong_stage = result("refused", at="dump", refusals=[{"reason": "file-changed", "fd": 3, "message": "m"}])
    assert not runner.judge(REFUSED, wrong_stage).passed
    assert not runner.judge(REFUSED, result("restored")).passed


def test_judge_only_the_expected_refusal_satisfies_it():
    """A matching refusal next to another one (of another fd, or another
    reason) is not the refusal the scenario expects."""
    both = result("refused", at="restore", refusals=[{"reason": "file-changed", "fd": 3, "message": "m"},
                                                    {"reason": "file-changed", "fd": 4, "message": "m"}])
    assert not runner.judge(REFUSED, both).passed
    other = result("refused", at="restore", refusals=[{"reason": "file-changed", "fd": 3, "message": "m"},
                                                     {"reason": "socket", "fd": 3, "message": "m"}])
    assert not runner.judge(REFUSED, other).passed
    two = {"refused": {"reason": "file-changed", "fd": [3, 4], "at": "restore"}}
    assert runner.judge(two, both).passed
    assert not runner.judge(two, result("refused", at="restore", refusals=both.refusals[:1])).passed
    nofd = {"refused": {"reason": "file-changed", "at": "restore"}}
    assert not runner.judge(nofd, both).passed
    assert runner.judge(nofd, result("refused", at="restore", refusals=[{"reason": "file-changed"}])).passed


def test_outside_checks_count_as_failed_checks():
    res = result("restored", verdict={"ok": True, "checks": [{"ok": True}]},
                 outside=[{"fd": None, "what": "state: status.SigBlk", "expected": "0", "got": "1", "ok": False}])
    assert [c["what"] for c in res.failed_checks()] == ["state: status.SigBlk"]


def test_corruption_fails_even_for_a_lenient_engine_and_names_the_fd():
    checks = [{"fd": 3, "what": "read at offset", "expected": "x", "got": "y", "ok": False}]
    res = result("corrupted", verdict={"ok": False, "checks": checks})
    for strict in (True, False):
        j = runner.judge(RESTORED, res, strict=strict)
        assert not j.passed and "fd 3: read at offset" in j.note


def test_lenient_engine_differences_are_noted_not_failed():
    j = runner.judge(RESTORED, result("refused", at="dump", refusals=[{"reason": "criu", "message": "no"}]),
                     strict=False)
    assert j.passed and j.note
    assert runner.judge(RESTORED, result("crashed", step="dump", detail="boom"), strict=False).passed
    assert not runner.judge(RESTORED, result("hung", step="dump")).passed


def test_parse_ckpt_contract():
    ok = engines.parse_ckpt(RunResult(0, json.dumps({"ok": True, "command": "restore", "result": {"pid": 42}}), "", 0))
    assert ok.status == "ok" and ok.pid == 42 and not ok.contract
    ref = engines.parse_ckpt(RunResult(3, json.dumps({"ok": False, "exit": 3, "error": "refused", "refusals": [
        {"reason": "fifo-missing", "fd": 3, "message": "pid 1 fd 3 (/f): fifo-missing"}]}), "", 0))
    assert ref.status == "refused" and ref.refusals[0]["fd"] == 3 and not ref.contract
    lines = engines.parse_ckpt(RunResult(3, "", "ckpt: refused: pid 1234 fd 3 (/data/a): file-changed: size 4096 -> 8192\n", 0))
    assert [r["reason"] for r in lines.refusals] == ["file-changed"]
    bogus = engines.parse_ckpt(RunResult(3, json.dumps({"refusals": [{"reason": "made-up"}]}), "", 0))
    assert bogus.contract == ["undefined reason code 'made-up'"]
    tb = engines.parse_ckpt(RunResult(1, "", "Traceback (most recent call last):\n  ...\n", 0))
    assert tb.status == "failed" and len(tb.contract) == 2
    assert engines.parse_ckpt(RunResult(4, json.dumps({"ok": False, "message": "no"}), "", 0)).contract == []


def test_ckpt_argv():
    class T:
        def ckpt_argv(self):
            return ["ckpt"]
    argv = engines.Ckpt().dump_argv(T(), 12, "/img", {"ghost_limit": 1 << 20, "file_validation": "digest"})
    assert argv == ["ckpt", "dump", "-t", "12", "-D", "/img", "--json", "--ghost-limit", "1048576",
                    "--file-validation", "digest"]
    assert engines.Criu().restore_argv(T(), "/img", "/p")[:4] == ["criu", "restore", "-D", "/img"]


ROWS = [
    {"scenario": "scenarios/a.yaml", "engine": "ckpt", "expected": "restored", "outcome": "restored",
     "got": "restored", "passed": True, "note": ""},
    {"scenario": "scenarios/a.yaml", "engine": "criu", "expected": "restored", "outcome": "refused",
     "got": "refused criu at dump", "passed": True, "note": "expected restored"},
    {"scenario": "scenarios/b.yaml", "engine": "ckpt", "expected": "refused socket", "outcome": "corrupted",
     "got": "corrupted", "passed": False, "note": "fd 3"},
]


def test_table_has_one_row_per_scenario_and_a_column_per_engine():
    lines = report.table(ROWS).splitlines()
    assert lines[0].split() == ["scenario", "expected", "ckpt", "criu"]
    a = next(ln for ln in lines if ln.startswith("scenarios/a.yaml"))
    assert "refused criu at dump (differs)" in a
    b = next(ln for ln in lines if ln.startswith("scenarios/b.yaml"))
    assert "corrupted FAIL" in b and b.rstrip().endswith("-")
    assert "ckpt: corrupted 1, failed 1, passed 1, restored 1" in lines


def test_json_report_merges_rows(tmp_path):
    path = report.write_json(ROWS, str(tmp_path), {"engines": ["ckpt", "criu"]})
    doc = json.loads(open(path).read())
    assert doc == json.loads((tmp_path / "scenarios.json").read_text())
    assert set(doc["scenarios"]["scenarios/a.yaml"]["engines"]) == {"ckpt", "criu"}
    assert doc["totals"]["criu"] == {"refused": 1, "passed": 1}


def test_bench_merge_replaces_only_its_cell(tmp_path):
    from harness import bench
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"vm": {"boot_s": 3}, "scenarios": {"aarch64": {"reset_s": {"median": 0.9}},
                                                                  "x86_64": {"old": True}}}))
    bench.merge_into(out, "scenarios", "x86_64", {"reset_s": {"median": 0.6}})
    assert json.loads(out.read_text()) == {"vm": {"boot_s": 3},
                                           "scenarios": {"aarch64": {"reset_s": {"median": 0.9}},
                                                         "x86_64": {"reset_s": {"median": 0.6}}}}


def test_bench_merge_drops_the_older_single_arch_layout(tmp_path):
    from harness import bench
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"scenarios": {"corpus": {"wall_s": 400}, "reset_s": {"median": 0.6}}}))
    bench.merge_into(out, "scenarios", "x86_64", {"reset_s": {"median": 0.5}})
    assert json.loads(out.read_text()) == {"scenarios": {"x86_64": {"reset_s": {"median": 0.5}}}}


def test_bench_rows_summary_counts_warm_and_exec_ckpt(tmp_path):
    """The per-scenario figures of a run's rows: the median (the first row,
    which boots, left out unless asked), step medians, ckpt starts."""
    from harness import bench
    rows = tmp_path / "rows.jsonl"
    got = [{"duration": 90.0, "outcome": "restored", "timings": {"engine": 3.0}, "engine_start": ["warm"]},
           {"duration": 2.0, "outcome": "restored", "timings": {"engine": 1.0}, "engine_start": ["warm"],
            "workload_start": "warm"},
           {"duration": 4.0, "outcome": "refused", "timings": {"engine": 0.5},
            "engine_start": ["exec: its environment differs", "warm"],
            "workload_start": "exec: exec requested (CRUCIBLE_WARM_WORKLOAD=0)"}]
    rows.write_text("".join(json.dumps(r) + "\n" for r in got))
    s = bench.summarize_rows(rows)
    assert (s["median_s"], s["max_s"], s["step_median_s"]["engine"]) == (3.0, 4.0, 0.75)
    assert s["engine_start"] == {"warm": 2, "exec": 1} and s["workload_start"] == {"warm": 1, "exec": 1}
    assert s["outcomes"] == {"refused": 1, "restored": 2}
    assert bench.summarize_rows(rows, skip_first=False)["median_s"] == 4.0
    assert s["cpu_median_s"] == {} and s["qemu_cpu_total_s"] is None     # rows from before the cpu figures


def test_bench_rows_summary_has_where_the_host_time_went(tmp_path):
    """Each row's cpu figures (harness/cpuclock.py): their medians, and
    the QEMU CPU total of the rows counted."""
    from harness import bench
    rows = tmp_path / "rows.jsonl"
    got = [{"duration": 9.0, "outcome": "restored", "cpu": {"qemu": 8.0, "qemu_wait": 1.0, "host_busy": 0.5}},
           {"duration": 2.0, "outcome": "restored", "cpu": {"qemu": 1.5, "qemu_wait": 0.25, "host_busy": None}},
           {"duration": 3.0, "outcome": "restored", "cpu": {"qemu": 2.5, "qemu_wait": 0.75, "host_busy": 1.0}}]
    rows.write_text("".join(json.dumps(r) + "\n" for r in got))
    s = bench.summarize_rows(rows)
    assert s["cpu_median_s"] == {"qemu": 2.0, "qemu_wait": 0.5, "host_busy": 1.0}
    assert s["qemu_cpu_total_s"] == 4.0
    assert bench.summarize_rows(rows, skip_first=False)["qemu_cpu_total_s"] == 12.0


def test_cpuclock_counts_a_busy_process_and_a_child_started_since(tmp_path):
    """harness/cpuclock.py: a process that spins for 0.3 s is counted as
    long on a CPU as its own CPU clock says; a process first seen in the second sample counts
    from its start; a gone one is not there; the host share is in [0, 1]."""
    import subprocess
    import sys
    import time
    from harness import cpuclock
    me = os.getpid()
    stat0 = cpuclock.host_stat()
    before = cpuclock.take([me])
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    mine = cpuclock.take([me])
    used = time.process_time() - t0
    p = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                          "while time.process_time()-t<0.2: pass\nimport sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE, close_fds=True)
    try:
        deadline = time.monotonic() + 30
        while (cpuclock.sample(p.pid) or (0, 0))[0] < 0.2e9 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = cpuclock.take([me, p.pid])
    finally:
        p.communicate(b"")
    run, wait = cpuclock.spent(before, mine)
    assert abs(run - used) < 0.05 and wait >= 0     # the scheduler's count is the process's CPU time
    assert cpuclock.spent(before, {me: after[me]})[0] >= run
    assert cpuclock.spent({}, {p.pid: after[p.pid]})[0] >= 0.2
    assert cpuclock.sample(p.pid) is None and cpuclock.take([p.pid]) == {}
    share = cpuclock.busy(stat0, cpuclock.host_stat())
    assert share is not None and 0 <= share <= 1


def test_bench_keeps_the_cells_other_figures(tmp_path):
    from harness import bench
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"scenarios": {"x86_64": {"corpus": {"wall_s": 100}, "reset_s": {"median": 0.6}}}}))
    assert bench.previous_cell(out, "scenarios", "x86_64") == {"corpus": {"wall_s": 100}, "reset_s": {"median": 0.6}}
    assert bench.previous_cell(out, "scenarios", "aarch64") == {}
    assert bench.previous_cell(tmp_path / "none.json", "scenarios", "x86_64") == {}
