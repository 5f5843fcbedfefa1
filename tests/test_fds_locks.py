"""File locks on regular files: flock, POSIX (fcntl F_SETLK) and OFD locks
held by the process alone are restored (flock/OFD on the open file, POSIX
by the new process itself), and so are read and write leases (set by the
new process: it becomes their owner); another holder, a waiter, a shared
locked open file or a lease being broken is refused as `file-lock` naming
who or why."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys

import pytest

from engine.errors import Refusal

from engine_core_support import procs, python_exe, wait_for  # noqa: F401
from fds_support import Target, classify, dump, dump_restore, restore

F_OFD_GETLK, F_OFD_SETLK = 36, 37


def flock_struct(typ, start, length, pid=0):
    return struct.pack("=hh4xqqi4x", typ, os.SEEK_SET, start, length, pid)


def lock_lines(fd: int):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return [" ".join(l.split()[2:5] + l.split()[7:]) for l in f.read().splitlines() if l.startswith("lock:")]


def other_process(code: str, path: str) -> str:
    """Run `code` in a fresh process with `fd` open on `path`; its stdout."""
    src = f"import fcntl, os, struct\nfd = os.open({path!r}, os.O_RDWR)\n" + code
    return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=20,
                          close_fds=True).stdout.strip()


SETUP = """
for name in ("f", "o", "p"):
    with open(os.path.join(D, name), "wb") as f:
        f.write(b"x" * 4096)
a = os.open(os.path.join(D, "f"), os.O_RDWR); fcntl.flock(a, fcntl.LOCK_EX); os.dup2(a, 500); os.close(a)
b = os.open(os.path.join(D, "o"), os.O_RDWR)
fcntl.fcntl(b, 37, struct.pack("=hh4xqqi4x", fcntl.F_WRLCK, 0, 100, 50, 0))   # OFD write 100-149
os.dup2(b, 501); os.close(b)
c = os.open(os.path.join(D, "p"), os.O_RDWR)
os.dup2(c, 502); os.close(c)            # (closing an fd drops the process's POSIX locks on the file)
fcntl.lockf(502, fcntl.LOCK_SH, 10, 0)                                      # POSIX read 0-9
fcntl.lockf(502, fcntl.LOCK_EX, 0, 2000)                                    # POSIX write 2000-EOF
"""


def test_flock_ofd_and_posix_locks_restored(tmp_path):
    d = str(tmp_path)
    with Target(tmp_path, f"D = {d!r}\n" + SETUP) as t:
        assert classify(t.pid, 500).endswith(", locks flock WRITE 0-EOF")
        assert classify(t.pid, 501).endswith(", locks OFD WRITE 100-149")
        assert classify(t.pid, 502).endswith(", locks POSIX READ 0-9, POSIX WRITE 2000-EOF")
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        with restore(img):
            assert lock_lines(500) == ["FLOCK ADVISORY WRITE 0 EOF"]
            assert lock_lines(501) == ["OFDLCK ADVISORY WRITE 100 149"]
            assert sorted(lock_lines(502)) == ["POSIX ADVISORY READ 0 9", "POSIX ADVISORY WRITE 2000 EOF"]
            # The locks hold against another process, and the POSIX ones are
            # this (the restored) process's own.
            got = other_process("""
try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB); print("flock free")
except BlockingIOError:
    print("flock held")
""", os.path.join(d, "f"))
            assert got == "flock held"
            got = other_process("""
r = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("=hh4xqqi4x", fcntl.F_RDLCK, 0, 2500, 1, 0))
print(struct.unpack_from("=h", r)[0], struct.unpack_from("=i", r, 24)[0])
r = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("=hh4xqqi4x", fcntl.F_RDLCK, 0, 5, 1, 0))
print(struct.unpack_from("=h", r)[0])
""", os.path.join(d, "p"))
            assert got.split() == [str(fcntl.F_WRLCK), str(os.getpid()), str(fcntl.F_UNLCK)]
            got = other_process("""
