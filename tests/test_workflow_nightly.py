"""The nightly CI workflow: its shape, that its commands exist, and actionlint.

actionlint is run for real (it is in the ``test`` extra); a deliberately
broken copy of the workflow must fail it, so the check can fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from vm import recipe as R

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "nightly.yml"


@pytest.fixture(scope="module")
def wf() -> Dict:
    return yaml.safe_load(WORKFLOW.read_text())


def triggers(wf: Dict) -> Dict:
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True.
    return wf.get("on", wf.get(True))


def steps(job: Dict) -> List[Dict]:
    return job["steps"]


def run_text(job: Dict) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


def uses(job: Dict, action: str) -> List[Dict]:
    return [s for s in steps(job) if str(s.get("uses", "")).startswith(action + "@")]


def test_scheduled_and_manually_triggerable(wf):
    on = triggers(wf)
    crons = [c["cron"] for c in on["schedule"]]
    assert crons and all(len(c.split()) == 5 for c in crons)
    assert "workflow_dispatch" in on


def cells(matrix: Dict) -> List[Dict]:
    """The jobs GitHub makes of ``matrix``: the product of its axes, then
    each ``include`` entry merged into every combination whose values it
    does not overwrite, or added as a job of its own (GitHub's rule)."""
    import itertools

    axes = {k: v for k, v in matrix.items() if k not in ("include", "exclude")}
    jobs = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    for exc in matrix.get("exclude", []):
        jobs = [j for j in jobs if any(j.get(k) != v for k, v in exc.items())]
    for inc in matrix.get("include", []):
        fits = [j for j in jobs if all(j.get(k, v) == v for k, v in inc.items() if k in axes)]
        if fits:
            for j in fits:
                j.update(inc)
        else:
            jobs.append(dict(inc))
    return jobs


def test_matrix_is_arch_by_distro_by_kernel_by_engine(wf):
    from harness.engines import ENGINES

    m = wf["jobs"]["corpus"]["strategy"]["matrix"]
    got = {(c["arch"], c["distro"], str(c["kernel"]), c["engine"]) for c in cells(m)}
    # every arch x every (distro, kernel) the image builder knows x both engines, each once
    want = {(a, d, k, e) for a in ("x86_64", "aarch64") for d, ks in R.DISTROS.items() for k in ks
            for e in ("ckpt", "criu")}
    assert got == want and len(cells(m)) == len(want)
    assert {"ckpt", "criu"} <= set(ENGINES)
    assert wf["jobs"]["corpus"]["strategy"]["fail-fast"] is False  # one red cell must not hide the rest


def test_each_cell_runs_the_readme_commands_on_a_fresh_runner(wf):
    job = wf["jobs"]["corpus"]
    assert str(job["runs-on"]).startswith("ubuntu-")
    text = run_text(job)
    assert "make setup" in text
    vm_test = re.search(r"make vm-test (.*?)(?:\n\S|\Z)", text.replace("\\\n", " "), re.S)
    assert vm_test, text
    args = vm_test.group(1)
    for var, axis in (("ARCH", "arch"), ("DISTRO", "distro"), ("KERNEL", "kernel"), ("ENGINE", "engine")):
        assert f'{var}="${{{{ matrix.{axis} }}}}"' in args, args
    # the per-cell local command is documented (vm/README-vm.md, "Nightly matrix")
    doc = (REPO / "vm" / "README-vm.md").read_text()
    assert "make vm-test ARCH=aarch64 KERNEL=backports ENGINE=criu" in doc
    assert "make vm-test DISTRO=trixie ENGINE=criu" in doc


@pytest.mark.parametrize("arch,kernel,engine", [("aarch64", "backports", "criu"), ("x86_64", "6.1", "ckpt")])
def test_make_cell_command_passes_every_axis_through(arch, kernel, engine):
    """`make -n` shows what one cell runs: the image for that kernel, the
    corpus with that arch/engine, JUnit named after the cell."""
    if shutil.which("make") is None:
        pytest.fail("make is required")
    out = subprocess.run(["make", "-n", "vm-test", f"ARCH={arch}", f"KERNEL={kernel}", f"ENGINE={engine}"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"-m vm image --arch {arch} --kernel {kernel}" in out
    assert f"--arch {arch}" in out and f"--engine {engine}" in out
    assert f"reports/junit-{arch}-{kernel}-{engine}.xml" in out
    assert ("--kernel backports" in out.split("pytest", 1)[1]) == (kernel != R.DEFAULT_KERNEL)


def test_artifacts_junit_json_and_serial_logs_of_failures(wf):
    job = wf["jobs"]["corpus"]
    ups = uses(job, "actions/upload-artifact")
    paths = {u["with"]["name"]: (u["with"]["path"], u.get("if", "")) for u in ups}
    outcome = next(v for k, v in paths.items() if k.startswith("outcome-"))
    assert "reports/*.xml" in outcome[0] and "reports/*.json" in outcome[0] and "always()" in outcome[1]
    serial = next(v for k, v in paths.items() if k.startswith("serial-"))
    assert "reports/guests" in serial[0] and "failure()" in serial[1]
    for name in paths:  # unique per cell, or the uploads of two cells collide
        assert "${{ matrix.arch }}-${{ matrix.distro }}-${{ matrix.kernel }}-${{ matrix.engine }}" in name
    assert "cell.json" in run_text(job)


def test_guest_rootfs_cached_on_its_recipe_hash(wf):
    job = wf["jobs"]["corpus"]
    (cache,) = uses(job, "actions/cache")
    assert cache["with"]["path"].endswith("/rootfs")
    assert "steps.key.outputs.rootfs" in cache["with"]["key"]
    assert "-m vm cache-key --arch" in run_text(job) and "--kernel" in run_text(job)
    assert '--distro "${{ matrix.distro }}"' in run_text(job)
    assert '"distro": "%s"' in run_text(job)   # cell.json names the distro for the merge
    assert wf["env"]["CRUCIBLE_CACHE"] in cache["with"]["path"].replace("${{ env.CRUCIBLE_CACHE }}",
                                                                       wf["env"]["CRUCIBLE_CACHE"])


def test_cache_key_command_prints_the_rootfs_recipe_hash(tmp_path):
    from vm.rootfs import rootfs_paths

    out = subprocess.run([sys.executable, "-m", "vm", "cache-key", "--arch", "aarch64", "--kernel", "backports"],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "CRUCIBLE_CACHE": str(tmp_path)}).stdout.strip()
    assert out == f"aarch64-backports-{rootfs_paths('aarch64', 'backports').rootfs_hash}"


def test_final_job_merges_every_cell_into_the_job_summary(wf):
    job = wf["jobs"]["matrix"]
    assert job["needs"] == "corpus" and "always()" in job["if"]
    (dl,) = uses(job, "actions/download-artifact")
    assert dl["with"]["pattern"] == "outcome-*"
    text = run_text(job)
    assert "tools/merge_reports.py" in text and "$GITHUB_STEP_SUMMARY" in text
    assert (REPO / "tools" / "merge_reports.py").is_file()


def actionlint() -> str:
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.fail("actionlint not installed: `make setup-pip` installs it (pyproject test extra)")
    return exe


def test_actionlint_passes_on_the_workflows():
    res = subprocess.run([actionlint(), "-no-color", str(WORKFLOW)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_catches_a_broken_copy(tmp_path: Path):
    """The lint is real: an undefined matrix axis and a bad runner label fail it."""
    bad = WORKFLOW.read_text().replace("${{ matrix.engine }}", "${{ matrix.flavour }}", 1)
    bad = bad.replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-18.04-nonexistent", 1)
    wdir = tmp_path / ".github" / "workflows"
    wdir.mkdir(parents=True)
    (wdir / "nightly.yml").write_text(bad)
    res = subprocess.run([actionlint(), "-no-color", str(wdir / "nightly.yml")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "flavour" in res.stdout
