"""Established TCP connections through engine.dump.dump + engine.restore.restore
(TCP_REPAIR): a loopback pair held by the target, and a connection to a peer
process that keeps its end open and streams both ways across the checkpoint.
Every byte is checked against a stream both sides derive from a seed (never
from the image); a RST, a lost or a duplicated byte fails the test."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time

import pytest

from engine import netlock
from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

STREAM = r'''
import hashlib
def stream(seed, start, n):
    """Bytes [start, start+n) of the seeded stream."""
    out = bytearray()
    blk = start // 32
    while len(out) < (start % 32) + n:
        out += hashlib.sha256(b"%s:%d" % (seed, blk)).digest()
        blk += 1
    return bytes(out[start % 32:start % 32 + n])

def to_eof(sk):
    """Everything the socket gives until end of stream."""
    got = bytearray()
    while True:
        b = sk.recv(65536)
        if not b:
            return bytes(got)
        got += b
'''

# Every worker's tail: on SIGUSR1 it writes check()'s verdict to argv[1]
# (atomically, so the test never reads half a file), says ready, waits.
SERVE = r'''
import json, os, signal, sys
def serve(check):
    def on_usr1(*_):
        out = check()
        with open(sys.argv[1] + ".tmp", "w") as f:
            json.dump(out, f)
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    signal.signal(signal.SIGUSR1, on_usr1)
    open("ready.tmp", "w").close(); os.rename("ready.tmp", "ready")
    while True:
        signal.pause()
'''

PAIR = STREAM + SERVE + r'''
import json, os, signal, socket, sys, time
FAM, LO = (socket.AF_INET6, "::1") if sys.argv[2] == "6" else (socket.AF_INET, "127.0.0.1")
l = socket.socket(FAM); l.bind((LO, 0)); l.listen(1)
c = socket.create_connection(l.getsockname()[:2]); a, _ = l.accept(); l.close()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.setblocking(False)
sent = 0
while True:                           # fill a's receive queue and c's send queue
    try:
        sent += c.send(stream(b"c2a", sent, 65536))
    except BlockingIOError:
        break
a.send(stream(b"a2c", 0, 1000))       # unread by c
MSS = [sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) for sk in (c, a)]
os.dup2(c.fileno(), 500); os.dup2(a.fileno(), 501); c.close(); a.close()

def check():
    c = socket.socket(fileno=os.dup(500)); a = socket.socket(fileno=os.dup(501))
    c.setblocking(True); a.settimeout(20); c.settimeout(20)
    got = bytearray()
    while len(got) < sent:
        b = a.recv(1 << 20)
        if not b:
            break
        got += b
    back = bytearray()
    while len(back) < 1000:
        b = c.recv(1000 - len(back))
        if not b:
            break
        back += b
    c.sendall(b"after"); a.sendall(b"reply")
    out = {"sent": sent, "c2a": bytes(got) == stream(b"c2a", 0, sent), "a2c": bytes(back) == stream(b"a2c", 0, 1000),
           "after": a.recv(5) == b"after" and c.recv(5) == b"reply",
           "nodelay": c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1,
           # The segment size the ends send with: a restore that left it at
           # TCP's default (536) stalled loaded pairs; a restore may cap it
           # at 32767 (the largest user MSS) less the header options.
           "mss": all(sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) >= min(was, 32767) - 40
                      for sk, was in zip((c, a), MSS))}
    return out

if sys.argv[3:] == ["tree"]:
    parent = os.getpid()
    if os.fork() == 0:                     # a child: the dump is a process tree's
        os.closerange(500, 502)
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(0)
serve(check)
'''

# Both ends stream N bytes at a steady pace and check what they receive.
ENDPOINT = STREAM + r'''
import json, os, select, socket, sys, time
def run(conn, me, other, n, out, pace):
    conn.setblocking(False)
    sent = got = 0
    ok, err = True, None
    deadline = time.monotonic() + 120
    try:
        while (sent < n or got < n) and time.monotonic() < deadline:
            r, w, _ = select.select([conn], [conn] if sent < n else [], [], 0.5)
            if r:
                b = conn.recv(65536)
                if not b:
                    err = "eof"
                    break
                ok = ok and b == stream(other, got, len(b))
                got += len(b)
            if w:
                sent += conn.send(stream(me, sent, min(2048, n - sent)))
                time.sleep(pace)
    except OSError as e:
        err = repr(e)
    with open(out + ".tmp", "w") as f:
        json.dump({"ok": ok, "sent": sent, "got": got, "err": err}, f)
    os.rename(out + ".tmp", out)
'''

SERVER = ENDPOINT + r'''
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(1)
open("port.tmp", "w").write(str(l.getsockname()[1])); os.rename("port.tmp", "port")
conn, _ = l.accept()
if sys.argv[2:] == ["keep"]:         # a server goes on listening on the port its connection uses
    os.dup2(l.fileno(), 6)          # restored before the connection (fd 7)
l.close()
conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
os.dup2(conn.fileno(), 7); conn.close(); conn = socket.socket(fileno=7)
open("ready.tmp", "w").close(); os.rename("ready.tmp", "ready")
run(conn, b"srv", b"peer", int(sys.argv[1]), "server.json", 0.01)
while True:
    time.sleep(1)
'''

PEER = ENDPOINT + r'''
c = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
run(c, b"peer", b"srv", int(sys.argv[1]), "peer.json", 0.01)
'''


def _worker(procs, tmp_path, src, *args):
    """Start a SERVE worker script with argv [verdict path, *args]."""
    return start_worker(procs, tmp_path, [str(tmp_path / "verdict.json")] + list(args), src)[0]


def _pair_worker(procs, tmp_path, v="4", tree=False):
    return _worker(procs, tmp_path, PAIR, v, *(["tree"] if tree else []))


def _verdict(p, tmp_path):
    return ask_verdict(p.pid, tmp_path, timeout=60)


def test_loopback_pair_in_a_process_tree_restored(procs, tmp_path):
    p = _pair_worker(procs, tmp_path, tree=True)
    dump_restore(procs, p, str(tmp_path / "img"))
    v = _verdict(p, tmp_path)
    assert v == {"sent": v["sent"], "c2a": True, "a2c": True, "after": True, "nodelay": True, "mss": True}


@pytest.mark.parametrize("v", ["4", "6"])
def test_loopback_pair_restored_with_both_queues(procs, tmp_path, v):
    p = _pair_worker(procs, tmp_path, v)
    dump_restore(procs, p, str(tmp_path / "img"))
    recs = [r for r in json.loads((tmp_path / "img" / "fds.json").read_text()) if r.get("sock") == "tcp-conn"]
    assert sorted(r["peer"] for r in recs) == ["dump", "dump"]
    # Both queues of the sender were caught: sent-unacknowledged and unsent bytes.
    assert any(r["repair"]["outq_len"] > 0 for r in recs) and any(r["repair"]["inq_len"] > 0 for r in recs)
    v = _verdict(p, tmp_path)
    assert v["sent"] > 100000
    assert v == {"sent": v["sent"], "c2a": True, "a2c": True, "after": True, "nodelay": True, "mss": True}


# The same pair with small locked buffers (CRIU's zdtm socket-tcpbuf*): the
# sender's queue fills its send buffer to the brim, so the rebuilt queue,
# charged by other skbs, may not take the unsent bytes back in the buffer's
# size (EAGAIN on leaving repair mode: the restore failed after the dump had
# killed the process). The buffer sizes and their locks must read back.
SMALLBUF = PAIR.replace(
    "c.setblocking(False)\n",
    "for sk in (c, a):     # locked\n"
    "    sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)\n"
    "    sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)\n"
    "BUFS = [c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)]\n"
    "BLOB = stream(b\"c2a\", 0, 8 << 20)\n"
    "c.setblocking(False)\n",
).replace(
    "sent += c.send(stream(b\"c2a\", sent, 65536))",
    "sent += c.send(BLOB[sent:sent + 17])     # small writes: many small skbs",
).replace(
    "    c.sendall(b\"after\")",
    "    bufs = [c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)]\n"
    "    c.sendall(b\"after\")",
).replace('"nodelay": c.getsockopt', '"bufs": bufs == BUFS, "nodelay": c.getsockopt').replace(
    "# unread by c\n", "# unread by c\nc.setblocking(True)     # blocking at the dump\n", 1).replace(
    "def check():\n", "def check():\n    import fcntl\n    if fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK:\n        return {'nonblock': True}\n", 1)
assert SMALLBUF.count("BUFS") == 2 and "+ 17])" in SMALLBUF and "blocking at the dump" in SMALLBUF and \
    "'nonblock'" in SMALLBUF


@pytest.mark.parametrize("v", ["4", "6"])
def test_loopback_pair_with_full_locked_send_buffer_restored(procs, tmp_path, v):
    p = _worker(procs, tmp_path, SMALLBUF, v)
    dump_restore(procs, p, str(tmp_path / "img"))
    recs = [r for r in json.loads((tmp_path / "img" / "fds.json").read_text()) if r.get("sock") == "tcp-conn"]
    assert any(r["repair"]["unsq_len"] > 0 for r in recs)     # unsent bytes were queued
    v = _verdict(p, tmp_path)
    assert v == {"sent": v["sent"], "c2a": True, "a2c": True, "after": True, "bufs": True, "nodelay": True, "mss": True}


@pytest.mark.parametrize("tree", [False, True])
def test_loopback_pair_leave_running_changes_nothing(procs, tmp_path, tree):
    p = _pair_worker(procs, tmp_path, tree=tree)
    res = dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    assert res["left_running"] and res.get("members", 1) == (2 if tree else 1)
    v = _verdict(p, tmp_path)
    assert v == {"sent": v["sent"], "c2a": True, "a2c": True, "after": True, "nodelay": True, "mss": True}


def _start_server_and_peer(procs, tmp_path, n, *server_args):
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "peer.py").write_text(PEER)
    srv = procs.start([python_exe(), str(tmp_path / "server.py"), str(n), *server_args], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "port").exists() or srv.poll() is not None, what="the server's port")
    port = (tmp_path / "port").read_text()
    peer = subprocess.Popen([python_exe(), str(tmp_path / "peer.py"), str(n), port], cwd=str(tmp_path),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            close_fds=True)
    procs.popens.append(peer)
    wait_for(lambda: (tmp_path / "ready").exists() or srv.poll() is not None, what="the server's connection")
    return srv, peer


@pytest.mark.skipif(netlock.available() is not None, reason=f"no network lock here: {netlock.available()}")
def test_outside_peer_keeps_streaming_across_the_checkpoint(procs, tmp_path):
    n = 400_000
    srv, peer = _start_server_and_peer(procs, tmp_path, n)
    time.sleep(0.5)                                  # mid-stream, both ways
    res = dump(srv.pid, str(tmp_path / "img"), Options())
    srv.wait()
    rec = [r for r in json.loads((tmp_path / "img" / "fds.json").read_text()) if r.get("sock") == "tcp-conn"]
    assert [r["peer"] for r in rec] == ["outside"]
    assert netlock.locked(rec[0]["lock"])            # the peer is held off while the server is an image
    time.sleep(1.0)                                  # the peer keeps sending into the lock meanwhile
    assert peer.poll() is None, "the peer lost its connection while the server was an image"
    out = restore(str(tmp_path / "img"), Options())
    procs.adopt(out["pid"])
    assert not netlock.locked(rec[0]["lock"])
    assert peer.wait(timeout=120) == 0, peer.stderr.read().decode()
    wait_for((tmp_path / "server.json").exists, timeout=60, what="the server's verdict")
    s = json.loads((tmp_path / "server.json").read_text())
    pe = json.loads((tmp_path / "peer.json").read_text())
    assert pe == {"ok": True, "sent": n, "got": n, "err": None}
    assert s == {"ok": True, "sent": n, "got": n, "err": None}
    assert res["fds"] >= 1


@pytest.mark.skipif(netlock.available() is not None, reason=f"no network lock here: {netlock.available()}")
def test_accepted_connection_beside_its_still_listening_socket(procs, tmp_path):
    """A server (redis, nginx) keeps listening on the port its accepted
    connection uses, both with SO_REUSEADDR (inherited by accept). The
    connection is rebuilt in repair mode, whose forced reuse lets it bind
    beside the listener; setting SO_REUSEADDR after entering repair mode
    would undo that (sock_setsockopt overwrites sk_reuse): "address in use"."""
    n = 100_000
    srv, peer = _start_server_and_peer(procs, tmp_path, n, "keep")
    port = int((tmp_path / "port").read_text())
    time.sleep(0.3)
    dump(srv.pid, str(tmp_path / "img"), Options())
    srv.wait()
    recs = json.loads((tmp_path / "img" / "fds.json").read_text())
    assert sorted(r.get("sock") for r in recs if r.get("sock")) == ["tcp-conn", "tcp-listen"]
    assert all("SO_REUSEADDR" in r["set"] for r in recs if r.get("sock"))
    out = restore(str(tmp_path / "img"), Options())
    procs.adopt(out["pid"])
    assert peer.wait(timeout=120) == 0, peer.stderr.read().decode()
    wait_for((tmp_path / "server.json").exists, timeout=60, what="the server's verdict")
    assert json.loads((tmp_path / "server.json").read_text()) == {"ok": True, "sent": n, "got": n, "err": None}
    with socket.create_connection(("127.0.0.1", port), timeout=10):   # the listener listens again
        pass


@pytest.mark.skipif(netlock.available() is not None, reason=f"no network lock here: {netlock.available()}")
def test_outside_peer_leave_running_releases_the_lock_and_repair_mode(procs, tmp_path):
    n = 200_000
    srv, peer = _start_server_and_peer(procs, tmp_path, n)
    time.sleep(0.3)
    dump(srv.pid, str(tmp_path / "img"), Options(leave_running=True))
    rec = [r for r in json.loads((tmp_path / "img" / "fds.json").read_text()) if r.get("sock") == "tcp-conn"]
    assert not netlock.locked(rec[0]["lock"])
    assert peer.wait(timeout=120) == 0, peer.stderr.read().decode()
    wait_for((tmp_path / "server.json").exists, timeout=60, what="the server's verdict")
    assert json.loads((tmp_path / "server.json").read_text()) == {"ok": True, "sent": n, "got": n, "err": None}
    assert json.loads((tmp_path / "peer.json").read_text()) == {"ok": True, "sent": n, "got": n, "err": None}


@pytest.mark.skipif(netlock.available() is not None, reason=f"no network lock here: {netlock.available()}")
def test_held_names_the_locks_this_machine_holds():
    """netlock.held(), which the host tier's conftest uses to take back the
    locks its runs leave (a dump never restored keeps its lock on purpose)."""
    ends = (("127.0.0.1", 1), ("127.0.0.1", 2))
    name = netlock.lock(*ends)
    try:
        assert name in netlock.held()
    finally:
        netlock.unlock(name)
    assert name not in netlock.held()


def test_outside_peer_without_network_lock_is_refused(procs, tmp_path, monkeypatch):
    srv, peer = _start_server_and_peer(procs, tmp_path, 100_000)
    monkeypatch.setattr(netlock, "available", lambda: "libnftables.so.1 is not installed (test)")
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(srv.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [(r.reason, r.fd) for r in refusals] == [("tcp-lock", 7)]
    assert "peer is outside the dump" in refusals[0].detail
    assert not (tmp_path / "img").exists()
    assert peer.wait(timeout=120) == 0                # the target carried on, untouched
    wait_for((tmp_path / "server.json").exists, timeout=60, what="the server's verdict")
    assert json.loads((tmp_path / "server.json").read_text())["ok"] is True


_here: dict = {}
exec(STREAM, _here)                         # the same stream on this side (the peer)
stream = _here["stream"]

HALF_OUT = STREAM + SERVE + r"""
import json, os, socket, sys, time
MODE, FAM, LO, PORT = sys.argv[2], *((socket.AF_INET6, "::1") if sys.argv[3] == "6" else (socket.AF_INET, "127.0.0.1")), int(sys.argv[4])
WANT = {"fin-wait2": 5, "close-wait": 8, "fin-wait1": 4, "last-ack": 9, "closing": 11, "closing-sent": 11}[MODE]
c = socket.socket(FAM)
if MODE in ("fin-wait1", "last-ack"):
    # a small queue behind the peer's 4 KiB window: it drains in a few
    # round trips once the peer reads (a large one trickles for minutes)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
