"""Regular, deleted ("ghost") and device fds through the handler protocol,
on real files and this process's own real fds."""

import fcntl
import os
import stat

import pytest

from engine.context import DumpContext, Options, RestoreContext
from engine.errors import Refusal
from engine.fds import classify_kind, handler_for
from engine.image import ImageReader, ImageWriter

from procfd import fdinfo_of

PID = os.getpid()


def _dump(tmp_path, fds, **opts):
    """Dump our own fds into an image; returns (image dir, records)."""
    options = Options(**opts)
    d = str(tmp_path / "img")
    recs = []
    with ImageWriter(d) as w:
        ctx = DumpContext(pid=PID, options=options, image=w)
        infos = [fdinfo_of(PID, fd) for fd in fds]
        for info in infos:
            kind, mod = handler_for(info)
            mod.classify(info, ctx)
        for info in infos:
            kind, mod = handler_for(info)
            rec = mod.dump(info, ctx)
            rec.update(fd=info.fd, kind=kind, flags=info.flags, pos=info.pos, cloexec=info.cloexec, link=info.link)
            recs.append(rec)
        w.write_json("fds.json", recs)
        w.commit()
    return d, recs


def _restore(d, same_node=True, **opts):
    img = ImageReader(d)
    img.verify()
    ctx = RestoreContext(options=Options(**opts), image=img, same_node=same_node, pid=PID)
    recs = img.read_json("fds.json")
    for rec in recs:
        _, mod = _mod(rec["kind"])
        mod.validate(rec, ctx)
    out = {rec["fd"]: _mod(rec["kind"])[1].restore(rec, ctx) for rec in recs}
    from engine import files
    files.close_shared(ctx)
    return out


def _mod(kind):
    from engine.fds import handler
    return kind, handler(kind)


def _classify(fd, **opts):
    info = fdinfo_of(PID, fd)
    _, mod = handler_for(info)
    return mod.classify(info, DumpContext(pid=PID, options=Options(**opts)))


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "data"
    p.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return p


@pytest.fixture
def fds():
    opened = []
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


def test_regular_file_comes_back_at_offset_with_flags(tmp_path, data, fds):
    fd = os.open(data, os.O_RDWR | os.O_APPEND)
    fds.append(fd)
    os.lseek(fd, 4096, os.SEEK_SET)
    d, recs = _dump(tmp_path, [fd])
    assert recs[0]["kind"] == "regular"
    new = _restore(d)[fd]
    fds.append(new)
    assert os.lseek(new, 0, os.SEEK_CUR) == 4096
    assert fcntl.fcntl(new, fcntl.F_GETFL) & (os.O_APPEND | 3) == os.O_APPEND | os.O_RDWR
    assert os.fstat(new).st_ino == data.stat().st_ino
    assert os.read(new, 4) == bytes(range(4))     # 4096 % 256 == 0


def test_renamed_after_open_follows_the_new_name(tmp_path, data, fds):
    fd = os.open(data, os.O_RDONLY)
    fds.append(fd)
    moved = tmp_path / "moved"
    os.rename(data, moved)
    d, recs = _dump(tmp_path, [fd])
    assert recs[0]["file"]["path"] == str(moved)
    new = _restore(d)[fd]
    fds.append(new)
    assert os.fstat(new).st_ino == moved.stat().st_ino


@pytest.mark.parametrize("change,reason,words", [
    ("rename-over", "file-changed", "another file at this path"),
    ("rewrite-same-size", "file-changed", "content differs"),
    ("append", "file-changed", "size 16384 -> 16385"),
    ("unlink", "file-missing", "no file at this path"),
])
def test_changed_after_dump_is_refused(tmp_path, data, fds, change, reason, words):
    fd = os.open(data, os.O_RDONLY)
    fds.append(fd)
    d, _ = _dump(tmp_path, [fd])
    os.close(fds.pop())
    if change == "rename-over":
        other = tmp_path / "other"
        other.write_bytes(data.read_bytes())   # same content, another inode
        os.rename(other, data)
    elif change == "rewrite-same-size":
        with open(data, "r+b") as f:
            f.seek(100)
            f.write(b"\xff")
    elif change == "append":
        with open(data, "ab") as f:
            f.write(b"!")
    else:
        data.unlink()
    with pytest.raises(Refusal) as ei:
        _restore(d)
    assert ei.value.reason == reason and words in ei.value.detail
    assert ei.value.fd == fd and ei.value.path == str(data)


def test_touched_mtime_alone_passes_digest_but_not_strict(tmp_path, data, fds):
    fd = os.open(data, os.O_RDONLY)
    fds.append(fd)
    d, _ = _dump(tmp_path, [fd], file_validation="strict")
    os.utime(data, ns=(1, 1_000_000_000))
    fds.append(_restore(d, file_validation="digest")[fd])
    with pytest.raises(Refusal, match="mtime"):
        _restore(d, file_validation="strict")


def test_other_node_accepts_same_content_refuses_other_content(tmp_path, data, fds):
    fd = os.open(data, os.O_RDONLY)
    fds.append(fd)
    d, _ = _dump(tmp_path, [fd])
    os.close(fds.pop())
    copy = data.read_bytes()
    data.unlink()
    data.write_bytes(copy)                      # another inode, as on another guest
    new = _restore(d, same_node=False)[fd]
    fds.append(new)
    assert os.read(new, 3) == b"\x00\x01\x02"
    with pytest.raises(Refusal, match="another file at this path"):
        _restore(d, same_node=True)   # even if ext4 handed out the same inode number again
    data.write_bytes(copy[:-1] + b"X")
    with pytest.raises(Refusal, match="content differs"):
        _restore(d, same_node=False)


