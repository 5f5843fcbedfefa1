"""pidfds (engine/fds/pidfd.py): of the process itself, of a member of its
tree, of dead processes; what is refused. The worker judges itself after
the restore: each pidfd names the process it named (fdinfo Pid, a signal
sent through it, waitid on it), O_NONBLOCK kept, pidfds of one dead
process still share their inode and those of two do not (pidfs), and on
6.15+ each dead process's wait status as PIDFD_GET_INFO reports it.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from fds_support import ask_verdict, start_worker
from test_engine_tree import _dump_restore, session_killer  # noqa: F401

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="python without os.pidfd_open")]

COMMON = r"""
import ctypes, errno, fcntl, json, os, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
NR_SEND = 424
def send(fd, sig):
    return libc.syscall(NR_SEND, fd, sig, None, 0) == 0 or -ctypes.get_errno()
def named(fd):
    for line in open(f"/proc/self/fdinfo/{fd}"):
        if line.startswith("Pid:"):
            return int(line.split()[1])
def exit_status(fd):
    buf = bytearray(64); struct.pack_into("Q", buf, 0, 8)
    try:
        fcntl.ioctl(fd, 0xC040FF0B, buf)
    except OSError as e:
        return "unsupported" if e.errno in (errno.ENOTTY, errno.EINVAL) else f"errno {e.errno}"
    return struct.unpack_from("i", buf, 60)[0] if struct.unpack_from("Q", buf, 0)[0] & 8 else "no exit info"
def put(fd, at):
    os.dup2(fd, at)
    os.close(fd)
def mark_ready(obj):
    with open("ready.tmp", "w") as f:
        json.dump(obj, f)
    os.rename("ready.tmp", "ready")
def dead(how):
    pid = os.fork()
    if pid == 0:
        if how == "exit":
            os._exit(7)
        time.sleep(60); os._exit(0)
    fds = [os.pidfd_open(pid), os.pidfd_open(pid, os.O_NONBLOCK)]
    if how == "kill":
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return fds
"""

# The root holds pidfds of itself (O_NONBLOCK, dup'ed to 45), of its child
# (watched by an epoll instance), of two dead processes (two pidfds each);
# the child holds one of its parent and one of the first dead process.
TREE = COMMON + r"""
import select
r, w = os.pipe()
kid = os.fork()
if kid == 0:
    os.close(w)
    me = os.getppid()
    put(os.pidfd_open(me), 50)
    os.read(r, 1)        # the dead ones: made by the parent, opened here too?
    signal.signal(signal.SIGUSR2, lambda *_: None)
    while True:
        time.sleep(1)
os.close(r)
put(os.pidfd_open(os.getpid(), os.O_NONBLOCK), 40)
os.dup2(40, 45)
put(os.pidfd_open(kid), 41)
a, b = dead("exit")
os.dup2(a, 42); os.dup2(b, 43)
c, d = dead("kill")
os.dup2(c, 44); os.dup2(d, 46)
for x in (a, b, c, d):
    os.close(x)
ep = select.epoll()
ep.register(41, select.EPOLLIN)
os.dup2(ep.fileno(), 47)  # (the epoll object keeps its own fd too)
before = {"ino42": os.fstat(42).st_ino, "exit42": exit_status(42), "exit44": exit_status(44)}
got_usr2 = []
def verdict(*_):
    v = {"named": {fd: named(fd) for fd in (40, 41, 42, 43, 44, 45, 46)},
         "nonblock": {fd: bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK) for fd in (40, 41, 42, 43, 44, 46)},
         "same_dead": os.fstat(42).st_ino == os.fstat(43).st_ino,
         "two_dead_differ": os.fstat(42).st_ino != os.fstat(44).st_ino,
         "self_same": os.fstat(40).st_ino == os.fstat(45).st_ino,
         "exit42": exit_status(42), "exit44": exit_status(44), "before": before,
         "send_dead": send(42, 0), "send_self": send(40, 0)}
    v["epoll_quiet"] = select.epoll.fromfd(os.dup(47)).poll(0) == []
    os.kill(kid, signal.SIGKILL)      # its pidfd becomes readable: the epoll instance must see it
    v["epoll_after_kill"] = [fd for fd, _ in select.epoll.fromfd(os.dup(47)).poll(5)]
    v["waitid"] = os.waitid(os.P_PIDFD, 41, os.WEXITED).si_status if hasattr(os, "P_PIDFD") else "n/a"
    with open("verdict.json", "w") as f:
        json.dump(v, f)
