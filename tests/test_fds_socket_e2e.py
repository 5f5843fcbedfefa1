"""Sockets end to end through engine.dump.dump + engine.restore.restore: the
restored process reads its own queued data, accepts connections from this
test on its restored listeners, and reports what it saw against the ground
truth it derived itself (never from the image)."""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, wait_for  # noqa: F401
from fds_support import dump_restore, start_worker

WORKER = r'''
import json, os, signal, socket, sys, time
DIR, ABSTRACT, PENDING = sys.argv[1], "\0" + sys.argv[2], sys.argv[3] == "pending"
AB = bytes(range(256)) * 300
BA = [b"reply-1", b"reply-2"]
MSGS = [b"m1", b"", b"m3" * 1000, b"m4", b""]
BACK = [b"back"]

def place(s, n):
    os.dup2(s.fileno(), n); s.close()

a, b = socket.socketpair()
a.send(AB)
for m in BA:
    b.send(m)
place(a, 500); place(b, 501)
c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for m in MSGS:
    c.send(m)
for m in BACK:
    d.send(m)
place(c, 502); place(d, 503)
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(8)
port = l.getsockname()[1]
if PENDING:
    pending = socket.create_connection(("127.0.0.1", port))   # waits in the accept queue
    pending.send(b"ping-tcp")                                   # the worker serves itself
place(l, 504)
u = socket.socket(socket.AF_UNIX); u.bind(os.path.join(DIR, "srv.sock")); u.listen(4); place(u, 505)
v = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); v.bind(ABSTRACT); v.listen(4); place(v, 506)

def drain(fd):
    s = socket.socket(fileno=os.dup(fd)); s.setblocking(False); out = []
    while True:
        try:
            m = s.recv(1 << 20)
        except BlockingIOError:
            break
        out.append(m)
        if s.type == socket.SOCK_STREAM and not m:
            break
    s.close()
    return out

def serve(fd, tag):
    s = socket.socket(fileno=os.dup(fd)); s.settimeout(10)
    try:
        conn, _ = s.accept()
        conn.settimeout(10)
        ok = conn.recv(100) == b"ping-" + tag
        conn.send(b"pong-" + tag)
        conn.close()
        return ok
    finally:
        s.close()

def verify(*_):
    out = {}
    for name, fn in (("stream", lambda: b"".join(drain(501)) == AB and b"".join(drain(500)) == b"".join(BA)),
                     ("dgram", lambda: drain(503) == MSGS and drain(502) == BACK),
                     ("tcp", lambda: serve(504, b"tcp")),
                     ("unix", lambda: serve(505, b"unix")),
                     ("abstract", lambda: serve(506, b"abstract"))):
        try:
            out[name] = bool(fn())
        except Exception as e:
            out[name] = repr(e)
    with open(os.path.join(DIR, "verdict.tmp"), "w") as f:
        json.dump(out, f)
    os.rename(os.path.join(DIR, "verdict.tmp"), os.path.join(DIR, "verdict.json"))

signal.signal(signal.SIGUSR1, verify)
with open(os.path.join(DIR, "ready.tmp"), "w") as f:
    json.dump({"port": port}, f)
os.rename(os.path.join(DIR, "ready.tmp"), os.path.join(DIR, "ready"))
while True:
    time.sleep(0.05)
'''

ALL_TRUE = {k: True for k in ("stream", "dgram", "tcp", "unix", "abstract")}


def start(procs, tmp_path, pending=False):
    abstract = "\0crucible-e2e-" + uuid.uuid4().hex
    p, info = start_worker(procs, tmp_path, [str(tmp_path), abstract[1:], "pending" if pending else "-"], WORKER,
                           "the socket worker")
    return p, info["port"], abstract


def clients(tmp_path, port, abstract):
    """Connect to each listener and send its ping (they queue until accepted);
    port None: no tcp client."""
    out = []
    for fam, typ, addr, tag in ((socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", port), b"tcp"),
                                (socket.AF_UNIX, socket.SOCK_STREAM, str(tmp_path / "srv.sock"), b"unix"),
                                (socket.AF_UNIX, socket.SOCK_SEQPACKET, abstract, b"abstract")):
        if port is None and tag == b"tcp":
            continue     # the listener's own pending client plays that part
        c = socket.socket(fam, typ)
        c.settimeout(10)
        c.connect(addr)
        c.send(b"ping-" + tag)
        out.append((c, tag))
    return out


def verdict_with_clients(pid, tmp_path, port, abstract):
    v = tmp_path / "verdict.json"
    if v.exists():
        v.unlink()
    conns = clients(tmp_path, port, abstract)
    try:
        os.kill(pid, signal.SIGUSR1)
        wait_for(v.exists, timeout=30, what="the worker's verdict")
        for c, tag in conns:
            assert c.recv(100) == b"pong-" + tag
    finally:
        for c, _ in conns:
            c.close()
    return json.loads(v.read_text())


@pytest.mark.slow
def test_sockets_restored_and_verified_by_the_process(procs, tmp_path):
    p, port, abstract = start(procs, tmp_path)
    dump_restore(procs, p, str(tmp_path / "img"))
    # A restored process dumps and restores again (its queues are the
    # restorer's fresh messages, nothing hidden from peeking).
    dump(p.pid, str(tmp_path / "img2"), Options())
    procs.reap(p.pid)
    assert restore(str(tmp_path / "img2"), Options())["pid"] == p.pid
    assert verdict_with_clients(p.pid, tmp_path, port, abstract) == ALL_TRUE


@pytest.mark.slow
def test_sockets_leave_running_dump_changes_nothing(procs, tmp_path):
    p, port, abstract = start(procs, tmp_path)
    res = dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    assert res["left_running"]
    assert verdict_with_clients(p.pid, tmp_path, port, abstract) == ALL_TRUE


@pytest.mark.slow
def test_pending_connection_refuses_the_dump_and_the_target_carries_on(procs, tmp_path):
    p, port, abstract = start(procs, tmp_path, pending=True)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = {r.fd: r for r in getattr(ei.value, "refusals", [ei.value])}
    # The waiting connection holds the bytes its client sent: they cannot be
    # read without accepting it. (Its client, fd 4, could be reconnected.)
    assert {fd: r.reason for fd, r in refusals.items()} == {504: "socket"}
    assert "waits in the accept queue with 8 bytes its client sent" in refusals[504].detail
    assert not os.path.exists(tmp_path / "img")
    # Nothing was consumed or lost: the worker accepts its own pending
    # connection and reads all its queues; our unix clients are served.
    assert verdict_with_clients(p.pid, tmp_path, None, abstract) == ALL_TRUE
    assert p.poll() is None
