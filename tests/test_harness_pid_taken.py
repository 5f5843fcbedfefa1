"""A refused restore on another guest whose PID something else already held
there (a kernel thread: a Debian 13 guest's kworkers reach the PIDs a
workload gets) is a refusal, not a crash; a workload left at that PID, or a
PID that was free before the restore, is still a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import engines, runner, schema

REPO = Path(__file__).resolve().parent.parent
KTHREAD = {"exists": True, "state": "I", "workload": False}


class Stub:
    """Just what the refused-restore judgement touches of a target."""

    def settle(self, pids):
        pass


@pytest.mark.parametrize("taken,after,outcome", [
    (KTHREAD, KTHREAD, "refused"),                                         # it was there before
    (None, KTHREAD, "crashed"),                                            # free before: the restore left it
    (KTHREAD, {"exists": True, "state": "S", "workload": True}, "crashed"),   # a workload is at the PID now
    (None, {"exists": False, "state": None, "workload": False}, "refused"),
])
def test_pid_taken_before_the_restore_is_not_left_by_it(taken, after, outcome):
    sc = schema.load(str(REPO / "scenarios" / "migrate" / "pipe-and-fifo.yaml"))
    run = runner.Run(sc, "pid-taken", engines.Criu(), Stub())
    run.taken = taken
    run.pidstate = lambda t, pid, step: after
    rr = engines.EngineResult("refused", 1, refusals=[{"reason": "criu", "message": "Can't fork for 299: File exists"}])
    run._refused_at_restore(Stub(), 299, rr, None)
    assert run.res.outcome == outcome, run.res.detail
    if outcome == "refused" and taken:
        assert "taken on the restore target before the restore" in run.res.detail and 299 not in run.pids
