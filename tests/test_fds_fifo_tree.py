"""A named fifo whose ends are held by different members of a process tree
(CRIU's zdtm fifo_wronly and fifo-rowo-pair): the parent holds one end,
its child the other. The restorer's keeper (engine/fds/fifo.py) must stay
open until every member's end is open: counted per member, it was closed
after the first member's ends and the next member's open (its fd number
reused) was closed in its place, so the restore failed with EBADF after the
dump had killed the tree.
"""

from __future__ import annotations

import os
import signal

import pytest

from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from test_engine_tree import _dump_restore, _ready, _start, session_killer  # noqa: F401

# The child opens its end first (a fifo open blocks until the other end
# comes), then the parent; on SIGUSR1 the writer writes a line and the
# reader copies what it reads to the file `got`.
SRC = r"""
import json, os, signal, sys, time
fifo, parent_mode = sys.argv[1], sys.argv[2]
child_mode = "r" if parent_mode == "w" else "w"

def serve(mode, fd):
    def on_usr1(*_):
        if mode == "w":
            os.write(fd, b"through the fifo\n")
        else:
            with open("got", "ab") as f:
                f.write(os.read(fd, 100))
    signal.signal(signal.SIGUSR1, on_usr1)
    while True:
        time.sleep(1)

def opened(mode):
    fd = os.open(fifo, os.O_WRONLY if mode == "w" else os.O_RDONLY)
    os.dup2(fd, 40); os.close(fd)
    return 40

kid = os.fork()
if kid == 0:
    serve(child_mode, opened(child_mode))
fd = opened(parent_mode)
with open("ready.tmp", "w") as f:
    json.dump({"kid": kid}, f)
os.rename("ready.tmp", "ready")
serve(parent_mode, fd)
"""


@pytest.mark.parametrize("parent_mode", ["w", "r"])
def test_fifo_ends_in_two_members_restored(procs, session_killer, tmp_path, parent_mode):  # noqa: F811
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    p = _start(procs, [python_exe(), "-c", SRC, str(fifo), parent_mode], tmp_path)
    session_killer.append(p.pid)
    kid = _ready(tmp_path, p)["kid"]
    ino = os.stat(fifo).st_ino
    _dump_restore(p.pid, tmp_path / "img", procs)
    for pid in (p.pid, kid):
        assert os.readlink(f"/proc/{pid}/fd/40") == str(fifo)
        assert os.stat(f"/proc/{pid}/fd/40").st_ino == ino
    writer, reader = (p.pid, kid) if parent_mode == "w" else (kid, p.pid)
    os.kill(writer, signal.SIGUSR1)
    os.kill(reader, signal.SIGUSR1)     # its read waits for the writer's line
    got = tmp_path / "got"
    wait_for(lambda: got.exists() and got.read_bytes(), what="the line through the fifo")
    assert got.read_bytes() == b"through the fifo\n"
