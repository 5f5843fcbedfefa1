"""eventfds on a kernel whose fdinfo lacks eventfd-semaphore (Linux < 6.6):
EFD_SEMAPHORE found by a probe on the same open file (engine/fds/_efdprobe.py).

The host kernel shows the line; CKPT_TEST_EVENTFD_NO_SEMAPHORE_LINE=1 makes
ckpt act as if it did not. Real processes (tests/targets/efdprobe.py):
every shape of eventfd (plain, semaphore; count 0, 1, 2, more; blocking and
O_NONBLOCK), alone and shared by two members of a tree, checked, dumped with
--leave-running, dumped and restored, and its counts, flags and what reads
return compared; one held by a process outside the dump is refused, naming
it; a fault in the middle of every probe leaves every count as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from engine import pidfd
from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.fds.eventfd import HIDE_SEMAPHORE_LINE_ENV
from engine.restore import restore
from engine_core_support import TARGETS, procs, wait_for  # noqa: F401
from fault_support import ckpt

TARGET = os.path.join(TARGETS, "efdprobe.py")

# [fd, count, semaphore, O_NONBLOCK]
SPEC = [[500, 0, False, False], [501, 5, False, False], [502, 0, True, True], [503, 3, True, False],
        [504, 1, False, True], [505, 1, True, True], [506, 2, True, False], [507, 0, True, False],
        [508, 2, False, True]]


def expected_reads(count: int, sem: bool) -> list:
    return [1] * count if sem else ([count] if count else [])


@pytest.fixture
def hidden(monkeypatch):
    monkeypatch.setenv(HIDE_SEMAPHORE_LINE_ENV, "1")


def _start(procs, tmp_path, child: bool = False):  # noqa: F811
    argv = [sys.executable, TARGET, str(tmp_path), json.dumps(SPEC)] + (["--child"] if child else [])
    p = procs.start(argv, cwd=str(tmp_path))
    wait_for(lambda: os.path.exists(tmp_path / "ready") or p.poll() is not None, what="the target")
    assert p.poll() is None
    kid = json.loads((tmp_path / "ready").read_text())["child"]
    if kid:
        procs.adopt(kid)        # killed at the end whatever happens (the restored one has its pid)
    return p, kid


def _fdinfo(pid: int) -> dict:
    """{fd: (count, flags)} of the SPEC fds, from outside."""
    out = {}
    for fd, *_ in SPEC:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            kv = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        out[fd] = (int(kv["eventfd-count"].strip(), 16), int(kv["flags"].strip(), 8) & os.O_NONBLOCK)
    return out


def _report(tmp_path, pid: int, who: str, consume: bool) -> dict:
    path = tmp_path / f"{who}.json"
    if path.exists():
        path.unlink()
    if consume:
        (tmp_path / "consume").touch()
    os.kill(pid, 10)        # SIGUSR1
    wait_for(lambda: path.exists(), what=f"the report of {who} {pid}")
    rep = json.loads(path.read_text())
    assert rep.pop("epoll") == [], f"{who} {pid}: epoll_wait reports an edge nobody made"
    threads = rep.pop("thread_reads")
    assert all(v == [] for v in threads.values()), f"{who} {pid}: a blocked reader got {threads}"
    assert list(threads) == ([] if who == "child" else [str(fd) for fd, c, _, nb in SPEC if not c and not nb])
    return {int(k): v for k, v in rep.items()}


def _feed_blocked_readers(tmp_path, pid: int) -> None:
    """Writes 3 to each eventfd a thread of `pid` is blocked reading: a
    plain one's reader gets 3, a semaphore's 1 three times."""
    blocked = [(fd, sem) for fd, c, sem, nb in SPEC if not c and not nb]
    if (tmp_path / "consume").exists():
        (tmp_path / "consume").unlink()        # the reports below must not race the readers
    for fd, _ in blocked:
        with pidfd.target_fd(pid, fd) as d:
            os.write(d, (3).to_bytes(8, sys.byteorder))

    def reads():
        path = tmp_path / "parent.json"
        if path.exists():
            path.unlink()
        os.kill(pid, 10)
        wait_for(lambda: path.exists(), what="the report")
        return json.loads(path.read_text())["thread_reads"]
    want = {str(fd): [1, 1, 1] if sem else [3] for fd, sem in blocked}
    end = time.monotonic() + 20
    got = reads()
    while got != want and time.monotonic() < end:
        time.sleep(0.05)
        got = reads()
    assert got == want, (f"the blocked readers read {got}, not {want} (pid {pid}: {_thread_states(pid)}; "
                         f"counts now {_fdinfo(pid)})")


def _thread_states(pid: int) -> dict:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                out[tid] = (st, f.read().split()[:2])
        except OSError:
            pass
    return out


def _as_built() -> dict:
    return {fd: (count, os.O_NONBLOCK if nb else 0) for fd, count, _, nb in SPEC}


def _assert_reads(rep: dict) -> None:
    got = {fd: rep[fd]["reads"] for fd, *_ in SPEC}
    want = {fd: expected_reads(count, sem) for fd, count, sem, _ in SPEC}
    assert got == want


def test_check_probes_and_leaves_every_count(procs, hidden, tmp_path):  # noqa: F811
    p, _ = _start(procs, tmp_path)
    assert _fdinfo(p.pid) == _as_built()
    res = check(p.pid, Options())
    assert res["ok"], res["refusals"]
    said = {i["what"]: i["detail"] for i in res["items"] if "eventfd" in i["what"]}
    for fd, count, sem, nb in SPEC:
        d = said[f"fd {fd} anon_inode:[eventfd]"]
        assert d.startswith(f"eventfd count {count}") and d.endswith("(probed)"), d
        assert ("EFD_SEMAPHORE" in d) == sem and ("EFD_NONBLOCK" in d) == nb, d
    assert _fdinfo(p.pid) == _as_built()
    # the original still behaves as it was made: what its reads return
    _assert_reads(_report(tmp_path, p.pid, "parent", consume=True))
    _feed_blocked_readers(tmp_path, p.pid)


def test_without_the_hook_the_fdinfo_line_decides(procs, tmp_path):  # noqa: F811
    p, _ = _start(procs, tmp_path)
    said = [i["detail"] for i in check(p.pid, Options())["items"] if "eventfd" in i["what"]]
    assert len(said) == len(SPEC) and not any("probed" in d for d in said), said


@pytest.mark.parametrize("tree", [False, True], ids=["alone", "tree"])
def test_probed_eventfds_restored_exactly(procs, hidden, tmp_path, tree):  # noqa: F811
    p, kid = _start(procs, tmp_path, child=tree)
    pids = [p.pid] + ([kid] if kid else [])
    dump(p.pid, str(tmp_path / "kept"), Options(leave_running=True))
    for pid in pids:
        assert _fdinfo(pid) == _as_built(), f"pid {pid} after --leave-running"
    _report(tmp_path, p.pid, "parent", consume=False)     # no edge, no blocked reader fed
    img = tmp_path / "img"
    dump(p.pid, str(img), Options())
    p.wait()
    wait_for(lambda: not any(os.path.exists(f"/proc/{x}") and _zombie_or_gone(x) is False for x in pids),
             what="the dumped processes gone")
    out = restore(str(img), Options())
    procs.adopt(p.pid)
    assert out["pid"] == p.pid
    for pid in pids:
        assert _fdinfo(pid) == _as_built(), f"restored pid {pid}"
    if tree:
        # one eventfd for both: what the child reads, the parent no longer has
        _assert_reads(_report(tmp_path, kid, "child", consume=True))
        after = _report(tmp_path, p.pid, "parent", consume=False)
        assert {fd: after[fd]["count"] for fd, *_ in SPEC} == {fd: 0 for fd, *_ in SPEC}
    else:
        _assert_reads(_report(tmp_path, p.pid, "parent", consume=True))
    _feed_blocked_readers(tmp_path, p.pid)


def _zombie_or_gone(pid: int):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_held_outside_the_dump_refused_naming_it(procs, hidden, tmp_path):  # noqa: F811
    p, _ = _start(procs, tmp_path)
    with pidfd.target_fd(p.pid, 503) as dup:
        outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=(dup,),
                                    close_fds=True, stdin=subprocess.DEVNULL)
        procs.popens.append(outsider)
    wait_for(lambda: os.path.exists(f"/proc/{outsider.pid}/fd/{dup}"), what="the outsider")
    res = check(p.pid, Options())
    assert not res["ok"]
    refused = [r for r in res["refusals"] if r.get("fd") == 503]
    assert len(refused) == 1 and refused[0]["reason"] == "unsupported-fd", res["refusals"]
    assert f"pid {outsider.pid} (fd {dup})" in refused[0]["detail"], refused[0]
    assert not [r for r in res["refusals"] if r.get("fd") != 503], res["refusals"]
    with pytest.raises((Refusal, Refusals)):
        dump(p.pid, str(tmp_path / "img"), Options())
    assert not os.path.exists(tmp_path / "img")
    assert _fdinfo(p.pid) == _as_built()


def test_a_fault_in_every_probe_leaves_every_count(procs, tmp_path):  # noqa: F811
    p, _ = _start(procs, tmp_path)
    for n in range(1, len(SPEC) + 1):
        img = tmp_path / f"img{n}"
        r = ckpt(["dump", "-t", str(p.pid), "-D", str(img)],
                 env={HIDE_SEMAPHORE_LINE_ENV: "1", "CKPT_FAULT": f"dump.eventfd-probe:{n}"})
        assert r.returncode == 4 and "fault injected at dump.eventfd-probe" in r.stderr, (n, r.stderr)
        assert not os.path.exists(img)
        assert p.poll() is None
        assert _fdinfo(p.pid) == _as_built(), f"after a fault in probe {n}"
    _assert_reads(_report(tmp_path, p.pid, "parent", consume=True))
    _feed_blocked_readers(tmp_path, p.pid)


def test_semaphore_in_flight_probed_and_restored(hidden, tmp_path):
    """Eventfds held only by a queued SCM_RIGHTS message: probed on ckpt's
    own peeked copy (engine/fds/_inflight.py), restored as they were."""
    import socket
    import struct
    from fds_support import Target, classify, dump as dump_fds, restore as restore_fds
    setup = """
