"""The fast tier: whole scenarios through LocalTarget with the real engine
(`python3 -m engine`), real processes, on this host. Each test asserts the
outcome *and* that nothing was left running."""

from __future__ import annotations

import base64
import json
import textwrap
from pathlib import Path

import pytest

from harness import engines, runner, schema, workload
from harness.targets import LocalTarget

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def target():
    t = LocalTarget()
    yield t
    t.close()


def run(target, name_or_text: str, sid: str) -> runner.Result:
    if name_or_text.endswith(".yaml"):
        sc = schema.load(str(REPO / "scenarios" / name_or_text))
    else:
        sc = schema.load(sid + ".yaml", textwrap.dedent(name_or_text))
    r = runner.Run(sc, sid, engines.Ckpt(), target)
    res = r.execute()
    leftovers = [p for p in r.pids if workload.pidstate(p)["exists"]]
    assert not leftovers, f"processes left behind: {leftovers}"
    return res


def test_restored_with_same_pid_and_every_check(target):
    res = run(target, "files/offsets.yaml", "e2e-offsets")
    assert res.outcome == "restored", res.detail
    assert res.verdict["ok"] and res.verdict["pid"] == res.pid
    assert runner.judge({"restored": True}, res).passed


def test_the_ready_file_is_kept_from_spawns_line_not_fetched_again():
    """spawn --ready-file sends the ready file's bytes on its line: the
    runner keeps those (its copy, put back by the check's own command) and
    asks the target for the file no more; nor for the witness (the between
    step reads it) or the pidfile (the check's command reads it): three
    agent requests a scenario fewer in a guest."""
    class Counting(LocalTarget):
        def get_bytes(self, path: str) -> bytes:
            fetched.append(path)
            return super().get_bytes(path)

        def put_bytes(self, data: bytes, path: str) -> None:
            put.append(path)
            super().put_bytes(data, path)

        def run(self, argv, timeout, step=""):
            if "signal" in argv and "--ready" in argv:     # the copy put back, and what the workload wrote there
                with open(argv[argv.index("--ready") + 1], "rb") as f:
                    put_back.append((base64.b64decode(argv[argv.index("--ready-b64") + 1]), f.read()))
            return super().run(argv, timeout, step)

    fetched, put, put_back = [], [], []
    t = Counting()
    try:
        sc = schema.load(str(REPO / "scenarios" / "files/offsets.yaml"))
        r = runner.Run(sc, "e2e-ready-file", engines.Ckpt(), t)
        res = r.execute()
        assert res.outcome == "restored", res.detail
        assert fetched == [] and put == [r.paths(t)["spec"]]     # (the spec: the scenario's first request)
        assert len(put_back) == 1 and put_back[0][0] == put_back[0][1] == r.ready_bytes
        assert json.loads(r.ready_bytes) == {k: v for k, v in r.ready.items() if k != "cold_why"}
        assert res.verdict["ok"] and r.witness(t) is not None       # the witness was there to read
    finally:
        t.close()


def test_a_restart_is_caught_by_the_pid_the_engine_reports_and_the_pidfile_holds(target):
    """The check's own command reads the restore's pidfile (no request of
    its own): a restart under a new PID shows in both."""
    sc = schema.load(str(REPO / "scenarios" / "pipe/both-ends-with-data.yaml"))
    r = runner.Run(sc, "e2e-restart", engines.make("mutant:restart"), target)
    res = r.execute()
    assert res.outcome == "corrupted", res.detail
    failed = {c["what"] for c in res.failed_checks()}
    assert {"proof: pid (the engine reported)", "proof: pid (the pidfile holds)"} <= failed, failed
    left = [p for p in r.pids if workload.pidstate(p)["exists"]]
    assert not left, f"processes left behind: {left}"


def test_refused_at_restore_leaves_no_process_and_image_intact(target):
    res = run(target, "changed/rewrite-same-size.yaml", "e2e-rewrite")
    assert (res.outcome, res.at) == ("refused", "restore"), res.detail
    assert [r["reason"] for r in res.refusals] == ["file-changed"] and res.refusals[0]["fd"] == 3


def test_refused_at_dump_leaves_the_original_working(target):
    res = run(target, "pipe/peer-outside.yaml", "e2e-peer")
    assert (res.outcome, res.at) == ("refused", "dump"), res.detail
    # the original answered its own check after the refusal
    assert res.verdict["ok"] and res.verdict["pid"] == res.pid


CONTROL = """\
name: control scenario
setup:
  - file: {path: data, bytes: 8192, seed: 1}
workload:
  fds:
    - {fd: 3, open: data, mode: r, seek: 100}
expect: restored
"""

