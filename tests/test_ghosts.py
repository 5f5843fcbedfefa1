"""Inodes with no name left come back as they were: deleted files and
memfds, device nodes, fifos, directories, the cwd and mappings. Same mode
(all 12 bits), owner, times, size and holes, and the exact name the kernel
shows ("<path> (deleted)"), with nothing left behind in their directory.

The fd-level tests restore a real target's fds into this process
(fds_support); the core tests dump and restore a real CPython target at
its PID (tests/targets/ghosts.py) and compare /proc before and after."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat

import pytest

from engine.context import Options
from engine.dump import check
from engine.errors import Refusal
from engine.fds import _sys
from engine_core_support import TARGETS, procs, python_exe, wait_for  # noqa: F401
from fds_support import Target, classify, dump, dump_restore, restore

TIMES = (1_000_000_123, 2_000_000_456)    # atime before mtime: relatime would move atime on any read
DELETED = " (deleted)"


def facts(st: os.stat_result) -> dict:
    return {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size,
            "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns, "nlink": st.st_nlink,
            "rdev": st.st_rdev}


def of_fd(pid: int, fd: int):
    return os.readlink(f"/proc/{pid}/fd/{fd}"), facts(os.stat(f"/proc/{pid}/fd/{fd}"))


def listing(path) -> list:
    return sorted(os.listdir(path))


# -- deleted regular files and memfds ----------------------------------------------

GHOST_SETUP = """
fd = os.open({p!r}, os.O_RDWR | os.O_CREAT, 0o600)
os.pwrite(fd, b"head", 0)
os.pwrite(fd, b"middle", 8 << 20)
os.ftruncate(fd, 16 << 20)
os.fchown(fd, 1234, 2345)
os.fchmod(fd, 0o7755)                 # setuid, setgid and sticky
os.utime(fd, ns={times!r})
os.dup2(fd, 500); os.close(fd)
os.lseek(500, 777, os.SEEK_SET)
"""


@pytest.mark.parametrize("at_restore", ["free", "taken"])
def test_deleted_file_keeps_mode_owner_times_holes_and_name(tmp_path, at_restore):
    p = str(tmp_path / "data")
    with Target(tmp_path, GHOST_SETUP.format(p=p, times=TIMES) + f"os.unlink({p!r})") as t:
        before = of_fd(t.pid, 500)
        assert before[0] == p + DELETED and before[1]["nlink"] == 0
        img = dump(t.pid, [500], str(tmp_path / "img"))
    if at_restore == "taken":      # a new file at the old name (a rotated log): it must stay untouched
        with open(p, "w") as f:
            f.write("the new file")
        os.chmod(p, 0o640)
        other = os.stat(p)
    names = listing(tmp_path)
    with restore(img):
        assert of_fd(os.getpid(), 500) == before
        st = os.fstat(500)
        assert st.st_blocks * 512 < 1 << 20, "holes filled in"
        assert os.lseek(500, 0, os.SEEK_CUR) == 777
        assert os.pread(500, 4, 0) == b"head" and os.pread(500, 6, 8 << 20) == b"middle"
        assert os.pread(500, 4, 4 << 20) == b"\0" * 4
        assert listing(tmp_path) == names, "a recreated name was left behind"
    if at_restore == "taken":
        now = os.stat(p)
        assert (now.st_ino, now.st_mode, now.st_size) == (other.st_ino, other.st_mode, other.st_size)
        assert open(p).read() == "the new file"


def test_renamed_over_file_keeps_its_name(tmp_path):
    p = str(tmp_path / "data")
    setup = GHOST_SETUP.format(p=p, times=TIMES) + f"""
open({p!r} + ".new", "w").write("replacement")
os.rename({p!r} + ".new", {p!r})
"""
    with Target(tmp_path, setup) as t:
        before = of_fd(t.pid, 500)
        assert before[0] == p + DELETED
        img = dump(t.pid, [500], str(tmp_path / "img"))
    ino = os.stat(p).st_ino
    names = listing(tmp_path)
    with restore(img):
        assert of_fd(os.getpid(), 500) == before
        assert listing(tmp_path) == names
    assert os.stat(p).st_ino == ino and open(p).read() == "replacement"


@pytest.mark.parametrize("flags,mode", [(0x2, 0o2750), (0x8, 0o640)], ids=["sealing", "noexec-seal"])
def test_memfd_keeps_name_mode_owner_and_seals(tmp_path, flags, mode):
    """0x8 is MFD_NOEXEC_SEAL (6.3+): mode 0666 and F_SEAL_EXEC from birth."""
    setup = """
