"""The nightly covers every tier: the host tier, the aarch64 guest tests where
the aarch64 image is built, a generated run, and the HTML matrix linked from
the job summary (.github/workflows/nightly.yml, Makefile)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WF = yaml.safe_load((REPO / ".github" / "workflows" / "nightly.yml").read_text())


def _steps(job: str):
    return WF["jobs"][job]["steps"]


def _step(job: str, name_part: str) -> dict:
    (s,) = [s for s in _steps(job) if name_part in s.get("name", "")]
    return s


def _make_n(*args: str) -> str:
    return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=30).stdout


def test_host_tier_runs_make_test_host_and_keeps_its_junit():
    job = WF["jobs"]["host"]
    assert str(job["runs-on"]).startswith("ubuntu-")
    text = "\n".join(s.get("run", "") for s in job["steps"])
    assert "make setup" in text and "make vm-image" in text and "make test-host" in text
    assert "--junitxml reports/junit-host.xml" in _step("host", "make test-host")["env"]["PYTEST_ADDOPTS"]
    up = _step("host", "Upload")
    assert up["with"]["path"] == "reports/junit-host.xml" and "always()" in up["if"]
    assert "pytest tests/" in _make_n("test-host")


def test_aarch64_guest_tests_run_after_the_aarch64_image_is_built():
    names = [s.get("name", "") for s in _steps("corpus")]
    step = _step("corpus", "aarch64 guest tests")
    assert names.index("make vm-image") < names.index(step["name"])
    # the tests use the 6.1 image: that cell builds it; once per arch, not per engine
    cond = step["if"]
    assert "matrix.arch == 'aarch64'" in cond and "matrix.distro == 'bookworm'" in cond
    assert "matrix.kernel == '6.1'" in cond and "matrix.engine == 'ckpt'" in cond
    assert "make test-aarch64-guest" in step["run"]
    cmd = _make_n("test-aarch64-guest")
    assert "CRUCIBLE_REQUIRE_AARCH64=1" in cmd and "-m aarch64" in cmd and "pytest tests/" in cmd


def test_aarch64_tests_fail_instead_of_skipping_when_required(tmp_path):
    """Where CI built the image a missing one is an error, not a silent skip."""
    import os
    import sys
    env = dict(os.environ, CRUCIBLE_REQUIRE_AARCH64="1", CRUCIBLE_CACHE=str(tmp_path), PATH="/usr/bin:/bin")
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_engine_aarch64_guest.py",
                        "tests/test_vm_aarch64_guest.py", "-m", "aarch64", "-q", "-p", "no:cacheprovider",
                        "-p", "no:randomly", "-x"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "CRUCIBLE_REQUIRE_AARCH64 is set but" in r.stdout, r.stdout[-2000:]


def test_generated_run_in_the_x86_64_cells():
    step = _step("corpus", "Generated scenarios")
    assert "matrix.arch == 'x86_64'" in step["if"] and "!cancelled()" in step["if"]
    assert "make vm-generate" in step["run"] and 'SEED="$SEED"' in step["run"]
    assert step["env"]["SEED"] == "${{ github.run_number }}"
    assert "$GITHUB_STEP_SUMMARY" in step["run"] and "pipefail" in step["run"]
    up = _step("corpus", "Upload the generated run")
    assert up["with"]["path"] == "reports/generated/" and "always()" in up["if"]
    cmd = _make_n("vm-generate", "GENERATE=7", "SEED=42")
    assert "--generate 7 --seed 42" in cmd and "--found-dir reports/generated/found" in cmd
    assert "CRUCIBLE_REPORTS=reports/generated" in cmd      # the corpus's reports/scenarios.json stays


def test_html_matrix_is_an_artifact_linked_from_the_summary():
    merge = _step("matrix", "Merge")
    assert "--html outcome-matrix.html" in merge["run"] and "--markdown outcome-matrix.md" in merge["run"]
    up = _step("matrix", "Upload the merged matrix")
    assert "outcome-matrix.html" in up["with"]["path"] and up["id"] == "upload"
    link = _step("matrix", "Link the HTML")
    assert link["env"]["URL"] == "${{ steps.upload.outputs.artifact-url }}"
    assert "$GITHUB_STEP_SUMMARY" in link["run"] and "outcome-matrix.html" in link["run"]