c.connect((LO, PORT))
c.sendall(stream(b"w2t", 0, 2000))
sent = 2000

def state():
    ino = os.fstat(c.fileno() if c.fileno() >= 0 else 500).st_ino
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(name).read().splitlines()[1:]:
            f = line.split()
            if int(f[9]) == ino:
                return int(f[3], 16)

def until(st):
    while state() != st:
        time.sleep(0.01)

if MODE == "last-ack":
    until(8)                            # the peer (the test) closed its side first
if MODE in ("fin-wait1", "last-ack"):
    c.setblocking(False)                # the peer reads nothing: fill its window, then our FIN waits
    while True:
        try:
            sent += c.send(stream(b"w2t", sent, 65536))
        except BlockingIOError:
            break
    c.setblocking(True)
if MODE.startswith("closing"):
    while not os.path.exists("go"):     # the test drops what we send from now on
        time.sleep(0.01)
if MODE != "close-wait":
    c.shutdown(socket.SHUT_WR)
until(WANT)
os.dup2(c.fileno(), 500); c.close()
calls = []

def check():
    calls.append(1)
    if len(calls) <= 2:                 # before the dump, and first thing after the restore
        return {"state": state(), "sent": sent}
    c = socket.socket(fileno=os.dup(500)); c.settimeout(20)
    out = {"t2w": to_eof(c) == stream(b"t2w", 0, 3000)}
    if MODE == "close-wait":
        c.sendall(b"late")              # the close-wait end can still write, then closes
    else:
        try:
            c.send(b"x")
            out["send"] = "sent"
        except BrokenPipeError:
            out["send"] = "EPIPE"       # shut down for writing, as before
    c.close(); os.close(500)
    return out