# The real restore, then 16 bytes of the file overwritten in place (same inode,
# same size): a stand-in for an engine that reopened the wrong content.
_TAMPER = (
    "import os, subprocess, sys\n"
    "r = subprocess.run([sys.executable, '-m', 'engine', 'restore', '-D', sys.argv[1], '--pidfile', sys.argv[2],"
    " '--json'], capture_output=True, text=True, close_fds=True)\n"
    "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
    "fd = os.open(sys.argv[3], os.O_WRONLY); os.pwrite(fd, b'X' * 16, 200); os.close(fd)\n"
    "sys.exit(r.returncode)\n")


class TamperingCkpt(engines.Ckpt):
    name = "ckpt-tampered"

    def restore_argv(self, t, img, pidfile):
        data = img.rsplit("/", 1)[0] + "/w/data"
        return [t.python, "-c", _TAMPER, img, pidfile, data]


def test_silent_corruption_is_caught_and_names_the_fd(target):
    """A restore that 'succeeds' while the process's file no longer holds what
    it held: only the workload can tell, and the harness must say where."""
    sc = schema.load("control.yaml", CONTROL)
    r = runner.Run(sc, "e2e-corrupt", TamperingCkpt(), target)
    res = r.execute()
    assert not [p for p in r.pids if workload.pidstate(p)["exists"]]
    assert res.outcome == "corrupted", (res.outcome, res.detail, res.engine_stderr)
    bad = res.failed_checks()
    assert bad and {c["fd"] for c in bad} == {3}
    assert {"content", "read at offset"} <= {c["what"] for c in bad}
    for strict in (True, False):       # corruption fails for every engine
        j = runner.judge({"restored": True}, res, strict=strict)
        assert not j.passed and "fd 3" in j.note


def test_a_step_past_its_timeout_is_hung(target):
    text = CONTROL.replace("expect: restored", "timeouts: {dump: 0.01}\nexpect: restored")
    res = run(target, text, "e2e-hung")
    assert (res.outcome, res.step) == ("hung", "dump")


def test_a_restore_target_with_the_dumps_boot_id_is_not_another_machine(tmp_path):
    """restore_on: other must cross machines: a second target on this same
    kernel (one boot id, as a guest cloned from the dump guest's memory
    would have) is a harness error at the migrate step, before any restore."""
    class Twin(LocalTarget):
        can_migrate = True
    a, b = Twin(), Twin()
    try:
        sc = schema.load(str(REPO / "scenarios" / "migrate" / "regular-file.yaml"))
        r = runner.Run(sc, "e2e-twin", engines.Ckpt(), a, other=lambda: b)
        with pytest.raises(runner.HarnessError) as e:
            r.execute()
        assert e.value.step == "migrate" and "boot id" in e.value.message
        assert not [p for p in r.pids if workload.pidstate(p)["exists"]]
    finally:
        a.close()
        b.close()


def test_scenarios_restoring_on_another_guest_are_scheduled_first():
    from types import SimpleNamespace as NS
    from harness.pytest_plugin import migrate_first
    items = [NS(name="a", scenario={}), NS(name="m1", scenario={"restore_on": "other"}), NS(name="x"),
             NS(name="b", scenario={"restore_on": "same"}), NS(name="m2", scenario={"restore_on": "other"})]
    assert [i.name for i in migrate_first(items)] == ["m1", "m2", "a", "x", "b"]


def test_the_guest_settle_line_waits_for_an_exit_and_gives_up_in_time():
    """GuestTarget.settle's shell line (run here with this host's sh): it
    returns once the process is gone (exited and reaped, here by a thread
    standing in for the guest's init), waits on while it is a zombie (its
    PID still taken), and gives up after its deadline."""
    import subprocess
    import sys
    import threading
    import time
    from harness.targets import settle_script
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"], close_fds=True)
    reaper = threading.Thread(target=quick.wait)
    reaper.start()
    stays = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=True)
    zombie = subprocess.Popen(["true"], close_fds=True)
    try:
        t0 = time.monotonic()
        subprocess.run(["sh", "-c", settle_script([quick.pid], 20)], check=True, close_fds=True, timeout=30)
        assert 0.5 < time.monotonic() - t0 < 10
        t0 = time.monotonic()
        subprocess.run(["sh", "-c", settle_script([stays.pid], 2)], check=True, close_fds=True, timeout=30)
        assert 1 <= time.monotonic() - t0 < 10 and stays.poll() is None
        time.sleep(0.3)
        with open(f"/proc/{zombie.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
        t0 = time.monotonic()
        subprocess.run(["sh", "-c", settle_script([zombie.pid], 2)], check=True, close_fds=True, timeout=30)
        assert 1 <= time.monotonic() - t0 < 10
    finally:
        stays.kill()
        stays.wait()
        zombie.wait()
        reaper.join()
