"""CPython target holding inodes that have no name left, for the core tests.

usage: ghosts.py DIR KIND[,KIND...]
  file  fd 10: a deleted sparse file, mode 07755, owner 1234:2345, set times
  map   a MAP_SHARED mapping of a deleted 3-page file (no fd left on it)
  dev   fd 11: a deleted mknod'ed clone of /dev/null (1:3), mode 0604
  fifo  fds 12 (read) and 13 (write): a deleted fifo with bytes buffered
  dir   fd 14: a removed directory, mode 03751
  cwd   the working directory is a removed directory, mode 01750
  cwdfd with cwd: fd 15 is open on that same removed directory
Writes DIR/ready. On SIGUSR1 it checks what it can see from inside and
writes DIR/verdict.json: {kind: true or what was wrong}.
"""

import json
import mmap
import os
import signal
import stat
import sys
import time

d, kinds = sys.argv[1], sys.argv[2].split(",")
TIMES = (1_000_000_123, 2_000_000_456)     # atime before mtime: relatime would move it on a read
FIFO_BYTES = b"bytes left in the unlinked fifo" * 10
checks = {}

if "file" in kinds:
    p = os.path.join(d, "ghost-file")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"head", 0)
    os.pwrite(fd, b"middle", 8 << 20)
    os.ftruncate(fd, 16 << 20)
    os.fchown(fd, 1234, 2345)
    os.fchmod(fd, 0o7755)
    os.utime(fd, ns=TIMES)
    os.dup2(fd, 10)
    os.close(fd)
    os.unlink(p)
    os.lseek(10, 4096, os.SEEK_SET)
    checks["file"] = lambda: (os.lseek(10, 0, os.SEEK_CUR) == 4096 and os.pread(10, 4, 0) == b"head"
                              and os.pread(10, 6, 8 << 20) == b"middle" and os.pread(10, 4, 12 << 20) == b"\0" * 4)

if "map" in kinds:
    p = os.path.join(d, "ghost-map")
    with open(p, "wb") as f:
        f.write(bytes(range(256)) * 48)
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 3 * 4096, mmap.MAP_SHARED)
    os.unlink(p)
    m[0:5] = b"later"
    checks["map"] = lambda: m[0:5] == b"later" and m[5:256] == bytes(range(5, 256)) and m[-1] == 255

if "dev" in kinds:
    p = os.path.join(d, "ghost-null")
    os.mknod(p, stat.S_IFCHR | 0o604, os.makedev(1, 3))
    os.chown(p, 1234, 2345)
    fd = os.open(p, os.O_WRONLY)
    os.utime(p, ns=TIMES)
    os.dup2(fd, 11)
    os.close(fd)
    os.unlink(p)
    checks["dev"] = lambda: os.write(11, b"gone") == 4

if "fifo" in kinds:
    p = os.path.join(d, "ghost-fifo")
    os.mkfifo(p, 0o640)
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(p, os.O_WRONLY)
    os.write(w, FIFO_BYTES)
    os.chown(p, 1234, 2345)
    os.utime(p, ns=TIMES)
    os.dup2(r, 12)
    os.dup2(w, 13)
    os.close(r)
    os.close(w)
    os.unlink(p)

    def fifo_ok():
        got = os.read(12, 1 << 16)
        os.write(13, b"more")
        return got == FIFO_BYTES and os.read(12, 100) == b"more"
    checks["fifo"] = fifo_ok

if "dir" in kinds:
    p = os.path.join(d, "ghost-dir")
    os.mkdir(p)
    os.chmod(p, 0o3751)
    os.chown(p, 1234, 2345)
    os.utime(p, ns=TIMES)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    os.dup2(fd, 14)
    os.close(fd)
    os.rmdir(p)
    checks["dir"] = lambda: os.fstat(14).st_nlink == 0 and stat.S_IMODE(os.fstat(14).st_mode) == 0o3751

if "cwd" in kinds:
    p = os.path.join(d, "ghost-cwd")
    os.mkdir(p)
    os.chmod(p, 0o1750)
    os.chdir(p)
    os.utime(p, ns=TIMES)
    if "cwdfd" in kinds:
        os.dup2(os.open(".", os.O_RDONLY | os.O_DIRECTORY), 15)
        checks["cwdfd"] = lambda: os.path.samestat(os.fstat(15), os.stat("."))
    os.rmdir(p)

    def cwd_ok():
        try:
            os.getcwd()
            return False
        except FileNotFoundError:
            return os.stat(".").st_nlink == 0
    checks["cwd"] = cwd_ok

fired = []
signal.signal(signal.SIGUSR1, lambda s, f: fired.append(1))
with open(os.path.join(d, "ready.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(d, "ready.tmp"), os.path.join(d, "ready"))
while True:
    time.sleep(0.01)
    if fired:
        fired.clear()
        verdict = {}
        for k, fn in checks.items():
            try:
                verdict[k] = True if fn() else "wrong"
            except Exception as e:   # noqa: BLE001 - reported, not raised
                verdict[k] = repr(e)
        with open(os.path.join(d, "verdict.tmp"), "w") as f:
            json.dump(verdict, f)
        os.rename(os.path.join(d, "verdict.tmp"), os.path.join(d, "verdict.json"))