def test_deleted_file_is_kept_and_recreated_unlinked(tmp_path, data, fds):
    fd = os.open(data, os.O_RDWR)
    fds.append(fd)
    os.chmod(data, 0o640)
    os.lseek(fd, 1000, os.SEEK_SET)
    data.unlink()
    assert classify_kind(fdinfo_of(PID, fd)) == "ghost"
    d, recs = _dump(tmp_path, [fd])
    os.close(fds.pop())
    new = _restore(d)[fd]
    fds.append(new)
    st = os.fstat(new)
    assert st.st_nlink == 0 and stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == 16384
    assert os.readlink(f"/proc/self/fd/{new}") == str(data) + " (deleted)"
    assert os.lseek(new, 0, os.SEEK_CUR) == 1000
    assert os.pread(new, 16384, 0) == bytes(range(256)) * 64
    assert fcntl.fcntl(new, fcntl.F_GETFL) & 3 == os.O_RDWR


def test_sparse_deleted_file_keeps_its_holes(tmp_path, fds):
    p = tmp_path / "sparse"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    fds.append(fd)
    os.ftruncate(fd, 1 << 30)
    os.pwrite(fd, b"head", 0)
    os.pwrite(fd, b"middle", 512 << 20)
    p.unlink()
    d, recs = _dump(tmp_path, [fd])
    image_bytes = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(d) for n in ns)
    assert image_bytes < 1 << 20, image_bytes
    new = _restore(d)[fd]
    fds.append(new)
    st = os.fstat(new)
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20
    assert os.pread(new, 4, 0) == b"head" and os.pread(new, 6, 512 << 20) == b"middle"
    assert os.pread(new, 4, 256 << 20) == b"\0" * 4


def test_deleted_file_over_the_ghost_limit_is_refused(tmp_path, data, fds):
    fd = os.open(data, os.O_RDONLY)
    fds.append(fd)
    data.unlink()
    with pytest.raises(Refusal) as ei:
        _classify(fd, ghost_limit=4096)
    assert ei.value.reason == "unlinked-too-large"
    assert "16384" in ei.value.detail and "--ghost-limit" in ei.value.detail
    assert not (tmp_path / "img").exists()


def test_memfd_keeps_name_content_and_seals(tmp_path, fds):
    fd = os.memfd_create("crucible-test", os.MFD_ALLOW_SEALING)
    fds.append(fd)
    os.write(fd, b"sealed contents")
    fcntl.fcntl(fd, 1033, 0x0002 | 0x0004)   # F_ADD_SEALS: SHRINK | GROW
    d, _ = _dump(tmp_path, [fd])
    new = _restore(d)[fd]
    fds.append(new)
    assert os.readlink(f"/proc/self/fd/{new}") == "/memfd:crucible-test (deleted)"
    assert os.pread(new, 100, 0) == b"sealed contents"
    assert fcntl.fcntl(new, 1034) == 0x0002 | 0x0004
    assert os.lseek(new, 0, os.SEEK_CUR) == 15


def test_unlinked_name_with_surviving_hard_link(tmp_path, data, fds):
    other = tmp_path / "other-name"
    os.link(data, other)
    fd = os.open(data, os.O_RDONLY)
    fds.append(fd)
    data.unlink()
    d, recs = _dump(tmp_path, [fd])
    assert recs[0]["file"]["path"] == str(other)
    new = _restore(d)[fd]
    fds.append(new)
    assert os.fstat(new).st_ino == other.stat().st_ino   # the same inode, not a copy


def test_dev_null_reopens_and_terminals_are_refused(tmp_path, fds):
    fd = os.open("/dev/null", os.O_WRONLY)
    fds.append(fd)
    d, _ = _dump(tmp_path, [fd])
    new = _restore(d)[fd]
    fds.append(new)
    assert os.fstat(new).st_rdev == os.stat("/dev/null").st_rdev
    master, slave = os.openpty()
    fds += [master, slave]
    # a pty slave is the tty kind's (engine/fds/tty.py, tests/test_fds_tty.py):
    # alone, its master is outside the dump
    with pytest.raises(Refusal) as ei:
        _classify(slave)
    assert ei.value.reason == "tty-outside" and "--shell-job" in ei.value.detail
    # any other terminal is a device
    other = None
    for path in ("/dev/tty0", "/dev/ttyS0", "/dev/console"):
        try:
            other = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
            break
        except OSError:
            continue
    if other is not None:
        fds.append(other)
        with pytest.raises(Refusal) as ei:
            _classify(other)
        assert ei.value.reason == "device"


def test_file_lock_on_a_deleted_file_is_refused_by_name(tmp_path, fds):
    # Locks are restored on regular files that keep their name
    # (tests/test_fds_locks.py); on a ghost they are refused, never dropped.
    path = tmp_path / "locked"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDWR)
    fds.append(fd)
    fcntl.flock(fd, fcntl.LOCK_EX)
    path.unlink()
    with pytest.raises(Refusal) as ei:
        _classify(fd)
    assert ei.value.reason == "file-lock" and "lock" in ei.value.detail