serve(check)
"""


@pytest.mark.skipif(netlock.available() is not None, reason=f"no network lock here: {netlock.available()}")
@pytest.mark.parametrize("mode", ["close-wait", "fin-wait2", "fin-wait1", "last-ack", "closing", "closing-sent"])
@pytest.mark.parametrize("v", ["4", "6"])
def test_half_closed_connection_to_an_outside_peer_restored_in_its_state(procs, tmp_path, mode, v):
    """The peer (this test) closed its side (close-wait), acknowledged the
    target's FIN (fin-wait2), or reads nothing, so that the target's FIN
    waits behind a full window (fin-wait1; last-ack after the peer's own
    FIN), or never gets the target's FIN nor acknowledgement and sends its
    own (closing: an nftables rule drops what the target sends until the
    dump, on its way out: its FIN counts as not sent, or on its way in: as
    sent). A FIN the peer sent or acknowledged is not sent again: the
    restore forges that segment (engine/fds/_tcpforge.py); the target's FIN
    not yet taken is sent again after its bytes. The connection is back in
    its state, with its bytes, EOF and EPIPE where they were, and the peer
    sees no reset."""
    lst = socket.socket(socket.AF_INET6 if v == "6" else socket.AF_INET)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # a window the target fills at once
    lst.bind(("::1" if v == "6" else "127.0.0.1", 0))
    lst.listen(1)
    with lst:
        (tmp_path / "worker.py").write_text(HALF_OUT)
        p = procs.start([python_exe(), str(tmp_path / "worker.py"), str(tmp_path / "verdict.json"), mode, v,
                         str(lst.getsockname()[1])], cwd=str(tmp_path))
        lst.settimeout(30)
        t, _ = lst.accept()
    with t:
        t.settimeout(30)
        got = bytearray()

        def read_to_eof():
            while True:                                  # a reset raises here
                b = t.recv(65536)
                if not b:
                    return
                got.extend(b)
        if mode in ("close-wait", "last-ack"):
            t.sendall(stream(b"t2w", 0, 3000))
            t.shutdown(socket.SHUT_WR)
        if mode == "fin-wait2":
            read_to_eof()                                # the target's bytes, then its FIN
        if mode.startswith("closing"):
            while len(got) < 2000:
                got.extend(t.recv(65536))
            drop = _drop_from(t.getpeername(), t.getsockname(), "input" if mode == "closing-sent" else "output")
            (tmp_path / "go").write_text("")
            wait_for(lambda: _tcp_state(t.getpeername()[1]) == 4, what="the target's FIN, dropped")
            t.sendall(stream(b"t2w", 0, 3000))
            t.shutdown(socket.SHUT_WR)
        wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the worker")
        want = {"close-wait": 8, "fin-wait2": 5, "fin-wait1": 4, "last-ack": 9, "closing": 11, "closing-sent": 11}[mode]
        before = ask_verdict(p.pid, tmp_path)
        assert before["state"] == want
        try:
            from engine.context import Options as _O
            res = dump(p.pid, str(tmp_path / "img"), _O())
            assert not res["left_running"]
        finally:
            if mode.startswith("closing"):
                netlock.unlock(drop)                     # the peer hears the target again from now on
        p.wait()
        out = restore(str(tmp_path / "img"), Options())
        assert out["pid"] == p.pid
        procs.adopt(p.pid)
        rec = [r for r in json.loads((tmp_path / "img" / "fds.json").read_text()) if r.get("sock") == "tcp-conn"]
        assert [(r["peer"], r["state"]) for r in rec] == [("outside", want)]
        if mode.startswith("closing"):
            assert rec[0]["repair"]["fin_sent"] == (mode == "closing-sent")
        assert not netlock.locked(rec[0]["lock"])
        again = ask_verdict(p.pid, tmp_path)                      # first thing after the restore
        # Our FIN not acknowledged at the dump goes out again as the restore
        # ends, and the live peer may acknowledge it before this look: the
        # state it moves on to then (the restore itself read back the state
        # it rebuilt, or failed)
        moved_on = {"fin-wait1": 5, "last-ack": None, "closing": None, "closing-sent": None}
        assert again["sent"] == before["sent"] and again["state"] in (want, moved_on.get(mode, want)), again
        if mode in ("fin-wait1", "last-ack", "closing", "closing-sent"):
            read_to_eof()                                # every byte, then the FIN sent again
        if mode in ("fin-wait2", "fin-wait1"):
            t.sendall(stream(b"t2w", 0, 3000))
            t.shutdown(socket.SHUT_WR)
        after = ask_verdict(p.pid, tmp_path, timeout=60)
        read_to_eof()
    assert after == ({"t2w": True} if mode == "close-wait" else {"t2w": True, "send": "EPIPE"})
    assert bytes(got) == stream(b"w2t", 0, before["sent"]) + (b"late" if mode == "close-wait" else b"")
    if mode in ("fin-wait1", "last-ack"):
        assert before["sent"] > 2000                     # the FIN waited behind bytes the peer had not taken
        _hostile_states_invalid(str(tmp_path / "img"), rec[0])


def _tcp_state(port: int):
    """The state of this machine's TCP socket bound to local `port`."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(name).read().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port:
                return int(f[3], 16)
    return None


