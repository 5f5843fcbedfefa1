"""Process trees (engine/tree.py, engine/tree_restore.py): a target and all
its descendants dumped with one consistent freeze and restored with the
same PIDs, parent links, sessions and groups, zombies, and the open files
and memory they share, shared.

Targets: a shell loop running a command each tick, a shell pipeline
producer | filter | consumer checkpointed mid-stream, a Python family
(tests/targets/family.py: zombies, groups, a shared open file, shared and
private memory, a parent reaping its children), a Python thread pool under
a shell; and one target per refusal boundary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import EngineError, Refusal, Refusals
from engine.restore import restore
from engine_core_support import (TARGETS, check_counter, count_lines, counter_bin, procs, python_exe,  # noqa: F401
                                 start_counter, start_ready_script, wait_for, world)

FAMILY = os.path.join(TARGETS, "family.py")


def _stat(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    rest = text.rsplit(")", 1)[1].split()
    return {"state": rest[0], "ppid": int(rest[1]), "pgid": int(rest[2]), "sid": int(rest[3])}


def _status_field(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def _session(sid: int) -> list:
    out = []
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                if _stat(int(n))["sid"] == sid:
                    out.append(int(n))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(out)


def _descendants(pid: int) -> list:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue        # exited meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return sorted(set(out))


def _untouched(pids) -> None:
    """After a refusal: every member running on, untraced, not stopped."""
    for pid in pids:
        assert _status_field(pid, "TracerPid") in ("0", ""), f"pid {pid} still traced"
        assert _stat(pid)["state"] not in ("t", "T"), f"pid {pid} left stopped"


@pytest.fixture
def session_killer(procs):  # noqa: F811
    """Kill every process of the sessions the test registers, by PID."""
    sids = []
    yield sids
    # the sessions, and every descendant (a child leading a session of its own too)
    pids = sorted({pid for sid in sids for pid in _session(sid) + _descendants(sid)})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: _gone(pids), what="the test's processes reaped")


def _start(procs, argv, cwd):  # noqa: F811
    p = procs.start(argv, cwd=str(cwd))
    return p


def _swarm_tree(procs, tmp_path, session_killer, n: int):
    """tests/targets/swarm.c as a tree of n, ready: (its Popen, every pid)."""
    exe = str(tmp_path / "swarm")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, os.path.join(TARGETS, "swarm.c")], check=True)
    p = _start(procs, [exe, "tree", str(n), str(tmp_path / "ready")], tmp_path)
    session_killer.append(p.pid)
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the swarm")
    return p, sorted([p.pid] + _descendants(p.pid))


def _ready(cwd, p):
    wait_for(lambda: os.path.exists(os.path.join(str(cwd), "ready")) or p.poll() is not None, what="the target")
    assert p.poll() is None
    with open(os.path.join(str(cwd), "ready")) as f:
        return json.load(f)


def _gone(pids) -> bool:
    """Every pid gone; the killed members were reparented to this test (a
    subreaper): reap them."""
    for x in pids:
        try:
            os.waitpid(x, os.WNOHANG)
        except ChildProcessError:
            pass
    return not any(os.path.exists(f"/proc/{x}") for x in pids)


def _wait_killed(pid, img, procs):  # noqa: F811
    procs.popens[:] = [p for p in procs.popens if p.pid != pid or p.wait() is not None]
    pids = [m["pid"] for m in json.loads((img / "tree.json").read_text())["members"]]
    wait_for(lambda: _gone(pids), what="the dumped tree gone")
    return pids


def _dump_restore(pid, img, procs):  # noqa: F811
    res = dump(pid, str(img), Options())
    _wait_killed(pid, img, procs)
    out = restore(str(img), Options())
    procs.adopt(pid)
    assert out["pid"] == pid
    return res, out


# -- what works -------------------------------------------------------------------------

def test_shell_loop_running_a_command_each_tick(procs, session_killer, tmp_path):  # noqa: F811
    """sh forks `sleep` every tick: the counter in the shell's memory goes
    on from where it was (a fresh start would begin again at 1), the
    child sleeping at the dump is restored as the shell's child and reaped."""
    p = _start(procs, ["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo $i >>f; sleep 0.1; done"], tmp_path)
    session_killer.append(p.pid)
    f = tmp_path / "f"
    wait_for(lambda: f.exists() and len(f.read_text().split()) >= 5, what="ticks")
    wait_for(lambda: _descendants(p.pid), what="a sleep child")
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] >= 2
    tree = json.loads((tmp_path / "img" / "tree.json").read_text())
    child = tree["members"][1]
    assert child["comm"] == "sleep" and child["ppid"] == p.pid
    from engine.show import render, show
    text = render(show(str(tmp_path / "img")))
    assert f"process tree: {res['members']} processes" in text and f"{child['pid']} sleep" in text, text
    n = len(f.read_text().split())
    wait_for(lambda: len(f.read_text().split()) >= n + 5, what="ticks after the restore")
    nums = [int(x) for x in f.read_text().split()]
    assert nums == list(range(1, len(nums) + 1)), nums
    st = _stat(p.pid)
    assert (st["sid"], st["pgid"]) == (p.pid, p.pid)
    assert _status_field(p.pid, "TracerPid") == "0"