import socket
a, b = socket.socketpair()
s0 = os.eventfd(0, os.EFD_SEMAPHORE); s3 = os.eventfd(3, os.EFD_SEMAPHORE); p3 = os.eventfd(3)
a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("iii", s0, s3, p3))])
os.close(s0); os.close(s3); os.close(p3)
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
"""
    with Target(tmp_path, setup) as t:
        assert "3 fds in flight (eventfd)" in classify(t.pid, 501)
        img = dump_fds(t.pid, [500, 501], str(tmp_path / "img"))
    with restore_fds(img):
        s = socket.socket(fileno=os.dup(501))
        try:
            _, anc, _, _ = s.recvmsg(1, socket.CMSG_SPACE(12))
        finally:
            s.close()
        fds = list(struct.unpack("iii", anc[0][2]))
        try:
            got = []
            for fd in fds:
                reads = []
                for _ in range(5):
                    buf = bytearray(8)
                    try:
                        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
                    except BlockingIOError:
                        break
                    reads.append(struct.unpack("Q", bytes(buf))[0])
                got.append(reads)
        finally:
            for fd in fds:
                os.close(fd)
    assert got == [[], [1, 1, 1], [3]]


def test_a_survey_does_not_probe(monkeypatch):
    """`ckpt survey` passes its options on with probe off, whatever it was given."""
    from engine import survey as sv
    from engine.context import Options
    seen = []
    monkeypatch.setattr(sv, "_checker", lambda o: seen.append(o) or (lambda pid: {}))
    given = Options()
    try:
        sv.survey(pid=[os.getpid()], options=given, timeout=5)
    except Exception:   # noqa: BLE001 - only the options handed to the checker matter here
        pass
    assert seen and seen[0].probe is False and given.probe is True


def test_check_without_probes_writes_nothing_and_says_so(procs, tmp_path, hidden, monkeypatch):  # noqa: F811
    """Options(probe=False) (what a survey uses): no eventfd is written to
    (a probe would be caught by the counting hook below), and each eventfd's
    verdict says its EFD_SEMAPHORE was not looked at."""
    from engine.fds import _efdprobe
    p, _ = _start(procs, tmp_path)
    probed = []
    monkeypatch.setattr(_efdprobe, "semaphore", lambda *a: probed.append(a) or False)
    rep = check(p.pid, Options(probe=False))
    assert probed == []
    assert not [r for r in rep["refusals"] if r.get("fd") in {fd for fd, *_ in SPEC}], rep["refusals"]
    text = json.dumps(rep)
    assert text.count("not looked at here") >= len(SPEC), text[:2000]
    check(p.pid, Options())           # and with probes (ckpt check): each eventfd probed once
    assert len(probed) == len(SPEC)
