"""`ckpt survey`: verdicts of real processes, the promise that it leaves
every process untouched (also while they fork, exit and take signals), the
cause ranking on canned verdicts, and the HTML page.

Real targets are the engine-core counter (restorable: single-threaded,
output to a file, no terminal) and tests/targets/churn.c (a tree that forks
and reaps children continuously and counts SIGUSR1). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser

import pytest

from engine import survey as sv
from engine.survey_html import render_html

from engine_core_support import (TARGETS, Procs, become_subreaper, check_counter, compile_counter,  # noqa: F401
                                 count_lines, counter_bin, procs, wait_for, world)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of other processes needs root")

PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers -------------------------------------------------------------------

@pytest.fixture(scope="session")
def churn_bin(tmp_path_factory) -> str:
    exe = os.path.join(str(tmp_path_factory.mktemp("survey-bin")), "churn")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "churn.c")],
                   check=True, capture_output=True, timeout=60)
    return exe


def churn_counters(path: str):
    with open(path, "rb") as f:
        return struct.unpack("<4Q", f.read(32))


def start_churn(procs: Procs, churn_bin: str, tmp_path, child_us: int = 3000):
    state = str(tmp_path / "churn.state")
    p = procs.start([churn_bin, state, str(child_us)], cwd=str(tmp_path))
    wait_for(lambda: os.path.exists(state) and os.path.getsize(state) >= 32 and churn_counters(state)[2] > 5,
             timeout=10, what="churn reaping children")
    return p, state


def status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in f))


def state_of(pid: int) -> dict:
    """What a survey must not change: run state, tracer, pending signals,
    the fd table (number -> target)."""
    st = status(pid)
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    # R/S/D are the same life (the counter computes, then sleeps); what a
    # survey must not change is stopped (T), traced (t) or not.
    run = st["State"][0]
    return {"State": run if run in "TtZX" else "live", "TracerPid": st["TracerPid"], "SigPnd": st["SigPnd"],
            "ShdPnd": st["ShdPnd"], "SigBlk": st["SigBlk"], "fds": fds}


def descendants(pid: int):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


class FreezeMonitor(threading.Thread):
    """Samples TracerPid/State of the watched trees while the survey runs:
    the most processes ever traced by us at one time (must be <= 1)."""

    def __init__(self, roots):
        super().__init__(daemon=True)
        self.roots = roots
        self.stop_evt = threading.Event()
        self.max_traced = 0
        self.samples = 0
        self.seen_traced = 0

    def _pass(self, me: str) -> set:
        out = set()
        for root in self.roots:
            for p in [root] + descendants(root):
                try:
                    if status(p)["TracerPid"] == me:
                        out.add(p)
                except (OSError, KeyError):
                    pass
        return out

    def run(self):
        # One pass reads the processes one after another, so it can see A
        # still traced and then B already traced across a release of A
        # and the attach of B. Two passes in a row: a process seen traced
        # in both was traced all the time between, so two of them were
        # traced at once, where the spans overlap.
        me = str(os.getpid())
        while not self.stop_evt.is_set():
            first = self._pass(me)
            traced = len(first & self._pass(me)) if first else 0
            self.samples += 1
            self.seen_traced += bool(first)
            self.max_traced = max(self.max_traced, traced)
            time.sleep(0.0005)


def run_survey(**kw):
    kw.setdefault("timeout", 15)
    return sv.survey(**kw)


def record(res: dict, pid: int) -> dict:
    return next(r for r in res["records"] if r["pid"] == pid)


# -- verdicts of real processes -------------------------------------------------

UNSHARED_THREAD = (
    "import ctypes, sys, threading, time\n"
    "def own_fs():\n"
    "    ctypes.CDLL(None).unshare(0x200)   # CLONE_FS\n"
    "    open(sys.argv[1], 'w').close()\n"
    "    time.sleep(60)\n"
    "threading.Thread(target=own_fs, daemon=True).start()\n"
    "time.sleep(60)\n")


def test_restorable_and_refused_real_processes(procs, counter_bin, world, tmp_path):
    ok = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    # Threads are restored (engine/threads.py): a second thread is fine...
    thr_ok = procs.start([counter_bin, str(tmp_path / "t.out"), world["in"], "4", "thread"], cwd=str(world["dir"]))
    # ...but not one with its own fs (unshare(CLONE_FS)): refused as threads.
    thr = procs.start([sys.executable, "-c", UNSHARED_THREAD, str(tmp_path / "thr.ready")], cwd=str(tmp_path))
    wait_for(lambda: count_lines(world["out"]) >= 2 and count_lines(str(tmp_path / "t.out")) >= 2, timeout=10)
    wait_for(lambda: os.path.exists(tmp_path / "thr.ready"), timeout=10)
    # One with a pipe to us: refused pipe-peer-outside, and with threads.
    r, w = os.pipe()
    try:
        piped = subprocess.Popen([counter_bin, str(tmp_path / "p.out"), world["in"], "4", "sleep"],
                                 stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 close_fds=True, start_new_session=True, cwd=str(world["dir"]))
        procs.popens.append(piped)
    finally:
        os.close(r)
    try:
        wait_for(lambda: count_lines(str(tmp_path / "p.out")) >= 1, timeout=10)
        res = run_survey(pid=[ok.pid, thr_ok.pid, thr.pid, piped.pid])
    finally:
        os.close(w)
    assert record(res, ok.pid)["status"] == sv.RESTORABLE, record(res, ok.pid)
    assert record(res, thr_ok.pid)["status"] == sv.RESTORABLE, record(res, thr_ok.pid)
    t = record(res, thr.pid)
    assert t["status"] == sv.REFUSED and [x["reason"] for x in t["refusals"]] == ["threads"]
    assert t["refusals"][0]["cause"]["label"] == "threads"
    p = record(res, piped.pid)
    assert p["status"] == sv.REFUSED
    causes = {x["cause"]["label"] for x in p["refusals"]}
    assert causes == {"pipe-peer-outside: pipe fd"}, p["refusals"]
    s = res["summary"]
    assert s["counts"] == {sv.RESTORABLE: 2, sv.REFUSED: 2}
    top = {c["label"]: c for c in s["causes"]}
    assert top["threads"]["processes"] == 1 and top["threads"]["alone"] == 1
    assert s["facets"]["fd kind"]["pipe"]["processes"] == 1


def test_all_refusals_reported_with_fd_filesystem_and_socket_causes(procs, counter_bin, world, tmp_path):
    """A process refused for several things at once: each refusal is there
    with its cause (fd kind, filesystem type, socket state, process state)."""
    script = (
        "import os, socket, sys, time, threading\n"
        "srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
        "cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()\n"
        "cli.send(b'!', socket.MSG_OOB)   # urgent data: an established socket the engine refuses\n"
        "f = open('/proc/self/status')\n"
        "import ctypes\n"
        "def own_fs():\n"
        "    ctypes.CDLL(None).unshare(0x200)   # CLONE_FS: a thread the engine refuses\n"
        "    time.sleep(60)\n"
        "threading.Thread(target=own_fs, daemon=True).start()\n"
        "time.sleep(0.2)\n"
        "open(sys.argv[1], 'w').close()\n"
        "time.sleep(60)\n")
    ready = str(tmp_path / "ready")
    p = procs.start([sys.executable, "-c", script, ready], cwd=str(tmp_path))
    wait_for(lambda: os.path.exists(ready), timeout=10)
    res = run_survey(pid=p.pid)
    rec = record(res, p.pid)
    assert rec["status"] == sv.REFUSED
    reasons = sorted(x["reason"] for x in rec["refusals"])
    assert "threads" in reasons and "socket" in reasons, reasons
    facets = res["summary"]["facets"]
    assert [k for k in facets["socket"] if "established" in k], facets["socket"]
    assert facets["process state"]["threads"]["processes"] == 1
    assert len(rec["refusals"]) >= 2
    # /proc/self/status is a regular fd on procfs: whatever its verdict, if
    # refused the cause names the filesystem.
    for x in rec["refusals"]:
        if x["what"].startswith("fd ") and "/proc/" in x["what"]:
            assert x["cause"]["facets"]["filesystem"] == "proc"


def test_not_inspectable_are_listed_not_counted(procs, counter_bin, world, tmp_path):
    # A zombie (our child, not reaped yet), a process traced by someone
    # else, and ckpt's own process (self): listed, not refusals.
    z = subprocess.Popen(["true"], close_fds=True)
    wait_for(lambda: open(f"/proc/{z.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", timeout=10)
    victim = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    tracer_src = ("import ctypes, os, sys, time\n"
                  "libc = ctypes.CDLL(None, use_errno=True)\n"
                  "assert libc.ptrace(0x4206, int(sys.argv[1]), 0, 0) == 0\n"    # PTRACE_SEIZE, no stop
                  "open(sys.argv[2], 'w').close(); time.sleep(60)\n")
    flag = str(tmp_path / "traced")
    tracer = procs.start([sys.executable, "-c", tracer_src, str(victim.pid), flag])
    try:
        wait_for(lambda: os.path.exists(flag), timeout=10)
        res = run_survey(pid=[z.pid, victim.pid, os.getpid()])
        assert record(res, z.pid)["status"] == sv.UNINSPECTABLE and record(res, z.pid)["note"] == "zombie"
        assert record(res, victim.pid)["note"] == "ptraced"
        assert status(victim.pid)["TracerPid"] == str(tracer.pid)     # still the other tracer's
        assert record(res, os.getpid())["note"] == "self"
        # Counted over these three only: the survey of our own PID takes in
        # every descendant of this worker (the tracer; and any process an
        # earlier test on this worker left to it, its subreaper).
        mine = sv.aggregate([record(res, p) for p in (z.pid, victim.pid, os.getpid())])
        assert mine["counts"].get(sv.REFUSED, 0) == 0 and mine["counts"][sv.UNINSPECTABLE] == 3, mine
        assert mine["causes"] == []
        assert "zombie" in sv.render_table(res)
    finally:
        z.wait(timeout=5)
        # The tracer first: a traced victim's exit is reported to its tracer
        # before its parent can reap it.
        tracer.kill()
        tracer.wait(timeout=5)


def test_exit_before_and_after_check_is_reported(procs, counter_bin, world):
    """A process that exits while surveyed: 'exited', never an error."""
    from engine.context import Options
    real = sv._checker(Options())

    def die_first(pid):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                 open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX", timeout=5)
        return real(pid)

    def die_after(pid):
        out = real(pid)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                 open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX", timeout=5)
        return out

    for check in (die_first, die_after):
        p = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
        wait_for(lambda: os.path.exists(world["out"]), timeout=10)
        st = sv.select(pid=p.pid)[p.pid]
        rec = sv.inspect(p.pid, st, check, timeout=10)
        assert rec["status"] == sv.EXITED, (check.__name__, rec)
        assert "during survey" in rec["note"]
        p.wait(timeout=5)


def test_job_control_stopped_process_stays_stopped(procs, counter_bin, world):
    p = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 1, timeout=10)
    os.kill(p.pid, signal.SIGSTOP)
    wait_for(lambda: status(p.pid)["State"].startswith("T"), timeout=5)
    before = state_of(p.pid)
    res = run_survey(pid=p.pid)
    rec = record(res, p.pid)
    # SIGSTOPped alone in its own session: its group is orphaned already, as
    # it will be once restored: restorable (engine/jobstop.py)
    assert rec["status"] == sv.RESTORABLE, rec
    # PTRACE_DETACH wakes a group-stopped task so that it re-enters the
    # stop (kernel/ptrace.c __ptrace_unlink): 'R' for an instant, in the
    # kernel, never running its own code (the counter below proves it).
    wait_for(lambda: status(p.pid)["State"].startswith("T"), timeout=2, what="back in group stop")
    assert state_of(p.pid) == before
    n = count_lines(world["out"])
    time.sleep(0.3)
    assert count_lines(world["out"]) == n          # still stopped: the survey did not continue it
    os.kill(p.pid, signal.SIGCONT)
    wait_for(lambda: count_lines(world["out"]) > n, timeout=5, what="counter continues after SIGCONT")


# -- untouched, under churn ---------------------------------------------------------

def test_survey_leaves_processes_untouched_under_fork_exit_churn(procs, counter_bin, churn_bin, world, tmp_path):
    """Before/after: same State, no tracer, same pending signals and fds;
    the counters keep advancing; never two processes traced at once; all
    while one tree forks and reaps children continuously and takes SIGUSR1."""
    quiet = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 2, timeout=10)
    churn, cstate = start_churn(procs, churn_bin, tmp_path)
    before_quiet = state_of(quiet.pid)
    before_churn = state_of(churn.pid)
    c0 = churn_counters(cstate)
    stop = threading.Event()
    sent = [0]

    def pester():
        while not stop.is_set():
            os.kill(churn.pid, signal.SIGUSR1)
            sent[0] += 1
            time.sleep(0.002)

    mon = FreezeMonitor([quiet.pid, churn.pid])
    sig = threading.Thread(target=pester, daemon=True)
    mon.start()
    sig.start()
    results = []
    try:
        for _ in range(4):
            results.append(run_survey(pid=[quiet.pid, churn.pid]))
    finally:
        stop.set()
        mon.stop_evt.set()
        sig.join(timeout=5)
        mon.join(timeout=5)
    assert mon.max_traced <= 1, "two processes frozen at once"
    assert mon.samples > 10
    for res in results:
        assert record(res, quiet.pid)["status"] == sv.RESTORABLE
        assert record(res, churn.pid)["status"] == sv.REFUSED
        assert "process-tree: children" in {x["cause"]["label"] for x in record(res, churn.pid)["refusals"]}
        assert not [r for r in res["records"] if r["status"] in (sv.ERROR, sv.TIMEOUT)], res["records"]
    statuses = {r["status"] for res in results for r in res["records"]}
    assert statuses <= {sv.RESTORABLE, sv.REFUSED, sv.EXITED, sv.UNINSPECTABLE}
    # A child caught between its exit and its reaping is a zombie.
    assert {r["note"] for res in results for r in res["records"] if r["status"] == sv.UNINSPECTABLE} <= {"zombie"}
    # After: nothing traced, nothing stopped, same fds, signals delivered.
    assert state_of(quiet.pid) == before_quiet
    wait_for(lambda: status(churn.pid)["SigPnd"] == before_churn["SigPnd"] and
             status(churn.pid)["ShdPnd"] == before_churn["ShdPnd"], timeout=5, what="churn's pending signals drain")
    after = state_of(churn.pid)
    assert after["TracerPid"] == "0" and after["State"] == "live"
    assert after["fds"] == before_churn["fds"]
    for p in [quiet.pid, churn.pid] + descendants(churn.pid):
        try:
            st = status(p)
        except OSError:
            continue
        assert st["TracerPid"] == "0", p
        assert not st["State"].startswith(("T", "t")), (p, st["State"])
    c1 = churn_counters(cstate)
    assert c1[1] > c0[1] and c1[2] > c0[2] and c1[3] > c0[3], (c0, c1)
    wait_for(lambda: churn_counters(cstate)[0] > c1[0] and churn_counters(cstate)[2] > c1[2], timeout=5,
             what="churn keeps forking and reaping after the survey")
    n = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) > n, timeout=5, what="counter keeps counting")
    os.kill(churn.pid, signal.SIGUSR1)
    wait_for(lambda: churn_counters(cstate)[3] > c1[3], timeout=5, what="SIGUSR1 still handled")


def test_sigterm_during_survey_releases_the_target(procs, counter_bin, world, tmp_path):
    """`ckpt survey` killed by SIGTERM mid-way: the target it was checking
    is released (check's cleanup runs), the output says interrupted."""
    targets = []
    for i in range(6):
        out = str(tmp_path / f"o{i}")
        targets.append((procs.start([counter_bin, out, world["in"], "4", "sleep"], cwd=str(world["dir"])), out))
    wait_for(lambda: all(count_lines(o) >= 1 for _, o in targets), timeout=10)
    args = [sys.executable, "-m", "engine", "survey", "--json"]
    for p, _ in targets:
        args += ["--pid", str(p.pid)]
    env = dict(os.environ, PYTHONPATH=PARENT)
    for delay in (0.25, 0.35, 0.5):
        cli = subprocess.Popen(args, cwd=PARENT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               close_fds=True)
        time.sleep(delay)
        cli.send_signal(signal.SIGTERM)
        out, _ = cli.communicate(timeout=30)
        for p, o in targets:
            st = status(p.pid)
            assert st["TracerPid"] == "0" and not st["State"].startswith(("T", "t")), st
        if out:
            res = json.loads(out)["result"]
            assert res.get("interrupted") or len(res["records"]) == len(targets)
    for p, o in targets:
        n = count_lines(o)
        wait_for(lambda: count_lines(o) > n, timeout=5, what="counter keeps counting")


def test_cli_json_and_html(procs, counter_bin, world, tmp_path):
    p = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 1, timeout=10)
    html = str(tmp_path / "s.html")
    r = subprocess.run([sys.executable, "-m", "engine", "survey", "--pid", str(p.pid), "--json", "--html", html],
                       cwd=PARENT, env=dict(os.environ, PYTHONPATH=PARENT), capture_output=True, text=True,
                       timeout=60, close_fds=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["result"]
    assert record(res, p.pid)["status"] == sv.RESTORABLE
    page = open(html).read()
    assert "<svg" in page and str(p.pid) in page
    r = subprocess.run([sys.executable, "-m", "engine", "survey", "--pid", str(p.pid)], cwd=PARENT,
                       env=dict(os.environ, PYTHONPATH=PARENT), capture_output=True, text=True, timeout=60,
                       close_fds=True)
    assert r.returncode == 0 and "restorable 1, refused 0" in r.stdout, r.stdout + r.stderr


# -- ranking on canned verdicts ------------------------------------------------------

def _ref(reason, what, kind, detail="", fdfacts=None):
    r = {"reason": reason, "detail": detail}
    item = {"what": what, "kind": kind}
    return dict(r, what=what, kind=kind, cause=sv.cause_of(item, r, fdfacts))


def _proc(pid, *refs, status=None):
    return {"pid": pid, "comm": f"p{pid}", "status": status or (sv.REFUSED if refs else sv.RESTORABLE),
            "refusals": list(refs)}


THREADS = ("threads", "threads", "process", "4 threads")
KIDS = ("process-tree", "children", "process", "children [5]")
PIPE = ("pipe-peer-outside", "fd 1 pipe:[123]", "pipe", "peer held by pid 9")
TCP = ("socket", "fd 3 socket:[77]", "socket", "tcp established 10.0.0.1:22->10.0.0.2:5555")


def canned():
    return [
        _proc(1),
        _proc(2, _ref(*THREADS)),
        _proc(3, _ref(*THREADS)),
        _proc(4, _ref(*THREADS), _ref(*KIDS)),
        _proc(5, _ref(*PIPE), _ref(*PIPE[:1], "fd 2 pipe:[124]", *PIPE[2:])),
        _proc(6, _ref(*TCP), _ref(*THREADS)),
        _proc(7, _ref(*KIDS), _ref(*PIPE)),
        _proc(8, status=sv.UNINSPECTABLE),
        _proc(9, status=sv.EXITED),
    ]


def test_ranking_blocks_alone_cumulative():
    s = sv.aggregate(canned())
    assert s["counts"] == {sv.RESTORABLE: 1, sv.REFUSED: 6, sv.UNINSPECTABLE: 1, sv.EXITED: 1}
    assert s["inspected"] == 7
    rows = [(c["label"], c["processes"], c["alone"], c["cumulative"]) for c in s["causes"]]
    assert rows == [
        ("threads", 4, 2, 3),                           # fixes 2, 3 alone
        ("pipe-peer-outside: pipe fd", 2, 1, 4),        # 5 (two pipe fds, one cause)
        ("process-tree: children", 2, 0, 6),            # then 4 and 7
        ("socket: tcp established", 1, 0, 7),    # then 6
    ]
    assert s["by_reason"]["threads"] == {"processes": 4, "refusals": 4}
    assert s["by_reason"]["pipe-peer-outside"] == {"processes": 2, "refusals": 3}
    assert list(s["by_reason"])[0] == "threads"
    assert s["facets"]["fd kind"]["pipe"] == {"processes": 2, "refusals": 3}
    assert s["facets"]["socket"]["tcp established"]["processes"] == 1


def test_causes_by_fd_kind_filesystem_socket_mapping_process():
    c = sv.cause_of({"what": "fd 4 /proc/1/status", "kind": "regular"},
                    {"reason": "file-changed", "detail": "size 0 -> 12"}, {"fstype": "proc", "link": "/proc/1/status"})
    assert c["label"] == "file-changed: regular fd on proc" and c["facets"]["filesystem"] == "proc"
    c = sv.cause_of({"what": "fd 0 /dev/pts/3", "kind": "device"}, {"reason": "device", "detail": "char 136:3"},
                    {"fstype": "devpts", "link": "/dev/pts/3"})
    assert c["value"] == "device /dev/pts/N on devpts"
    c = sv.cause_of({"what": "fd 9 /x", "kind": "regular"},
                    {"reason": "unsupported-state", "detail": "holds a file lock (POSIX WRITE); locks are not restored"},
                    {"fstype": "ext4", "link": "/x"})
    assert c["value"] == "regular fd on ext4 (holds a file lock)"
    c = sv.cause_of({"what": "fd 7 anon_inode:[io_uring]", "kind": "unsupported"},
                    {"reason": "unsupported-fd", "detail": "no handler"})
    assert c["value"] == "fd anon_inode:[io_uring]"
    for detail, want in [("unix stream connected /run/a.sock->(unnamed)", "unix stream connected"),
                         ("unix dgram connected (socketpair): peer held by pid 3 (fd 4)",
                          "unix dgram socketpair: peer held by another process"),
                         ("tcp6 listening [::]:22: 2 connection(s) waiting in the accept queue",
                          "tcp6 listening: N connection(s) waiting in the accept queue"),
                         ("udp 127.0.0.1:53", "udp bound"), ("netlink route", "netlink route"),
                         ("packet raw", "packet raw")]:
        assert sv.socket_state(detail) == want, detail
    c = sv.cause_of({"what": "mapping 7f00-7f10 rw-s /SYSV00000000", "kind": "mapping"},
                    {"reason": "unsupported-mapping", "detail": "System V shared memory segment"})
    assert c["label"] == "unsupported-mapping: mapping: System V shared memory segment"
    assert c["facets"]["mapping"] == "System V shared memory segment"
    c = sv.cause_of({"what": "namespaces", "kind": "process"},
                    {"reason": "unsupported-state", "detail": "in other namespaces than ckpt: mnt, pid"})
    assert c["value"] == "namespaces (mnt, pid)"
    c = sv.cause_of({"what": "cwd", "kind": "fs"}, {"reason": "unsupported-state", "detail": "deleted"})
    assert c["value"] == "cwd deleted" and c["dim"] == "process"


def test_table_lists_ranking_and_uninspectable():
    res = {"host": "h", "arch": "x86_64", "kernel": "6.1", "elapsed_s": 1, "appeared_during_survey": 0,
           "records": canned(), "summary": sv.aggregate(canned())}
    res["records"][7]["note"] = "kernel-thread"
    text = sv.render_table(res, list_processes=True)
    lines = text.splitlines()
    assert "restorable 1, refused 6" in text and "1 kernel-thread" in text
    i = next(n for n, line in enumerate(lines) if line.startswith("blocks"))
    assert lines[i + 2].split()[:4] == ["4", "2", "3", "threads"]


# -- HTML -------------------------------------------------------------------------------

class _Checker(HTMLParser):
    VOID = {"meta", "br", "img", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.rects, self.texts = [], [], [], []
        self.errors = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "rect":
            self.rects.append(dict(attrs))
        if tag in ("link", "script", "img") or any(k in ("src", "href") for k, _ in attrs):
            self.errors.append(f"external asset: {tag} {attrs}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.texts.append(data)


def test_html_page_is_self_contained_with_chart_and_counts():
    recs = canned()
    recs[6]["comm"] = "a<b>&c"
    res = {"host": "h", "arch": "x86_64", "kernel": "6.1", "time": "t", "elapsed_s": 1,
           "appeared_during_survey": 2, "records": recs, "summary": sv.aggregate(recs)}
    page = render_html(res)
    p = _Checker()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors
    assert not p.stack or p.stack == [], p.stack
    assert "svg" in p.tags and "style" in p.tags
    blocks = [r for r in p.rects if r.get("class") == "blocks"]
    alone = [r for r in p.rects if r.get("class") == "alone"]
    assert len(blocks) == 4 and len(alone) == 2            # threads and pipe block some alone
    widths = [float(r["width"]) for r in blocks]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    text = " ".join(p.texts)
    assert "a<b>&c" in text                                  # escaped in source, intact when parsed
    assert "4 (2 alone)" in text and "threads" in text
    for label, n in (("restorable", 1), ("refused", 6)):
        assert f"{label}" in text and str(n) in text


def test_check_overrunning_its_deadline_is_cut_off_and_released(procs, counter_bin, world):
    """A check that hangs with the target frozen: stopped by the deadline,
    the target released by the check's own cleanup and running again."""
    from engine.task import Task
    p = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 1, timeout=10)
    frozen = []

    def hanging_check(pid):
        t = Task.seize(pid)
        try:
            frozen.append(status(pid)["State"])
            time.sleep(10)
        finally:
            t.release()

    t0 = time.monotonic()
    rec = sv.inspect(p.pid, sv.select(pid=p.pid)[p.pid], hanging_check, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert frozen and frozen[0].startswith("t")
    assert rec["status"] == sv.TIMEOUT and "0.5 s" in rec["note"] and rec["cut_at"] == "check"
    assert status(p.pid)["TracerPid"] == "0"
    n = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) > n, timeout=5, what="counter runs again")


def test_select_tree_and_comm(procs, churn_bin, tmp_path):
    churn, _ = start_churn(procs, churn_bin, tmp_path, child_us=200000)
    wait_for(lambda: len(descendants(churn.pid)) >= 2, timeout=5, what="churn children")
    tree = sv.select(pid=churn.pid)
    assert churn.pid in tree and os.getpid() not in tree
    assert all(st["comm"] == "churn" for st in tree.values())
    assert len(tree) >= 2 and all(st["ppid"] == churn.pid for p, st in tree.items() if p != churn.pid)
    byname = sv.select(comm="chur?")
    assert set(tree) & set(byname) and all(st["comm"] == "churn" for st in byname.values())
    with pytest.raises(sv.UsageError):
        sv.select(pid=[churn.pid, 999999999])


def test_safety_net_detaches_a_target_a_check_left_frozen(procs, counter_bin, world):
    from engine.task import Task
    p = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 1, timeout=10)

    def leaky_check(pid):
        Task.seize(pid)            # never released
        return {"pid": pid, "ok": True, "items": [], "refusals": []}

    rec = sv.inspect(p.pid, sv.select(pid=p.pid)[p.pid], leaky_check, timeout=5)
    assert rec["safety_net"] == "detached by the survey's safety net"
    assert rec["status"] == sv.RESTORABLE
    assert status(p.pid)["TracerPid"] == "0"
    n = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) > n, timeout=5, what="counter runs again")


