"""CPython target holding several fd kinds, for core + handler integration.

usage: pyfds.py DIR
Opens: DIR/log (O_APPEND, written), DIR/data (read at an offset), a pipe
with both ends here and bytes buffered in it, an eventfd with a count, an
epoll watching the pipe's read end, a dup of the log fd, /dev/null. Writes
DIR/ready. On SIGUSR1 it checks every fd against what it knows it did and
writes DIR/verdict.json: {"ok": bool, "errors": [...]}.
"""

import json
import os
import select
import signal
import sys
import time

d = sys.argv[1]
errors = []
log = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(log, b"first\n")
data = os.open(os.path.join(d, "data"), os.O_RDONLY)
os.lseek(data, 1000, os.SEEK_SET)
r, w = os.pipe()
os.write(w, b"buffered-bytes")
efd = os.eventfd(5, os.EFD_CLOEXEC) if hasattr(os, "eventfd") else None
ep = select.epoll()
ep.register(r, select.EPOLLIN)
dup = os.dup(log)
null = os.open("/dev/null", os.O_RDWR)
fired = []
signal.signal(signal.SIGUSR1, lambda s, f: fired.append(1))


def check():
    def expect(cond, what):
        if not cond:
            errors.append(what)
    expect(os.lseek(data, 0, os.SEEK_CUR) == 1000, "data offset")
    expect(os.read(data, 4) == open(os.path.join(d, "data"), "rb").read()[1000:1004], "data content")
    ev = dict(ep.poll(0))
    expect(ev.get(r, 0) & select.EPOLLIN, "epoll reports the pipe readable")
    expect(os.read(r, 100) == b"buffered-bytes", "pipe bytes")
    if efd is not None:
        expect(os.eventfd_read(efd) == 5, "eventfd count")
        expect(os.get_inheritable(efd) is False, "eventfd cloexec")
    os.write(dup, b"second\n")
    expect(open(os.path.join(d, "log"), "rb").read() == b"first\nsecond\n", "append through the dup")
    expect(os.get_inheritable(log) is False and os.get_inheritable(null) is False, "cloexec bits")
    expect(os.fstat(null).st_rdev == os.stat("/dev/null").st_rdev, "/dev/null")


with open(os.path.join(d, "ready.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(d, "ready.tmp"), os.path.join(d, "ready"))   # closed before it shows
while True:
    time.sleep(0.01)
    if fired:
        fired.clear()
        try:
            check()
        except Exception as e:  # noqa: BLE001 - reported in the verdict
            errors.append(repr(e))
        with open(os.path.join(d, "verdict.json.tmp"), "w") as f:
            json.dump({"ok": not errors, "errors": errors}, f)
        os.rename(os.path.join(d, "verdict.json.tmp"), os.path.join(d, "verdict.json"))
