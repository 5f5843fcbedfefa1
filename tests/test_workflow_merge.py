"""tools/merge_reports.py: per-job outcome reports -> one outcome matrix.

Inputs are built in the harness's report format (``reports/scenarios.json``:
written by harness/report.py ``write_json``) and in the plain record-list
format, laid out the way the workflow's download-artifact step lays them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import merge_reports as M  # noqa: E402


def harness_doc(arch: str, engines: dict, kernel: str = None, distro: str = None) -> dict:
    """A report shaped like harness/report.py's: {path: {expected, engines: {e: row}}}."""
    scen = {}
    for engine, rows in engines.items():
        for path, (expected, outcome, passed) in rows.items():
            entry = scen.setdefault(path, {"expected": expected, "engines": {}})
            entry["engines"][engine] = {"engine": engine, "scenario": path, "expected": expected,
                                        "outcome": outcome, "got": outcome, "passed": passed,
                                        "refusals": [], "timings": {}}
    doc = {"arch": arch, "engines": sorted(engines), "generated": "2026-01-01T00:00:00Z",
           "target": "guest", "totals": {}, "scenarios": scen}
    if kernel:
        doc["kernel"] = kernel
    if distro:
        doc["distro"] = distro
    return doc


def job_dir(root: Path, arch: str, kernel: str, engine: str, doc: dict, label: bool = True,
            distro: str = None) -> Path:
    """One cell's artifact; its cell.json has a distro only when given (the
    workflow's before the distro axis had none)."""
    d = root / f"outcome-{arch}-{distro + '-' if distro else ''}{kernel}-{engine}"
    d.mkdir(parents=True)
    (d / "scenarios.json").write_text(json.dumps(doc))
    (d / f"junit-{arch}-{kernel}-{engine}.xml").write_text("<testsuites/>")
    if label:
        (d / "cell.json").write_text(json.dumps({"arch": arch, "kernel": kernel, "engine": engine,
                                                 **({"distro": distro} if distro else {})}))
    return d


@pytest.fixture
def outcomes(tmp_path: Path) -> Path:
    root = tmp_path / "outcomes"
    job_dir(root, "x86_64", "6.1", "ckpt", harness_doc("x86_64", {"ckpt": {
        "scenarios/pipe/empty.yaml": ("restored", "restored", True),
        "scenarios/files/renamed-over.yaml": ("refused file-changed fd 3 at restore", "refused", True)}}))
    job_dir(root, "x86_64", "backports", "criu", harness_doc("x86_64", {"criu": {
        "scenarios/pipe/empty.yaml": ("restored", "restored", True),
        "scenarios/files/renamed-over.yaml": ("refused file-changed fd 3 at restore", "corrupted", False)}}))
    job_dir(root, "aarch64", "6.1", "ckpt", harness_doc("aarch64", {"ckpt": {
        "scenarios/pipe/empty.yaml": ("restored", "crashed", False)}}))
    return root


def test_harness_reports_become_one_row_per_scenario_one_column_per_cell(outcomes: Path):
    records, problems = M.load(sorted(str(p) for p in outcomes.iterdir()))
    assert problems == []
    cells, rows, table = M.matrix(records)
    assert cells == [("aarch64", "bookworm", "6.1", "ckpt"), ("x86_64", "bookworm", "6.1", "ckpt"),
                     ("x86_64", "bookworm", "backports", "criu")]
    assert rows == ["scenarios/files/renamed-over.yaml", "scenarios/pipe/empty.yaml"]
    # the kernel comes from cell.json: the harness report has none
    assert table[("scenarios/files/renamed-over.yaml", ("x86_64", "bookworm", "backports", "criu"))][
        "outcome"] == "corrupted"
    md = M.markdown(records, problems)
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| scenario"))
    assert header.count("|") == 2 + len(cells) + 1
    assert "x86_64<br>bookworm backports<br>criu" in header
    row = next(ln for ln in lines if "renamed-over" in ln)
    assert row.endswith("| ✅ refused | ❌ corrupted |") and "| — |" in row  # no aarch64 result: a dash
    total = next(ln for ln in lines if ln.startswith("| **total**"))
    assert "0/1 pass" in total and "2/2 pass" in total and "1/2 pass" in total


def test_kernel_in_the_report_wins_and_default_is_6_1(tmp_path: Path):
    root = tmp_path / "o"
    job_dir(root, "x86_64", "backports", "ckpt",
            harness_doc("x86_64", {"ckpt": {"s.yaml": ("restored", "restored", True)}}, kernel="backports"),
            label=False)
    (root / "plain.json").write_text(json.dumps(harness_doc("x86_64", {"ckpt": {"s.yaml": ("restored", "hung", False)}})))
    records, problems = M.load([str(root / "outcome-x86_64-backports-ckpt"), str(root / "plain.json")])
    assert problems == [] and {M.cell_of(r) for r in records} == {("x86_64", "bookworm", "backports", "ckpt"),
                                                                   ("x86_64", "bookworm", "6.1", "ckpt")}


