"""engine/uffdfill.py: a restore writes private anonymous memory by
UFFDIO_COPY. The memory must be what was dumped, page for page, with the
same pagemap flags and VmFlags as the pages process_vm_writev would have
made (the original's); a page already present in the new process (EEXIST)
and everything after it in its run is left over and written by the writev
path; the new process keeps no userfaultfd and no registered range."""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

import fault_support as fs
from engine import uffdfill
from engine.libc import buffer_address, vm_writev
from engine.memory import PAGE, PageSource
from engine_core_support import become_subreaper, build_target

pytestmark = pytest.mark.timeout(300)
GOLDEN = 0x9E3779B97F4A7C15
FLAGS = (1 << 63) | (1 << 62) | (1 << 61) | (1 << 56) | (1 << 55)  # present, swap, file/shared, exclusive, soft-dirty


def _need_uffd():
    if uffdfill.thp_on_fault():
        pytest.skip("THP on fault here: restore keeps process_vm_writev")
    if uffdfill._unfit(os.getpid()):
        pytest.skip("under a seccomp filter (or a full fd table): restore keeps process_vm_writev")


def _pagemap(pid: int, start: int, n: int) -> list:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        raw = f.read(n // PAGE * 8)
    return [w & FLAGS for w in struct.unpack(f"<{len(raw) // 8}Q", raw)]


def _vmflags(pid: int, start: int) -> str:
    text = open(f"/proc/{pid}/smaps").read()
    block = text[text.index(f"{start:x}-"):]
    return block[block.index("VmFlags:"):].splitlines()[0]


def test_a_restored_memhog_has_its_memory_and_page_flags(tmp_path):
    _need_uffd()
    become_subreaper()
    mib = 16
    ready, img = tmp_path / "ready", tmp_path / "img"
    p = subprocess.Popen([build_target(tmp_path, "memhog"), str(mib), str(ready)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                         start_new_session=True)
    restored = None
    try:
        fs.wait_for(lambda: ready.exists() and ready.read_text().endswith("\n"), 30, "memhog ready")
        start, n = int(ready.read_text().split()[1], 16), mib << 20
        flags, vmflags = _pagemap(p.pid, start, n), _vmflags(p.pid, start)
        d = fs.ckpt(["dump", "-t", str(p.pid), "-D", str(img)], timeout=120)
        assert d.returncode == 0, d.stderr
        p.wait(timeout=30)
        r = fs.ckpt(["restore", "-D", str(img), "--json"], timeout=120)
        assert r.returncode == 0, r.stderr
        restored = p.pid
        assert json.loads(r.stdout)["result"]["injected"]["pages_uffd_bytes"] >= n
        with open(f"/proc/{restored}/mem", "rb", buffering=0) as mem:
            mem.seek(start)
            data = mem.read(n)
        words = struct.unpack(f"<{n // 8}Q", data)
        assert all(w == (i * GOLDEN) & ((1 << 64) - 1) for i, w in enumerate(words) if i), "memory differs"
        assert _pagemap(restored, start, n) == flags
        assert _vmflags(restored, start) == vmflags     # no "um" left: unregistered
        fds = [os.readlink(f"/proc/{restored}/fd/{x}") for x in os.listdir(f"/proc/{restored}/fd")]
        assert not any("userfaultfd" in f for f in fds), fds
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if restored:
            fs.kill_reap(restored)


def test_a_page_already_there_and_the_rest_of_its_run_go_by_writev():
    """A Builder on a real child (tests/test_engine_batch.py's): a region
    of 8 MiB and a page, one page of it touched before the fill."""
    _need_uffd()
    from test_engine_batch import MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, _builder, _free
    gen = _builder()
    b = next(gen)
    try:
        n = uffdfill.MIN_BYTES + PAGE
        addr = _free(b)
        assert b.call("mmap", addr, n, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) == addr
        src = bytearray(os.urandom(n))
        touched = 100 * PAGE
        assert vm_writev(b.pid, [(buffer_address(src) + touched, PAGE)], [(addr + touched, PAGE)]) == PAGE
        half = n // PAGE // 2
        runs = [[addr, half, 0, 0], [addr + half * PAGE, n // PAGE - half, 0, half * PAGE]]
        vma = {"start": addr, "end": addr + n, "kind": "anon", "perms": "rw-p", "flags": ["rd", "wr"], "pages": runs}
        fds = sorted(os.listdir(f"/proc/{b.pid}/fd"))
        fill = uffdfill.AnonFill.open(b, [vma])
        assert fill is not None and fill.covers(addr, n)
        assert sorted(os.listdir(f"/proc/{b.pid}/fd")) == fds      # its userfaultfd closed at once
        assert " um" in _vmflags(b.pid, addr)
        pages = PageSource([src])
        got = pages.write_runs(b.pid, runs, fill=fill)
        extra = os.dup(fill.fd)     # the ranges are unregistered by close(), not by the file's release
        try:
            leftover = fill.close()
            assert " um" not in _vmflags(b.pid, addr)
        finally:
            os.close(extra)
        assert leftover == [[addr + touched, half - 100, 0, touched]]
        assert got == n - (half - 100) * PAGE
        assert " um" not in _vmflags(b.pid, addr)
        assert pages.write_runs(b.pid, leftover) == (half - 100) * PAGE
        with open(f"/proc/{b.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(addr)
            assert mem.read(n) == bytes(src)
        pages.close()
    finally:
        gen.close()


def test_too_little_or_not_anonymous_is_left_to_writev():
    vma = {"start": 0x10000, "end": 0x20000, "kind": "anon", "perms": "rw-p", "flags": [],
           "pages": [[0x10000, 16, 0, 0]]}
    assert uffdfill.AnonFill.open(None, [vma]) is None     # under MIN_BYTES: nothing is asked of the process
    assert not uffdfill.eligible(dict(vma, kind="file"))
    assert not uffdfill.eligible(dict(vma, perms="rw-s"))
    assert not uffdfill.eligible(dict(vma, flags=["dp"]))


@pytest.mark.parametrize("top,size,want", [("always [madvise] never", "always inherit madvise [never]", False),
                                           ("[always] madvise never", "always inherit madvise [never]", True),
                                           ("always madvise [never]", "[always] inherit madvise never", True),
                                           ("always [madvise] never", "always [inherit] madvise never", False)])
def test_huge_pages_on_fault_keep_the_writev_path(tmp_path, monkeypatch, top, size, want):
    """Where a fault could give a huge page (THP or an mTHP size "always"),
    the writev's faults make what they made before: no UFFDIO_COPY."""
    (tmp_path / "enabled").write_text(top + "\n")
    (tmp_path / "hugepages-64kB").mkdir()
    (tmp_path / "hugepages-64kB" / "enabled").write_text(size + "\n")
    monkeypatch.setattr(uffdfill, "THP", str(tmp_path))
    assert uffdfill.thp_on_fault() is want


def test_a_process_under_a_seccomp_filter_is_not_asked():
    """A filter the new process inherits from the restorer might kill it
    for the injected userfaultfd (systemd's SystemCallFilter without an
    errno): then no userfaultfd at all. (A filter that allows everything
    shows as one too.)"""
    import sys
    prog = (
        "import ctypes, struct, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.prctl(38, 1, 0, 0, 0) == 0\n"                                   # PR_SET_NO_NEW_PRIVS
        "insn = ctypes.create_string_buffer(struct.pack('<HBBI', 0x06, 0, 0, 0x7fff0000))\n"  # RET ALLOW
        "prog = ctypes.create_string_buffer(struct.pack('<H6xQ', 1, ctypes.addressof(insn)))\n"
        "assert libc.prctl(22, 2, ctypes.c_void_p(ctypes.addressof(prog)), 0, 0) == 0\n"  # SECCOMP_MODE_FILTER
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE, close_fds=True)
    try:
        assert p.stdout.readline().strip() == b"ready"
        assert uffdfill._unfit(p.pid)
        if "Seccomp:\t0" in open("/proc/self/status").read():
            assert not uffdfill._unfit(os.getpid())
    finally:
        p.kill()
        p.wait()
