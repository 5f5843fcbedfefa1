"""CPython target for the fault-point and kill tests: one fd of every kind
a dump saves, a second thread, a secret and a counter held only in memory.

usage: faultee.py DIR [--child] [--pty]
Writes DIR/secret.sha (sha256 of a random secret it keeps in memory) and
DIR/ready. On SIGUSR1 it checks, without consuming anything, that every fd
is still what it made (kind, offset, buffered bytes, counts, masks, lock,
the epoll registration, the dup sharing the offset), that the secret still
hashes the same and that the thread is still counting, and writes
DIR/verdict.json: {"ok", "errors", "counter", "thread_counter", "secret"}.
With --pty it also holds a pty pair (master and slave).
With --child it is a process tree: a child forked first writes to a pipe as
it counts, and the check also wants the child alive and writing.
The counter and the thread's counter only ever go up by one per step, so a
restore from an older image or a fresh start shows as a counter going back.
"""

import ctypes
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time

d = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
child = 0
if "--child" in sys.argv[2:]:
    # A process tree (engine/tree.py): a child forked before anything else,
    # counting in its own memory; the parent's check sees it alive and going on.
    rd, wr = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(rd)
        n = 0
        while True:
            n += 1
            if n % 4 == 0:
                os.write(wr, b".")
            time.sleep(0.005)
    os.close(wr)
    os.set_blocking(rd, False)
secret = bytearray(os.urandom(32))
state = {"counter": 0, "thread": 0}
fds = {}

fds["regular"] = os.open(os.path.join(d, "data"), os.O_RDWR | os.O_CREAT, 0o600)
os.write(fds["regular"], bytes(range(256)) * 4)
os.lseek(fds["regular"], 100, os.SEEK_SET)
fcntl.flock(fds["regular"], fcntl.LOCK_EX)
fds["dup"] = os.dup(fds["regular"])
fds["directory"] = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
fds["ghost"] = os.open(os.path.join(d, "ghost"), os.O_RDWR | os.O_CREAT, 0o600)
os.write(fds["ghost"], b"ghost-bytes")
os.unlink(os.path.join(d, "ghost"))
fds["device"] = os.open("/dev/null", os.O_RDWR)
os.symlink("data", os.path.join(d, "link"))
fds["symlink"] = os.open(os.path.join(d, "link"), os.O_PATH | os.O_NOFOLLOW)
os.mkfifo(os.path.join(d, "fifo"))
fds["fifo"] = os.open(os.path.join(d, "fifo"), os.O_RDWR | os.O_NONBLOCK)
os.write(fds["fifo"], b"fifo-bytes")
fds["pipe_r"], fds["pipe_w"] = os.pipe()
os.write(fds["pipe_w"], b"pipe-bytes!")
s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
fds["sock_a"], fds["sock_b"] = s1.detach(), s2.detach()
os.write(fds["sock_a"], b"socket-bytes")
fds["inotify"] = libc.inotify_init1(os.O_CLOEXEC)
os.mkdir(os.path.join(d, "watched"))
WD = libc.inotify_add_watch(fds["inotify"], os.path.join(d, "watched").encode(), 0x100)   # IN_CREATE
fds["eventfd"] = os.eventfd(7)
fds["procfile"] = os.open("/proc/self/stat", os.O_RDONLY)    # not read yet: reopened (pread keeps f_pos 0)
fds["procsys"] = os.open("/proc/loadavg", os.O_RDONLY)
fds["timerfd"] = libc.timerfd_create(1, 0)   # CLOCK_MONOTONIC, unarmed
fds["pidfd"] = os.pidfd_open(child or os.getpid())      # of the child in a tree (a member), or itself
_dead = os.fork()
if _dead == 0:
    os._exit(3)
fds["pidfd_dead"] = os.pidfd_open(_dead)     # while a zombie; reaped next: "Pid: -1"
os.waitpid(_dead, 0)
mask = ctypes.c_uint64(1 << (signal.SIGUSR2 - 1))
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
fds["signalfd"] = libc.signalfd(-1, ctypes.byref(mask), 0)
ep = select.epoll()
ep.register(fds["pipe_r"], select.EPOLLIN)
fds["epoll"] = ep.fileno()
if "--pty" in sys.argv[2:]:
    import termios as _t
    fds["pty_master"], fds["pty_slave"] = os.openpty()
    PTY = (os.ttyname(fds["pty_slave"]), _t.tcgetattr(fds["pty_slave"]))
assert all(v >= 0 for v in fds.values()), fds

with open(os.path.join(d, "secret.sha"), "w") as f:
    f.write(hashlib.sha256(secret).hexdigest())
fired = []
signal.signal(signal.SIGUSR1, lambda s, f: fired.append(1))