def _drop_from(src, dst, hook: str) -> str:
    """An nftables table dropping every segment src -> dst (not the other way):
    the target's FIN and acknowledgements never reach the peer."""
    name = "crucible_test_drop_" + str(os.getpid())
    fam = "ip6" if ":" in src[0] else "ip"
    rc, err = netlock._run(f"table inet {name} {{\n chain out {{\n  type filter hook {hook} priority -200; "
                           f"policy accept;\n  {fam} saddr {src[0]} {fam} daddr {dst[0]} tcp sport {src[1]} "
                           f"tcp dport {dst[1]} drop\n }}\n}}\n")
    assert rc == 0, err
    return name


def _hostile_states_invalid(img: str, good: dict) -> None:
    """A record whose state this engine does not rebuild, or a fin-wait2 one
    with bytes not acknowledged, is image-invalid before anything is made."""
    from engine.fds import handler
    from engine.context import RestoreContext
    from engine.image import ImageReader
    reader = ImageReader(img)
    try:
        recs = reader.read_json("fds.json")
        ctx = RestoreContext(options=Options(), image=reader, same_node=True, records=recs, pid=None)
        handler(good["kind"]).validate(good, ctx)
        assert good["repair"]["outq_len"] > 0
        for state in (2, 6, 7, 10, 11, 5):               # syn-sent, time-wait, close, listen, closing; fin-wait2
            with pytest.raises(Refusal) as ei:
                handler(good["kind"]).validate(dict(good, state=state), ctx)
            assert ei.value.reason == "image-invalid", state
    finally:
        reader.close()


