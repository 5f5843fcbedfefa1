"""Files in flight in SCM_RIGHTS messages queued in a unix socketpair, and
SCM_CREDENTIALS: the receiver of the restored queue reads the same
messages, at the same boundaries, with working files of the same kinds at
the same offsets and flags (also files no process holds any more) and the
same sender credentials - or the dump is refused naming the message and
the file. Ground truth: the original process reads its own queue the same
way (after the dump) and reports what it got."""

from __future__ import annotations

import os

import pytest

from engine.errors import Refusal

from engine_core_support import procs  # noqa: F401
from fds_support import Target, classify, dump, restore

# Reads the queue at fd 501 in `step`-byte reads (stream: shows at which
# read the fds arrive) and describes each file received: its link, mode
# flags, offset, and contents or eventfd counter.
DRAIN = r'''
import socket, array, fcntl, os, struct
def describe(fd):
    link = os.readlink(f"/proc/self/fd/{fd}")
    fl = fcntl.fcntl(fd, fcntl.F_GETFL) & ~0o100000   # O_LARGEFILE differs between 32/64-bit openers
    if "eventfd" in link:
        return [link, fl, os.read(fd, 8).hex()]
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    head = os.pread(fd, 16, 0).hex() if fl & 3 != 1 else None
    return [link, fl, pos, head]
def drain(fd, step):
    s = socket.socket(fileno=os.dup(fd)); out = []
    try:
        while True:
            try:
                m, anc, flags, _ = s.recvmsg(step, socket.CMSG_SPACE(64), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            fds = array.array("i"); cred = None
            for lvl, typ, data in anc:
                if typ == socket.SCM_RIGHTS:
                    fds.frombytes(data)
                elif typ == socket.SCM_CREDENTIALS:
                    cred = list(struct.unpack("iII", data))
            out.append([m.hex(), [describe(f) for f in fds], cred])
            for f in fds:
                os.close(f)
            if not m and not fds:
                return out
    finally:
        s.close()
'''

CHECK = DRAIN + "report['got'] = drain(501, STEP)\n"


def drained(step: int) -> list:
    g = {}
    exec(DRAIN, g)
    return g["drain"](501, step)


def _setup(typ: str, tmp, extra: str = "") -> str:
    return f"""
import socket
STEP = {5 if typ == 'STREAM' else 1 << 16}
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_{typ})
f = open("{tmp}/data", "w+b"); f.write(b"0123456789"); f.flush(); f.seek(3)
w = os.open("{tmp}/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
e = os.eventfd(7, os.EFD_NONBLOCK)
m = os.memfd_create("scratch"); os.write(m, b"memfd data"); os.lseek(m, 4, 0)
a.send(b"plain first")
a.sendmsg([b"with fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("iii", f.fileno(), e, w))])
a.send(b"between")
a.sendmsg([b"memfd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", m))])
a.send(b"after")
f.close(); os.close(e); os.close(w); os.close(m)      # held by the messages only
{extra}
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
"""


@pytest.mark.parametrize("typ", ["STREAM", "DGRAM", "SEQPACKET"])
def test_files_in_flight_restored_as_the_original_reads_them(tmp_path, typ):
    with Target(tmp_path, _setup(typ, tmp_path), CHECK) as t:
        desc = classify(t.pid, 501)
        assert "4 fds in flight (eventfd, ghost, regular)" in desc, desc
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        truth = t.check()
    assert "error" not in truth, truth
    got_files = [d for m in truth["got"] for d in m[1]]
    assert len(got_files) == 4 and got_files[0][2] == 3            # the ground truth saw them all
    with restore(img):
        got = drained(5 if typ == "STREAM" else 1 << 16)
    assert got == truth["got"]
    if typ == "STREAM":
        # the fds arrive with the read that takes the first byte of the
        # write that carried them ("plain first" is 11 bytes, read 5 by 5)
        firsts = [bytes.fromhex(m[0]) for m in got if m[1]]
        assert firsts == [b"twith", b"nmemf"]


def test_stream_write_with_fds_starts_where_it_started(tmp_path):
    # Reading exactly the bytes before the write with fds gets no fds.
    setup = """
import socket
STEP = 3
a, b = socket.socketpair()
e = os.eventfd(1)
a.send(b"abcdefg")
a.sendmsg([b"hij"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", e))])
os.close(e)
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
"""
    with Target(tmp_path, setup, CHECK) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        truth = t.check()
    # a read goes on into the write with fds and stops after it
    assert [bytes.fromhex(m[0]) for m in truth["got"]] == [b"abc", b"def", b"ghi", b"j"]
    assert [len(m[1]) for m in truth["got"]] == [0, 0, 1, 0]
    with restore(img):
        assert drained(3) == truth["got"]


def test_peek_leaves_no_fd_behind_and_the_queue_intact(tmp_path):
    with Target(tmp_path, _setup("DGRAM", tmp_path), CHECK) as t:
        before = set(os.listdir("/proc/self/fd"))
        classify(t.pid, 501)
        dump(t.pid, [500, 501], str(tmp_path / "img"))
        assert set(os.listdir("/proc/self/fd")) == before
        got = t.check()["got"]
        assert [bytes.fromhex(m[0]) for m in got] == [b"plain first", b"with fds", b"between", b"memfd", b"after"]
        assert [len(m[1]) for m in got] == [0, 3, 0, 1, 0]