def fdinfo(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return f.read()


def queued(fd):
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def check():
    errors = []

    def expect(cond, what):
        if not cond:
            errors.append(what)
    links = {k: os.readlink(f"/proc/self/fd/{v}") for k, v in fds.items()}
    expect(links["regular"] == os.path.join(d, "data"), f"regular link {links['regular']}")
    expect(os.lseek(fds["regular"], 0, os.SEEK_CUR) == 100, "regular offset")
    expect(os.pread(fds["regular"], 4, 100) == bytes([100, 101, 102, 103]), "regular content")
    expect("FLOCK" in fdinfo(fds["regular"]), "flock held")
    expect(os.fstat(fds["dup"]).st_ino == os.fstat(fds["regular"]).st_ino, "dup same file")
    os.lseek(fds["dup"], 101, os.SEEK_SET)
    expect(os.lseek(fds["regular"], 0, os.SEEK_CUR) == 101, "dup shares the offset")
    os.lseek(fds["dup"], 100, os.SEEK_SET)
    expect(os.fstat(fds["directory"]).st_ino == os.stat(d).st_ino, "directory")
    expect(os.pread(fds["ghost"], 64, 0) == b"ghost-bytes" and os.fstat(fds["ghost"]).st_nlink == 0, "ghost")
    expect(os.fstat(fds["device"]).st_rdev == os.stat("/dev/null").st_rdev, "device")
    expect(os.readlink("", dir_fd=fds["symlink"]) == "data" and links["symlink"] == os.path.join(d, "link"),
           "symlink held by O_PATH")
    expect(queued(fds["fifo"]) == len(b"fifo-bytes"), "fifo bytes")
    expect(queued(fds["pipe_r"]) == len(b"pipe-bytes!"), "pipe bytes")
    expect(queued(fds["sock_b"]) == len(b"socket-bytes"), "socket bytes")
    expect(socket.socket(fileno=os.dup(fds["sock_b"])).getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 0,
           "SO_PASSCRED still off")
    expect(links["pipe_r"] == links["pipe_w"], "pipe ends are one pipe")
    expect("inotify wd:" in fdinfo(fds["inotify"]) and "mask:100" in fdinfo(fds["inotify"]), "inotify watch")
    expect("eventfd-count:                7" in fdinfo(fds["eventfd"])
           or "eventfd-count: 7" in " ".join(fdinfo(fds["eventfd"]).split()), "eventfd count")
    expect("clockid: 1" in fdinfo(fds["timerfd"]), "timerfd clock")
    expect(f"Pid:\t{child or os.getpid()}\n" in fdinfo(fds["pidfd"]), "pidfd names the process it named")
    expect("Pid:\t-1\n" in fdinfo(fds["pidfd_dead"]), "pidfd of a dead process")
    expect(os.pread(fds["procfile"], 64, 0).split()[:1] == [str(os.getpid()).encode()]
           and links["procfile"] == f"/proc/{os.getpid()}/stat", "own /proc file")
    expect(links["procsys"] == "/proc/loadavg" and len(os.pread(fds["procsys"], 64, 0).split()) == 5, "/proc/loadavg")
    expect("sigmask:\t0000000000000800" in fdinfo(fds["signalfd"]), "signalfd mask")
    expect(dict(ep.poll(0)).get(fds["pipe_r"], 0) & select.EPOLLIN, "epoll sees the pipe")
    expect(signal.pthread_sigmask(signal.SIG_BLOCK, []) == {signal.SIGUSR2}, "signal mask")
    expect(worker.is_alive(), "thread alive")
    if "pty_slave" in fds:
        expect(os.isatty(fds["pty_slave"]) and os.ttyname(fds["pty_slave"]) == PTY[0], "pty slave")
        expect(termios.tcgetattr(fds["pty_slave"]) == PTY[1], "pty termios")
    if child:
        got = 0
        end = time.monotonic() + 3
        while not got and time.monotonic() < end:
            try:
                got = len(os.read(rd, 65536))
            except BlockingIOError:
                time.sleep(0.01)
        expect(got > 0, "the child goes on")
        expect(os.waitpid(child, os.WNOHANG) == (0, 0), "the child is alive")
    return errors


def spin():
    while True:
        state["thread"] += 1
        time.sleep(0.005)


worker = threading.Thread(target=spin, daemon=True)
worker.start()
open(os.path.join(d, "ready.tmp"), "w").close()
os.rename(os.path.join(d, "ready.tmp"), os.path.join(d, "ready"))
while True:
    state["counter"] += 1
    time.sleep(0.005)
    if fired:
        fired.clear()
        t0 = state["thread"]
        time.sleep(0.03)
        try:
            errors = check()
        except Exception as e:  # noqa: BLE001 - reported in the verdict
            errors = [repr(e)]
        # A live thread advances within milliseconds; on a loaded machine it
        # may wait seconds for the GIL and a CPU. A stopped one never does.
        end = time.monotonic() + 10
        while state["thread"] <= t0 and time.monotonic() < end:
            time.sleep(0.01)
        if state["thread"] <= t0:
            errors.append("thread stopped counting")
        out = {"ok": not errors, "errors": errors, "counter": state["counter"], "thread_counter": state["thread"],
               "secret": hashlib.sha256(secret).hexdigest()}
        with open(os.path.join(d, "verdict.json.tmp"), "w") as f:
            json.dump(out, f)
        os.rename(os.path.join(d, "verdict.json.tmp"), os.path.join(d, "verdict.json"))
