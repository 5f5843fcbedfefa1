"""A TCP connection and the listener it came through held by different
members of a process tree: the parent accepted it, the child (forked
before the accept) keeps the listener and the connecting end. The parent
is restored first; its accepted connection bound the port before the
child's listener was rebuilt, and the listener's bind failed ("address in
use"): the restore was refused after the dump had killed the tree. The
listener is now built before any connection on its port.
"""

from __future__ import annotations

import json
import os
import signal
import socket

from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from test_engine_tree import _dump_restore, _ready, _start, session_killer  # noqa: F401

SRC = r"""
import json, os, signal, socket, sys, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(4)
port = l.getsockname()[1]
kid = os.fork()
if kid == 0:
    c = socket.create_connection(("127.0.0.1", port))
    def on_usr1(*_):
        got = c.recv(100)
        n, _ = l.accept()              # the listener still takes connections
        with open("got.tmp", "w") as f:
            json.dump({"got": got.decode(), "new": n.recv(100).decode()}, f)
        os.rename("got.tmp", "got")
    signal.signal(signal.SIGUSR1, on_usr1)
    while True:
        time.sleep(1)
a, _ = l.accept(); l.close()
signal.signal(signal.SIGUSR1, lambda *_: a.sendall(b"through the restored connection"))
with open("ready.tmp", "w") as f:
    json.dump({"kid": kid, "port": port}, f)
os.rename("ready.tmp", "ready")
while True:
    time.sleep(1)
"""


def test_accepted_connection_and_listener_in_two_members_restored(procs, session_killer, tmp_path):  # noqa: F811
    p = _start(procs, [python_exe(), "-c", SRC], tmp_path)
    session_killer.append(p.pid)
    info = _ready(tmp_path, p)
    _dump_restore(p.pid, tmp_path / "img", procs)
    os.kill(p.pid, signal.SIGUSR1)
    with socket.create_connection(("127.0.0.1", info["port"]), timeout=10) as s:
        s.sendall(b"a new client")
        os.kill(info["kid"], signal.SIGUSR1)
        got = tmp_path / "got"
        wait_for(got.exists, timeout=20, what="the child's report")
    assert json.loads(got.read_text()) == {"got": "through the restored connection", "new": "a new client"}