def refusal(pid, fd) -> Refusal:
    with pytest.raises(Refusal) as ei:
        classify(pid, fd)
    return ei.value


def test_pipe_in_flight_refused_by_kind(tmp_path):
    setup = """
import socket
a, b = socket.socketpair()
r, w = os.pipe()
a.sendmsg([b"with a pipe"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r))])
os.close(r)
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); os.dup2(w, 502); a.close(); b.close()
"""
    with Target(tmp_path, setup) as t:
        r = refusal(t.pid, 501)
        assert r.reason == "socket" and r.fd == 501
        assert "queued message 1 of 1: fd #1 of 1 in flight is a pipe (pipe:[" in r.detail, r.detail


def test_socket_in_flight_refused(tmp_path):
    setup = """
import socket
a, b = socket.socketpair()
c, d = socket.socketpair()
a.sendmsg([b"a socket"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", c.fileno()))])
c.close()
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); os.dup2(d.fileno(), 502); a.close(); b.close(); d.close()
"""
    with Target(tmp_path, setup) as t:
        r = refusal(t.pid, 501)
        assert r.reason == "socket"
        assert "is a socket (socket:[" in r.detail and "may carry messages of its own" in r.detail, r.detail


def test_file_in_flight_shared_with_the_process_refused(tmp_path):
    setup = f"""
import socket
a, b = socket.socketpair()
f = os.open("{tmp_path}/kept", os.O_RDWR | os.O_CREAT, 0o600)
a.sendmsg([b"shared"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", f))])
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); os.dup2(f, 502); os.close(f); a.close(); b.close()
"""
    with Target(tmp_path, setup) as t:
        r = refusal(t.pid, 501)
        assert r.reason == "socket"
        assert f"({tmp_path}/kept) is the open file of fd 502 of the process too" in r.detail, r.detail


CRED_SETUP = """
import socket
STEP = 1 << 16
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_%s)
b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
a.send(b"from the process")
child = os.fork()
if child == 0:
    os.setgid(4321); os.setuid(1234)
    a.send(b"from a child")
    a.send(b"again")
    os._exit(0)
os.waitpid(child, 0)
a.send(b"from the process again")
%s
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
"""


@pytest.mark.parametrize("typ", ["STREAM", "DGRAM"])
def test_scm_credentials_restored_exactly(tmp_path, typ):
    with Target(tmp_path, CRED_SETUP % (typ, ""), CHECK) as t:
        assert "sender credentials of" in classify(t.pid, 501)
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        truth = t.check()
    creds = [m[2] for m in truth["got"]]
    assert creds[0] == [t.pid, 0, 0] and creds[1][1:] == [1234, 4321] and creds[1][0] != t.pid
    with restore(img):
        assert drained(1 << 16) == truth["got"]


def test_scm_credentials_of_a_live_sender_outside_refused(tmp_path):
    keep = """
r, w = os.pipe()
if os.fork() == 0:
    a.send(b"from a live child"); a.close(); b.close(); os.close(w); os.read(r, 1); os._exit(0)
os.close(r)
import time; time.sleep(0.2)
"""
    with Target(tmp_path, CRED_SETUP % ("DGRAM", keep)) as t:
        r = refusal(t.pid, 501)
        assert r.reason == "peer-pid-in-use", r.detail
        assert "queued message 5 of 5: SCM_CREDENTIALS: its peer credentials name pid" in r.detail, r.detail


# -- the whole process, through engine.dump / engine.restore ------------------

E2E_WORKER = r'''
import json, os, signal, socket, struct, sys, time
DIR = sys.argv[1]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
m = os.memfd_create("in-flight"); os.write(m, b"held by nobody"); os.lseek(m, 5, 0)
e = os.eventfd(41)
a.sendmsg([b"two files"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("ii", m, e))])
os.close(m); os.close(e)
child = os.fork()
if child == 0:
    os.setgid(777); os.setuid(777); a.send(b"from uid 777"); os._exit(0)
os.waitpid(child, 0)
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
EXPECT = [["two files", ["/memfd:in-flight (deleted)", 5, "held by nobody"], ["anon_inode:[eventfd]", 41], [os.getpid(), 0, 0]],
          ["from uid 777", None, None, [child, 777, 777]]]
import array
def verify(*_):
    s = socket.socket(fileno=os.dup(501)); got = []
    for _ in range(2):
        msg, anc, _, _ = s.recvmsg(100, 256, socket.MSG_DONTWAIT)
        fds, cred = array.array("i"), None
        for lvl, typ, data in anc:
            if typ == socket.SCM_RIGHTS: fds.frombytes(data)
            else: cred = list(struct.unpack("iII", data))
        one = [msg.decode(), None, None, cred]
        if fds:
            one[1] = [os.readlink(f"/proc/self/fd/{fds[0]}"), os.lseek(fds[0], 0, 1), os.pread(fds[0], 100, 0).decode()]
            one[2] = [os.readlink(f"/proc/self/fd/{fds[1]}"), struct.unpack("Q", os.read(fds[1], 8))[0]]
        got.append(one)
    with open(os.path.join(DIR, "verdict.tmp"), "w") as f:
        json.dump({"ok": got == EXPECT, "got": got, "expect": EXPECT}, f)
    os.rename(os.path.join(DIR, "verdict.tmp"), os.path.join(DIR, "verdict.json"))
signal.signal(signal.SIGUSR1, verify)
open(os.path.join(DIR, "ready"), "w").close()
while True:
    time.sleep(0.05)
'''


