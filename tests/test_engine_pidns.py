"""ckpt in a child pid namespace, as in a container (`docker exec`): the
target and ckpt inside `unshare --pid --fork --mount-proc` (PID 1 the
test's script, the namespace's init). Round trips keep every pid at its
namespace-level number (clone3 set_tid in the namespace); what cannot be
exact is refused with reason `namespaces` (engine/pidns.py): /proc of
another pid namespace, PID 1 as a target, an image dumped in other
namespaces than the restore's (inside -> outside and back), a target that
unshared its children's pid namespace. A target in a child namespace of
ckpt's (nested) is refused at dump (`unsupported-state`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.pidns import INIT_INO, children_problem, proc_problem, restore_problem
from engine_core_support import (check_counter, compile_target, count_lines, procs, wait_for,  # noqa: F401
                                 world)
from pidns_support import REPO, in_pidns, needs_unshare
from test_engine_thread_timers import TARGET as TIMER_TARGET
from test_engine_threads import NAMES, _check_run, _lines

FAMILY = os.path.join(REPO, "tests", "targets", "family.py")


# -- the rules, as tables ----------------------------------------------------------

PROC = [
    (("43", "43", 43), None),                     # /proc of ckpt's own namespace
    (("7111 43", "7111", 43), "another pid namespace"),     # the parent namespace's /proc
    (("43", "7111", 43), "another pid namespace"),
    ((None, "43", 43), None),                     # no NSpid (Linux < 4.1): /proc/self decides
    ((None, None, 43), "another pid namespace"),  # /proc/self does not resolve: a child namespace's /proc
]


@pytest.mark.parametrize("args, want", PROC)
def test_proc_rules(args, want):
    got = proc_problem(*args)
    assert (got is None) if want is None else (got is not None and want in got), got


def test_children_rules():
    assert children_problem("pid:[1]", "pid:[1]") is None
    assert children_problem(None, "pid:[2]") is None
    assert "a new one" in children_problem("pid:[1]", None)     # unshared, no process in it yet
    assert "unshare --fork" in children_problem("pid:[1]", "pid:[2]")


HOST = {k: v for k, v in INIT_INO.items()} | {"mnt": 4026531841, "net": 4026531840}
CONT = {**HOST, "pid": 4026532181, "mnt": 4026532180}

RESTORE = [
    ((HOST, HOST, True), None),
    ((CONT, CONT, True), None),                   # dumped and restored inside the same container
    ((CONT, HOST, True), "pid:[4026532181] (here pid:[4026531836])"),
    ((HOST, CONT, True), "pid:[4026531836] (here pid:[4026532181])"),
    (({**HOST, "net": 5}, HOST, True), "net:[5]"),
    ((HOST, HOST, False), None),                  # another boot, initial namespaces both sides
    (({**HOST, "mnt": 9}, HOST, False), None),    # mnt/net inodes mean nothing across boots
    ((CONT, CONT, False), "pid (child at dump, child here)"),   # the same inode on another boot
    ((CONT, HOST, False), "pid (child at dump, initial here)"),
    (({**HOST, "user": 7}, HOST, False), "user (child at dump"),
    ((None, HOST, True), None),                   # format 11: restored in the initial pid namespace
    ((None, CONT, True), "older than format 12"),
]


@pytest.mark.parametrize("args, want", RESTORE)
def test_restore_rules(args, want):
    got = restore_problem(*args)
    assert (got is None) if want is None else (got is not None and want in got), got


# -- inside a child pid namespace --------------------------------------------------

@pytest.fixture(scope="module")
def counter_bin(tmp_path_factory):
    return compile_target(tmp_path_factory, "counter", "-pthread")


@pytest.fixture(scope="module")
def threads_bin(tmp_path_factory):
    return compile_target(tmp_path_factory, "threads", "-pthread")


COUNTER_ROUND_TRIP = """
    out, inp, img = {out!r}, {inp!r}, {img!r}
    {setup}
    p = start([{exe!r}, out, inp, "1", {mode!r}])
    lines = lambda: open(out).read().count("\\n") if os.path.exists(out) else 0
    wait_for(lambda: lines() > 20, what="output")
    tasks = sorted(os.listdir(f"/proc/{{p.pid}}/task"))
    before = stat(p.pid)
    rc, msg = ckpt("dump", "-t", p.pid, "-D", img)
    assert rc == 0, msg
    p.wait()
    rc, msg = ckpt("restore", "-D", img)
    assert rc == 0, msg
    n = lines()
    wait_for(lambda: lines() > n + 20, what="output after the restore")
    status = dict(l.split(":", 1) for l in open(f"/proc/{{p.pid}}/status").read().splitlines())
    done({{"pid": p.pid, "tasks": tasks, "tasks_now": sorted(os.listdir(f"/proc/{{p.pid}}/task")),
          "before": before, "after": stat(p.pid), "nspid": status["NSpid"].split(), "restored": msg}})
