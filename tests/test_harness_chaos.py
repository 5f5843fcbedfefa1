"""Harness chaos (issue 13): the harness's own machinery breaks under a
scenario — QEMU killed, the guest frozen (QMP ``stop``) or QEMU SIGSTOPped,
the guest's disk full, the channel to the guest dropped. Each time the
scenario is reported ``crashed`` or ``hung`` with the guest's serial tail,
the worker gets a fresh guest and the run goes on; and no QEMU outlives the
run, nor a pytest stopped by SIGINT or SIGKILL.

One pytest run (a subprocess, like ``make vm-test``) carries a fault in each
of its first scenarios (harness/chaos.py, ``CRUCIBLE_CHAOS``) and none in
the last; the tests below read its rows. Guest tier: skipped without the
cached x86_64 image.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.guest

#: scenario, fault (CRUCIBLE_CHAOS entry), the outcome it must be reported as
#: (faults at ``ready``, the first step after the guest's reset: a faulted
#: scenario costs no dump or restore; ``drop`` at ``dump`` breaks the
#: channel between two steps of a running scenario)
PLAN = [
    ("scenarios/files/offsets.yaml", "drop@dump", "crashed"),
    ("scenarios/files/append.yaml", "diskfull@ready", "crashed"),
    ("scenarios/files/cloexec.yaml", "stop@ready", "hung"),
    ("scenarios/files/flags.yaml", "sigstop@ready", "hung"),
    ("scenarios/pipe/both-ends-with-data.yaml", "kill@ready", "crashed"),
    # the run goes on, on a fresh guest: a light scenario, so that the halved
    # timeouts leave room on a host busy with the rest of the host tier
    ("scenarios/files/shared-offset.yaml", "-", "restored"),
]


def _image_or_skip():
    from vm import paths
    if not any(paths.images_dir().glob("x86_64-6.1-*/rootfs.ext4")):
        pytest.skip("no cached x86_64 guest image (make vm-image)")


def _qemus_under(pid: int) -> List[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in kids if _is_qemu(p)]


def _is_qemu(p: psutil.Process) -> bool:
    try:
        return "qemu-system" in p.name() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pytest_argv(scenarios: List[str], *extra: str) -> List[str]:
    # scale 0.5: a frozen guest is "hung" after its step's timeout (ready:
    # 30 s x 0.5 x 2 under TCG) plus the agent's grace, not after minutes;
    # the healthy steps still have room on a loaded host
    return [sys.executable, "-m", "pytest", *scenarios, "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
            "--guest-timeout-scale", "0.5", *extra]


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory):
    _image_or_skip()
    reports = tmp_path_factory.mktemp("chaos-reports")
    env = dict(os.environ, CRUCIBLE_REPORTS=str(reports), CRUCIBLE_CHAOS=",".join(f for _, f, _ in PLAN))
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.Popen(_pytest_argv([s for s, _, _ in PLAN]), cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, close_fds=True)
    seen_qemu = set()
    deadline = time.monotonic() + 2400
    while proc.poll() is None and time.monotonic() < deadline:
        seen_qemu |= {p.pid for p in _qemus_under(proc.pid)}
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    (reports / "pytest.out").write_text(out)
    rows: Dict[str, dict] = {}
    for line in (reports / "rows.jsonl").read_text().splitlines() if (reports / "rows.jsonl").exists() else []:
        row = json.loads(line)
        rows[row["scenario"]] = row
    return {"rc": proc.returncode, "out": out, "rows": rows, "qemus": seen_qemu}


@pytest.mark.timeout(2700)
@pytest.mark.parametrize("scenario,fault,outcome", PLAN, ids=[f for _, f, _ in PLAN])
def test_fault_is_reported_and_the_run_goes_on(chaos_run, scenario, fault, outcome):
    row = chaos_run["rows"].get(scenario)
    assert row is not None, f"no row for {scenario}; pytest said:\n{chaos_run['out'][-4000:]}"
    assert row["outcome"] == outcome, (row, chaos_run["out"][-3000:])
    if outcome != "restored":
        assert not row["passed"]
        # the guest's serial console tail comes with the report (row and failure text)
        assert row.get("diagnostics", "").strip(), row
        assert "guest serial console (tail)" in chaos_run["out"]
    else:
        assert row["passed"], row


@pytest.mark.timeout(2700)
def test_broken_guests_were_replaced_and_none_is_left(chaos_run):
    # kill and SIGSTOP cost their guest: three QEMUs at least (the first, and
    # one after each); the frozen-by-QMP, full-disk and dropped-channel ones
    # are mended by the revert to the golden snapshot.
    assert len(chaos_run["qemus"]) >= 3, chaos_run["qemus"]
    assert "booting a new one" in chaos_run["out"]
    assert not [p for p in chaos_run["qemus"] if psutil.pid_exists(p) and _is_qemu(psutil.Process(p))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_no_qemu_outlives_a_stopped_pytest(tmp_path: Path, sig):
    """pytest -n 1 (a controller and an xdist worker that owns the guest):
    signalled while the guest boots, no QEMU survives it."""
    _image_or_skip()
    env = dict(os.environ, CRUCIBLE_REPORTS=str(tmp_path))
    env.pop("CRUCIBLE_CHAOS", None)
    proc = subprocess.Popen(_pytest_argv(["scenarios/files/offsets.yaml"], "-n", "1"), cwd=str(REPO), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True)
    qemus: List[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not qemus and time.monotonic() < deadline and proc.poll() is None:
            qemus = _qemus_under(proc.pid)
            time.sleep(0.2)
        assert qemus, "the run never started a QEMU"
        proc.send_signal(sig)
        gone_by = time.monotonic() + 30
        while time.monotonic() < gone_by and any(_is_qemu(q) for q in qemus):
            time.sleep(0.2)
        left = [q.pid for q in qemus if _is_qemu(q)]
        assert not left, f"QEMU {left} outlived pytest ({sig.name})"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for q in qemus:
            if _is_qemu(q):
                q.kill()
