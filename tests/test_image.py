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