r = fcntl.fcntl(fd, 36, struct.pack("=hh4xqqi4x", fcntl.F_RDLCK, 0, 120, 1, 0))
print(struct.unpack_from("=h", r)[0])
""", os.path.join(d, "o"))
            assert got == str(fcntl.F_WRLCK)


def test_lock_of_another_process_on_the_file_refused(tmp_path):
    path = tmp_path / "shared"
    path.write_bytes(b"y" * 100)
    mine = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(mine, fcntl.LOCK_SH, 10, 50)          # this test process: POSIX read 50-59
        setup = f"""
c = os.open({str(path)!r}, os.O_RDWR); os.dup2(c, 500); os.close(c); fcntl.lockf(500, fcntl.LOCK_SH, 10, 0)
"""
        with Target(tmp_path, setup) as t:
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "file-lock"
            assert ei.value.detail == f"another holder: pid {os.getpid()} holds POSIX READ 50-59 on this file"
    finally:
        os.close(mine)


def test_waiter_for_the_process_lock_refused(tmp_path):
    path = tmp_path / "w"
    path.write_bytes(b"z" * 10)
    setup = f"""
c = os.open({str(path)!r}, os.O_RDWR); fcntl.flock(c, fcntl.LOCK_EX); os.dup2(c, 500); os.close(c)
"""
    with Target(tmp_path, setup) as t:
        waiter = subprocess.Popen([sys.executable, "-c", f"import fcntl, os\nfd = os.open({str(path)!r}, os.O_RDWR)\n"
                                   "fcntl.flock(fd, fcntl.LOCK_EX)\n"], close_fds=True)
        try:
            for _ in range(200):
                if f" -> FLOCK " in open("/proc/locks").read():
                    break
                import time
                time.sleep(0.02)
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "file-lock"
            assert f"pid {waiter.pid} waits for a lock on this file" in ei.value.detail
        finally:
            waiter.kill()
            waiter.wait()


def test_locked_open_file_shared_with_another_process_refused(tmp_path):
    import engine.pidfd as pidfd
    path = tmp_path / "s"
    path.write_bytes(b"s")
    setup = f"""
c = os.open({str(path)!r}, os.O_RDWR); fcntl.flock(c, fcntl.LOCK_SH); os.dup2(c, 500); os.close(c)
"""
    with Target(tmp_path, setup) as t:
        with pidfd.target_fd(t.pid, 500) as d:
            held = os.dup(d)
        try:
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "file-lock"
            assert f"the locked open file is shared with pid {os.getpid()}" in ei.value.detail
        finally:
            os.close(held)


F_SETLEASE, F_GETLEASE, F_SETSIG, F_GETSIG = 1024, 1025, 10, 11
SIGURG, SIGWINCH = 23, 28          # ignored by default: a lease break here must not kill pytest


def lease_setup(path_r, path_w, extra=""):
    return f"""
