"""A workload for the fd end-to-end tests: opens the fds named on its
command line (at fixed numbers >= 500), records the ground truth of each
from what it did itself (never from the engine's image), writes "ready",
then on SIGUSR1 checks every fd and writes a JSON verdict.

argv: DIR KIND[,KIND...]
"""

import ctypes
import fcntl
import json
import os
import select
import signal
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
DIR = sys.argv[1]
KINDS = sys.argv[2].split(",")
truth = {}
checks = {}


class ts(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]


class its(ctypes.Structure):
    _fields_ = [("i", ts), ("v", ts)]


def place(fd, n):
    os.dup2(fd, n)
    os.close(fd)
    return n


def setup_pipe():
    r, w = os.pipe()
    data = b"pipe bytes " * 1000
    os.write(w, data)
    place(r, 500)
    place(w, 501)

    def check():
        fcntl.fcntl(500, fcntl.F_SETFL, os.O_NONBLOCK)
        got = os.read(500, 1 << 20)
        os.write(501, b"after")
        return got == data and os.read(500, 100) == b"after"
    checks["pipe"] = check


def setup_fifo():
    path = os.path.join(DIR, "fifo")
    r = place(os.open(path, os.O_RDONLY | os.O_NONBLOCK), 502)
    w = place(os.open(path, os.O_WRONLY), 503)
    os.write(w, b"fifo bytes")

    def check():
        return (os.readlink("/proc/self/fd/502") == path and os.read(502, 100) == b"fifo bytes"
                and fcntl.fcntl(503, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY)
    checks["fifo"] = check


def setup_eventfd():
    place(libc.eventfd(42, 1), 504)      # EFD_SEMAPHORE

    def check():
        return [struct.unpack("Q", os.read(504, 8))[0] for _ in range(2)] == [1, 1] and \
            "eventfd-count:               28" in open("/proc/self/fdinfo/504").read()
    checks["eventfd"] = check


def setup_timerfd():
    fd = place(libc.timerfd_create(1, 0), 505)
    assert libc.timerfd_settime(fd, 0, ctypes.byref(its(ts(7, 0), ts(1000, 0))), None) == 0

    def check():
        cur = its()
        libc.timerfd_gettime(505, ctypes.byref(cur))
        return cur.i.s == 7 and 0 < cur.v.s < 1000
    checks["timerfd"] = check


def setup_signalfd():
    mask = (ctypes.c_uint64 * 16)()
    mask[0] = 1 << (signal.SIGUSR2 - 1)
    place(libc.signalfd(-1, mask, os.O_NONBLOCK), 506)

    def check():
        return "sigmask:\t0000000000000800" in open("/proc/self/fdinfo/506").read()
    checks["signalfd"] = check


def setup_inotify():
    d = os.path.join(DIR, "watched")
    fd = place(libc.inotify_init1(os.O_NONBLOCK), 507)
    assert libc.inotify_add_watch(fd, d.encode(), 0x100) == 1          # IN_CREATE

    def check():
        open(os.path.join(d, "new"), "w").close()
        data = os.read(507, 4096)
        wd, mask, _, ln = struct.unpack_from("iIII", data)
        return wd == 1 and mask == 0x100 and data[16:16 + ln].rstrip(b"\0") == b"new"
    checks["inotify"] = check


def setup_epoll():
    r, w = os.pipe()
    place(r, 508)
    place(w, 509)
    ep = place(libc.epoll_create1(0), 510)
    assert libc.epoll_ctl(ep, 1, 508, ctypes.c_char_p(struct.pack("=IQ", select.EPOLLIN, 0x5150))) == 0

    def check():
        e = select.epoll.fromfd(os.dup(510))
        try:
            empty = e.poll(0) == []
            os.write(509, b"!")
            return empty and e.poll(0) == [(0x5150, select.EPOLLIN)]
        finally:
            e.close()
    checks["epoll"] = check


def setup_directory():
    d = os.path.join(DIR, "listing")
    fd = place(os.open(d, os.O_RDONLY | os.O_DIRECTORY), 511)
    st = os.fstat(fd)

    def check():
        s = os.fstat(511)
        return (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino) and os.readlink("/proc/self/fd/511") == d
    checks["directory"] = check


for kind in KINDS:
    globals()["setup_" + kind]()


def verify(*_):
    out = {}
    for k, fn in checks.items():
        try:
            out[k] = bool(fn())
        except Exception as e:   # a wrong fd shows up as the error it raised
            out[k] = repr(e)
    with open(os.path.join(DIR, "verdict.tmp"), "w") as f:
        json.dump(out, f)
    os.rename(os.path.join(DIR, "verdict.tmp"), os.path.join(DIR, "verdict.json"))


signal.signal(signal.SIGUSR1, verify)
with open(os.path.join(DIR, "ready.tmp"), "w") as f:   # "ready" appears once closed
    f.write("ready")
os.rename(os.path.join(DIR, "ready.tmp"), os.path.join(DIR, "ready"))
while True:
    time.sleep(0.05)