"""

# the target is 701 here, some other number outside
LAST_PID = """with open("/proc/sys/kernel/ns_last_pid", "w") as f: f.write("700")"""

# A container runtime's /proc (runc's defaults): /proc/sys read-only, some files masked by /dev/null,
# some directories by an empty read-only tmpfs
DOCKER_PROC = """
def mount(*args):
    subprocess.run(["mount", *args], check=True, capture_output=True)
mount("--bind", "/proc/sys", "/proc/sys")
mount("-o", "remount,bind,ro", "/proc/sys")
for f in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/latency_stats"):
    if os.path.exists(f):
        mount("--bind", "/dev/null", f)
for d in ("/proc/acpi", "/proc/scsi"):
    if os.path.isdir(d):
        mount("-t", "tmpfs", "-o", "ro", "tmpfs", d)
assert subprocess.run(["sh", "-c", "echo 1 > /proc/sys/kernel/ns_last_pid"], capture_output=True).returncode
"""


@needs_unshare
@pytest.mark.parametrize("mode", ["sleep", "thread", "docker-proc"])
def test_counter_round_trip_inside(counter_bin, world, tmp_path, mode):  # noqa: F811
    """A process (and one with a thread) dumped and restored inside: the
    same namespace-level pid and tids, its parent the namespace's PID 1
    before and after, its output exact across the restore. docker-proc: in
    a runtime's /proc (read-only /proc/sys, masked files)."""
    docker = mode == "docker-proc"
    setup = DOCKER_PROC.replace("\n", "\n    ") if docker else LAST_PID
    got = in_pidns(COUNTER_ROUND_TRIP.format(out=world["out"], inp=world["in"], img=str(tmp_path / "img"),
                                             exe=counter_bin, mode="sleep" if docker else mode, setup=setup))
    pid = got["pid"]
    assert (docker or pid == 701) and got["nspid"] == [str(pid)], got
    assert got["tasks_now"] == got["tasks"] and len(got["tasks"]) == (2 if mode == "thread" else 1), got
    assert got["before"]["ppid"] == got["after"]["ppid"] == 1, got
    assert (got["after"]["pgid"], got["after"]["sid"]) == (pid, pid), got
    res = check_counter(world["out"], world["in_data"], mib=1)
    assert res["last"] > 40


PYSELF = r"""
import fcntl, os, socket, sys, threading, time
out = open(sys.argv[1], "a", buffering=1)
owned, _ = socket.socketpair()
fcntl.fcntl(owned, fcntl.F_SETOWN, os.getpid())     # an fd owner: a pid of the namespace
def look(who):
    while True:
        tid = threading.get_native_id()
        with open("/proc/thread-self/stat") as f:
            statpid = f.read().split()[0]
        with open("/proc/self/status") as f:
            st = dict(l.split(":", 1) for l in f.read().splitlines())
        out.write(f"{who} {os.getpid()} {os.readlink('/proc/self')} {os.readlink('/proc/thread-self')} "
                  f"{os.getppid()} {tid} {statpid} {st['NSpid'].strip()} {st['PPid'].strip()} "
                  f"{fcntl.fcntl(owned, fcntl.F_GETOWN)}\n")
        time.sleep(0.02)
threading.Thread(target=look, args=("t",), daemon=True).start()
look("m")
"""