c = os.open({str(path_r)!r}, os.O_RDONLY); fcntl.fcntl(c, {F_SETLEASE}, fcntl.F_RDLCK)
fcntl.fcntl(c, {F_SETSIG}, {SIGURG}); os.dup2(c, 500); os.close(c)
w = os.open({str(path_w)!r}, os.O_RDWR); fcntl.fcntl(w, {F_SETLEASE}, fcntl.F_WRLCK)
fcntl.fcntl(w, {F_SETSIG}, {SIGWINCH}); os.dup2(w, 501); os.close(w)
{extra}
"""


def opener_turned_away(path, flags) -> bool:
    """Whether a non-blocking open by another process is refused
    (EWOULDBLOCK: it would break a lease; the lease holder is signalled)."""
    return other_process.__globals__["subprocess"].run(
        [sys.executable, "-c", f"import os\ntry:\n os.open({str(path)!r}, {flags} | os.O_NONBLOCK)\n"
         "except BlockingIOError:\n print('turned away')"], capture_output=True, text=True, timeout=20,
        close_fds=True).stdout.strip() == "turned away"


def test_read_and_write_leases_restored(tmp_path):
    r, w = tmp_path / "r", tmp_path / "w"
    r.write_bytes(b"r")
    w.write_bytes(b"w")
    with Target(tmp_path, lease_setup(r, w)) as t:
        assert classify(t.pid, 500).endswith(", locks read lease")
        assert classify(t.pid, 501).endswith(", locks write lease")
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
        with restore(img):
            assert lock_lines(500) == ["LEASE ACTIVE READ 0 EOF"]
            assert lock_lines(501) == ["LEASE ACTIVE WRITE 0 EOF"]
            assert [fcntl.fcntl(fd, F_GETLEASE) for fd in (500, 501)] == [fcntl.F_RDLCK, fcntl.F_WRLCK]
            assert [fcntl.fcntl(fd, F_GETSIG) for fd in (500, 501)] == [SIGURG, SIGWINCH]
            # the new process set them: lease breaks signal it
            assert [fcntl.fcntl(fd, fcntl.F_GETOWN) for fd in (500, 501)] == [os.getpid()] * 2
            assert opener_turned_away(r, "os.O_WRONLY")       # the leases are real: opens break them
            assert opener_turned_away(w, "os.O_RDONLY")


def test_lease_being_broken_refused(tmp_path):
    r, w = tmp_path / "r", tmp_path / "w"
    r.write_bytes(b"r")
    w.write_bytes(b"w")
    breaker = f"""
if os.fork() == 0:
    try:
        os.open({str(r)!r}, os.O_WRONLY | os.O_NONBLOCK)
    finally:
        os._exit(0)
os.wait()
"""
    with Target(tmp_path, lease_setup(r, w, breaker)) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "file-lock" and ei.value.fd == 500
        assert ei.value.detail.startswith("holds a lease being broken (LEASE BREAKING, to become UNLCK)")
        assert classify(t.pid, 501).endswith("write lease")          # the other one is intact


@pytest.mark.parametrize("order", ["as listed", "reversed"])
def test_read_lease_of_another_process_refused(tmp_path, monkeypatch, order):
    """Two read leases on one file, the target's and another's: the other
    holder is the one named, in whichever order /proc/locks lists them
    (it named the target itself now and then)."""
    if order == "reversed":
        from engine.fds import _locks
        real = _locks._system_locks
        monkeypatch.setattr(_locks, "_system_locks", lambda ctx: list(reversed(real(ctx))))
    r, w = tmp_path / "r", tmp_path / "w"
    r.write_bytes(b"r")
    w.write_bytes(b"w")
    other = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, time\nfd = os.open({str(r)!r}, os.O_RDONLY)\n"
                              f"fcntl.fcntl(fd, {F_SETLEASE}, fcntl.F_RDLCK)\nprint('ok', flush=True)\ntime.sleep(60)\n"],
                             stdout=subprocess.PIPE, close_fds=True)
    try:
        assert other.stdout.readline().strip() == b"ok"
        with Target(tmp_path, lease_setup(r, w)) as t:
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "file-lock"
            assert ei.value.detail == f"another holder: pid {other.pid} holds read lease on this file"
    finally:
        other.kill()
        other.wait()


def test_lease_owner_elsewhere_refused(tmp_path):
    r, w = tmp_path / "r", tmp_path / "w"
    r.write_bytes(b"r")
    w.write_bytes(b"w")
    with Target(tmp_path, lease_setup(r, w, "fcntl.fcntl(500, fcntl.F_SETOWN, os.getppid())")) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "file-lock"
        assert f"break signals go to {os.getpid()} (F_SETOWN)" in ei.value.detail


def test_lease_that_cannot_be_placed_at_restore_refused(tmp_path):
    r, w = tmp_path / "r", tmp_path / "w"
    r.write_bytes(b"r")
    w.write_bytes(b"w")
    with Target(tmp_path, lease_setup(r, w)) as t:
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        t.close()
    writer = os.open(r, os.O_WRONLY)          # open for writing now: no read lease can be placed
    try:
        with pytest.raises(Refusal) as ei:
            restore(img)
        assert ei.value.reason == "file-lock" and ei.value.fd == 500
        assert ei.value.detail.startswith("read lease: cannot be placed now")
    finally:
        os.close(writer)


def test_lock_taken_by_someone_else_before_restore_refused(tmp_path):
    d = str(tmp_path)
    with Target(tmp_path, f"D = {d!r}\n" + SETUP) as t:
        img = dump(t.pid, [500, 501, 502], str(tmp_path / "img"))
        t.close()
        thief = subprocess.Popen([sys.executable, "-c",
                                  f"import fcntl, os, time\nfd = os.open({os.path.join(d, 'p')!r}, os.O_RDWR)\n"
                                  "fcntl.lockf(fd, fcntl.LOCK_EX, 1, 5)\nprint('ok', flush=True)\ntime.sleep(60)\n"],
                                 stdout=subprocess.PIPE, close_fds=True)
        try:
            assert thief.stdout.readline().strip() == b"ok"
            with pytest.raises(Refusal) as ei:
                restore(img)
            assert ei.value.reason == "file-lock"
            assert ei.value.detail == f"POSIX READ 0-9: pid {thief.pid} holds a conflicting lock on the file now"
        finally:
            thief.kill()
            thief.wait()


def test_flock_on_a_directory_refused_not_dropped(tmp_path):
    setup = f"""
