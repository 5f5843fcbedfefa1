"""Directory fds: same directory, same flags, same getdents position;
dnotify refused."""

from __future__ import annotations

import fcntl
import os
import time

import pytest

from engine.errors import Refusal

from fds_support import Target, classify, dump, restore

GETDENTS = 217


def getdents_names(fd: int):
    """Names returned by getdents64 from fd's current position."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(1 << 16)
    names = []
    while True:
        n = libc.syscall(GETDENTS, fd, buf, len(buf))
        assert n >= 0
        if n == 0:
            return names
        off = 0
        raw = buf.raw
        while off < n:
            reclen = int.from_bytes(raw[off + 16:off + 18], "little")
            names.append(raw[off + 19:off + reclen].split(b"\0")[0].decode())
            off += reclen


def make_dir(tmp_path, n=50):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(n):
        (d / f"f{i:03}").write_text("x")
    return str(d)


def test_directory_reopened_at_same_position(tmp_path):
    d = make_dir(tmp_path)
    setup = f"""
fd = os.open({d!r}, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
os.dup2(fd, 500); os.close(fd)
buf = ctypes.create_string_buffer(400)
assert libc.syscall(217, 500, buf, 400) > 0         # read part of the directory
"""
    with Target(tmp_path, setup) as t:
        pos = int(open(f"/proc/{t.pid}/fdinfo/500").read().split()[1])
        assert pos != 0
        assert classify(t.pid, 500) == f"directory {d} at {pos}"
        img = dump(t.pid, [500], str(tmp_path / "img"))
        # The rest of the listing, as the target would see it.
        probe = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.lseek(probe, pos, os.SEEK_SET)
        rest = getdents_names(probe)
        os.close(probe)
    assert rest
    with restore(img):
        assert os.lseek(500, 0, os.SEEK_CUR) == pos
        assert fcntl.fcntl(500, fcntl.F_GETFL) & os.O_NONBLOCK
        assert getdents_names(500) == rest


def test_directory_replaced_refused_on_same_node(tmp_path):
    d = make_dir(tmp_path, 1)
    with Target(tmp_path, f"fd = os.open({d!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)") as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    os.rename(d, d + ".old")
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "file-missing"
    os.mkdir(d)
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "file-changed"
    (tmp_path / "d" / "f000").write_text("other content")   # same names and types
    with restore(img, same_node=False):                  # another node: recognised by its listing
        assert os.readlink("/proc/self/fd/500") == d


@pytest.mark.parametrize("change", ["added", "removed", "renamed", "file-became-dir", "chmod", "chown"])
def test_directory_on_another_node_is_checked_by_mode_owner_and_listing(tmp_path, change):
    """Another node (the image's boot id is not ours): inode numbers say
    nothing, so the directory must have the same permission bits, owner,
    group and sorted (name, type) listing; the copy here is another inode."""
    d = make_dir(tmp_path, 3)
    with Target(tmp_path, f"fd = os.open({d!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)") as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    os.rename(d, d + ".orig")
    os.mkdir(d, 0o755)
    os.chmod(d, os.stat(d + ".orig").st_mode & 0o7777)
    for name in sorted(os.listdir(d + ".orig")):
        (tmp_path / "d" / name).write_text("copied")
    with restore(img, same_node=False):                  # the same listing on "another machine"
        assert os.fstat(500).st_ino == os.stat(d).st_ino != os.stat(d + ".orig").st_ino
    if change == "added":
        (tmp_path / "d" / "new").write_text("x")
    elif change == "removed":
        os.unlink(tmp_path / "d" / "f001")
    elif change == "renamed":
        os.rename(tmp_path / "d" / "f001", tmp_path / "d" / "g001")
    elif change == "file-became-dir":
        os.unlink(tmp_path / "d" / "f001")
        os.mkdir(tmp_path / "d" / "f001")
    elif change == "chmod":
        os.chmod(d, 0o700)
    else:
        os.chown(d, 1234, 1234)
    with pytest.raises(Refusal) as ei:
        restore(img, same_node=False)
    assert ei.value.reason == "file-changed"
    assert ("mode/uid/gid" if change in ("chmod", "chown") else "entries differ") in ei.value.detail
    from engine.context import Options
    with restore(img, same_node=False, options=Options(file_validation="none")):   # only "a directory"
        pass


def test_directory_dnotify_refused_and_target_unharmed(tmp_path):
    d = make_dir(tmp_path, 1)
    setup = f"""
got = []
signal.signal(signal.SIGRTMIN + 1, lambda *a: got.append(1))
fd = os.open({d!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)
fcntl.fcntl(500, 10, signal.SIGRTMIN + 1)                       # F_SETSIG
fcntl.fcntl(500, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_MULTISHOT)
"""
    with Target(tmp_path, setup, "report['got'] = len(got)") as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "dnotify"
        assert f"owner ({t.pid}" in ei.value.detail
        open(os.path.join(d, "new"), "w").close()
        # dnotify still delivers (its RT signal may come after our SIGUSR1).
        deadline = time.monotonic() + 5
        while t.check()["got"] < 1:
            assert time.monotonic() < deadline, "the dnotify signal never arrived"
            time.sleep(0.05)


def test_directory_plain_has_no_owner(tmp_path):
    d = make_dir(tmp_path, 1)
    with Target(tmp_path, f"fd = os.open({d!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)") as t:
        assert classify(t.pid, 500).startswith("directory ")


def test_directory_removed_is_recreated(tmp_path):
    """Once refused as file-missing; now recreated (tests/test_ghosts.py)."""
    d = make_dir(tmp_path, 0)
    with Target(tmp_path, f"fd = os.open({d!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)") as t:
        os.rmdir(d)
        assert classify(t.pid, 500).startswith(f"removed directory {d} (deleted)")


def test_directory_recreated_with_reused_inode_refused(tmp_path):
    d = make_dir(tmp_path, 0)
    with Target(tmp_path, f"fd = os.open({d!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)") as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    ino = os.stat(d).st_ino
    os.rmdir(d)
    os.mkdir(d)
    if os.stat(d).st_ino != ino:
        pytest.skip("the filesystem did not reuse the inode number")
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "file-changed" and "reuses inode" in ei.value.detail
