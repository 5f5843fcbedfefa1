"""bench/compare.py's memhog rows carry the frozen time each tool reports
and ckpt's durable time, apart from the wall time (issue 15: a durable dump
must not freeze the target for its fsyncs); --leave-running dumps leave the
target running and say so. Figures are never asserted: only that they are
there and that the restore they come from held the memory."""

import json
import os
import subprocess
import sys

from engine_core_support import build_target

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compare(tmp_path, *extra) -> dict:
    sys.path.insert(0, REPO)
    from harness.zygote import command_line
    memhog = build_target(tmp_path, "memhog")
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, os.path.join(REPO, "bench", "compare.py"), "--memhog", memhog, "--sizes", "1",
                    "--dirs", str(tmp_path), "--rounds", "1", "--criu", "", "--out", str(out),
                    "--ckpt", command_line(sys.executable, REPO), *extra],
                   check=True, close_fds=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())["rows"][0]


def test_rows_carry_frozen_and_durable_time(tmp_path):
    row = _compare(tmp_path)
    assert row["ckpt_frozen_ms"] > 0 and row["ckpt_durable_ms"] > 0
    assert "leave_running" not in row


def test_leave_running_rows_say_so(tmp_path):
    row = _compare(tmp_path, "--leave-running")
    assert row["leave_running"] is True
    assert row["ckpt_frozen_ms"] > 0 and row["ckpt_durable_ms"] > 0
