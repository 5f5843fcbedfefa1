"""Deny by default, by filesystem (issue 10 items 4 and 5): fds and mappings
of files on kernel pseudo filesystems are refused at dump with
`pseudo-file` (handles with no path: `unsupported-fd`), naming the
filesystem; deleted files that restore could not recreate are refused at
dump (`unlinked-unrestorable`); regular files on ext4 and tmpfs still come
back. The dumps that are refused leave the target running, with no image."""

from __future__ import annotations

import os
import subprocess

import pytest

from engine.context import Options
from engine.dump import dump as engine_dump
from engine.errors import Refusal, Refusals
from engine import fstype
from engine_core_support import procs, python_exe, start_ready_script, wait_for  # noqa: F401

from fds_support import Target, classify, dump, restore

OPEN = "fd = os.open({path!r}, os.O_RDONLY); os.dup2(fd, 500); os.close(fd)"


def _cgroup_file() -> str:
    """A file of a mounted cgroup or cgroup2 hierarchy."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            if right.split()[0] in ("cgroup", "cgroup2"):
                p = os.path.join(left.split()[4], "cgroup.procs")
                if os.path.exists(p):
                    return p
    pytest.skip("no cgroup filesystem mounted here")


PSEUDO = {
    "proc-mountinfo": ("/proc/self/mountinfo", "proc"),   # (a status not read yet is reopened: procfile.py)
    "sysfs": ("/sys/kernel/mm/transparent_hugepage/enabled", "sysfs"),
    "nsfs": ("/proc/self/ns/net", "nsfs"),
    "proc-dir": ("/proc/self", "proc"),
}


def reasons(exc):
    return [(r.reason, r.fd) for r in getattr(exc, "refusals", [exc])]


@pytest.mark.parametrize("what", sorted(PSEUDO) + ["cgroup", "mqueue"])
def test_pseudo_filesystem_fds_are_refused_by_filesystem(tmp_path, what):
    if what == "cgroup":
        path, fs = _cgroup_file(), "cgroup"
        setup = OPEN.format(path=path)
    elif what == "mqueue":
        fs = "mqueue"
        setup = ("rt = ctypes.CDLL('librt.so.1', use_errno=True)\n"
                 f"fd = rt.mq_open(b'/ckpt-test-{os.getpid()}', os.O_RDWR | os.O_CREAT, 0o600, None)\n"
                 f"rt.mq_unlink(b'/ckpt-test-{os.getpid()}')\n"
                 "assert fd >= 0; os.dup2(fd, 500); os.close(fd)")
    else:
        path, fs = PSEUDO[what]
        if not os.path.exists(path):
            pytest.skip(f"{path} does not exist here")
        flags = "os.O_RDONLY | os.O_DIRECTORY" if what == "proc-dir" else "os.O_RDONLY"
        setup = f"fd = os.open({path!r}, {flags}); os.dup2(fd, 500); os.close(fd)"
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as e:
            classify(t.pid, 500)
    assert e.value.reason == "pseudo-file"
    assert f"{fs} pseudo filesystem" in e.value.message


def test_a_pidfd_is_its_own_kind_not_a_pseudo_file(tmp_path):
    """A pidfd is on pidfs (6.9+) or anon_inodefs, both handle filesystems:
    its link text makes it a pidfd (engine/fds/pidfd.py), judged there."""
    with Target(tmp_path, "fd = os.pidfd_open(os.getpid()); os.dup2(fd, 500); os.close(fd)") as t:
        assert classify(t.pid, 500) == "pidfd of itself"


@pytest.mark.parametrize("where", ["ext4-or-disk", "tmpfs"])
def test_regular_files_on_disk_and_tmpfs_still_restore(tmp_path, where):
    base = str(tmp_path) if where != "tmpfs" else "/dev/shm"
    path = os.path.join(base, f"ckpt-regular-{os.getpid()}")
    with open(path, "wb") as f:
        f.write(b"0123456789" * 100)
    try:
        magic = fstype.magic(path)
        assert not fstype.pseudo(magic) and not fstype.handle(magic)
        if where == "tmpfs":
            assert fstype.name(magic) == "tmpfs"
        setup = OPEN.format(path=path) + "; os.lseek(500, 7, 0)"
        with Target(tmp_path, setup) as t:
            assert classify(t.pid, 500).startswith(f"regular {path} at 7")
            img = dump(t.pid, [500], str(tmp_path / "img"))
        with restore(img):
            assert os.lseek(500, 0, os.SEEK_CUR) == 7
            assert os.read(500, 3) == b"789"
    finally:
        os.unlink(path)


# -- whole dumps: refused before the target is harmed ---------------------------------

def _start(procs, tmp_path, setup: str):
    p = start_ready_script(procs, tmp_path, setup, imports="os, time, ctypes, mmap")
    assert p.poll() is None, "the target died during setup"
    return p


def _refused(procs, tmp_path, setup: str):
    """Dump the target; expect a refusal; the target runs on, no image."""
    p = _start(procs, tmp_path, setup)
    image = tmp_path / "img"
    with pytest.raises((Refusal, Refusals)) as e:
        engine_dump(p.pid, str(image), Options())
    assert not image.exists() and not (tmp_path / "img.partial").exists()
    assert p.poll() is None
    with open(f"/proc/{p.pid}/status") as f:
        assert "TracerPid:\t0" in f.read()
    return e.value


@pytest.mark.slow
def test_dump_of_proc_and_sys_fds_is_refused_and_target_unharmed(procs, tmp_path):
    """Before: the dump succeeded and killed the target, then restore
    refused the /proc file as file-missing: the process was lost."""
    e = _refused(procs, tmp_path, "a = os.open('/proc/self/mountinfo', os.O_RDONLY)\n"
                                  "b = os.open('/proc/self/ns/net', os.O_RDONLY)")
    assert sorted(r for r, _ in reasons(e)) == ["pseudo-file", "pseudo-file"]


@pytest.mark.slow
def test_mapping_of_a_sysfs_file_is_refused(procs, tmp_path):
    path = "/sys/kernel/btf/vmlinux"
    try:
        fd = os.open(path, os.O_RDONLY)
        import mmap
        mmap.mmap(fd, 4096, prot=mmap.PROT_READ, flags=mmap.MAP_PRIVATE).close()
        os.close(fd)
    except OSError:
        pytest.skip(f"{path} cannot be mapped here")
    # mmap through libc: Python's mmap object would keep an fd open too.
    e = _refused(procs, tmp_path, f"fd = os.open({path!r}, os.O_RDONLY)\n"
                                  "libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p\n"
                                  "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, "
                                  "ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
                                  "assert libc.mmap(None, 4096, 1, 2, fd, 0) not in (None, 2**64 - 1)\n"
                                  "os.close(fd)")
    got = getattr(e, "refusals", [e])
    assert [r.reason for r in got] == ["pseudo-file"]
    assert "sysfs" in got[0].message and got[0].path == path


@pytest.mark.slow
def test_deleted_file_whose_directory_is_gone_is_refused_at_dump(procs, tmp_path):
    """Before: dumped, then restore refused (its directory is gone)."""
    d = tmp_path / "gone"
    d.mkdir()
    e = _refused(procs, tmp_path, f"fd = os.open({str(d / 'f')!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
                                  "os.write(fd, b'data')\n"
                                  f"os.unlink({str(d / 'f')!r}); os.rmdir({str(d)!r})")
    assert [r for r, _ in reasons(e)] == ["unlinked-unrestorable"]


@pytest.fixture
def ro_bind(tmp_path):
    """tmp_path/rw bind-mounted read-only at tmp_path/ro."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(rw), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield rw, ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