@needs_unshare
def test_a_target_reading_its_pids_inside(tmp_path):
    """What a target reads of its own pids (getpid, getppid, gettid,
    /proc/self, /proc/thread-self, NSpid, PPid, an F_SETOWN owner) after the
    restore is what it read before, inside the namespace."""
    src, out = tmp_path / "pyself.py", tmp_path / "out"
    src.write_text(PYSELF)
    got = in_pidns(f"""
        out, img = {str(out)!r}, {str(tmp_path / "img")!r}
        p = start([sys.executable, "-S", {str(src)!r}, out])
        lines = lambda: open(out).read().splitlines() if os.path.exists(out) else []
        wait_for(lambda: len(lines()) > 10, what="output")
        for attempt in range(8):    # caught with its own /proc file open mid-loop: refused by design, again
            rc, msg = ckpt("dump", "-t", p.pid, "-D", img)
            if rc == 0 or "its own files are reopened while the restore traces it" not in msg or \
                    msg.count("refused") != 1:
                break
            time.sleep(0.05)
        assert rc == 0, msg
        p.wait()
        n = len(lines())
        rc, msg = ckpt("restore", "-D", img)
        assert rc == 0, msg
        wait_for(lambda: len(lines()) > n + 10, what="output after the restore")
        done({{"pid": p.pid, "n": n, "lines": lines()}})
    """)
    before = {ln.split()[0]: ln.split()[1:] for ln in got["lines"][:got["n"]] if len(ln.split()) == 10}
    after = {ln.split()[0]: ln.split()[1:] for ln in got["lines"][got["n"] + 2:] if len(ln.split()) == 10}
    pid = str(got["pid"])
    assert before["m"][:3] == [pid, pid, f"{pid}/task/{pid}"] and before["m"][3] == "1", before
    assert before["m"][8] == pid and set(before) == {"m", "t"}, before
    assert before == after, (before, after)


@needs_unshare
def test_threads_inside(threads_bin, tmp_path):
    """The threads target (blocked in a mutex, a condition variable, a join,
    futex, poll, read; each checks its own TID against the one it recorded)
    dumped and restored inside."""
    out, go = tmp_path / "out", tmp_path / "go"
    got = in_pidns(f"""
        out, go, img = {str(out)!r}, {str(go)!r}, {str(tmp_path / "img")!r}
        p = start([{threads_bin!r}, out, go], cwd={str(tmp_path)!r})
        lines = lambda: open(out).read().splitlines() if os.path.exists(out) else []
        wait_for(lambda: "ready" in lines() and sum(l.startswith("tid ") for l in lines()) == {len(NAMES)},
                 what="the threads")
        wait_for(lambda: sum(l.startswith("tick ") for l in lines()) >= 3, what="ticks")
        tids = sorted(os.listdir(f"/proc/{{p.pid}}/task"))
        rc, msg = ckpt("dump", "-t", p.pid, "-D", img)
        assert rc == 0, msg
        p.wait()
        rc, msg = ckpt("restore", "-D", img)
        assert rc == 0, msg
        assert sorted(os.listdir(f"/proc/{{p.pid}}/task")) == tids
        open(go, "w").close()
        wait_for(lambda: "done" in lines(), what="done")
        done({{"tids": tids}})
    """)
    tids = {ln.split()[1]: int(ln.split()[2]) for ln in _lines(out) if ln.startswith("tid ")}
    _check_run(out, tids)


FAMILY_INSIDE = """
    cwd, img = {cwd!r}, {img!r}
    p = start([sys.executable, {family!r}, {mode!r}], cwd=cwd)
    wait_for(lambda: os.path.exists(os.path.join(cwd, "ready")) or p.poll() is not None, what="the family")
    info = json.load(open(os.path.join(cwd, "ready")))
    pids = [p.pid] + list(info["kids"].values())
    before = {{pid: stat(pid) for pid in pids}}
    rc, msg = ckpt("dump", "-t", p.pid, "-D", img)
    assert rc == 0, msg
    p.wait()
    gone(pids)
    rc, msg = ckpt("restore", "-D", img)
    assert rc == 0, msg
    after = {{pid: stat(pid) for pid in pids}}
    open(os.path.join(cwd, "go"), "w").close()
    wait_for(lambda: os.path.exists(os.path.join(cwd, "result")), timeout=20, what="the result")
    done({{"pid": p.pid, "info": info, "before": before, "after": after,
          "result": json.load(open(os.path.join(cwd, "result")))}})
"""