@pytest.mark.skipif(netlock.available() is not None, reason=f"no network lock here: {netlock.available()}")
def test_half_closed_connection_waiting_to_be_accepted_is_refused(procs, tmp_path):
    """A client that shut down writing while its connection waits in its own
    listener's accept queue: such a connection is made again by connecting
    anew, which would not send its FIN."""
    script = tmp_path / "cw.py"
    script.write_text(r'''
import os, socket, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
c = socket.create_connection(l.getsockname()[:2])
c.shutdown(socket.SHUT_WR)                  # acknowledged by the waiting end: FIN_WAIT2
os.dup2(c.fileno(), 500); os.dup2(l.fileno(), 501); c.close(); l.close()
open("ready.tmp", "w").close(); os.rename("ready.tmp", "ready")
while True:
    time.sleep(1)
''')
    p = procs.start([python_exe(), str(script)], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "ready").exists(), what="the worker")
    time.sleep(0.2)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    # the listener finds its waiting connection half-closed (not counted as
    # waiting) and is refused; the client says why if asked
    assert {r.reason for r in refusals} == {"socket"} and {r.fd for r in refusals} <= {500, 501}
    assert not (tmp_path / "img").exists()


WAITING = SERVE + r'''
import json, os, signal, socket, sys, time
MODE = sys.argv[2]
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(4)
c = socket.create_connection(l.getsockname())
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if MODE == "data":
    c.send(b"hello")
if MODE == "two":
    c2 = socket.create_connection(l.getsockname()); os.dup2(c2.fileno(), 502); c2.close()
cname = c.getsockname()
os.dup2(l.fileno(), 500); os.dup2(c.fileno(), 501); l.close(); c.close()

def check():
    l = socket.socket(fileno=os.dup(500)); c = socket.socket(fileno=os.dup(501))
    l.settimeout(5); c.settimeout(5)
    a, peer = l.accept()
    a.settimeout(5)
    if MODE == "data":
        assert a.recv(5) == b"hello"
    c.sendall(b"ping"); a.sendall(b"pong")
    out = {"peer": list(peer) == list(cname), "ping": a.recv(4) == b"ping", "pong": c.recv(4) == b"pong",
           "nodelay": c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1,
           "reuse": l.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1}
    return out

serve(check)
'''