@pytest.mark.slow
def test_deleted_file_on_a_read_only_mount_is_refused_at_dump(procs, tmp_path, ro_bind):
    """Before: dumped and killed; restore failed with "cannot recreate
    deleted file ... Read-only file system"."""
    rw, ro = ro_bind
    (rw / "f").write_bytes(b"kept")
    p = _start(procs, tmp_path, f"fd = os.open({str(ro / 'f')!r}, os.O_RDONLY)")
    (rw / "f").unlink()
    image = tmp_path / "img"
    with pytest.raises((Refusal, Refusals)) as e:
        engine_dump(p.pid, str(image), Options())
    got = getattr(e.value, "refusals", [e.value])
    assert [r.reason for r in got] == ["unlinked-unrestorable"]
    assert "read-only" in got[0].message
    assert not image.exists() and p.poll() is None


def test_o_tmpfile_in_a_directory_made_read_only_restores(tmp_path):
    """Before: restore crashed with NotADirectoryError: the O_TMPFILE bits
    kept in the fd's flags were replayed on the reopen."""
    d = tmp_path / "d"
    d.mkdir()
    setup = (f"fd = os.open({str(d)!r}, os.O_TMPFILE | os.O_RDWR, 0o600); os.write(fd, b'scratch')\n"
             f"os.dup2(fd, 500); os.close(fd); os.chmod({str(d)!r}, 0o500)")
    try:
        with Target(tmp_path, setup) as t:
            img = dump(t.pid, [500], str(tmp_path / "img"))
        with restore(img):
            assert os.pread(500, 100, 0) == b"scratch"
            assert os.lseek(500, 0, os.SEEK_CUR) == 7
    finally:
        os.chmod(d, 0o700)


@pytest.mark.slow
def test_mapped_deleted_file_whose_directory_is_gone_is_refused_at_dump(procs, tmp_path):
    """The same pre-flight for a deleted file held only by a mapping."""
    d = tmp_path / "gone"
    d.mkdir()
    (d / "lib").write_bytes(b"m" * 8192)
    e = _refused(procs, tmp_path, f"fd = os.open({str(d / 'lib')!r}, os.O_RDONLY)\n"
                                  "libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p\n"
                                  "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, "
                                  "ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
                                  "assert libc.mmap(None, 8192, 1, 2, fd, 0) not in (None, 2**64 - 1)\n"
                                  f"os.close(fd); os.unlink({str(d / 'lib')!r}); os.rmdir({str(d)!r})")
    got = getattr(e, "refusals", [e])
    assert [r.reason for r in got] == ["unlinked-unrestorable"] and got[0].fd is None


def test_o_tmpfile_later_linked_reopens_by_its_name(tmp_path):
    """An O_TMPFILE file given a name with linkat is a regular file whose fd
    flags still hold the O_TMPFILE bits. Before: restore replayed them on
    open(path) (ENOTDIR) and refused an unchanged file."""
    d = tmp_path / "d"
    d.mkdir()
    name = str(d / "named")
    setup = (f"fd = os.open({str(d)!r}, os.O_TMPFILE | os.O_RDWR, 0o600); os.write(fd, b'now named')\n"
             f"assert libc.linkat(-100, f'/proc/self/fd/{{fd}}'.encode(), -100, {name!r}.encode(), 0x400) == 0\n"
             "os.dup2(fd, 500); os.close(fd)")            # AT_FDCWD, AT_SYMLINK_FOLLOW
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500).startswith(f"regular {name} (reached through a surviving hard link)")
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert os.fstat(500).st_ino == os.stat(name).st_ino
        assert os.pread(500, 100, 0) == b"now named" and os.lseek(500, 0, os.SEEK_CUR) == 9