@needs_unshare
def test_family_tree_inside(tmp_path):
    """A tree (-t) with zombies, groups, a session of its own, shared files
    and memory, dumped and restored inside: every member at its pid, parent,
    group and session; the zombies' exit statuses reaped after."""
    got = in_pidns(FAMILY_INSIDE.format(cwd=str(tmp_path), img=str(tmp_path / "img"), family=FAMILY,
                                        mode="family"))
    kids = got["info"]["kids"]
    for pid, now in got["after"].items():
        was = got["before"][pid]
        assert (now["ppid"], now["pgid"], now["sid"]) == (was["ppid"], was["pgid"], was["sid"]), (pid, was, now)
        assert (now["state"] == "Z") == (int(pid) in (kids["A"], kids["C"])), (pid, now)
    assert got["before"][str(got["pid"])]["ppid"] == 1
    res = got["result"]
    assert res["pid"] == got["pid"] and res["token"] == got["info"]["token"]
    assert res["status"] == {"A": ["exit", 7], "C": ["signal", 15], "B": ["exit", 3], "D": ["exit", 4],
                             "E": ["exit", 5], "F": ["exit", 6], "G": ["exit", 8]}
    assert res["groups"] == [True, True, True] and res["shm"] == "child" and res["private"] is True


@needs_unshare
def test_socketpairs_with_queued_messages_inside(tmp_path):
    """Messages queued between tree members, sent without credentials, and
    SO_PEERCRED naming the pair's maker, inside: a message without
    credentials peeks as pid 0 with the overflow ids, as one of a sender
    outside the namespace would; SO_PASSPIDFD tells them apart (SCM_PIDFD
    for a sender pid only). Restored exactly."""
    got = in_pidns(FAMILY_INSIDE.format(cwd=str(tmp_path), img=str(tmp_path / "img"), family=FAMILY,
                                        mode="sockpair"))
    assert got["result"] == {"token": got["info"]["token"], "first": "to-parent", "dgrams": ["d1", "d2"],
                             "reply": f"child-got:to-child|p1|queued|{got['pid']}"}, got