signal.signal(signal.SIGUSR1, verdict)
mark_ready({"kid": kid})
while True:
    time.sleep(1)
"""


def test_pidfds_of_self_child_and_dead_processes_restored(procs, session_killer, tmp_path):  # noqa: F811
    p, ready = start_worker(procs, tmp_path, [], TREE, what="the pidfd worker")
    session_killer.append(p.pid)
    kid = ready["kid"]
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] == 2
    with open(f"/proc/{kid}/fdinfo/50") as f:
        assert f"Pid:\t{p.pid}\n" in f.read(), "the child's pidfd of its parent"
    v = ask_verdict(p.pid, tmp_path)
    named = {int(k): x for k, x in v["named"].items()}
    assert named == {40: p.pid, 41: kid, 42: -1, 43: -1, 44: -1, 45: p.pid, 46: -1}
    assert v["nonblock"] == {"40": True, "41": False, "42": False, "43": True, "44": False, "46": True}
    assert v["self_same"], "fd 45, a dup of 40, is another file after the restore"
    assert v["send_self"] is True
    assert v["send_dead"] == -3, "a signal through a dead process's pidfd must fail with ESRCH"
    assert v["epoll_quiet"], "the epoll instance saw its child's pidfd ready before the child died"
    assert v["epoll_after_kill"] == [41], "the epoll instance does not watch the restored pidfd of the child"
    assert v["waitid"] in (signal.SIGKILL, "n/a")
    if v["before"]["exit42"] != "unsupported":     # pidfs with PIDFD_INFO_EXIT (6.15+): what it showed, it shows
        assert (v["exit42"], v["exit44"]) == (7 << 8, signal.SIGKILL) == (v["before"]["exit42"],
                                                                          v["before"]["exit44"])
        assert v["same_dead"] and v["two_dead_differ"]


OUTSIDE = COMMON + r"""
put(os.pidfd_open(int(sys.argv[1])), 40)
mark_ready({})
while True:
    time.sleep(1)
"""


def test_pidfd_of_a_process_outside_the_dump_refused(procs, tmp_path):  # noqa: F811
    other = procs.start(["sleep", "60"])
    p, _ = start_worker(procs, tmp_path, [str(other.pid)], OUTSIDE, what="the pidfd worker")
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    rs = e.value.refusals if isinstance(e.value, Refusals) else [e.value]
    assert [(r.reason, r.fd) for r in rs] == [("pidfd-outside", 40)]
    assert str(other.pid) in rs[0].detail
    assert not (tmp_path / "img").exists() or not (tmp_path / "img" / "manifest.json").exists()
    assert p.poll() is None, "a refused dump harmed its target"


THREAD = COMMON + r"""
put(os.pidfd_open(os.getpid(), os.O_EXCL), 40)    # PIDFD_THREAD
mark_ready({})
while True:
    time.sleep(1)
"""

CORE = COMMON + r"""
pid = os.fork()
if pid == 0:
    time.sleep(60); os._exit(0)
put(os.pidfd_open(pid), 40)
os.kill(pid, signal.SIGABRT)
os.waitpid(pid, 0)
mark_ready({"exit": exit_status(40)})
while True:
    time.sleep(1)
