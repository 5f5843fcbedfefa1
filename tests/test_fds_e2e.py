"""End to end through engine.dump.dump + engine.restore.restore: the
restored workload checks its own fds against its own ground truth."""

from __future__ import annotations

import os

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fds_e2e_worker.py")


def start(procs, tmp_path, kinds):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "watched").mkdir()
    (tmp_path / "listing").mkdir()
    return start_worker(procs, tmp_path, [python_exe(), WORKER, str(tmp_path), ",".join(kinds)],
                        what="the fd worker", ready_json=False)[0]


def verdict(pid, tmp_path):
    return ask_verdict(pid, tmp_path, timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("kinds", [
    ["pipe", "fifo", "eventfd", "timerfd", "signalfd", "directory"],
    ["inotify"],
    ["epoll"],
], ids=["pipes-counters-dirs", "inotify", "epoll"])
def test_fds_restored_and_verified_by_the_process(procs, tmp_path, kinds):
    p = start(procs, tmp_path, kinds)
    dump_restore(procs, p, str(tmp_path / "img"))
    got = verdict(p.pid, tmp_path)
    assert got == {k: True for k in kinds}


@pytest.mark.slow
def test_fds_leave_running_dump_consumes_nothing(procs, tmp_path):
    p = start(procs, tmp_path, ["pipe", "fifo"])
    res = dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    assert res["left_running"]
    assert verdict(p.pid, tmp_path) == {"pipe": True, "fifo": True}


@pytest.mark.slow
def test_fds_refusal_leaves_target_working(procs, tmp_path):
    """A pipe whose read end we hold: refused (pipe-peer-outside), no image,
    and the target goes on writing to us."""
    import subprocess
    r, w = os.pipe()
    try:
        p = subprocess.Popen([python_exe(), "-c",
                              "import os, time\nopen('ready.tmp', 'w').close(); os.rename('ready.tmp', 'ready')\n"
                              f"while True: os.write({w}, b'.'); time.sleep(0.02)"],
                             cwd=str(tmp_path), pass_fds=[w], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.popens.append(p)
        wait_for(lambda: (tmp_path / "ready").exists(), what="the writer")
        with pytest.raises((Refusal, Refusals)) as ei:
            dump(p.pid, str(tmp_path / "img"), Options())
        refusals = getattr(ei.value, "refusals", [ei.value])
        assert [(x.reason, x.fd) for x in refusals] == [("pipe-peer-outside", w)]
        assert not os.path.exists(tmp_path / "img")
        os.set_blocking(r, False)
        while True:                       # drain what was written so far
            try:
                os.read(r, 1 << 16)
            except BlockingIOError:
                break
        os.set_blocking(r, True)
        assert os.read(r, 1) == b"."      # still writing after the refused dump
        assert p.poll() is None
    finally:
        os.close(r)
        os.close(w)