def test_counter_with_a_child(procs, session_killer, counter_bin, world, tmp_path):  # noqa: F811
    """The C counter (its proof: consecutive steps, the input byte of each,
    the xor of its 4 MiB of memory) with a child sharing its open files:
    once refused as process-tree, now a tree of two."""
    p = start_counter(procs, counter_bin, world, mode="child")
    session_killer.append(p.pid)
    kid = _descendants(p.pid)
    assert len(kid) == 1
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] == 2
    assert _stat(kid[0])["ppid"] == p.pid and _stat(kid[0])["state"] == "S"
    n = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) >= n + 10, what="the counter to carry on")
    check_counter(world["out"], world["in_data"])


PRODUCER = ("import sys, time\n"
            "for i in range(1, 1501):\n"
            "    sys.stdout.write(f'{i}\\n'); sys.stdout.flush(); time.sleep(0.002)\n")
CONSUMER = ("import sys\n"
            "with open(sys.argv[1], 'a') as out:\n"
            "    for line in sys.stdin:\n"
            "        out.write(line); out.flush()\n")


def test_pipeline_mid_stream(procs, session_killer, tmp_path):  # noqa: F811
    """producer | cat | consumer, dumped mid-stream: both pipes (ends held
    by different members) and their queued bytes come back once; the
    output is complete, in order, with no duplicates."""
    (tmp_path / "prod.py").write_text(PRODUCER)
    (tmp_path / "cons.py").write_text(CONSUMER)
    py = python_exe()
    p = _start(procs, ["/bin/sh", "-c", f"{py} prod.py | cat | {py} cons.py out; echo done >>status"], tmp_path)
    session_killer.append(p.pid)
    out = tmp_path / "out"
    wait_for(lambda: out.exists() and len(out.read_text().split()) >= 200, what="the stream")
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] == 4
    recs = []
    tree = json.loads((tmp_path / "img" / "tree.json").read_text())
    for m in tree["members"]:
        recs += json.loads((tmp_path / "img" / m["dir"] / "fds.json").read_text()) if m["dir"] else \
            json.loads((tmp_path / "img" / "fds.json").read_text())
    assert sum(1 for r in recs if r.get("kind") == "pipe") >= 4, "pipe ends held by different members"
    wait_for(lambda: (tmp_path / "status").exists(), timeout=60, what="the pipeline to finish")
    nums = [int(x) for x in out.read_text().split()]
    assert nums == list(range(1, 1501)), (len(nums), nums[:5], nums[-5:])