fd = os.memfd_create("crucible:ghost", %d)
os.write(fd, b"sealed")
os.fchown(fd, 1234, 2345)
os.fchmod(fd, %d)
os.utime(fd, ns=%r)
fcntl.fcntl(fd, 1033, 0x0002 | 0x0004 | 0x0008)      # F_ADD_SEALS: SHRINK | GROW | WRITE
os.dup2(fd, 500); os.close(fd)
""" % (flags, mode, TIMES)
    with Target(tmp_path, setup) as t:
        before = of_fd(t.pid, 500)
        assert before[0] == "/memfd:crucible:ghost (deleted)"
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert of_fd(os.getpid(), 500) == before
        want = 0x0002 | 0x0004 | 0x0008 | (0x20 if flags == 0x8 else 0)
        assert fcntl.fcntl(500, 1034) == want
        assert os.pread(500, 10, 0) == b"sealed"


# -- device nodes -------------------------------------------------------------------

def test_deleted_device_node_keeps_mode_rdev_owner_and_name(tmp_path):
    p = str(tmp_path / "mynull")
    setup = f"""
os.mknod({p!r}, stat.S_IFCHR | 0o604, os.makedev(1, 3))
os.chown({p!r}, 1234, 2345)
fd = os.open({p!r}, os.O_WRONLY)
os.utime({p!r}, ns={TIMES!r})
os.dup2(fd, 500); os.close(fd); os.unlink({p!r})
"""
    with Target(tmp_path, "import stat\n" + setup) as t:
        before = of_fd(t.pid, 500)
        assert before[0] == p + DELETED and before[1]["rdev"] == os.makedev(1, 3)
        assert "unlinked device node" in classify(t.pid, 500)
        img = dump(t.pid, [500], str(tmp_path / "img"))
    names = listing(tmp_path)
    with restore(img):
        assert of_fd(os.getpid(), 500) == before
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        assert os.write(500, b"into the void") == 13
        assert listing(tmp_path) == names


# -- fifos --------------------------------------------------------------------------

FIFO_SETUP = """
os.mkfifo({p!r}, 0o640)
r = os.open({p!r}, os.O_RDONLY | os.O_NONBLOCK)
w = os.open({p!r}, os.O_WRONLY)
os.write(w, b"queued bytes")
os.chown({p!r}, 1234, 2345)
os.utime({p!r}, ns={times!r})
os.dup2(r, 500); os.dup2(w, 501); os.close(r); os.close(w)
"""


@pytest.mark.parametrize("at_restore", ["free", "taken"])
def test_unlinked_fifo_both_ends_with_data(tmp_path, at_restore):
    p = str(tmp_path / "ff")
    with Target(tmp_path, FIFO_SETUP.format(p=p, times=TIMES) + f"os.unlink({p!r})",
                "report['data'] = os.read(500, 100).decode()") as t:
        before = [of_fd(t.pid, fd) for fd in (500, 501)]
        assert before[0][0] == p + DELETED and before[0][1]["nlink"] == 0
        assert "12 bytes buffered" in classify(t.pid, 500)
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
        assert t.check()["data"] == "queued bytes"          # the dump did not consume them
    if at_restore == "taken":
        os.mkfifo(p, 0o600)                                  # another fifo at the old name
        ino = os.stat(p).st_ino
    names = listing(tmp_path)
    with restore(img):
        assert [of_fd(os.getpid(), fd) for fd in (500, 501)] == before
        assert os.fstat(500).st_ino == os.fstat(501).st_ino
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK
        assert not fcntl.fcntl(501, fcntl.F_GETFL) & os.O_NONBLOCK
        assert os.read(500, 100) == b"queued bytes"
        os.write(501, b"more")
        assert os.read(500, 100) == b"more"
        os.close(501)
        assert os.read(500, 100) == b"", "the keeper is still open"
        assert listing(tmp_path) == names
    if at_restore == "taken":
        assert os.stat(p).st_ino == ino and stat.S_ISFIFO(os.stat(p).st_mode)


def test_unlinked_fifo_read_end_only_with_data(tmp_path):
    p = str(tmp_path / "ff")
    setup = FIFO_SETUP.format(p=p, times=TIMES) + f"os.close(501); os.unlink({p!r})"
    with Target(tmp_path, setup) as t:
        before = of_fd(t.pid, 500)
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert of_fd(os.getpid(), 500) == before
        assert _sys.fionread(500) == 12
        assert os.read(500, 100) == b"queued bytes"
        assert os.read(500, 100) == b""                      # no writer left: EOF, as before


def test_unlinked_fifo_shared_or_still_linked_is_refused(tmp_path):
    p = str(tmp_path / "ff")
    other = str(tmp_path / "other-name")
    setup = f"""