def test_listener_with_a_waiting_connection_from_its_own_client_restored_waiting(procs, tmp_path):
    p = _worker(procs, tmp_path, WAITING, "empty")
    dump_restore(procs, p, str(tmp_path / "img"))
    recs = {r["fd"]: r for r in json.loads((tmp_path / "img" / "fds.json").read_text())}
    assert len(recs[500]["waiting"]) == 1 and recs[501]["peer"] == "accept"
    assert _verdict(p, tmp_path) == {"peer": True, "ping": True, "pong": True, "nodelay": True, "reuse": True}


@pytest.mark.parametrize("mode, detail", [
    ("data", "waits in the accept queue with 5 bytes its client sent: they cannot be read without accepting it"),
    ("two", "2 connections waiting in the accept queue: their accept order cannot be read"),
])
def test_listener_with_waiting_connections_that_cannot_be_made_again_is_refused(procs, tmp_path, mode, detail):
    p = _worker(procs, tmp_path, WAITING, mode)
    time.sleep(0.1)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [(r.reason, r.fd) for r in refusals] == [("socket", 500)]
    assert detail in refusals[0].detail
    assert not (tmp_path / "img").exists()
    v = _verdict(p, tmp_path)                          # untouched: the connection is still there to accept
    assert v["peer"] and v["ping"] and v["pong"]