c = os.open({str(tmp_path)!r}, os.O_RDONLY | os.O_DIRECTORY); fcntl.flock(c, fcntl.LOCK_EX); os.dup2(c, 500); os.close(c)
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "file-lock"


E2E = r'''
import fcntl, json, os, signal, socket, sys, time
d = sys.argv[1]
with open(os.path.join(d, "p"), "wb") as f:
    f.write(b"p" * 100)
fd = os.open(os.path.join(d, "p"), os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 10, 20)                     # POSIX write 20-29
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); t.bind(("127.0.0.1", 0))
t.sendto(b"queued", u.getsockname()); src = t.getsockname(); t.close()
def report(*_):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        locks = [l.split()[2:5] for l in f.read().splitlines() if l.startswith("lock:")]
    data, frm = u.recvfrom(100, socket.MSG_DONTWAIT)
    with open(os.path.join(d, "v.tmp"), "w") as f:
        json.dump({"locks": locks, "data": data.decode(), "from": list(frm), "src": list(src)}, f)
    os.rename(os.path.join(d, "v.tmp"), os.path.join(d, "v.json"))
signal.signal(signal.SIGUSR1, report)
open(os.path.join(d, "ready"), "w").close()
while True:
    signal.pause()
'''


@pytest.mark.slow
def test_posix_lock_and_udp_queue_restored_end_to_end(procs, tmp_path):
    """Through the real dump and restore: the POSIX lock is taken by the
    restored process itself (injected fcntl), the UDP datagram keeps its
    source."""
    if True:
        p = procs.start([python_exe(), "-c", E2E, str(tmp_path)], cwd=str(tmp_path))
        wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the worker")
        dump_restore(procs, p, str(tmp_path / "img"))
        got = other_process("""
r = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("=hh4xqqi4x", fcntl.F_RDLCK, 0, 25, 1, 0))
print(struct.unpack_from("=h", r)[0], struct.unpack_from("=i", r, 24)[0])
""", str(tmp_path / "p"))
        assert got.split() == [str(fcntl.F_WRLCK), str(p.pid)]
        os.kill(p.pid, 10)
        wait_for(lambda: (tmp_path / "v.json").exists(), what="the restored worker's report")
        import json
        v = json.loads((tmp_path / "v.json").read_text())
        assert v["locks"] == [["POSIX", "ADVISORY", "WRITE"]]
        assert v["data"] == "queued" and v["from"] == v["src"]