def test_family(procs, session_killer, tmp_path):  # noqa: F811
    """Zombies with their exit status, groups and sessions, a shared open
    file (one offset), shared anonymous memory (one object), private
    copy-on-write memory (each its own), and a parent that reaps them all."""
    p = _start(procs, [python_exe(), FAMILY, "family"], tmp_path)
    session_killer.append(p.pid)
    info = _ready(tmp_path, p)
    kids = info["kids"]
    pids = [p.pid] + list(kids.values())
    before = {pid: _stat(pid) for pid in pids}
    cpus = {pid: _status_field(pid, "Cpus_allowed_list") for pid in pids}
    res = check(p.pid, Options())
    assert res["ok"], res["refusals"]
    assert {m["pid"] for m in res["members"]} == set(pids)
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] == 8 and res["zombies"] == 2
    for pid in pids:
        now = _stat(pid)
        assert (now["ppid"], now["pgid"], now["sid"]) == (before[pid]["ppid"], before[pid]["pgid"],
                                                         before[pid]["sid"]) or pid == p.pid, (pid, now)
        assert (now["state"] == "Z") == (pid in (kids["A"], kids["C"])), (pid, now)
        assert _status_field(pid, "TracerPid") in ("0", "")
    # the restorer builds on one CPU (engine/placement.py): none keeps that, a zombie neither
    assert {pid: _status_field(pid, "Cpus_allowed_list") for pid in pids} == cpus
    assert (_stat(p.pid)["pgid"], _stat(p.pid)["sid"]) == (p.pid, p.pid)
    (tmp_path / "go").write_text("")
    wait_for(lambda: (tmp_path / "result").exists(), timeout=20, what="the result")
    got = json.loads((tmp_path / "result").read_text())
    assert got["token"] == info["token"] and got["pid"] == p.pid and got["sid"]
    assert got["groups"] == [True, True, True]
    assert got["sigchld"][0] == got["sigchld"][1], "a SIGCHLD made by the restore reached the parent"
    assert got["status"] == {"A": ["exit", 7], "C": ["signal", 15], "B": ["exit", 3], "D": ["exit", 4],
                             "E": ["exit", 5], "F": ["exit", 6], "G": ["exit", 8]}
    assert got["shm"] == "child", "the shared page is not one object"
    assert got["memfd"] == "child", "the memfd mapping is not one object"
    assert got["private"] is True
    assert (tmp_path / "shared.txt").read_bytes() == b"p1cp2", "the open file description was split"


def test_zombies_killed_by_any_signal(procs, session_killer, tmp_path):  # noqa: F811
    """zdtm's zombie00: zombies killed by SIGKILL (whose action no
    rt_sigaction may touch: the restore failed on EINVAL after a dump that
    had killed the tree), SIGSEGV and SIGTERM, and one that exited, each
    reaped with its own status after the restore."""
    p = _start(procs, [python_exe(), FAMILY, "killed"], tmp_path)
    session_killer.append(p.pid)
    info = _ready(tmp_path, p)
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["zombies"] == 4
    assert all(_stat(pid)["state"] == "Z" for pid in info["kids"].values())
    (tmp_path / "go").write_text("")
    wait_for(lambda: (tmp_path / "result").exists(), timeout=20, what="the result")
    got = json.loads((tmp_path / "result").read_text())["status"]
    assert got == {"kill": signal.SIGKILL, "segv": signal.SIGSEGV, "term": signal.SIGTERM, "exit": 3 << 8}


def test_socketpairs_between_members(procs, session_killer, tmp_path):  # noqa: F811
    """A stream and a datagram socketpair whose ends parent and child hold,
    bytes queued both ways: one pair each, every byte and message once."""
    p = _start(procs, [python_exe(), FAMILY, "sockpair"], tmp_path)
    session_killer.append(p.pid)
    info = _ready(tmp_path, p)
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] == 2
    assert _stat(info["kids"]["C"])["ppid"] == p.pid
    (tmp_path / "go").write_text("")
    wait_for(lambda: (tmp_path / "result").exists(), timeout=20, what="the result")
    got = json.loads((tmp_path / "result").read_text())
    assert got == {"token": info["token"], "first": "to-parent", "dgrams": ["d1", "d2"],
                   "reply": f"child-got:to-child|p1|queued|{p.pid}"}, got   # SO_PEERCRED: the pair's maker


