"""A unix stream socketpair end whose peer was closed (what a program keeps
after its child or helper exits: socat's EXEC child, a pipeline over
socketpairs): the bytes the peer sent before it closed are read, then EOF,
or first ECONNRESET when the peer closed with bytes of its own unread
(unix_release_sock); writes fail with EPIPE. Restored by rebuilding the pair
and closing the other end the same way. The truth is a twin worker that is
never dumped: the restored one must read and write exactly as it does."""

from __future__ import annotations

import json
import os

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine_core_support import procs  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

WORKER = r'''
import errno, json, os, signal, socket, sys, time
DIR, MODE = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
kind = socket.SOCK_SEQPACKET if MODE == "seqpacket" else socket.SOCK_STREAM
a, b = socket.socketpair(socket.AF_UNIX, kind)
if MODE in ("data", "reset", "seqpacket"):
    b.sendall(b"sent before the close " * 40)
if MODE == "reset":
    a.sendall(b"never read by the peer")
b.close()
os.dup2(a.fileno(), 5); a.close()

def check():
    s = socket.socket(fileno=os.dup(5))
    s.settimeout(5)
    reads = []
    for _ in range(4):
        try:
            got = s.recv(1 << 16)
            reads.append(len(got))
        except OSError as e:
            reads.append(errno.errorcode[e.errno])
    try:
        s.send(b"x")
        wrote = "sent"
    except OSError as e:
        wrote = errno.errorcode[e.errno]
    return {"reads": reads, "write": wrote}

def on_usr1(*_):
    with open(os.path.join(DIR, "verdict.tmp"), "w") as f:
        json.dump(check(), f)
    os.rename(os.path.join(DIR, "verdict.tmp"), os.path.join(DIR, "verdict.json"))
signal.signal(signal.SIGUSR1, on_usr1)
open(os.path.join(DIR, "ready.tmp"), "w").close(); os.rename(os.path.join(DIR, "ready.tmp"), os.path.join(DIR, "ready"))
while True:
    signal.pause()
'''

WANT = {"empty": {"reads": [0, 0, 0, 0], "write": "EPIPE"},
        "data": {"reads": [880, 0, 0, 0], "write": "EPIPE"},
        "reset": {"reads": [880, "ECONNRESET", 0, 0], "write": "EPIPE"}}


@pytest.mark.parametrize("mode", ["empty", "data", "reset"])
def test_stream_end_whose_peer_closed_reads_and_writes_as_the_original(procs, tmp_path, mode):
    twin_dir = tmp_path / "twin"
    twin_dir.mkdir()
    twin, _ = start_worker(procs, twin_dir, [str(twin_dir), mode], WORKER, ready_json=False)
    assert ask_verdict(twin.pid, twin_dir) == WANT[mode]        # the kernel's own behaviour, never dumped
    p, _ = start_worker(procs, tmp_path, [str(tmp_path), mode], WORKER, ready_json=False)
    dump_restore(procs, p, str(tmp_path / "img"))
    rec = next(r for r in json.loads((tmp_path / "img" / "fds.json").read_text()) if r["fd"] == 5)
    assert rec["widowed"] and rec["reset"] == (mode == "reset")
    assert ask_verdict(p.pid, tmp_path) == WANT[mode]


def test_seqpacket_end_whose_peer_closed_is_refused(procs, tmp_path):
    p, _ = start_worker(procs, tmp_path, [str(tmp_path), "seqpacket"], WORKER, ready_json=False)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    r = getattr(ei.value, "refusals", [ei.value])
    assert [(x.reason, x.fd) for x in r] == [("socket", 5)] and "peer is closed" in r[0].detail
    assert not (tmp_path / "img").exists() and p.poll() is None
    assert os.path.exists(f"/proc/{p.pid}")


def test_check_and_leave_running_keep_the_pending_reset(procs, tmp_path):
    """Looking at the queue must not take the ECONNRESET the process is still
    to read (a peek that finds the queue empty would: sock_error)."""
    from engine.dump import check
    p, _ = start_worker(procs, tmp_path, [str(tmp_path), "reset"], WORKER, ready_json=False)
    rep = check(p.pid, Options())
    assert not rep["refusals"], rep["refusals"]
    dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    assert ask_verdict(p.pid, tmp_path) == WANT["reset"]