os.mkfifo({p!r})
fd = os.open({p!r}, os.O_RDWR)
os.dup2(fd, 500); os.close(fd)
os.link({p!r}, {other!r}); os.unlink({p!r})
"""
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "fifo-missing" and "other hard link" in ei.value.detail
        mine = os.open(other, os.O_RDONLY | os.O_NONBLOCK)   # another process holds it too
        try:
            os.unlink(other)
            with pytest.raises(Refusal) as ei:
                classify(t.pid, 500)
            assert ei.value.reason == "pipe-peer-outside" and f"fd {mine}" in ei.value.detail
        finally:
            os.close(mine)
        assert "recreated" in classify(t.pid, 500)


# -- one inode under two names, both unlinked ---------------------------------------

@pytest.mark.parametrize("kind", ["file", "fifo", "dev"])
def test_two_unlinked_names_of_one_inode_both_come_back(tmp_path, kind):
    """Each fd shows the name it was opened by; they stay one inode."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make = {"file": f"open({a!r}, 'w').write('shared')",
            "fifo": f"os.mkfifo({a!r})",
            "dev": f"os.mknod({a!r}, 0o20606, os.makedev(1, 3))"}[kind]
    setup = f"""
{make}
os.link({a!r}, {b!r})
for fd, name in ((500, {a!r}), (501, {b!r})):
    tmp = os.open(name, os.O_RDWR | os.O_NONBLOCK); os.dup2(tmp, fd); os.close(tmp)
os.unlink({a!r}); os.unlink({b!r})
"""
    with Target(tmp_path, setup) as t:
        before = [of_fd(t.pid, fd) for fd in (500, 501)]
        assert [x[0] for x in before] == [a + DELETED, b + DELETED]
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
    names = listing(tmp_path)
    with restore(img):
        after = [of_fd(os.getpid(), fd) for fd in (500, 501)]
        assert after == before
        assert os.fstat(500).st_ino == os.fstat(501).st_ino
        assert listing(tmp_path) == names
        if kind == "file":
            os.pwrite(500, b"SH", 0)
            assert os.pread(501, 6, 0) == b"SHared"
        elif kind == "fifo":
            os.write(500, b"through a")
            assert os.read(501, 100) == b"through a"


# -- directories ----------------------------------------------------------------------

DIR_SETUP = """
os.mkdir({p!r})
os.chmod({p!r}, 0o3751)
os.chown({p!r}, 1234, 2345)
os.utime({p!r}, ns={times!r})
fd = os.open({p!r}, os.O_RDONLY | os.O_DIRECTORY)
os.dup2(fd, 500); os.close(fd)
os.rmdir({p!r})
"""


@pytest.mark.parametrize("at_restore", ["free", "directory", "file"])
def test_removed_directory_fd(tmp_path, at_restore):
    p = str(tmp_path / "gone")
    with Target(tmp_path, DIR_SETUP.format(p=p, times=TIMES)) as t:
        before = of_fd(t.pid, 500)
        assert before[0] == p + DELETED and before[1]["nlink"] == 0
        assert "removed directory" in classify(t.pid, 500)
        img = dump(t.pid, [500], str(tmp_path / "img"))
    if at_restore == "directory":
        os.mkdir(p)
        (tmp_path / "gone" / "inside").write_text("x")
    elif at_restore == "file":
        (tmp_path / "gone").write_text("a file now")
    occupant = os.stat(p) if at_restore != "free" else None
    names = listing(tmp_path)
    with restore(img):
        assert of_fd(os.getpid(), 500) == before
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert listing(tmp_path) == names
    if occupant is not None:
        assert os.stat(p).st_ino == occupant.st_ino
        if at_restore == "directory":
            assert os.listdir(p) == ["inside"]