def test_thread_pool_under_a_shell(procs, session_killer, tmp_path):  # noqa: F811
    """A multi-threaded member (a Python ThreadPoolExecutor) in a tree."""
    pool = os.path.join(TARGETS, "pool.py")
    p = _start(procs, ["/bin/sh", "-c", f"{python_exe()} {pool} out; echo $? >status"], tmp_path)
    session_killer.append(p.pid)
    out = tmp_path / "out"
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 20, what="pool results")
    tasks = lambda: {(pid, t): _status_field(t, "Cpus_allowed_list")     # noqa: E731
                     for pid in [p.pid] + _descendants(p.pid) for t in map(int, os.listdir(f"/proc/{pid}/task"))}
    cpus = tasks()
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] == 2 and res["threads"] >= 6
    assert tasks() == cpus, "a task kept the restorer's one CPU (engine/placement.py)"
    n = len(out.read_text().splitlines())
    wait_for(lambda: len(out.read_text().splitlines()) >= n + 20, timeout=20, what="results after the restore")
    lines = [ln.split() for ln in out.read_text().splitlines()]
    nums = [int(ln[0]) for ln in lines if ln and ln[0].isdigit()]
    assert nums == list(range(1, len(nums) + 1))
    assert not [ln for ln in lines if "BAD" in " ".join(ln)]


def test_failure_leaves_no_member(procs, session_killer, tmp_path, monkeypatch):  # noqa: F811
    """A failure after the tree exists kills every member created."""
    p = _start(procs, [python_exe(), FAMILY, "family"], tmp_path)
    session_killer.append(p.pid)
    info = _ready(tmp_path, p)
    pids = [p.pid] + list(info["kids"].values())
    dump(p.pid, str(tmp_path / "img"), Options())
    _wait_killed(p.pid, tmp_path / "img", procs)
    monkeypatch.setenv("CKPT_TEST_FAIL_AT", "threads")
    with pytest.raises(EngineError):
        restore(str(tmp_path / "img"), Options())
    wait_for(lambda: _gone(pids), what="every member gone")
    monkeypatch.delenv("CKPT_TEST_FAIL_AT")
    restore(str(tmp_path / "img"), Options())    # and the image still restores
    procs.adopt(p.pid)
    assert _stat(p.pid)["state"] != "Z"


def test_fifty_members_under_the_default_fd_limit(procs, session_killer, tmp_path):  # noqa: F811
    """A tree of 50 (tests/targets/swarm.c, the bench's) restores with the
    usual RLIMIT_NOFILE soft limit of 1024: the restorer holds each
    member's files (exe, mappings, cwd, fds) above one base, not above a
    base that climbed ~70 fds a member (EMFILE before 50)."""
    import resource
    p, pids = _swarm_tree(procs, tmp_path, session_killer, 50)
    assert len(pids) == 50
    dump(p.pid, str(tmp_path / "img"), Options())
    _wait_killed(p.pid, tmp_path / "img", procs)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        restore(str(tmp_path / "img"), Options())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    procs.adopt(p.pid)
    assert sorted([p.pid] + _descendants(p.pid)) == pids
    assert all(_stat(x)["state"] == "S" for x in pids)


# -- refusal boundaries ---------------------------------------------------------------

def _refused(pid):
    with pytest.raises((Refusal, Refusals)) as e:
        check(pid, Options())
    rs = e.value.refusals if isinstance(e.value, Refusals) else [e.value]
    return rs


def _check_refusals(pid) -> list:
    res = check(pid, Options())
    assert not res["ok"]
    return res["refusals"]


def test_refused_pipe_peer_outside(procs, session_killer, tmp_path):  # noqa: F811
    """The test holds the write end of the tree's pipe: pipe-peer-outside
    naming this process; every member goes on untouched."""
    r, w = os.pipe()
    try:
        p = subprocess.Popen(["/bin/sh", "-c", "cat | cat >/dev/null"], stdin=r, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd=str(tmp_path))
        procs.popens.append(p)
        session_killer.append(p.pid)
        wait_for(lambda: len(_descendants(p.pid)) == 2, what="the pipeline")
        refs = _check_refusals(p.pid)
        assert any(x["reason"] == "pipe-peer-outside" and f"pid {os.getpid()}" in x["detail"] for x in refs), refs
        with pytest.raises((Refusal, Refusals)):
            dump(p.pid, str(tmp_path / "img"), Options())
        assert not (tmp_path / "img").exists()
        _untouched([p.pid] + _descendants(p.pid))
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("mode,reason,detail", [
    ("traceme", "ptraced", "traced by pid"),
    ("badsession", "process-tree", "session"),
    ("outside", "memory-peer-outside", "mapped by"),
    ("memfd-outside", "memory-peer-outside", "held open by"),
])
def test_refused_boundaries(procs, session_killer, tmp_path, mode, reason, detail):  # noqa: F811
    p = _start(procs, [python_exe(), FAMILY, mode], tmp_path)
    session_killer.append(p.pid)
    info = _ready(tmp_path, p)
    session_killer.extend(info["kids"].values())    # badsession: A's own session
    try:
        res = check(p.pid, Options())
        refs = res["refusals"]
    except (Refusal, Refusals) as e:
        refs = [r.as_dict() for r in (e.refusals if isinstance(e, Refusals) else [e])]
    assert any(x["reason"] == reason and detail in x["detail"] for x in refs), refs
    if mode in ("outside", "memfd-outside"):
        assert any(str(info["outside"]) in x["detail"] for x in refs), refs
        procs.adopt(info["outside"])
    with pytest.raises((Refusal, Refusals)):
        dump(p.pid, str(tmp_path / "img"), Options())
    assert not (tmp_path / "img").exists() and not (tmp_path / "img.partial").exists()
    members = [p.pid] + _descendants(p.pid)
    if mode != "traceme":
        _untouched(members)
    else:
        _untouched([p.pid])