def test_listener_whose_waiting_client_is_outside_is_refused(procs, tmp_path):
    script = tmp_path / "l.py"
    script.write_text(r'''
import os, socket, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(4)
open("port.tmp", "w").write(str(l.getsockname()[1])); os.rename("port.tmp", "port")
os.dup2(l.fileno(), 500); l.close()
while True:
    time.sleep(1)
''')
    p = procs.start([python_exe(), str(script)], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "port").exists(), what="the listener")
    with socket.create_connection(("127.0.0.1", int((tmp_path / "port").read_text()))):
        time.sleep(0.1)
        with pytest.raises((Refusal, Refusals)) as ei:
            dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [(r.reason, r.fd) for r in refusals] == [("socket", 500)]
    assert "its client is outside the dump" in refusals[0].detail


SHUTRD = SERVE + r'''
import json, os, signal, socket, sys, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
c = socket.create_connection(l.getsockname()); a, _ = l.accept(); l.close()
c.sendall(b"queued")
time.sleep(0.05)
a.shutdown(socket.SHUT_RD)            # still established; reads give the queue, then EOF
os.dup2(c.fileno(), 500); os.dup2(a.fileno(), 501); c.close(); a.close()

def check():
    c = socket.socket(fileno=os.dup(500)); a = socket.socket(fileno=os.dup(501))
    a.settimeout(5); c.settimeout(5)
    got = [a.recv(100), a.recv(100)]
    a.sendall(b"still")
    out = {"reads": [g.decode() for g in got], "write": c.recv(5).decode()}
    return out

serve(check)
'''


def test_shutdown_for_reading_is_restored(procs, tmp_path):
    p = _worker(procs, tmp_path, SHUTRD)
    dump_restore(procs, p, str(tmp_path / "img"))
    recs = {r["fd"]: r for r in json.loads((tmp_path / "img" / "fds.json").read_text())}
    assert (recs[500]["shut_rd"], recs[501]["shut_rd"]) == (False, True)
    assert _verdict(p, tmp_path) == {"reads": ["queued", ""], "write": "still"}


HALF = STREAM + SERVE + r"""
import json, os, signal, socket, sys, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
c = socket.create_connection(l.getsockname()); a, _ = l.accept(); l.close()
a.sendall(stream(b"a2c", 0, 3000))
c.sendall(stream(b"c2a", 0, 2000))
a.shutdown(socket.SHUT_WR)          # a: FIN_WAIT2, c: CLOSE_WAIT (the FIN after a's 3000 bytes)
time.sleep(0.1)
os.dup2(c.fileno(), 500); os.dup2(a.fileno(), 501); c.close(); a.close()

def states():
    out = {}
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        out[int(f[9])] = int(f[3], 16)
    return [out.get(os.fstat(fd).st_ino) for fd in (500, 501)]

def check():
    c = socket.socket(fileno=os.dup(500)); a = socket.socket(fileno=os.dup(501))
    c.settimeout(5); a.settimeout(5)
    st = states()
    got = to_eof(c)
    back = bytearray()
    while len(back) < 2000:
        back += a.recv(2000 - len(back))
    c.sendall(b"late")                   # the close-wait end can still write
    out = {"states": st, "a2c": bytes(got) == stream(b"a2c", 0, 3000), "c2a": bytes(back) == stream(b"c2a", 0, 2000),
           "late": a.recv(4).decode()}
    return out

serve(check)
"""