def test_removed_directory_parent_gone_is_refused(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    p = str(sub / "gone")
    with Target(tmp_path, DIR_SETUP.format(p=p, times=TIMES)) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    sub.rmdir()
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "file-missing" and "is gone" in ei.value.detail


# -- through the core: the process at its PID -------------------------------------------

def _mask_deleted_inodes(maps: str) -> str:
    out = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].endswith(DELETED):
            parts[4] = "*"                 # a recreated file is another inode, same name
        out.append(" ".join(parts))
    return "\n".join(out)


def _outside_view(pid: int) -> dict:
    fds = {}
    for n in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        link, f = of_fd(pid, int(n))
        if link.startswith("/dev/pts") or link.startswith(("pipe:", "socket:", "anon_inode:")):
            continue
        fds[n] = (link, f)
    view = {"fds": fds, "maps": _mask_deleted_inodes(open(f"/proc/{pid}/maps").read()),
            "cwd": os.readlink(f"/proc/{pid}/cwd")}
    if view["cwd"].endswith(DELETED):     # a live directory's times move with the world
        view["cwd_stat"] = facts(os.stat(f"/proc/{pid}/cwd"))
    return view


@pytest.mark.slow
@pytest.mark.parametrize("kinds", [["file", "map"], ["dev"], ["fifo"], ["dir"], ["cwd"],
                                   ["file", "map", "dev", "fifo", "dir", "cwd", "cwdfd"]],
                         ids=["file-map", "dev", "fifo", "dir", "cwd", "all"])
def test_ghosts_through_the_core(procs, tmp_path, kinds):
    work = tmp_path / "w"
    work.mkdir()
    p = procs.start([python_exe(), os.path.join(TARGETS, "ghosts.py"), str(work), ",".join(kinds)],
                    cwd=str(work))
    wait_for(lambda: (work / "ready").exists() or p.poll() is not None, what="the ghosts target")
    assert p.poll() is None, "the target died during setup"
    before = _outside_view(p.pid)
    if "map" in kinds:
        assert str(work / "ghost-map") + DELETED in before["maps"]
    if "cwd" in kinds:
        assert before["cwd"] == str(work / "ghost-cwd") + DELETED
    names = listing(work)
    r = check(p.pid, Options())          # the dry run agrees, and leaves nothing behind
    assert r["ok"] and r["refusals"] == [], r["refusals"]
    assert _outside_view(p.pid) == before and listing(work) == names
    dump_restore(procs, p, str(tmp_path / "img"))
    assert _outside_view(p.pid) == before
    assert listing(work) == names, "a recreated name was left behind"
    if "cwdfd" in kinds:     # the cwd and fd 15 are one recreated directory, as they were one before
        assert os.path.samestat(os.stat(f"/proc/{p.pid}/cwd"), os.stat(f"/proc/{p.pid}/fd/15"))
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: (work / "verdict.json").exists(), what="the target's verdict")
    assert json.loads((work / "verdict.json").read_text()) == {k: True for k in kinds}


# -- the name dance itself ------------------------------------------------------------

def test_failed_swap_puts_the_other_file_back(tmp_path, monkeypatch):
    """If putting the occupant back over ours fails, the occupant still ends
    where it was, and no temporary name is left."""
    from engine import unlinked
    from engine.errors import EngineError
    p = tmp_path / "taken"
    p.write_text("theirs")
    ino = p.stat().st_ino

    def broken_rename(a, b):
        raise OSError(5, "injected", a)
    monkeypatch.setattr(unlinked.os, "rename", broken_rename)
    with pytest.raises(EngineError, match="injected"):
        unlinked.create_file([str(p)])
    assert p.stat().st_ino == ino and p.read_text() == "theirs"
    assert listing(tmp_path) == ["taken"]
