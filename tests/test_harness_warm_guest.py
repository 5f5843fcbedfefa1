"""Warm ckpt in a real guest (harness/zygote.py): the same scenarios with
every ckpt forked from the agent's warm engine and with every ckpt exec'd
(CRUCIBLE_WARM_CKPT=0) come out the same - outcome, refusals with their
reason codes, the judge's verdict - and each run says how ckpt started.

Guest tier: two pytest runs (subprocesses, like ``make vm-test``), skipped
without the cached x86_64 image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.guest

#: a restore, a refusal at dump (its reason and fd), a refusal at restore
SCENARIOS = ["scenarios/files/offsets.yaml", "scenarios/pipe/peer-outside.yaml",
             "scenarios/changed/rewrite-same-size.yaml"]


def _image_or_skip():
    from vm import paths
    if not any(paths.images_dir().glob("x86_64-6.1-*/rootfs.ext4")):
        pytest.skip("no cached x86_64 guest image (make vm-image)")


def _run(tmp: Path, warm: bool, attempt: int = 0) -> Dict[str, dict]:
    reports = tmp / (("warm" if warm else "exec") + str(attempt))
    env = dict(os.environ, CRUCIBLE_REPORTS=str(reports), CRUCIBLE_WARM_CKPT="1" if warm else "0")
    env.pop("PYTEST_XDIST_WORKER", None)
    p = subprocess.run([sys.executable, "-m", "pytest", *SCENARIOS, "-q", "-p", "no:cacheprovider",
                        "-p", "no:benchmark"], cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, close_fds=True, timeout=1500)
    rows = {}
    for line in (reports / "rows.jsonl").read_text().splitlines() if (reports / "rows.jsonl").exists() else []:
        row = json.loads(line)
        rows[row["scenario"]] = row
    assert len(rows) == len(SCENARIOS), p.stdout[-3000:]
    return rows


def _snapshot_flake(row: dict) -> bool:
    """The judge's own flake on a loaded host, not the engine's: the
    snapshot before the dump fell back to one taken while the workload was
    out of its sigtimedwait (harness/procstate.py quiet_snapshot), so its
    SigBlk shows the signal that the wait unblocks; nothing else differs."""
    bad = row.get("failed_checks") or []
    return row.get("outcome") == "corrupted" and bool(bad) and \
        all(c.get("what") == "state: status.SigBlk" for c in bad)


@pytest.mark.timeout(3200)
def test_warm_and_exec_d_ckpt_judge_alike_in_a_guest(tmp_path):
    _image_or_skip()
    for attempt in range(2):
        warm, cold = _run(tmp_path, True, attempt), _run(tmp_path, False, attempt)
        if not any(_snapshot_flake(r) for r in list(warm.values()) + list(cold.values())):
            break       # (a second attempt only after that flake; it must not come twice)
    for rows in (warm, cold):
        assert all(r["passed"] for r in rows.values()), {k: (r["got"], r.get("note")) for k, r in rows.items()}
    for sc in SCENARIOS:
        w, c = warm[sc], cold[sc]
        assert w["engine_start"] == ["warm"], w
        assert c["engine_start"] == ["exec: off (CRUCIBLE_WARM_CKPT=0)"], c
        same = ("outcome", "got", "passed", "failed_checks")
        assert {k: w.get(k) for k in same} == {k: c.get(k) for k in same}, sc
        # (their messages name inodes and PIDs, which differ from run to run)
        assert [(r["reason"], r.get("fd")) for r in w["refusals"]] == [(r["reason"], r.get("fd")) for r in c["refusals"]]
    assert warm["scenarios/pipe/peer-outside.yaml"]["got"] == "refused pipe-peer-outside fd 3 at dump"
