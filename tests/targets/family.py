"""A process tree for tests/test_engine_tree.py: argv[1] is the mode.

family: the parent P (its own session) holds in memory a random token,
  a MAP_SHARED anonymous page and a private buffer, and an O_RDWR file
  "shared.txt" (offset 2 after "p1"). Its children:
    A  exits 7 at once (a zombie P has not reaped)
    C  kills itself with SIGTERM (a zombie, killed by a signal)
    B  leads its own process group; D joins B's group; E and F are in P's
    E  on "go": writes "c" through the inherited fd (shared offset), exits 5
    F  on "go": writes b"child" into the shared page, checks its private
       copy of the buffer (P changed its own after the fork), exits 6 (66
       if its copy is wrong)
    B, D: on "go", check their parent and group, exit 3 / 4 (33/44 if not)
    G  leads its own session (setsid), exits 8 (88 if not)
  P counts the SIGCHLDs its handler sees. Every child waits for "go2" in a
  sleep loop. Once the zombies exist P writes "ready" with the token and
  the PIDs, then waits for "go", notes its SIGCHLD count, makes "go2", checks its
  groups, reaps every child in order, writes "p2" through its fd, reads the
  shared page, and writes "result" (JSON).
clonefiles: P and a child made by clone(CLONE_FILES) (a shared fd table).
traceme: P and a child that made P its tracer (PTRACE_TRACEME).
badsession: P forks A; A forks B, then calls setsid (B stays in P's session).
killed: P with zombies killed by SIGKILL, SIGSEGV (no core: RLIMIT_CORE 0)
  and SIGTERM, and one that exited 3 (zdtm's zombie00); on "go" it reaps
  them and writes "result": each one's wait status.
outside: P maps shared memory, forks a child that forks a grandchild and
  exits (the grandchild, holding the memory, is outside P's tree), and
  forks another child that sleeps.
"""

import ctypes
import json
import mmap
import os
import signal
import sys
import time

mode = sys.argv[1]
# Members lead sessions of their own, so a test run killed before its
# clean-up (SIGKILL of pytest, a helper's timeout) would leave them for
# good: every member gives up waiting after a test's longest life.
# (CLOCK_MONOTONIC goes on across a restore on the same machine.)
GIVE_UP = time.monotonic() + 900


def _outlived():
    if time.monotonic() > GIVE_UP:
        os._exit(97)


def wait_go(name="go2"):
    while not os.path.exists(name):
        _outlived()
        time.sleep(0.02)


def sleep_forever():
    while True:
        _outlived()
        time.sleep(1)


def ready(obj):
    with open("ready.tmp", "w") as f:
        json.dump(obj, f)
    os.rename("ready.tmp", "ready")


