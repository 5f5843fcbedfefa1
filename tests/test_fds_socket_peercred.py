"""SO_PEERCRED exact: a restored unix socket reports the pid, uid, gid and
groups its peer had when the socket was made - the process itself, or a
child that made a socketpair under other credentials and has exited
since - never ckpt's. A peer pid that a live process holds is refused
(`peer-pid-in-use`) at dump or at restore. The worker records its ground
truth itself (the child's pid from fork, the ids it set)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

WORKER = r'''
import json, os, signal, socket, struct, sys, time
DIR, MODE = sys.argv[1], sys.argv[2]

def cred(fd):
    s = socket.socket(fileno=os.dup(fd))
    try:
        pid, uid, gid = struct.unpack("iII", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        groups = s.getsockopt(socket.SOL_SOCKET, 59, 1024)
        return [pid, uid, gid, sorted(struct.unpack(f"{len(groups) // 4}I", groups))]
    finally:
        s.close()

truth = {}
a, b = socket.socketpair()
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
truth[500] = truth[501] = [os.getpid(), os.geteuid(), os.getegid(), sorted(os.getgroups())]
# a socketpair made by a child under other credentials, passed back, child gone
chan, far = socket.socketpair()
child = os.fork()
if child == 0:
    os.setgroups([4, 24]); os.setresgid(4321, 4321, 4321); os.setresuid(1234, 1234, 1234)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    socket.send_fds(far, [b"x"], [c.fileno(), d.fileno()])
    os._exit(0)
_, fds, _, _ = socket.recv_fds(chan, 10, 2)
os.waitpid(child, 0)
os.dup2(fds[0], 502); os.dup2(fds[1], 503); os.close(fds[0]); os.close(fds[1])
truth[502] = truth[503] = [child, 1234, 4321, [4, 24]]
chan.close(); far.close()
keeper = None
if MODE == "outside":
    # a socketpair made by a process that stays alive outside the dump (a
    # grandchild, so not a child of the worker)
    chan, far = socket.socketpair()
    if os.fork() == 0:
        if os.fork() == 0:
            e, f = socket.socketpair()
            socket.send_fds(far, [str(os.getpid()).encode()], [e.fileno(), f.fileno()])
            e.close(); f.close()
            os.closerange(0, 1000)
            time.sleep(600)
        os._exit(0)
    os.wait()
    msg, fds, _, _ = socket.recv_fds(chan, 10, 2)
    keeper = int(msg)
    os.dup2(fds[0], 506); os.dup2(fds[1], 507); os.close(fds[0]); os.close(fds[1])
    chan.close(); far.close()
l = socket.socket(socket.AF_UNIX); l.bind(os.path.join(DIR, "l.sock")); l.listen(3)
pend = socket.socket(socket.AF_UNIX); pend.connect(os.path.join(DIR, "l.sock"))
os.dup2(l.fileno(), 504); os.dup2(pend.fileno(), 505); l.close(); pend.close()
me = [os.getpid(), os.geteuid(), os.getegid(), sorted(os.getgroups())]
truth[504] = truth[505] = me

def verify(*_):
    out = {}
    for fd, want in truth.items():
        out[str(fd)] = cred(fd) == want or [cred(fd), want]
    l = socket.socket(fileno=os.dup(504))
    conn, _ = l.accept()
    out["accepted"] = cred(conn.fileno()) == me or [cred(conn.fileno()), me]
    with open(os.path.join(DIR, "verdict.tmp"), "w") as fh:
        json.dump(out, fh)
    os.rename(os.path.join(DIR, "verdict.tmp"), os.path.join(DIR, "verdict.json"))

signal.signal(signal.SIGUSR1, verify)
with open(os.path.join(DIR, "ready.tmp"), "w") as fh:
    json.dump({"child": child, "keeper": keeper}, fh)
os.rename(os.path.join(DIR, "ready.tmp"), os.path.join(DIR, "ready"))
while True:
    time.sleep(0.05)
'''

ALL_TRUE = {k: True for k in ("500", "501", "502", "503", "504", "505", "accepted")}


def start(procs, tmp_path, mode="-"):
    p, ready = start_worker(procs, tmp_path, [str(tmp_path), mode], WORKER, "the peercred worker")
    return p, ready["child"]


verdict = ask_verdict


def test_peer_credentials_restored_exactly_also_of_an_exited_peer(procs, tmp_path):
    p, child = start(procs, tmp_path)
    assert not os.path.exists(f"/proc/{child}")
    dump_restore(procs, p, str(tmp_path / "img"))
    assert not os.path.exists(f"/proc/{child}"), "the helper with the child's pid was left behind"
    assert verdict(p.pid, tmp_path) == ALL_TRUE


def test_exited_peers_pid_taken_at_restore_is_refused(procs, tmp_path):
    from engine.fds import _peercred
    p, child = start(procs, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    # another process takes the exited child's pid before the restore
    r, w = os.pipe()
    squatter = _peercred._clone_with_pid(child)
    if squatter == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        with pytest.raises((Refusal, Refusals)) as ei:
            restore(str(tmp_path / "img"), Options())
        refusals = getattr(ei.value, "refusals", [ei.value])
        assert {(r.reason, r.fd) for r in refusals} == {("peer-pid-in-use", 502), ("peer-pid-in-use", 503)}
        assert f"pid {child}" in refusals[0].detail
        assert not os.path.exists(f"/proc/{p.pid}")
    finally:
        os.close(w)
        os.waitpid(squatter, 0)
    out = restore(str(tmp_path / "img"), Options())       # the image is intact
    procs.adopt(out["pid"])
    assert verdict(p.pid, tmp_path) == ALL_TRUE


def test_live_peer_outside_the_dump_is_refused_at_dump(procs, tmp_path):
    p, _ = start(procs, tmp_path, "outside")
    keeper = json.loads((tmp_path / "ready").read_text())["keeper"]
    try:
        with pytest.raises((Refusal, Refusals)) as ei:
            dump(p.pid, str(tmp_path / "img"), Options())
        refusals = getattr(ei.value, "refusals", [ei.value])
        assert {(r.reason, r.fd) for r in refusals} == {("peer-pid-in-use", 506), ("peer-pid-in-use", 507)}
        assert f"pid {keeper}, a live process outside the dump" in refusals[0].detail
        assert p.poll() is None and not os.path.exists(tmp_path / "img")
        assert verdict(p.pid, tmp_path) == ALL_TRUE
    finally:
        os.kill(keeper, signal.SIGKILL)


def test_the_helper_dies_with_ckpt(tmp_path):
    """ckpt killed while a helper holds the restored process's pid: the
    helper goes too (a killed restore leaves no process with that pid;
    bench/reliability.py's kill test saw one outlive ckpt and then answer
    its SIGUSR1 by dying of it)."""
    import signal
    import subprocess
    import sys
    import time
    from engine.fds import _peercred
    from engine_core_support import alive, wait_for
    pidfile = tmp_path / "helper.pid"
    # A free pid for the helper: one just used by a process that is gone.
    probe = subprocess.Popen(["true"])
    probe.wait()
    src = f"""
