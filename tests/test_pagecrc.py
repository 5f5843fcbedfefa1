"""Pages files carry a CRC-32 per 1 MiB block (image format 6,
engine/pagecrc.py): a single damaged byte anywhere is refused, the damaged
block is named, the entry's shape is checked, and format 5 images (sha256
of the whole pages file) are still read."""

import hashlib
import json
import os
import zlib

import pytest

from engine import FORMAT_VERSION, imagecheck, pagecrc
from engine.errors import Refusal
from engine.image import MANIFEST, ImageReader, ImageWriter

B = pagecrc.BLOCK
SIZE = 3 * B + 5 * 4096         # four blocks, the last one short
PAGES = "pages-000.img"


def _data() -> bytes:
    return bytes((i * 7 + i // 4096) & 0xFF for i in range(SIZE))


def _write(tmp_path, name="img", pieces=(4096, B, 3 * 4096 + 1)) -> str:
    """An image with one pages file written in pieces that straddle blocks."""
    d = str(tmp_path / name)
    data = _data()
    with ImageWriter(d) as w:
        w.write_json("core.json", {"x": 1})
        with w.open(PAGES) as f:
            pos, i = 0, 0
            while pos < len(data):
                k = pieces[i % len(pieces)]
                f.write(data[pos:pos + k])
                pos, i = pos + k, i + 1
        w.commit()
    return d


def _manifest(d) -> dict:
    with open(os.path.join(d, MANIFEST)) as f:
        return json.load(f)


def _put_manifest(d, man) -> None:
    with open(os.path.join(d, MANIFEST), "w") as f:
        json.dump(man, f)


def test_the_entry_is_a_crc_per_block_whatever_the_write_sizes(tmp_path):
    data = _data()
    want = "".join(f"{zlib.crc32(data[i:i + B]):08x}" for i in range(0, SIZE, B))
    for n, pieces in enumerate([(SIZE,), (1,) * 7 + (B - 7,), (4096, B, 3 * 4096 + 1), (B,)]):
        d = _write(tmp_path, f"img{n}", pieces)
        entry = _manifest(d)["files"][PAGES]
        assert entry == {"crc32": want, "size": SIZE}
        assert "sha256" in _manifest(d)["files"]["core.json"]
        assert _manifest(d)["format"] == FORMAT_VERSION
        r = ImageReader(d)
        r.verify()
        assert bytes(r.data(PAGES)) == data
        r.close()


@pytest.mark.parametrize("copied", [False, True], ids=["leased-map", "copied"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_byte_in_any_block_is_refused(tmp_path, monkeypatch, where, copied):
    if copied:      # the path taken where no lease can be had (overlayfs, NFS...)
        monkeypatch.setattr(imagecheck, "map_leased", lambda *a, **k: None)
    d = _write(tmp_path)
    off = {"first": 0, "middle": 2 * B + 12345, "last": SIZE - 1}[where]
    block = off // B
    fd = os.open(os.path.join(d, PAGES), os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 0x10]), off)
    finally:
        os.close(fd)
    with pytest.raises(Refusal) as ei:
        ImageReader(d).verify()
    assert ei.value.reason == "image-invalid"
    assert f"{PAGES} does not match its crc32 at block {block} " in ei.value.message


def test_truncated_or_grown_pages_file_is_refused(tmp_path):
    d = _write(tmp_path)
    os.truncate(os.path.join(d, PAGES), SIZE - 4096)
    with pytest.raises(Refusal, match="manifest says") as ei:
        ImageReader(d).verify()
    assert ei.value.reason == "image-invalid"


def _reject(d, match="malformed"):
    with pytest.raises(Refusal, match=match) as ei:
        ImageReader(d).verify()
    assert ei.value.reason == "image-invalid"


@pytest.mark.parametrize("edit", ["short", "long", "upper", "int-list", "both", "none", "newline"])
def test_a_malformed_crc_entry_is_refused(tmp_path, edit):
    d = _write(tmp_path)
    man = _manifest(d)
    e = man["files"][PAGES]
    crc = e["crc32"]
    if edit == "short":
        e["crc32"] = crc[:-8]           # one block fewer: the last block would go unchecked
    elif edit == "long":
        e["crc32"] = crc + "00000000"
    elif edit == "upper":
        e["crc32"] = crc.upper()
    elif edit == "int-list":
        e["crc32"] = [int(crc[i:i + 8], 16) for i in range(0, len(crc), 8)]
    elif edit == "both":
        e["sha256"] = "0" * 64
    elif edit == "none":
        del e["crc32"]
    else:
        e["crc32"] = crc + "\n"
    _put_manifest(d, man)
    _reject(d)


def test_a_crc_on_a_file_other_than_pages_is_refused(tmp_path):
    """The records keep their sha256: only the bulk of the image is CRC'd."""
    d = _write(tmp_path)
    man = _manifest(d)
    data = open(os.path.join(d, "core.json"), "rb").read()
    man["files"]["core.json"] = {"crc32": f"{zlib.crc32(data):08x}", "size": len(data)}
    _put_manifest(d, man)
    _reject(d)


def _as_format_5(d) -> dict:
    man = _manifest(d)
    man["format"] = 5
    with open(os.path.join(d, PAGES), "rb") as f:
        man["files"][PAGES] = {"sha256": hashlib.sha256(f.read()).hexdigest(), "size": SIZE}
    _put_manifest(d, man)
    return man


def test_a_format_5_image_is_read_with_its_sha256(tmp_path):
    d = _write(tmp_path)
    _as_format_5(d)
    r = ImageReader(d)
    r.verify()
    assert bytes(r.data(PAGES)) == _data()
    r.close()
    fd = os.open(os.path.join(d, PAGES), os.O_RDWR)
    os.pwrite(fd, b"\xff", SIZE // 2)
    os.close(fd)
    _reject(d, "does not match its sha256")


def test_format_5_has_no_crc_entries(tmp_path):
    d = _write(tmp_path)
    man = _manifest(d)
    man["format"] = 5
    _put_manifest(d, man)
    _reject(d)


@pytest.mark.parametrize("fmt", [4, 14, 5.0, "6", True])
def test_other_formats_are_refused_naming_those_read(tmp_path, fmt):
    d = _write(tmp_path)
    man = _manifest(d)
    man["format"] = fmt
    _put_manifest(d, man)
    with pytest.raises(Refusal, match=r"this engine reads formats 5, 6, 7, 8, 9, 10, 11, 12, 13") as ei:
        ImageReader(d)
    assert ei.value.reason == "image-invalid"


def test_a_writer_opening_a_pages_file_while_its_crcs_are_taken_is_refused(tmp_path, monkeypatch):
    """The CRCs are taken by block after the file is mapped (on two
    threads): the lease must still be unbroken once they all are."""
    d = _write(tmp_path)
    path = os.path.join(d, PAGES)
    tried = []

    class Racing(pagecrc.BlockCRC):
        def update(self, data):
            if not tried:
                tried.append(1)
                with pytest.raises(BlockingIOError):    # the open waits for the lease's holder...
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            super().update(data)

    monkeypatch.setattr(pagecrc, "BlockCRC", Racing)
    r = ImageReader(d)
    with pytest.raises(Refusal) as ei:      # ...whose verification sees the lease breaking
        r.verify()
    assert tried and ei.value.reason == "image-invalid"
    assert f"{PAGES} was opened for writing while it was verified" in ei.value.message


def test_a_dump_written_by_two_threads_in_pieces_verifies_and_holds_the_memory(tmp_path):
    """PageDumper fills one file SEG bytes a job on two threads (pwrite at
    offsets, each job's CRCs its own): the file holds the process's bytes in
    plan order and its CRCs verify; the pieces of the plan meet at SEG."""
    import mmap
    import signal
    from engine import memory
    n = 2 * memory.SEG + 5 * B + 3 * memory.PAGE        # three jobs, the last one short
    r, w = os.pipe()
    child = os.fork()
    if child == 0:      # pragma: no cover - the child
        try:
            m = mmap.mmap(-1, n)
            for off in range(0, n, memory.PAGE):
                m[off:off + 8] = (off * 0x9E3779B1 & (1 << 64) - 1).to_bytes(8, "little")
            import ctypes
            os.write(w, str(ctypes.addressof(ctypes.c_char.from_buffer(m))).encode())
            signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    try:
        addr = int(os.read(r, 64))
        d = str(tmp_path / "img")
        with ImageWriter(d) as img:
            dumper = memory.PageDumper(child, img, threads=2)
            half = (n // 2) // memory.PAGE
            records = dumper.add([[addr, half], [addr + half * memory.PAGE, n // memory.PAGE - half]])
            assert [(fi, off, len(p)) for fi, off, p in dumper.units()][:3] == \
                [(0, 0, 1), (0, memory.SEG, 2), (0, 2 * memory.SEG, 1)]
            dumper.run()
            img.commit()
        assert {rec[2] for rec in records} == {0}
        reader = ImageReader(d)
        reader.verify()
        got = bytes(reader.data(memory.page_file_name(0)))
        with open(f"/proc/{child}/mem", "rb", buffering=0) as mem:
            mem.seek(addr)
            assert got == mem.read(n)
        reader.close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(r)


def _blockcrc(data, pieces) -> str:
    h = pagecrc.BlockCRC()
    view, pos, i = memoryview(data), 0, 0
    while pos < len(data):
        k = pieces[i % len(pieces)]
        h.update(view[pos:pos + k])
        pos, i = pos + k, i + 1
    return h.hexdigest()


@pytest.mark.parametrize("pieces", [(3 * B + 1,), (B,), (pagecrc.FAST_MIN - 1, B + 4096, 5), (pagecrc.FAST_MIN,)],
                         ids=["whole", "blocks", "straddling", "fast-min"])
def test_libdeflate_gives_zlibs_crcs_and_is_the_one_used(monkeypatch, pieces):
    """libdeflate's CRC-32 (when installed) must be zlib's, chained across
    pieces and blocks; and for a writable buffer it is the one called."""
    if pagecrc.fast_crc32() is None:
        pytest.skip("no libdeflate.so.0 here")
    data = bytearray(os.urandom(3 * B + 12345))
    want = "".join(f"{zlib.crc32(data[i:i + B]):08x}" for i in range(0, len(data), B))
    calls = []
    real = pagecrc.fast_crc32()
    monkeypatch.setattr(pagecrc, "_fast", lambda *a: calls.append(a[2]) or real(*a))
    assert _blockcrc(data, pieces) == want
    assert calls and sum(calls) > len(data) // 2
    monkeypatch.setattr(pagecrc, "_fast", False)        # zlib alone: the same
    assert _blockcrc(data, pieces) == want
    assert _blockcrc(bytes(data), pieces) == want        # read-only: zlib


def test_without_libdeflate_a_flipped_byte_is_still_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(pagecrc, "_fast", False)
    d = _write(tmp_path)
    r = ImageReader(d)
    r.verify()
    r.close()
    fd = os.open(os.path.join(d, PAGES), os.O_RDWR)
    os.pwrite(fd, bytes([os.pread(fd, 1, B + 7)[0] ^ 1]), B + 7)
    os.close(fd)
    with pytest.raises(Refusal) as ei:
        ImageReader(d).verify()
    assert f"{PAGES} does not match its crc32 at block 1 " in ei.value.message