def family():
    token = os.urandom(8).hex()
    me = os.getpid()
    shm = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
    shm[0:5] = b"start"
    mfd = os.memfd_create("family")
    os.ftruncate(mfd, 4096)
    mshm = mmap.mmap(mfd, 4096, mmap.MAP_SHARED)
    os.close(mfd)
    mshm[0:5] = b"start"
    private = bytearray(b"F" * 4096)
    fd = os.open("shared.txt", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"p1")
    kids = {}
    chld = []
    signal.signal(signal.SIGCHLD, lambda *a: chld.append(1))

    def child(name, body):
        pid = os.fork()
        if pid == 0:
            try:
                code = body()
            except BaseException:
                code = 99
            os._exit(code)
        kids[name] = pid

    def a():
        return 7

    def c():
        os.kill(os.getpid(), signal.SIGTERM)
        return 98

    def b():
        os.setpgid(0, 0)
        wait_go()
        return 3 if os.getppid() == me and os.getpgid(0) == os.getpid() else 33

    child("A", a)
    child("C", c)
    child("B", b)
    while os.getpgid(kids["B"]) != kids["B"]:
        time.sleep(0.01)

    def d():
        os.setpgid(0, kids["B"])
        wait_go()
        return 4 if os.getppid() == me and os.getpgid(0) == kids["B"] else 44

    def e():
        wait_go()
        os.write(fd, b"c")
        return 5

    def f():
        wait_go()
        shm[0:5] = b"child"
        mshm[0:5] = b"child"
        return 6 if private == bytearray(b"F" * 4096) else 66

    def g():
        os.setsid()
        wait_go()
        return 8 if os.getsid(0) == os.getpid() and os.getppid() == me else 88

    child("D", d)
    child("E", e)
    child("F", f)
    child("G", g)
    while os.getsid(kids["G"]) != kids["G"]:
        time.sleep(0.01)
    private[:] = b"Q" * 4096
    while os.getpgid(kids["D"]) != kids["B"]:
        time.sleep(0.01)
    for z in ("A", "C"):
        while open(f"/proc/{kids[z]}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
    time.sleep(0.1)
    n_chld = len(chld)
    ready({"token": token, "kids": kids})
    wait_go("go")
    # Before any child is let go ("go2"): a SIGCHLD made by the restore
    # itself would show here.
    n_after = len(chld)
    open("go2", "w").close()
    res = {"token": token, "sigchld": [n_chld, n_after], "pid": os.getpid(), "sid": os.getsid(0) == me,
           "groups": [os.getpgid(kids["B"]) == kids["B"], os.getpgid(kids["D"]) == kids["B"],
                      os.getpgid(kids["E"]) == me]}
    status = {}
    for name in ("A", "C", "B", "D", "E", "F", "G"):
        pid, st = os.waitpid(kids[name], 0)
        status[name] = ("exit", os.WEXITSTATUS(st)) if os.WIFEXITED(st) else ("signal", os.WTERMSIG(st))
    res["status"] = status
    os.write(fd, b"p2")
    res["shm"] = shm[0:5].decode(errors="replace")
    res["memfd"] = mshm[0:5].decode(errors="replace")
    res["private"] = private == bytearray(b"Q" * 4096)
    with open("result.tmp", "w") as f:
        json.dump(res, f)
    os.rename("result.tmp", "result")
    return 0


def clonefiles():
    libc = ctypes.CDLL(None, use_errno=True)
    nr = {"x86_64": 56, "aarch64": 220}[os.uname().machine]
    pid = libc.syscall(nr, 0x400 | signal.SIGCHLD, 0, 0, 0, 0)   # CLONE_FILES, no new stack: a fork
    if pid == 0:
        sleep_forever()
    ready({"kids": {"X": pid}})
    sleep_forever()


def traceme():
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace(0, 0, 0, 0)       # PTRACE_TRACEME: the parent is the tracer
        sleep_forever()
    while "TracerPid:\t0\n" in open(f"/proc/{pid}/status").read():
        time.sleep(0.01)
    ready({"kids": {"X": pid}})
    sleep_forever()


def badsession():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        grand = os.fork()
        if grand == 0:
            sleep_forever()
        os.setsid()
        os.write(w, str(grand).encode())
        sleep_forever()
    grand = int(os.read(r, 64))
    ready({"kids": {"A": pid, "B": grand}})
    sleep_forever()


def outside(memfd=False):
    if memfd:
        fd = os.memfd_create("outside")
        os.ftruncate(fd, 4096)
        shm = mmap.mmap(fd, 4096, mmap.MAP_SHARED)   # the outside grandchild keeps fd open, unmapped
    else:
        shm = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
    shm[0:2] = b"hi"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            if memfd:
                shm.close()     # held open, not mapped
            os.close(r)
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            sleep_forever()
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    grand = int(os.read(r, 64))
    if memfd:
        os.close(fd)
    os.close(r)
    other = os.fork()
    if other == 0:
        sleep_forever()
    ready({"kids": {"X": other}, "outside": grand})
    sleep_forever()


def sockpair():
    """P and C hold the two ends of a stream and a datagram socketpair,
    each end with bytes queued for it; on "go" each reads what is queued
    for it, C answers, and P writes "result"."""
    import socket
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    da, db = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    token = os.urandom(8).hex()
    pr, pw = os.pipe()              # both ends held by both (shared open files), bytes queued
    os.write(pw, b"queued")
    pid = os.fork()
    if pid == 0:
        sa.close()
        da.close()
        sb.sendall(b"to-parent")
        db.send(b"d1")
        db.send(b"d2")
        wait_go("go")
        import struct
        cred = struct.unpack("iII", sb.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        got = sb.recv(100) + b"|" + db.recv(100) + b"|" + os.read(pr, 100) + b"|" + str(cred).encode()
        sb.sendall(b"child-got:" + got)
        os._exit(0)
    sb.close()
    db.close()
    sa.sendall(b"to-child")
    da.send(b"p1")
    while True:
        import fcntl, struct, termios
        q = struct.unpack("i", fcntl.ioctl(sa.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        if q == len(b"to-parent"):
            break
        time.sleep(0.01)
    time.sleep(0.1)
    ready({"token": token, "kids": {"C": pid}})
    wait_go("go")
    first = sa.recv(9)
    d = [da.recv(100), da.recv(100)]
    reply = b""
    while not reply.endswith(str(os.getpid()).encode()):
        chunk = sa.recv(100)
        if not chunk:
            break
        reply += chunk
    os.waitpid(pid, 0)
    with open("result.tmp", "w") as f:
        json.dump({"token": token, "first": first.decode(), "dgrams": [x.decode() for x in d],
                   "reply": reply.decode()}, f)
    os.rename("result.tmp", "result")
    sleep_forever()


def killed():
    import resource
    kids = {}
    for name, sig in (("kill", signal.SIGKILL), ("segv", signal.SIGSEGV), ("term", signal.SIGTERM), ("exit", 0)):
        pid = os.fork()
        if pid == 0:
            if sig:
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                signal.signal(sig, signal.SIG_DFL) if sig != signal.SIGKILL else None
                os.kill(os.getpid(), sig)
            os._exit(3)
        kids[name] = pid
    for pid in kids.values():
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    ready({"kids": kids})
    wait_go("go")
    status = {name: os.waitpid(pid, 0)[1] for name, pid in kids.items()}
    with open("result.tmp", "w") as f:
        json.dump({"status": status}, f)
    os.rename("result.tmp", "result")
    sleep_forever()


{"sockpair": sockpair, "killed": killed, "family": family, "clonefiles": clonefiles, "traceme": traceme, "badsession": badsession,
 "outside": outside, "memfd-outside": lambda: outside(memfd=True)}[mode]()