def test_a_check_that_crashes_is_listed_and_the_survey_goes_on(procs, counter_bin, world, tmp_path):
    a = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    b = procs.start([counter_bin, str(tmp_path / "b.out"), world["in"], "4", "sleep"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 1 and count_lines(str(tmp_path / "b.out")) >= 1, timeout=10)
    from engine.context import Options
    real = sv._checker(Options())

    def buggy(pid):
        if pid == a.pid:
            raise KeyError("engine bug")
        return real(pid)

    res = sv.survey(pid=[a.pid, b.pid], check=buggy, timeout=10)
    assert record(res, a.pid)["status"] == sv.ERROR and "KeyError" in record(res, a.pid)["note"]
    assert record(res, b.pid)["status"] == sv.RESTORABLE
    assert "check failed 1" in sv.render_table(res)


def test_deadline_never_lands_inside_a_syscall_injection(procs, counter_bin, world):
    """Deadlines so short they ring all over real checks (seize, pre-flight,
    injected syscalls, release): the alarm only cuts a check where its
    cleanup restores the target, so the counter's every output line stays
    right (no gap, right input byte, right memory) and it keeps counting."""
    from engine.context import Options
    p = procs.start([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 2, timeout=10)
    real = sv._checker(Options())
    seen = {}
    for i in range(80):
        st = sv.select(pid=p.pid)[p.pid]
        rec = sv.inspect(p.pid, st, real, timeout=0.0005 + 0.0005 * (i % 20))
        seen[rec["status"]] = seen.get(rec["status"], 0) + 1
        # The safety net only ever steps in after a cut in the freeze wait
        # (a target that stops just after seize gave up on it, untouched):
        # no check was cut where its cleanup could not restore the target.
        assert status(p.pid)["TracerPid"] == "0", rec
        assert "safety_net" not in rec or rec.get("cut_at") == "freeze", rec
        assert rec["status"] != sv.ERROR, rec         # e.g. a release that found the target running
    assert seen.get(sv.TIMEOUT, 0) > 0, seen          # the deadline did ring mid-check
    n = check_counter(world["out"], world["in_data"])["last"]
    wait_for(lambda: count_lines(world["out"]) > n + 2, timeout=5, what=f"counter keeps counting {seen}")
    check_counter(world["out"], world["in_data"])


def _frame_in(chain):
    """The innermost frame of calls through functions named as `chain`
    gives: [(file basename, function name), ...], outermost first."""
    got = {}
    inner = "def leaf():\n    got['frame'] = sys._getframe()\n"
    ns = {"got": got, "sys": __import__("sys")}
    exec(compile(inner, "/x/leaf.py", "exec"), ns)
    callee = ns["leaf"]
    for fname, func in reversed(chain):
        code = f"def {func}():\n    callee()\n"
        scope = {"callee": callee}
        exec(compile(code, f"/x/{fname}", "exec"), scope)
        callee = scope[func]
    callee()
    return got["frame"].f_back          # the innermost named function's frame


@pytest.mark.parametrize("chain, safe", [
    ([("dump.py", "_check_one"), ("dump.py", "_survey_frozen"), ("check.py", "preflight")], True),
    ([("dump.py", "_check_one"), ("dump.py", "_survey_frozen"), ("task.py", "syscall")], False),
    # the release, and the finally that calls it: an exception there skips the release
    ([("dump.py", "_check_one"), ("threads.py", "release")], False),
    ([("dump.py", "_check_one")], False),
    ([("dump.py", "_check_one"), ("threads.py", "freeze")], False),
    # the batched reads: the target may be running the runner (engine/dumpbatch.py)
    ([("dump.py", "_check_one"), ("dump.py", "injected_state"), ("dumpbatch.py", "read"),
      ("dumpbatch.py", "finish"), ("signals.py", "siginfo_at_stop")], False),
    ([("survey.py", "inspect"), ("test_survey.py", "hanging_check")], True),     # a check of the caller's own
])
def test_a_deadline_never_cuts_where_the_release_could_be_skipped(chain, safe):
    """A cut is allowed only where the check's finally still releases the
    target: not in the freeze, the release, the check's own body or a
    ptrace operation (a cut at the first line of threads.release left the
    target seized and masked)."""
    assert sv._safe_to_interrupt(_frame_in(chain)) is safe
