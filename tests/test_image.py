import json
import os
import stat

import pytest

from engine.errors import Refusal, UsageError
from engine.image import MANIFEST, ImageReader, ImageWriter


def _write(tmp_path, name="img"):
    d = tmp_path / name
    with ImageWriter(str(d)) as w:
        w.write_json("a.json", {"x": 1})
        with w.open("pages.img") as f:
            f.write(b"\x01" * 10000)
        w.commit()
    return d


def test_commit_is_atomic_and_private(tmp_path):
    d = _write(tmp_path)
    assert not (tmp_path / "img.partial").exists()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for name in ("a.json", "pages.img", MANIFEST):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600
    man = json.loads((d / MANIFEST).read_text())
    assert set(man["files"]) == {"a.json", "pages.img"}
    assert man["files"]["pages.img"]["size"] == 10000
    ImageReader(str(d)).verify()


def test_failed_dump_leaves_nothing(tmp_path):
    d = tmp_path / "img"
    with pytest.raises(RuntimeError):
        with ImageWriter(str(d)) as w:
            w.write_json("a.json", {})
            raise RuntimeError("boom")
    assert not d.exists() and not (tmp_path / "img.partial").exists()


def test_existing_dir_is_a_usage_error(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        ImageWriter(str(tmp_path / "img"))


@pytest.mark.parametrize("tamper", ["flip", "truncate", "extra", "missing", "manifest"])
def test_tampered_image_is_refused(tmp_path, tamper):
    d = _write(tmp_path)
    p = d / "pages.img"
    if tamper == "flip":
        data = bytearray(p.read_bytes()); data[5000] ^= 1; p.write_bytes(bytes(data))
    elif tamper == "truncate":
        p.write_bytes(p.read_bytes()[:4096])
    elif tamper == "extra":
        (d / "evil.json").write_text("{}")
    elif tamper == "missing":
        p.unlink()
    else:
        (d / "a.json").write_text('{"x": 2}')
    with pytest.raises(Refusal) as ei:
        ImageReader(str(d)).verify()
    assert ei.value.reason == "image-invalid"


def test_not_an_image(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UsageError, match="not a ckpt image"):
        ImageReader(str(tmp_path / "x"))
    with pytest.raises(UsageError, match="no such image"):
        ImageReader(str(tmp_path / "nope"))


def test_other_format_version_is_refused(tmp_path):
    d = _write(tmp_path)
    man = json.loads((d / MANIFEST).read_text()); man["format"] = 999
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(Refusal, match="format 999"):
        ImageReader(str(d))


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs: a disk that fills up for real."""
    import subprocess
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_is_one_clear_error(tiny_fs):
    from engine.errors import EngineError
    d = tiny_fs / "img"
    with pytest.raises(EngineError, match="no space left on device"):
        with ImageWriter(str(d)) as w:
            with w.open("pages.img") as f:
                for _ in range(100):
                    f.write(b"x" * 65536)
    assert os.listdir(tiny_fs) == []


def test_full_disk_in_a_whole_file_write_is_one_clear_error(tiny_fs):
    """write_bytes keeps its file open for sync_files: a write that fills the
    disk still ends as the one clear error, nothing left behind."""
    from engine.errors import EngineError
    d = tiny_fs / "img"
    with pytest.raises(EngineError, match="no space left on device"):
        with ImageWriter(str(d)) as w:
            for i in range(100):
                w.write_bytes(f"f{i}.bin", b"x" * 65536)
    assert os.listdir(tiny_fs) == []


def test_commit_flushes_every_file_and_dir_before_publishing(tmp_path, monkeypatch):
    # Files its writer already closed too: the rename must not publish pages
    # that only live in the page cache.
    import engine.image as image
    synced = set()
    real = os.fsync

    def recording_fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        return real(fd)

    monkeypatch.setattr(image.os, "fsync", recording_fsync)
    d = tmp_path / "img"
    with ImageWriter(str(d)) as w:
        with w.open("pages-000.img") as f:       # closed by its writer
            f.write(b"\x02" * 8192)
        w.write_json("fds/fifo.json", {})
        w.commit()
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            assert os.stat(os.path.join(root, n)).st_ino in synced, n
    assert os.stat(d).st_ino in synced


def test_whole_files_are_fsynced_through_their_own_fds_up_to_the_cap(tmp_path, monkeypatch):
    # write_bytes leaves a file open for sync_files (no open by path again,
    # no stat of its directory for every file), up to KEEP_OPEN of them;
    # the rest are closed and fsynced by path, as before. Every file is
    # fsynced either way and the image reads back whole.
    import engine.image as image
    monkeypatch.setattr(image, "KEEP_OPEN", 3)
    by_path, looked = [], []
    real_fsync_path, real_isdir = image._fsync_path, image.os.path.isdir
    monkeypatch.setattr(image, "_fsync_path", lambda p: (by_path.append(p), real_fsync_path(p))[1])
    d = tmp_path / "img"
    with ImageWriter(str(d)) as w:
        monkeypatch.setattr(image.os.path, "isdir", lambda p: (looked.append(p), real_isdir(p))[1])
        for i in range(5):
            w.write_json(f"tree/1/f{i}.json", {"i": i})
        w.sync_files()
        for i in range(2):      # after a sync_files: kept open again
            w.write_bytes(f"tree/2/g{i}.bin", bytes([i]) * 100)
        w.commit()
    monkeypatch.setattr(image.os.path, "isdir", real_isdir)
    files = [p for p in by_path if not os.path.isdir(p.replace(".partial", ""))]
    assert sorted(os.path.basename(p) for p in files) == ["f3.json", "f4.json"]
    assert looked == []         # each directory made once, not looked for again for every file
    r = ImageReader(str(d))
    r.verify()
    assert r.read_json("tree/1/f4.json") == {"i": 4} and r.read_bytes("tree/2/g1.bin") == b"\x01" * 100


# -- trusted like a binary: who can write it, no symlinks, read once (engine/imagecheck.py) ----

def _unsafe(d, match=None):
    with pytest.raises(Refusal) as ei:
        ImageReader(str(d)).verify()
    assert ei.value.reason == "image-unsafe", ei.value
    if match:
        assert match in ei.value.detail     # not .message: it holds the path, named after the test
    return ei.value


@pytest.mark.parametrize("what", ["file", "manifest", "subdir", "dangling", "extra"])
def test_a_symlink_inside_the_image_is_never_followed(tmp_path, what):
    # Each symlink leads to an identical copy outside: followed, every checksum would pass.
    import shutil
    with ImageWriter(str(tmp_path / "img")) as w:
        w.write_json("a.json", {"x": 1})
        w.write_bytes("fds/pipe-1", b"queued")
        w.commit()
    d, out = tmp_path / "img", tmp_path / "outside"
    out.mkdir()
    if what == "subdir":
        shutil.copytree(d / "fds", out / "fds")
        shutil.rmtree(d / "fds")
        (d / "fds").symlink_to(out / "fds")
    elif what == "extra":
        (out / "secret").write_text("secret")
        (d / "b.json").symlink_to(out / "secret")
    else:
        name = {"file": "a.json", "manifest": MANIFEST, "dangling": "a.json"}[what]
        shutil.copy2(d / name, out / name)
        (d / name).unlink()
        (d / name).symlink_to(out / ("nowhere" if what == "dangling" else name))
    _unsafe(d, "symlink")


def test_a_fifo_or_device_in_the_image_is_refused_without_reading_it(tmp_path):
    d = _write(tmp_path)
    (d / "pages.img").unlink()
    os.mkfifo(d / "pages.img", 0o600)      # opened blocking, this would hang the restore
    _unsafe(d, "not a regular file")
    (d / "pages.img").unlink()
    os.mknod(d / "pages.img", 0o600 | stat.S_IFCHR, os.makedev(1, 5))   # /dev/zero
    _unsafe(d, "not a regular file")


@pytest.mark.parametrize("how", ["file-g+w", "file-o+w", "dir-o+w", "subdir-o+w", "file-owner", "dir-owner"])
def test_an_image_others_could_change_is_refused(tmp_path, how):
    with ImageWriter(str(tmp_path / "img")) as w:
        w.write_json("a.json", {"x": 1})
        w.write_bytes("ghosts/g.data", b"x")
        w.commit()
    d = tmp_path / "img"
    {"file-g+w": lambda: os.chmod(d / "a.json", 0o620), "file-o+w": lambda: os.chmod(d / "a.json", 0o602),
     "dir-o+w": lambda: os.chmod(d, 0o703), "subdir-o+w": lambda: os.chmod(d / "ghosts", 0o777),
     "file-owner": lambda: os.chown(d / "a.json", 65534, 65534),
     "dir-owner": lambda: os.chown(d, 65534, 65534)}[how]()
    _unsafe(d)


def test_a_parent_writable_by_others_needs_the_sticky_bit(tmp_path):
    holder = tmp_path / "holder"
    holder.mkdir()
    d = _write(holder)
    os.chmod(holder, 0o777)                 # anyone could rename the image away and put another there
    _unsafe(d, "not sticky")
    os.chmod(holder, 0o1777)                # /tmp-like: others cannot touch what is ours
    ImageReader(str(d)).verify()
    sub = holder / "by-nobody"              # ...but below a sticky dir, a directory of someone else is theirs
    sub.mkdir()
    d2 = _write(sub)
    os.chown(sub, 65534, 65534)
    _unsafe(d2, "belongs to")


def test_the_path_given_may_be_a_symlink_but_not_a_component_swapped_later(tmp_path):
    d = _write(tmp_path)
    (tmp_path / "link").symlink_to(d)
    r = ImageReader(str(tmp_path / "link"))
    assert r.dir == str(d)
    r.verify()


def test_restore_uses_exactly_the_bytes_it_verified(tmp_path, monkeypatch):
    # After verify(), no image file is opened again: the file changed on
    # disk (and every open forbidden) changes nothing restore reads.
    d = _write(tmp_path)
    r = ImageReader(str(d))
    r.verify()
    (d / "pages.img").write_bytes(b"\x07" * 10000)
    (d / "a.json").write_text('{"x": 2}')

    def no_open(*a, **k):
        raise AssertionError(f"opened after verify: {a}")

    monkeypatch.setattr(os, "open", no_open)
    monkeypatch.setattr("builtins.open", no_open)
    assert bytes(r.data("pages.img")) == b"\x01" * 10000
    assert r.read_json("a.json") == {"x": 1}


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../x", "./a.json", "a\0b", "a//b", ""])
def test_manifest_names_stay_inside_the_image(tmp_path, name):
    d = _write(tmp_path)
    (tmp_path / "escape").write_text("{}")
    man = json.loads((d / MANIFEST).read_text())
    man["files"][name] = {"sha256": "0" * 64, "size": 2}
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(Refusal) as ei:
        ImageReader(str(d))
    assert ei.value.reason == "image-invalid" and "not a plain relative name" in ei.value.message


def test_a_missing_manifest_beside_image_files_is_a_damaged_image(tmp_path):
    d = _write(tmp_path)
    (d / MANIFEST).unlink()
    with pytest.raises(Refusal) as ei:
        ImageReader(str(d))
    assert ei.value.reason == "image-invalid"


def test_openat2_fallback_walk_does_not_follow_either(tmp_path, monkeypatch):
    import engine.imagecheck as ic
    with ImageWriter(str(tmp_path / "img")) as w:
        w.write_bytes("fds/pipe-1", b"queued")
        w.commit()
    d = tmp_path / "img"
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        monkeypatch.setattr(ic, "_openat2_works", False)
        os.close(ic.open_beneath(dfd, "fds/pipe-1"))
        os.rename(d / "fds", d / "real")
        (d / "fds").symlink_to("real")
        for works in (False, None):          # the component walk, then openat2
            monkeypatch.setattr(ic, "_openat2_works", works)
            with pytest.raises(OSError):
                ic.open_beneath(dfd, "fds/pipe-1")
    finally:
        os.close(dfd)


def test_pidfile_is_never_written_through_a_symlink(tmp_path):
    from engine.restore import write_pidfile
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pf = tmp_path / "pidfile"
    pf.symlink_to(victim)
    write_pidfile(str(pf), 4242)
    assert victim.read_text() == "precious\n"
    assert not pf.is_symlink() and pf.read_text() == "4242\n"
    assert sorted(os.listdir(tmp_path)) == ["pidfile", "victim"]


def _creds(uid, caps="0000000000000000"):
    return {"uid": [uid] * 4, "gid": [uid] * 4, "groups": [], "no_new_privs": "0",
            "caps": {c: caps for c in ("CapInh", "CapPrm", "CapEff", "CapAmb")} | {"CapBnd": "000001ffffffffff"}}


def test_an_unprivileged_caller_restores_only_its_own_uid(monkeypatch):
    from engine.imagecheck import _check_creds
    _check_creds(_creds(0, "000001ffffffffff"))          # root restores root when the image says so
    _check_creds(_creds(1000))                           # and anyone else
    for k in ("geteuid", "getuid", "getgid"):
        monkeypatch.setattr(os, k, lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000])
    _check_creds(_creds(1000))
    for bad in (_creds(0), _creds(1001), _creds(1000, "0000000000000400")):
        with pytest.raises(Refusal) as ei:
            _check_creds(bad)
        assert ei.value.reason == "capability"
    with pytest.raises(Refusal) as ei:
        _check_creds(dict(_creds(1000), uid=[1000, 1000, -1, 1000]))
    assert ei.value.reason == "image-invalid"


def test_show_refuses_an_unsafe_image(tmp_path):
    from engine.cli import main
    d = _write(tmp_path)
    os.chmod(d / "a.json", 0o666)
    assert main(["show", "-D", str(d)]) == 3