def test_files_and_credentials_in_flight_through_the_core(procs, tmp_path):
    import json
    import signal
    from engine_core_support import python_exe, wait_for
    from fds_support import dump_restore
    script = tmp_path / "worker.py"
    script.write_text(E2E_WORKER)
    p = procs.start([python_exe(), str(script), str(tmp_path)], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the worker")
    assert p.poll() is None
    dump_restore(procs, p, str(tmp_path / "img"))
    os.kill(p.pid, signal.SIGUSR1)
    wait_for((tmp_path / "verdict.json").exists, timeout=30, what="the verdict")
    v = json.loads((tmp_path / "verdict.json").read_text())
    assert v["ok"], v


# -- credentials hidden in the queue: the receiver's SO_PASSCRED off ----------

HIDDEN_SETUP = """
import socket
STEP = 1 << 16
CRED = lambda uid, gid: [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("iII", os.getpid(), uid, gid))]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_%s)
a.sendmsg([b"from the process"], CRED(0, 0))
child = os.fork()
if child == 0:
    os.setgid(4321); os.setuid(1234)
    a.sendmsg([b"from a child"], CRED(1234, 4321))
    # Either end's flag at send time attaches them too (a datagram sender's
    # would also autobind it, which a socketpair with a bound end refuses).
    flagged = a if socket.SOCK_%s == socket.SOCK_STREAM else b
    flagged.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    a.send(b"again")
    flagged.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
    os._exit(0)
os.waitpid(child, 0)
a.send(b"with no credentials")
a.sendmsg([b"from the process again"], CRED(0, 0))
os.dup2(a.fileno(), 500); os.dup2(b.fileno(), 501); a.close(); b.close()
"""

PASSCRED_ON = "socket.socket(fileno=os.dup(501)).setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)\n"


def _passcred(pid: int, fd: int) -> int:
    """SO_PASSCRED of the target's socket (read on a pidfd_getfd duplicate)."""
    import socket
    from engine import pidfd
    with pidfd.target_fd(pid, fd) as dup:
        s = socket.socket(fileno=os.dup(dup))
        try:
            return s.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED)
        finally:
            s.close()


@pytest.mark.parametrize("typ,on", [("STREAM", True), ("STREAM", False), ("DGRAM", True), ("SEQPACKET", True)])
def test_hidden_credentials_restored_exactly(tmp_path, typ, on):
    """SO_PASSCRED off at dump: the credentials the messages carry are what
    the process reads once it turns it on (a stream read stops where the
    writer changes); with it off, the same bytes at the same boundaries."""
    check = (PASSCRED_ON if on else "") + CHECK
    with Target(tmp_path, HIDDEN_SETUP % (typ, typ), check) as t:
        assert "sender credentials of" in classify(t.pid, 501)
        assert _passcred(t.pid, 501) == 0       # put back after the peek
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        assert _passcred(t.pid, 501) == 0
        truth = t.check()
    assert "error" not in truth, truth
    got = truth["got"]
    if on:
        creds = [m[2] for m in got]
        child = creds[1][0]
        assert child not in (0, t.pid)
        none = [0] + creds[-2][1:]                # no credentials: pid 0, the overflow ids
        want = [[t.pid, 0, 0], [child, 1234, 4321]] + ([] if typ == "STREAM" else [[child, 1234, 4321]])
        assert creds == want + [none, [t.pid, 0, 0]] and none[1] != 0, creds
        if typ == "STREAM":       # split by writer
            assert [bytes.fromhex(m[0]) for m in got] == [b"from the process", b"from a childagain",
                                                           b"with no credentials", b"from the process again"]
    elif typ == "STREAM":         # glued
        assert len(got) == 1 and got[0][2] is None, got
    with restore(img):
        if on:
            import socket
            s = socket.socket(fileno=os.dup(501))
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 0
            s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            s.close()
        assert drained(1 << 16) == got


def test_passcred_put_back_when_the_peek_fails(tmp_path, monkeypatch):
    """A failure while the flag is on (its fault point) leaves the target's
    SO_PASSCRED off again."""
    from engine import faults
    monkeypatch.setattr(faults, "_TARGET", ("dump.passcred", 1))
    monkeypatch.setattr(faults, "_ACTIVE", True)
    monkeypatch.setattr(faults, "_hits", {})
    with Target(tmp_path, HIDDEN_SETUP % ("STREAM", "STREAM")) as t:
        with pytest.raises(faults.FaultInjected):
            classify(t.pid, 501)
        assert _passcred(t.pid, 501) == 0