def test_clonefiles_child_restored_sharing_the_table(procs, session_killer, tmp_path):  # noqa: F811
    """Once refused (tree-sharing): a child made by clone(CLONE_FILES) comes
    back holding its parent's fd table (more in test_engine_tree_sharing.py)."""
    from engine.pidfd import kcmp
    p = _start(procs, [python_exe(), FAMILY, "clonefiles"], tmp_path)
    session_killer.append(p.pid)
    kid = _ready(tmp_path, p)["kids"]["X"]
    _dump_restore(p.pid, tmp_path / "img", procs)
    assert _stat(kid)["ppid"] == p.pid
    assert kcmp(p.pid, kid, 2, 0, 0) == 0, "the fd table was split"


def test_vfork_child_that_execs_soon_is_waited_for(procs, session_killer, tmp_path):  # noqa: F811
    """A vfork child that execs 300 ms after the check began (a shell
    running a command): the check waits for the exec (tree.VFORK_WAIT) and
    then takes the tree, parent and exec'd child."""
    exe = str(tmp_path / "vforker")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "vforker.c")], check=True,
                   capture_output=True, timeout=60)
    p = _start(procs, [exe, str(tmp_path / "ready"), "300"], tmp_path)
    session_killer.append(p.pid)
    wait_for(lambda: (tmp_path / "ready").exists(), what="the vfork child")
    r = check(p.pid, Options())
    assert r["ok"], r.get("refusals")
    kids = [m for m in r["members"] if m["pid"] != p.pid]
    assert [m["comm"] for m in kids] == ["sleep"], r["members"]
    _untouched([p.pid])


def test_refused_vfork_child_without_waiting_for_it(procs, session_killer, tmp_path):  # noqa: F811
    """A parent held in vfork() by a child that does not exec: no ptrace
    stop can end that wait, so the freeze would hang until the child execs;
    it is refused at once (tree-sharing: they share memory)."""
    exe = str(tmp_path / "vforker")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "vforker.c")], check=True,
                   capture_output=True, timeout=60)
    p = _start(procs, [exe, str(tmp_path / "ready")], tmp_path)
    session_killer.append(p.pid)
    wait_for(lambda: (tmp_path / "ready").exists(), what="the vfork child")
    t0 = time.monotonic()
    with pytest.raises(Refusal) as e:
        check(p.pid, Options())
    assert e.value.reason == "tree-sharing" and "vfork" in e.value.detail
    assert time.monotonic() - t0 < 10, "the freeze waited for the vfork child"
    _untouched([p.pid])


# -- a tree that never holds still ----------------------------------------------------