import os, sys, time
sys.path.insert(0, {os.getcwd()!r})
from engine.fds import _peercred
def fn():
    open({str(pidfile)!r}, "w").write(str(os.getpid()))
    time.sleep(30)
    return []
_peercred.run_as({{"pid": {probe.pid}, "uid": 0, "gid": 0, "groups": None}}, fn)
"""
    ckpt = subprocess.Popen([sys.executable, "-c", src], close_fds=True)
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the helper")
        helper = int(pidfile.read_text())
        assert helper == probe.pid and alive(helper)
        # It says what it is, and a signal sent to the pid it holds (meant
        # for the restored process) neither runs ckpt's handlers nor ends it.
        with open(f"/proc/{helper}/comm", "rb") as f:
            assert f.read().strip() == _peercred.HELPER_NAME
        os.kill(helper, signal.SIGUSR1)
        os.kill(helper, signal.SIGINT)
        time.sleep(0.2)
        assert alive(helper), "the helper died of a signal meant for the restored process"
        ckpt.send_signal(signal.SIGKILL)
        ckpt.wait()
        end = time.monotonic() + 5
        while alive(helper) and time.monotonic() < end:
            time.sleep(0.01)
        assert not alive(helper), "the helper outlived ckpt"
    finally:
        if ckpt.poll() is None:
            ckpt.kill()
            ckpt.wait()