def test_half_closed_pair_restored_with_its_fin(procs, tmp_path):
    p = _worker(procs, tmp_path, HALF)
    dump_restore(procs, p, str(tmp_path / "img"))
    recs = {r["fd"]: r for r in json.loads((tmp_path / "img" / "fds.json").read_text())}
    assert (recs[500]["state"], recs[501]["state"]) == (8, 5)
    # close-wait, fin-wait2 as they were; c reads a's bytes then EOF
    assert _verdict(p, tmp_path) == {"states": [8, 5], "a2c": True, "c2a": True, "late": "late"}


@pytest.mark.skipif(netlock.available() is not None, reason=f"no network lock here: {netlock.available()}")
def test_outside_peer_over_loopback_is_refused_on_another_machine(procs, tmp_path):
    from engine.context import RestoreContext
    from engine.fds import socket as socket_kind
    from engine.image import ImageReader
    srv, peer = _start_server_and_peer(procs, tmp_path, 100_000)
    dump(srv.pid, str(tmp_path / "img"), Options())
    srv.wait()
    img = ImageReader(str(tmp_path / "img"))
    try:
        img.verify()
        recs = img.read_json("fds.json")
        rec = next(r for r in recs if r.get("sock") == "tcp-conn")
        socket_kind.validate(rec, RestoreContext(options=Options(), image=img, same_node=True, records=recs))
        with pytest.raises(Refusal) as ei:
            socket_kind.validate(rec, RestoreContext(options=Options(), image=img, same_node=False, records=recs))
    finally:
        img.close()
    assert ei.value.reason == "socket" and "over loopback, restored on another machine" in ei.value.detail
    out = restore(str(tmp_path / "img"), Options())        # here, the same machine: the peer is waiting
    procs.adopt(out["pid"])
    assert peer.wait(timeout=120) == 0, peer.stderr.read().decode()


def test_unsent_bytes_requeued_past_a_full_send_buffer_on_leaving_repair():
    """_tcpconn.finish on a connection whose send buffer is already full
    (the rebuilt queue's skbs charged more than the original's): the unsent
    bytes still go back in, and the buffer size and lock bits read back as
    recorded. On the old code the non-blocking send failed with EAGAIN and
    the restore was lost after the dump had killed the process."""
    from engine.context import RestoreContext
    from engine.fds import _tcpconn
    lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    c.connect(lst.getsockname()); a, _ = lst.accept(); lst.close()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.setblocking(False)
    full = 0
    try:
        while True:
            full += c.send(b"q" * 4096)
    except BlockingIOError:
        pass
    c.setblocking(True)         # the process's own file status: finish() must not change it
    try:
        sndbuf = c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4).hex()
        lock = c.getsockopt(socket.SOL_SOCKET, 72, 4).hex()
        assert lock == "01000000"         # SO_SNDBUF locked it
        reuse = c.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 4).hex()
        c.setsockopt(socket.IPPROTO_TCP, _tcpconn.TCP_REPAIR, 1)
        unsent = b"u" * 200000
        ctx = RestoreContext(options=Options(), image=None, same_node=True)
        ctx.shared = {"tcp-conn-live:1": c.fileno(), "tcp-conn-unsent:1": unsent}
        rec = {"inode": 1, "fd": 500, "state": _tcpconn.ESTABLISHED, "set": [],
               "opts": {"SO_REUSEADDR": reuse, "SO_BUF_LOCK": lock},
               "moved": {"SO_SNDBUF": sndbuf}}
        _tcpconn.finish(rec, ctx, None)
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4).hex() == sndbuf
        assert c.getsockopt(socket.SOL_SOCKET, 72, 4).hex() == lock
        assert not fcntl.fcntl(c.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        a.settimeout(10)
        got = 0
        while got < full + len(unsent):
            b = a.recv(1 << 16)
            assert b
            got += len(b)
        assert got == full + len(unsent)
    finally:
        c.close()
        a.close()
