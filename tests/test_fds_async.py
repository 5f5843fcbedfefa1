"""O_ASYNC signal-driven I/O (engine/fds/_util.py async_owner,
restore_async): an fd's F_SETOWN_EX owner and F_SETSIG signal are saved
and given back when the owner is in the dump (the process itself, one of
its threads, its process group; nginx's master owns its channel sockets),
and refused when the owner is outside. The worker proves it from its own
side: the owner and signal read back, and a write to the peer delivers
that signal to it after the restore."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from engine.context import Options
from engine.dump import check
from engine_core_support import procs  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

WORKER = r'''
import fcntl, json, os, signal, socket, struct, sys, threading, time
F_SETSIG, F_GETSIG, F_SETOWN_EX, F_GETOWN_EX = 10, 11, 15, 16
mode = sys.argv[1]
got = []
signal.signal(signal.SIGUSR2, lambda *a: got.append(1))
a, b = socket.socketpair()
os.dup2(a.fileno(), 5); os.dup2(b.fileno(), 6); a.close(); b.close()
tid = [0]
if mode == "thread":
    ev = threading.Event()
    def sleeper():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        tid[0] = threading.get_native_id()
        ev.set()
        while True:
            time.sleep(0.05)
    threading.Thread(target=sleeper, daemon=True).start()
    ev.wait()
owner = {"self": (1, os.getpid()), "thread": (0, tid[0]), "pgrp": (2, os.getpgrp()),
         "outside": (1, int(sys.argv[2]) if len(sys.argv) > 2 else 0)}[mode]
fcntl.fcntl(5, F_SETOWN_EX, struct.pack("ii", *owner))
fcntl.fcntl(5, F_SETSIG, signal.SIGUSR2)
fcntl.fcntl(5, fcntl.F_SETFL, fcntl.fcntl(5, fcntl.F_GETFL) | os.O_ASYNC)
os.dup2(5, 7)                               # a dup: the owner is its open file's, kept once

def check():
    before = len(got)
    own = struct.unpack("ii", fcntl.fcntl(5, F_GETOWN_EX, bytes(8)))
    os.write(6, b"x")                       # data arrives at fd 5: its owner gets the signal
    end = time.monotonic() + 5
    while len(got) == before and time.monotonic() < end:
        time.sleep(0.01)
    return {"owner": list(own), "want": list(owner), "sig": fcntl.fcntl(5, F_GETSIG),
            "async": bool(fcntl.fcntl(5, fcntl.F_GETFL) & os.O_ASYNC), "signalled": len(got) > before}

def on_usr1(*_):
    with open("verdict.json.tmp", "w") as f:
        json.dump(check(), f)
    os.rename("verdict.json.tmp", "verdict.json")
signal.signal(signal.SIGUSR1, on_usr1)
open("ready.tmp", "w").close(); os.rename("ready.tmp", "ready")
while True:         # not pause(): a signal caught by the other thread must wake this one too
    time.sleep(0.05)
'''


@pytest.mark.parametrize("mode", ["self", "thread", "pgrp"])
def test_owner_in_the_dump_gets_its_signals_after_the_restore(procs, tmp_path, mode):
    p, _ = start_worker(procs, tmp_path, [mode], WORKER, ready_json=False)
    dump_restore(procs, p, str(tmp_path / "img"))
    rec = next(r for r in json.loads((tmp_path / "img" / "fds.json").read_text()) if r["fd"] == 5)
    assert rec["async"]["signal"] == 12 and rec["async"]["owner_type"] == {"self": 1, "thread": 0, "pgrp": 2}[mode]
    v = ask_verdict(p.pid, tmp_path)
    assert v["owner"] == v["want"] and v["sig"] == 12 and v["async"] and v["signalled"], v


def test_owner_outside_the_dump_is_refused_naming_it(procs, tmp_path):
    other = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, close_fds=True)
    try:
        p, _ = start_worker(procs, tmp_path, ["outside", str(other.pid)], WORKER, ready_json=False)
        rep = check(p.pid, Options())
        bad = [r for r in rep["refusals"] if r.get("fd") == 5]
        assert [r["reason"] for r in bad] == ["unsupported-state"], rep["refusals"]
        assert f"process {other.pid} as its owner, outside the dump" in bad[0]["message"], bad[0]["message"]
        v = ask_verdict(p.pid, tmp_path)           # the worker is unharmed: its owner kept, its signal sent
        assert v["owner"] == v["want"] and v["sig"] == 12 and v["async"], v
        assert other.wait(timeout=10) == -12       # SIGUSR2 reached the outside owner
    finally:
        other.kill()
        other.wait()