def test_forking_tree_frozen_consistently(procs, session_killer, tmp_path):  # noqa: F811
    """tests/targets/churn.c forks a short-lived child every few ms and
    reaps them: `ckpt check -t` again and again leaves nothing traced or
    stopped (a child forked mid-freeze is caught and let go too), and a
    dump of it restores, zombies and all, and it goes on forking and
    reaping (its counters advance)."""
    import struct
    exe = str(tmp_path / "churn")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "churn.c")], check=True,
                   capture_output=True, timeout=60)
    state = tmp_path / "churn.state"
    p = _start(procs, [exe, str(state), "3000"], tmp_path)
    session_killer.append(p.pid)

    def counters():
        return struct.unpack("<4Q", state.read_bytes()[:32])
    wait_for(lambda: state.exists() and state.stat().st_size >= 32 and counters()[2] > 5, what="churn")
    for _ in range(8):
        try:
            res = check(p.pid, Options())
            # no child at that instant: judged alone; a child forked meanwhile: judged as a tree
            assert res["ok"] or {r["reason"] for r in res["refusals"]} <= {"process-tree"}, res["refusals"]
        except (Refusal, Refusals) as e:
            rs = e.refusals if isinstance(e, Refusals) else [e]
            assert all(r.reason in ("process-tree", "no-such-process") for r in rs), rs
        for pid in [p.pid] + _descendants(p.pid):
            try:
                assert _status_field(pid, "TracerPid") == "0", pid
                assert _stat(pid)["state"] not in ("t", "T"), pid
            except OSError:
                pass     # a child that exited meanwhile (ENOENT, or ESRCH mid-read)
    c0 = counters()
    wait_for(lambda: counters()[2] > c0[2] + 5, what="churn carrying on after the checks")
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    c1 = counters()
    wait_for(lambda: counters()[1] > c1[1] + 5 and counters()[2] > c1[2] + 5, what="churn forking after the restore")


def test_leave_running_then_restore_refused_while_members_live(procs, session_killer, tmp_path):  # noqa: F811
    """--leave-running lets every member go on (untraced, running); a
    restore while they still hold their PIDs is refused pid-in-use for
    each member, before any process is made."""
    p = _start(procs, [python_exe(), FAMILY, "family"], tmp_path)
    session_killer.append(p.pid)
    info = _ready(tmp_path, p)
    pids = [p.pid] + list(info["kids"].values())
    res = dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    assert res["left_running"] and res["members"] == len(pids)
    _untouched(pids)
    with pytest.raises(Refusals) as e:
        restore(str(tmp_path / "img"), Options())
    assert {r.reason for r in e.value.refusals} == {"pid-in-use"}
    assert {r.pid for r in e.value.refusals} == set(pids)
    (tmp_path / "go").write_text("")
    wait_for(lambda: (tmp_path / "result").exists(), timeout=20, what="the original's result")
    got = json.loads((tmp_path / "result").read_text())
    assert got["token"] == info["token"] and got["status"]["A"] == ["exit", 7]


def test_mlockall_future_of_a_tree_member_told_by_the_batched_reads(procs, tmp_path):
    """A tree's members are read side by side (dumpbatch.read_each): a
    member's mlockall(MCL_FUTURE) is told by its own batch area there, as
    for a process alone, and none of the members gets the page probe."""
    import glob
    from engine import mlockfuture
    from engine.context import Options
    from engine.dump import dump
    setup = """
import ctypes
if os.fork() == 0:
    ctypes.CDLL(None).mlockall(2)            # MCL_FUTURE, nothing mapped since
    open('child-ready', 'w').close()
    while True: time.sleep(1)
while not os.path.exists('child-ready'): time.sleep(0.01)
"""
    p = start_ready_script(procs, tmp_path, setup)
    calls = []
    orig = mlockfuture.probe
    mlockfuture.probe = lambda task: calls.append(task.pid) or orig(task)
    try:
        dump(p.pid, str(tmp_path / "img"), Options())
    finally:
        mlockfuture.probe = orig
    p.wait()
    import re
    flags = []
    for path in glob.glob(str(tmp_path / "img" / "**" / "*.json"), recursive=True):
        flags += [int(x) for x in re.findall(r'"mlock_future":\s*(\d+)', open(path).read())]
    assert sorted(flags) == [0, 2]          # the parent none, the child MCL_FUTURE
    assert calls == []                      # told by the batch areas, no page probe