def test_distro_is_an_axis_of_its_own(outcomes: Path):
    """A trixie cell is a column of its own beside bookworm's, from the
    report's own ``distro`` or from cell.json; the same scenario's outcomes
    on both distros stay apart."""
    job_dir(outcomes, "x86_64", "6.12", "criu", harness_doc("x86_64", {"criu": {
        "scenarios/pipe/empty.yaml": ("restored", "corrupted", False)}}), distro="trixie")
    job_dir(outcomes, "x86_64", "6.12", "ckpt", harness_doc("x86_64", {"ckpt": {
        "scenarios/pipe/empty.yaml": ("restored", "restored", True)}}, kernel="6.12", distro="trixie"),
        label=False)
    records, problems = M.load(sorted(str(p) for p in outcomes.iterdir()))
    assert problems == []
    cells, rows, table = M.matrix(records)
    assert ("x86_64", "trixie", "6.12", "criu") in cells and ("x86_64", "trixie", "6.12", "ckpt") in cells
    assert len(cells) == 5
    assert table[("scenarios/pipe/empty.yaml", ("x86_64", "trixie", "6.12", "criu"))]["outcome"] == "corrupted"
    assert table[("scenarios/pipe/empty.yaml", ("x86_64", "bookworm", "backports", "criu"))]["outcome"] == "restored"
    assert "x86_64<br>trixie 6.12<br>criu" in M.markdown(records, problems)


def test_plain_record_list_and_pass_rules(tmp_path: Path):
    recs = [{"scenario": "a", "engine": "ckpt", "arch": "aarch64", "kernel": "backports", "outcome": "refused",
             "expected": "refused"},
            {"scenario": "b", "engine": "ckpt", "arch": "aarch64", "outcome": "restored", "expected": "refused"},
            {"scenario": "c", "engine": "criu", "arch": "aarch64", "outcome": "corrupted"}]
    f = tmp_path / "records.json"
    f.write_text(json.dumps(recs))
    records, problems = M.load([str(f)])
    assert problems == [] and [M.passed(r) for r in records] == [True, False, False]
    assert records[1]["kernel"] == "6.1"
    (tmp_path / "bad.json").write_text(json.dumps([{"scenario": "x"}]))
    _, problems = M.load([str(tmp_path / "bad.json")])
    assert problems and "needs scenario, engine, arch, outcome" in problems[0]


def test_cli_writes_summary_and_json_and_names_unreadable_inputs(outcomes: Path, tmp_path: Path):
    empty = outcomes / "outcome-aarch64-backports-criu"  # a job that died before the corpus ran
    empty.mkdir()
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    out_json = tmp_path / "matrix.json"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "merge_reports.py"),
                          *sorted(str(p) for p in outcomes.iterdir()),
                          "--summary", str(summary), "--json", str(out_json)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = summary.read_text()
    assert text.startswith("earlier step\n## Crucible nightly: outcome matrix")  # appended, not replaced
    assert "outcome-aarch64-backports-criu: no scenarios.json" in text and text.endswith(res.stdout)
    doc = json.loads(out_json.read_text())
    assert len(doc["cells"]) == 3 and len(doc["records"]) == 5 and len(doc["problems"]) == 1
    strict = subprocess.run([sys.executable, str(REPO / "tools" / "merge_reports.py"), "--strict",
                             *sorted(str(p) for p in outcomes.iterdir())], capture_output=True, text=True)
    assert strict.returncode == 1  # a corrupted and a crashed cell
    none = subprocess.run([sys.executable, str(REPO / "tools" / "merge_reports.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert none.returncode == 2 and "No outcome reports were found." in none.stdout


def test_report_written_by_the_harness_writer_merges(tmp_path: Path):
    """The format contract: a report written by harness/report.py itself."""
    from harness import report as harness_report

    rows = [{"scenario": "scenarios/pipe/empty.yaml", "engine": e, "expected": "restored", "outcome": o,
             "got": o, "passed": o == "restored", "note": "", "duration": 1.0}
            for e, o in (("ckpt", "restored"), ("criu", "crashed"))]
    d = tmp_path / "outcome-aarch64-6.1-ckpt"
    path = harness_report.write_json(rows, str(d), {"engines": ["ckpt", "criu"], "arch": "aarch64",
                                                    "target": "guest"})
    assert Path(path).is_file() and (d / "scenarios.json").is_file()
    records, problems = M.load([str(d)])
    assert problems == []
    assert {(M.cell_of(r), r["outcome"], M.passed(r)) for r in records} == {
        (("aarch64", "bookworm", "6.1", "ckpt"), "restored", True),
        (("aarch64", "bookworm", "6.1", "criu"), "crashed", False)}
    assert all(r["outcome"] in M.OUTCOMES for r in records)


def test_distro_written_by_the_harness_lands_in_the_cell(tmp_path: Path):
    """The harness writes its run's distro into the report (pytest --distro);
    the merge puts the rows in that distro's column without any cell.json."""
    from harness import report as harness_report

    rows = [{"scenario": "scenarios/pipe/empty.yaml", "engine": "ckpt", "expected": "restored",
             "outcome": "restored", "got": "restored", "passed": True, "note": "", "duration": 1.0}]
    d = tmp_path / "outcome-x86_64-trixie-6.12-ckpt"
    harness_report.write_json(rows, str(d), {"engines": ["ckpt"], "arch": "x86_64", "kernel": "6.12",
                                             "distro": "trixie", "target": "guest"})
    records, problems = M.load([str(d)])
    assert problems == [] and [M.cell_of(r) for r in records] == [("x86_64", "trixie", "6.12", "ckpt")]