@needs_unshare
@pytest.mark.parametrize("sender", ["live", "dead"])
def test_a_message_from_a_sender_outside_is_refused(tmp_path, sender):
    """A message whose sender is outside the namespace (its pid 0 there),
    running as the overflow ids, queued after a credential-less one, in a
    socketpair the target holds both ends of: both peek as pid 0 with the
    overflow ids; the one with a sender is still refused
    (`peer-pid-in-use`), the sender alive or gone."""
    import socket
    import struct
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        a.send(b"credless")

        def send_with_creds():      # explicit SCM_CREDENTIALS (SO_PASSCRED would autobind the socket)
            # the overflow ids (root may claim any): inside, exactly what a message without credentials peeks as
            creds = struct.pack("iII", os.getpid(), *(int(open(f"/proc/sys/kernel/overflow{k}").read())
                                                      for k in ("uid", "gid")))
            a.sendmsg([b"from-outside"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
        if sender == "live":
            send_with_creds()
        else:
            pid = os.fork()
            if pid == 0:
                send_with_creds()
                os._exit(0)
            os.waitpid(pid, 0)
        got = in_pidns(f"""
            p = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"], close_fds=True,
                                 pass_fds=({a.fileno()}, {b.fileno()}), start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.close({a.fileno()})
            os.close({b.fileno()})
            wait_for(lambda: len(os.listdir(f"/proc/{{p.pid}}/fd")) >= 5, what="the target")
            rc, msg = ckpt("dump", "-t", p.pid, "-D", {str(tmp_path / "img")!r})
            done({{"rc": rc, "msg": msg, "alive": p.poll() is None}})
        """, pass_fds=(a.fileno(), b.fileno()))
    finally:
        a.close()
        b.close()
    assert got["rc"] == 3 and "peer-pid-in-use" in got["msg"] and "pid 0" in got["msg"], got["msg"]
    assert "message 2 of 2" in got["msg"] and "message 1 of" not in got["msg"], got["msg"]
    assert got["alive"]


@needs_unshare
def test_a_timer_notifying_a_thread_inside(tmp_path):
    """A POSIX timer notifying one thread by its TID (SIGEV_THREAD_ID): the
    namespace's TID, the same after the restore, and it keeps waking it."""
    (tmp_path / "t.py").write_text(TIMER_TARGET)
    got = in_pidns(f"""
        cwd, img = {str(tmp_path)!r}, {str(tmp_path / "img")!r}
        p = start([sys.executable, "t.py"], cwd=cwd)
        count = lambda: int(open(os.path.join(cwd, "count")).read().split()[0]) \\
            if os.path.exists(os.path.join(cwd, "count")) else 0
        wait_for(lambda: os.path.exists(os.path.join(cwd, "ready")) and count() > 0, what="the timer firing")
        tid = int(open(os.path.join(cwd, "ready")).read())
        timers = open(f"/proc/{{p.pid}}/timers").read()
        for attempt in range(8):    # a freeze that meets the timer's signal pending is refused by design: again
            rc, msg = ckpt("dump", "-t", p.pid, "-D", img)
            if rc == 0 or "POSIX timer" not in msg or msg.count("refused") != 1:
                break
        assert rc == 0, msg
        p.wait()
        rc, msg = ckpt("restore", "-D", img)
        assert rc == 0, msg
        n = count()
        wait_for(lambda: count() >= n + 3, timeout=10, what="the timer after the restore")
        done({{"tid": tid, "timers": timers, "timers_now": open(f"/proc/{{p.pid}}/timers").read(),
              "tids_now": sorted(os.listdir(f"/proc/{{p.pid}}/task"))}})
    """)
    assert f"tid.{got['tid']}" in got["timers"] and got["timers_now"] == got["timers"], got
    assert str(got["tid"]) in got["tids_now"]


@needs_unshare
def test_a_pidfd_inside_is_restored_naming_the_same_pid(tmp_path):
    """A pidfd naming a process of the namespace, dumped and restored by a
    ckpt inside it (fdinfo shows that namespace's PID, one level): the
    restored pidfd names the same PID there (engine/fds/pidfd.py)."""
    got = in_pidns(f"""
        img = {str(tmp_path / "img")!r}
        p = start([sys.executable, "-S", "-c",
                   "import os, time; os.dup2(os.pidfd_open(os.getpid()), 9); time.sleep(60)"])
        wait_for(lambda: os.path.exists(f"/proc/{{p.pid}}/fd/9"), what="the pidfd")
        rc, msg = ckpt("dump", "-t", p.pid, "-D", img)
        assert rc == 0, msg
        p.wait()
        gone([p.pid])
        rc, msg = ckpt("restore", "-D", img)
        assert rc == 0, msg
        info = open(f"/proc/{{p.pid}}/fdinfo/9").read()
        os.kill(p.pid, 9)
        done({{"pid": p.pid, "info": info}})
    """)
    assert f"Pid:\t{got['pid']}\n" in got["info"] and f"NSpid:\t{got['pid']}\n" in got["info"], got


def test_check_restore_reads_the_record():
    """The manifest record's types, and format 12's having one."""
    from engine.errors import Refusal
    from engine.pidns import check_restore, record
    mine = record()
    check_restore({"namespaces": mine}, 12, True)
    for meta, fmt in (({}, 12), ({"namespaces": {"pid": "x"}}, 12), ({"namespaces": {"nope": 1, "pid": 1}}, 12),
                      ({"namespaces": []}, 12), ({"namespaces": {"mnt": 5}}, 12)):
        with pytest.raises(Refusal) as ei:
            check_restore(meta, fmt, True)
        assert ei.value.reason == "image-invalid", meta
    if mine["pid"] == INIT_INO["pid"]:
        check_restore({}, 11, True)      # format 11: no record, restored in the initial pid namespace
    with pytest.raises(Refusal) as ei:
        check_restore({"namespaces": {**mine, "pid": mine["pid"] + 1}}, 12, True)
    assert ei.value.reason == "namespaces"


def _container(tmp_path):
    """A namespace whose init (a session leader, as runc makes it) only
    sleeps: (the unshare Popen, the init's host pid)."""
    init = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-S", "-c",
                             "import os, time; os.setsid(); time.sleep(120)"], close_fds=True,
                            start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def child():
        with open(f"/proc/{init.pid}/task/{init.pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else None
    inner = wait_for(child, what="the namespace's init")
    wait_for(lambda: os.getsid(inner) == inner, what="the init's setsid")
    return init, inner


def _exec_in(inner: int, *argv):
    """nsenter into the namespace's pid and mount namespaces, as docker exec does."""
    return ["nsenter", "-t", str(inner), "--pid", "--mount", f"--wd={REPO}", "--", *map(str, argv)]


@needs_unshare
def test_docker_exec_style_round_trip(counter_bin, world, tmp_path):  # noqa: F811
    """Target and ckpt each entered into the namespace from outside (docker
    exec): the target's parent is outside (ppid 0 there), ckpt's too. Dumped
    and restored at its namespace pid, the restored process the init's child
    (the namespace's reaper), its output exact."""
    init, inner = _container(tmp_path)
    try:
        t = subprocess.Popen(_exec_in(inner, "setsid", counter_bin, world["out"], world["in"], "1"), close_fds=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: count_lines(world["out"]) > 5, what="output")
        with open(f"/proc/{t.pid}/task/{t.pid}/children") as f:
            host_pid = int(f.read().split()[0])
        with open(f"/proc/{host_pid}/status") as f:
            nspid = [ln.split()[1:] for ln in f if ln.startswith("NSpid:")][0]
        pid = int(nspid[-1])
        assert len(nspid) == 2 and pid != host_pid
        r = subprocess.run(_exec_in(inner, sys.executable, "-S", "-m", "engine", "dump", "-t", pid, "-D",
                                    tmp_path / "img"), capture_output=True, text=True, close_fds=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        t.wait()
        r = subprocess.run(_exec_in(inner, sys.executable, "-S", "-m", "engine", "restore", "-D", tmp_path / "img"),
                           capture_output=True, text=True, close_fds=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        n = count_lines(world["out"])
        wait_for(lambda: count_lines(world["out"]) > n + 20, what="output after the restore")
        with open(f"/proc/{inner}/task/{inner}/children") as f:
            kids = [int(k) for k in f.read().split()]
        assert len(kids) == 1, kids
        with open(f"/proc/{kids[0]}/status") as f:
            assert [ln.split()[1:] for ln in f if ln.startswith("NSpid:")][0][-1] == str(pid)
        check_counter(world["out"], world["in_data"], mib=1)
    finally:
        init.kill()
        init.wait()


# -- what stays refused ------------------------------------------------------------

def _ckpt(*args, **kw):
    return subprocess.run([sys.executable, "-S", "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, close_fds=True, timeout=120, **kw)


@needs_unshare
def test_the_namespace_init_is_refused(tmp_path):
    """PID 1 of a namespace ckpt entered from outside (nsenter, docker exec:
    not ckpt's ancestor) is refused: its kill would end the namespace (ckpt
    with it) and no restore can make a PID 1 again. The init leads its
    session, as a container's does (runc). The init lives on."""
    init, inner = _container(tmp_path)
    try:
        r = subprocess.run(_exec_in(inner, sys.executable, "-S", "-m", "engine", "dump", "-t", 1, "-D",
                                    tmp_path / "img"), capture_output=True, text=True, close_fds=True, timeout=120)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "namespaces" in r.stderr and "PID 1" in r.stderr, r.stderr
        assert init.poll() is None and os.path.exists(f"/proc/{inner}"), "the namespace ended"
        assert not (tmp_path / "img").exists()
    finally:
        init.kill()
        init.wait()


@needs_unshare
def test_proc_of_the_parent_namespace_is_refused(counter_bin, world, tmp_path):  # noqa: F811
    """`unshare --pid --fork` without --mount-proc: ckpt's /proc is the
    host's, where the target's number names another process. Refused
    (dump and restore) before anything is read."""
    got = in_pidns(f"""
        p = start([{counter_bin!r}, {world['out']!r}, {world['in']!r}, "1"])
        time.sleep(0.2)
        d = ckpt("dump", "-t", p.pid, "-D", {str(tmp_path / "img")!r})
        r = ckpt("restore", "-D", {str(tmp_path / "img")!r})
        alive = p.poll() is None
        p.kill()
        done({{"dump": d, "restore": r, "alive": alive}})
    """, mount_proc=False)
    for what in ("dump", "restore"):
        rc, out = got[what]
        assert rc == 3 and "namespaces: /proc is mounted for another pid namespace" in out, (what, out)
    assert got["alive"]


UNSHARE_THEN_EXEC = r"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x20000000) != 0:     # CLONE_NEWPID, no fork: as unshare --pid
    sys.exit(5)
os.execv(sys.argv[1], sys.argv[1:])
"""


@needs_unshare
def test_unshare_without_fork_is_refused(counter_bin, world, tmp_path, procs):  # noqa: F811
    """ckpt run right after unshare(CLONE_NEWPID) (`unshare --pid` without
    --fork): its restorer would be PID 1 of a new namespace, the process
    made in it and killed with it when the restorer exits. Refused; then
    restored where it was dumped."""
    p = procs.start([counter_bin, world["out"], world["in"], "1"])
    wait_for(lambda: count_lines(world["out"]) > 5, what="output")
    r = _ckpt("dump", "-t", p.pid, "-D", tmp_path / "img")
    assert r.returncode == 0, r.stderr
    p.wait()
    r = subprocess.run([sys.executable, "-S", "-c", UNSHARE_THEN_EXEC, sys.executable, "-S", "-m", "engine",
                        "restore", "-D", str(tmp_path / "img")], capture_output=True, text=True, cwd=REPO,
                       close_fds=True, timeout=120)
    if r.returncode == 0:
        procs.adopt(p.pid)
    assert r.returncode == 3 and "namespaces" in r.stderr and "unshare --fork" in r.stderr, r.stdout + r.stderr
    r = _ckpt("restore", "-D", tmp_path / "img")
    assert r.returncode == 0, r.stderr
    procs.adopt(p.pid)
    n = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) > n + 10, what="output after the restore")
    check_counter(world["out"], world["in_data"], mib=1)


@needs_unshare
def test_dumped_inside_restored_outside_is_refused(counter_bin, world, tmp_path, procs):  # noqa: F811
    """The image's pids are numbers of the namespace it was dumped in: a
    restore on the host (where that number was free) would have made the
    process a host process. Refused, and no process made."""
    img = tmp_path / "img"
    got = in_pidns(f"""
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write({_free_pid_base()!r})
        p = start([{counter_bin!r}, {world['out']!r}, {world['in']!r}, "1"])
        time.sleep(0.2)
        rc, msg = ckpt("dump", "-t", p.pid, "-D", {str(img)!r})
        assert rc == 0, msg
        p.wait()
        done({{"pid": p.pid}})
    """)
    assert not os.path.exists(f"/proc/{got['pid']}"), "the pid is not free on the host: no proof"
    r = _ckpt("restore", "-D", img)
    if r.returncode == 0:
        procs.adopt(got["pid"])
    assert r.returncode == 3 and "namespaces: dumped in other namespaces" in r.stderr and "pid:[" in r.stderr, \
        r.stdout + r.stderr
    assert not os.path.exists(f"/proc/{got['pid']}")


@needs_unshare
def test_dumped_outside_restored_inside_is_refused(counter_bin, world, tmp_path, procs):  # noqa: F811
    """And back: a host process's image restored inside a namespace (its pid
    free there) would be a process of that namespace. Refused."""
    p = procs.start([counter_bin, world["out"], world["in"], "1"])
    wait_for(lambda: count_lines(world["out"]) > 5, what="output")
    r = _ckpt("dump", "-t", p.pid, "-D", tmp_path / "img")
    assert r.returncode == 0, r.stderr
    p.wait()
    got = in_pidns(f"""
        rc, msg = ckpt("restore", "-D", {str(tmp_path / "img")!r})
        done({{"rc": rc, "msg": msg, "there": os.path.exists("/proc/{p.pid}")}})
    """)
    assert got["rc"] == 3 and "namespaces: dumped in other namespaces" in got["msg"], got
    assert not got["there"]
    r = _ckpt("restore", "-D", tmp_path / "img")     # where it was dumped: restored
    assert r.returncode == 0, r.stderr
    procs.adopt(p.pid)
    n = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) > n + 10, what="output after the restore")
    check_counter(world["out"], world["in_data"], mib=1)


@needs_unshare
def test_a_target_in_a_child_namespace_is_refused(counter_bin, world):  # noqa: F811
    """ckpt outside, the target inside a child pid namespace (nested): a
    restore by this ckpt would make it in ckpt's namespace. Refused at dump."""
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", counter_bin, world["out"], world["in"],
                              "1"], close_fds=True, start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: count_lines(world["out"]) > 5, what="output")
        with open(f"/proc/{outer.pid}/task/{outer.pid}/children") as f:
            target = int(f.read().split()[0])
        r = _ckpt("check", "-t", target)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "unsupported-state" in r.stdout + r.stderr and "pid" in r.stdout + r.stderr, r.stdout + r.stderr
        assert "namespaces" in r.stdout + r.stderr
    finally:
        outer.kill()
        outer.wait()


UNSHARE_PID = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x20000000) != 0:       # CLONE_NEWPID: the next child would be PID 1 of a new namespace
    sys.exit(5)
open("ready", "w").close()
while True:
    time.sleep(0.05)
"""


UNSHARE_PID_THREAD = r"""
import ctypes, os, threading, time
libc = ctypes.CDLL(None, use_errno=True)
def unshared():
    if libc.unshare(0x20000000) != 0:
        os._exit(5)
    open("ready", "w").close()
    while True:
        time.sleep(0.05)
threading.Thread(target=unshared, daemon=True).start()
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("where", ["process", "thread"])
def test_a_target_that_unshared_its_childrens_pid_namespace_is_refused(tmp_path, procs, where):  # noqa: F811
    """unshare(CLONE_NEWPID) without a fork since (the process, or one of
    its threads): its next child is PID 1 of a new namespace. A restore
    would make it in the restorer's pid_for_children. Refused
    (`unsupported-state`, `threads`)."""
    (tmp_path / "t.py").write_text(UNSHARE_PID if where == "process" else UNSHARE_PID_THREAD)
    p = procs.start([sys.executable, "-S", str(tmp_path / "t.py")], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the target")
    assert p.poll() is None
    r = _ckpt("check", "-t", p.pid)
    out = r.stdout + r.stderr
    assert r.returncode == 3 and ("pid_for_children namespace" in out or "pid_for_children (a new one" in out), out
    assert ("unsupported-state" if where == "process" else "threads: thread") in out, out


AS_INIT = r"""
import os, subprocess, sys, time
repo, counter, out, inp, img, command = sys.argv[1:7]
p = subprocess.Popen([counter, out, inp, "1"], close_fds=True, start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while not os.path.exists(out) or os.path.getsize(out) < 100:
    time.sleep(0.01)
if command == "restore":
    r = subprocess.run([sys.executable, "-S", "-m", "engine", "dump", "-t", str(p.pid), "-D", img], cwd=repo,
                       close_fds=True)
    assert r.returncode == 0
    p.wait()
    args = ["restore", "-D", img]
else:
    args = ["dump", "-t", str(p.pid), "-D", img, "--leave-running"]
os.chdir(repo)
os.execv(sys.executable, [sys.executable, "-S", "-m", "engine", *args])     # ckpt as PID 1
"""


@needs_unshare
@pytest.mark.parametrize("command", ["restore", "dump --leave-running"])
def test_ckpt_as_the_namespace_init_leaves_nothing_behind(counter_bin, world, tmp_path, command):  # noqa: F811
    """ckpt run as PID 1 of its namespace (`unshare --pid --fork ckpt
    restore`): the process it restores or leaves running would be killed
    with the namespace the moment ckpt exits ("restored", and gone).
    Refused."""
    r = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-S", "-c",
                        AS_INIT, REPO, counter_bin, world["out"], world["in"], str(tmp_path / "img"),
                        command.split()[0]], capture_output=True, text=True, close_fds=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "namespaces: ckpt is PID 1 of its pid namespace" in r.stderr, r.stderr
    if command != "restore":
        assert not (tmp_path / "img").exists()


def _free_pid_base() -> str:
    """A number N such that N+1 .. N+20 are free on the host now (the target
    inside gets N+1)."""
    top = int(open("/proc/sys/kernel/pid_max").read())
    for base in range(top - 5000, 1000, -997):
        if not any(os.path.exists(f"/proc/{base + i}") for i in range(1, 21)):
            return str(base)
    pytest.skip("no run of free pids")