def test_a_tree_member_in_a_landlock_domain_is_refused_by_its_batched_probe(procs, tmp_path):
    """The Landlock probe (engine/landlock.py) of a tree's members rides in
    their batched reads (dumpbatch.read_each), not in an injected kcmp of
    its own each: a member in a domain is still refused, by name, the
    others not, and nothing is left (no image, the tree runs on)."""
    from engine import landlock
    if not landlock.enabled():
        pytest.skip("Landlock is not running on this kernel")
    setup = """
import ctypes, struct
if os.fork() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(struct.pack('<Q', 1 << 2), 8)    # LANDLOCK_ACCESS_FS_READ_FILE
    rs = libc.syscall(444, attr, 8, 0)
    if rs < 0 or libc.prctl(38, 1, 0, 0, 0) or libc.syscall(446, rs, 0):
        os._exit(3)
    os.close(rs)        # the ruleset's fd: the domain is all that is left
    open('child-ready', 'w').close()
    while True: time.sleep(1)
while not os.path.exists('child-ready'): time.sleep(0.01)
"""
    p = start_ready_script(procs, tmp_path, setup)
    child = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
    injected = []
    orig = landlock.check
    landlock.check = lambda task, status, probed=None: injected.append((task.pid, probed)) or orig(task, status, probed)
    try:
        with pytest.raises((Refusal, Refusals)) as ei:
            dump(p.pid, str(tmp_path / "img"), Options())
    finally:
        landlock.check = orig
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [(r.reason, r.pid) for r in refusals] == [("unsupported-state", child)]
    assert "Landlock" in str(ei.value)
    assert sorted(pid for pid, _ in injected) == sorted([p.pid, child])
    assert all(probed is not None for _, probed in injected)    # every probe made in the batched run
    assert p.poll() is None and not os.path.exists(tmp_path / "img")


def test_a_tree_member_last_on_a_sysv_semaphore_is_refused_by_the_trees_snapshot(procs, tmp_path):
    """A tree's members are judged against one snapshot of the SysV
    semaphores (sysvsem.snapshot, taken once every member is frozen): the
    child that last operated on one is still refused, by name, the parent
    not; nothing is left behind."""
    import ctypes
    from engine import sysvsem
    setup = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
semid = libc.semget(0, 1, 0o1600)            # IPC_PRIVATE, IPC_CREAT
open('semid', 'w').write(str(semid))
if os.fork() == 0:
    op = struct.pack('<HhH', 0, 1, 0x1000)   # sem_num 0, +1, SEM_UNDO
    if libc.semop(semid, ctypes.c_char_p(op), 1):
        os._exit(3)
    open('child-ready', 'w').close()
    while True: time.sleep(1)
while not os.path.exists('child-ready'): time.sleep(0.01)
"""
    p = start_ready_script(procs, tmp_path, setup)
    semid = int((tmp_path / "semid").read_text())
    child = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
    taken = []
    orig = sysvsem.snapshot
    sysvsem.snapshot = lambda: taken.append(1) or orig()
    try:
        with pytest.raises((Refusal, Refusals)) as ei:
            dump(p.pid, str(tmp_path / "img"), Options())
    finally:
        sysvsem.snapshot = orig
        ctypes.CDLL(None).semctl(semid, 0, 0)      # IPC_RMID
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [(r.reason, r.pid) for r in refusals] == [("unsupported-state", child)]
    assert f"SysV semaphore {semid}#0" in str(ei.value)
    assert taken == [1]                             # one snapshot for the two members
    assert p.poll() is None and not os.path.exists(tmp_path / "img")


def test_a_members_syscall_instruction_is_looked_for_once(procs, session_killer, tmp_path, monkeypatch):  # noqa: F811
    """The tree's batched reads (prefetch_injected) find each member's
    syscall instruction; the member's survey uses it, not searching its
    [vdso] again (it was: twice a member)."""
    import engine.dump as single
    p, pids = _swarm_tree(procs, tmp_path, session_killer, 3)
    looked = []
    real = single._syscall_in_vdso
    monkeypatch.setattr(single, "_syscall_in_vdso", lambda task, vmas: (looked.append(task.pid), real(task, vmas))[1])
    res = check(p.pid, Options())
    assert res["ok"], res["refusals"]
    assert sorted(looked) == pids
    monkeypatch.undo()
    _dump_restore(p.pid, tmp_path / "img", procs)
    assert sorted([p.pid] + _descendants(p.pid)) == pids
    assert all(_stat(x)["state"] == "S" for x in pids)