"""


def test_thread_pidfd_refused(procs, tmp_path):  # noqa: F811
    p, _ = start_worker(procs, tmp_path, [], THREAD, what="the pidfd worker")
    with pytest.raises(Refusal) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    assert (e.value.reason, e.value.fd) == ("unsupported-fd", 40) and "PIDFD_THREAD" in e.value.detail
    assert p.poll() is None


def test_pidfd_of_a_process_that_died_of_a_core_signal(procs, tmp_path):  # noqa: F811
    """Refused where the kernel shows how it died (the restore would have
    to dump a core to die so); elsewhere nothing can see it and it is
    restored as any dead process."""
    p, ready = start_worker(procs, tmp_path, [], CORE, what="the pidfd worker")
    if ready["exit"] == "unsupported":
        pytest.skip("this kernel shows no exit status through a pidfd (PIDFD_INFO_EXIT, 6.15+)")
    with pytest.raises(Refusal) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    assert (e.value.reason, e.value.fd) == ("unsupported-fd", 40) and "dumps core" in e.value.detail
    assert p.poll() is None


SELF = COMMON + r"""
put(os.pidfd_open(os.getpid()), 40)
mark_ready({})
signal.signal(signal.SIGUSR1, lambda *_: open("verdict.json", "w").write(json.dumps({"named": named(40)})))
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("edit, why", [
    ({"pid": 1}, "which this restore does not make"),
    ({"pid": "1"}, "pidfd record"),
    ({"pid": -1}, "pidfd record"),                          # dead, without its group
    ({"pid": -1, "dead": 5, "exit": 6 << 16}, "pidfd record"),  # a status no death gives
    ({"pid": -1, "dead": 5, "exit": signal.SIGSEGV}, "pidfd record"),
    ({"pid": -1, "dead": 5, "exit": signal.SIGSTOP}, "pidfd record"),
    ({"flags": os.O_RDWR | os.O_EXCL}, "file flags"),
])
def test_hostile_pidfd_records_are_image_invalid(procs, tmp_path, edit, why):  # noqa: F811
    from engine.context import RestoreContext
    from engine.fds import handler
    from engine.image import ImageReader
    p, _ = start_worker(procs, tmp_path, [], SELF, what="the pidfd worker")
    img = tmp_path / "img"
    dump(p.pid, str(img), Options(leave_running=True))
    assert ask_verdict(p.pid, tmp_path)["named"] == p.pid
    reader = ImageReader(str(img))
    try:
        recs = reader.read_json("fds.json")
        ctx = RestoreContext(options=Options(), image=reader, same_node=True, records=recs, pid=p.pid)
        good = next(r for r in recs if r["fd"] == 40)
        assert good["kind"] == "pidfd" and good["pid"] == p.pid
        handler("pidfd").validate(good, ctx)
        with pytest.raises(Refusal) as e:
            handler("pidfd").validate(dict(good, **edit), ctx)
        assert e.value.reason == "image-invalid" and why in e.value.detail
    finally:
        reader.close()


DEAD_AND_SELF = COMMON + r"""
put(os.pidfd_open(os.getpid()), 40)
a, b = dead("exit")
put(a, 42)
os.close(b)
mark_ready({})
signal.signal(signal.SIGUSR1, lambda *_: open("verdict.json", "w").write(
    json.dumps({"named": {fd: named(fd) for fd in (40, 42)}})))
while True:
    time.sleep(1)
"""


def test_mutant_revive_dead_pidfd_changes_only_what_the_dead_pidfd_names(procs, tmp_path):  # noqa: F811
    """harness/mutants.py revive-dead-pidfd: the image edit turns the dead
    process's pidfd into one of the process itself, and nothing else."""
    from engine.restore import restore
    from harness import mutants
    p, _ = start_worker(procs, tmp_path, [], DEAD_AND_SELF, what="the pidfd worker")
    img = str(tmp_path / "img")
    dump(p.pid, img, Options())
    p.wait()
    assert "pidfd fd 42 of a dead process" in mutants.apply_edit("revive-dead-pidfd", img)
    out = restore(img, Options())
    procs.adopt(out["pid"])
    assert ask_verdict(p.pid, tmp_path)["named"] == {"40": p.pid, "42": p.pid}


ZOMBIE = COMMON + r"""
kid = os.fork()
if kid == 0:
    os._exit(5)
put(os.pidfd_open(kid), 40)
while open(f"/proc/{kid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
mark_ready({"kid": kid})
def verdict(*_):
    v = {"named": named(40)}
    r = os.waitid(os.P_PIDFD, 40, os.WEXITED)
    v.update(pid=r.si_pid, status=r.si_status)
    open("verdict.json", "w").write(json.dumps(v))
signal.signal(signal.SIGUSR1, verdict)
while True:
    time.sleep(1)
"""


@pytest.mark.skipif(not hasattr(os, "P_PIDFD"), reason="python without os.P_PIDFD")
def test_pidfd_of_a_zombie_child_reaps_it_after_the_restore(procs, session_killer, tmp_path):  # noqa: F811
    """A zombie member (a child not reaped yet) is made again; its parent's
    pidfd names it, and waitid(P_PIDFD) through it reaps it with its status."""
    p, ready = start_worker(procs, tmp_path, [], ZOMBIE, what="the pidfd worker")
    session_killer.append(p.pid)
    res, _ = _dump_restore(p.pid, tmp_path / "img", procs)
    assert res["members"] == 2
    v = ask_verdict(p.pid, tmp_path)
    assert v == {"named": ready["kid"], "pid": ready["kid"], "status": 5}
