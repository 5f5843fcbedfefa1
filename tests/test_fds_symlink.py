"""Symlinks held open by O_PATH | O_NOFOLLOW fds (CRIU's zdtm symlink,
symlink01): reopened the same way, the same link (same inode, same text);
a removed one recreated with its text, owner and times and removed again.
They were refused (unsupported-fd: no handler for the kind)."""

from __future__ import annotations

import fcntl
import os
import stat

import pytest

from engine.errors import Refusal

from fds_support import Target, classify, dump, restore

O_PATH = getattr(os, "O_PATH", 0o10000000)


def test_symlink_fds_restored_kept_and_removed(tmp_path):
    link, gone = str(tmp_path / "link"), str(tmp_path / "gone")
    setup = f"""
open({str(tmp_path / 'file')!r}, "w").close()
os.symlink("file", {link!r})
os.symlink("/nowhere/at/all", {gone!r})
os.utime({gone!r}, ns=(10**18, 2 * 10**18), follow_symlinks=False)
a = os.open({link!r}, os.O_PATH | os.O_NOFOLLOW); os.dup2(a, 500, inheritable=False); os.close(a)
b = os.open({gone!r}, os.O_PATH | os.O_NOFOLLOW); os.dup2(b, 501); os.close(b)
os.unlink({gone!r})
"""
    with Target(tmp_path, setup) as t:
        assert classify(t.pid, 500) == f"symlink {link} (O_PATH)"
        assert "removed symlink" in classify(t.pid, 501)
        ino = os.lstat(link).st_ino
        img = dump(t.pid, [500, 501], str(tmp_path / "img"))
    with restore(img):
        st = os.fstat(500)
        assert stat.S_ISLNK(st.st_mode) and st.st_ino == ino
        assert os.readlink("", dir_fd=500) == "file"
        assert fcntl.fcntl(500, fcntl.F_GETFL) & (O_PATH | os.O_NOFOLLOW) == O_PATH | os.O_NOFOLLOW
        assert fcntl.fcntl(500, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        st = os.fstat(501)
        assert stat.S_ISLNK(st.st_mode) and st.st_nlink == 0
        assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 2 * 10**18)      # before a readlink touches it
        assert os.readlink("", dir_fd=501) == "/nowhere/at/all"
        assert os.readlink("/proc/self/fd/501") == f"{gone} (deleted)"
        assert not os.path.lexists(gone)


def test_symlink_pointing_elsewhere_at_restore_refused(tmp_path):
    link = str(tmp_path / "link")
    setup = f"""
os.symlink("a", {link!r})
a = os.open({link!r}, os.O_PATH | os.O_NOFOLLOW); os.dup2(a, 500); os.close(a)
"""
    with Target(tmp_path, setup) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    os.unlink(link)
    os.symlink("b", link)
    with pytest.raises(Refusal) as ei:
        with restore(img):
            pass
    assert ei.value.reason == "file-changed" and "points elsewhere" in ei.value.detail
