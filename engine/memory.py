"""Memory pages: collected with pagemap + process_vm_readv into a reused
buffer and streamed into the image; written back with process_vm_writev
straight from the image file mapped into the restorer.

Image layout: pages-NNN.img files of at most CHUNK bytes each; every run of
pages is recorded as [addr, npages, file index, offset in that file] (a run
never spans two files). Each file carries a CRC-32 per 1 MiB block
(engine/pagecrc.py), so a file is written, and verified, by several threads
at once, SEG bytes each (zlib, file writes and process_vm_readv release
the GIL).
"""

from __future__ import annotations

import ctypes
import mmap
import os
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional, Sequence, Tuple

from . import faults, libc
from .errors import EngineError, Refusal
from .pagecrc import BlockCRC
from .libc import SysError

PAGE = 4096
BUF = 16 << 20            # largest piece of a run a record names
STEP = 1 << 20            # dump: bytes read, written and hashed at a time (see _Worker)
CHUNK = 64 << 20          # bytes per pages file
SEG = 8 << 20             # dump: bytes of a file one thread fills at a time (whole CRC blocks)
IOV_BATCH = 512           # remote iovecs per process_vm_readv (< IOV_MAX)
WRITE_STEP = 16 << 20     # restore: bytes per process_vm_writev, freed from the buffer after it


def page_file_name(i: int) -> str:
    return f"pages-{i:03d}.img"


class PageDumper:
    """Streams pages of one frozen process into the image.

    `add()` plans: it assigns every run of pages its place in a pages file
    and returns the records at once; `run()` then fills the files, several
    at a time in threads (process_vm_readv, file writes and hashlib all
    release the GIL), each thread with its own reused buffer."""

    def __init__(self, pid: int, image, threads: int = 2):
        self.pid = pid
        self.image = image
        self.threads = max(1, threads)
        self.plan: List[List[Tuple[int, int, bool]]] = []   # per file: (addr, nbytes, force_mem)
        self.file_off = CHUNK
        self.total = 0

    def add(self, runs: Sequence[Sequence[int]], force_mem: bool = False) -> List[List[int]]:
        """Plan saving `runs` ([addr, npages]); returns the image records
        [addr, npages, file, offset] (valid once run() succeeded).
        `force_mem`: read through /proc/PID/mem (PROT_NONE or unreadable)."""
        records: List[List[int]] = []
        for addr, npages in runs:
            n = npages * PAGE
            while n:
                if self.file_off >= CHUNK:
                    self.plan.append([])
                    self.file_off = 0
                k = min(n, BUF, CHUNK - self.file_off)
                self.plan[-1].append((addr, k, force_mem))
                records.append([addr, k // PAGE, len(self.plan) - 1, self.file_off])
                self.file_off += k
                self.total += k
                addr += k
                n -= k
        return records

    def units(self) -> List[Tuple[int, int, List[Tuple[int, int, bool]]]]:
        """The plan cut into pieces of files: (file, offset, pieces) of at
        most SEG bytes each, every one but a file's last exactly SEG (a
        whole number of CRC blocks: each unit's CRCs are its own)."""
        units = []
        for fi, pieces in enumerate(self.plan):
            start = pos = 0
            cur: List[Tuple[int, int, bool]] = []
            for addr, n, force in pieces:
                while n:
                    k = min(n, SEG - (pos - start))
                    cur.append((addr, k, force))
                    addr, n, pos = addr + k, n - k, pos + k
                    if pos - start == SEG:
                        units.append((fi, start, cur))
                        start, cur = pos, []
            if cur:
                units.append((fi, start, cur))
        return units

    def run(self) -> None:
        """Read and write every planned file, SEG bytes at a time on
        `threads` threads (engine/parallel.py): one 64 MiB file keeps both
        cores busy too. Raises EngineError/OSError."""
        if not self.plan:
            return
        from . import parallel
        files = [self.image.open_pages(page_file_name(i)) for i in range(len(self.plan))]
        # Across the files first (each file's first unit, then each one's
        # second...): two threads then write two files, not one (a write
        # holds its file's lock: the other thread would wait for it).
        units = sorted(self.units(), key=lambda u: (u[1], u[0]))
        # No bigger than the largest unit: a small process's few pages must
        # not pay for faulting in and zeroing a larger buffer.
        bufsize = min(STEP, max(sum(n for _, n, _ in pieces) for _, _, pieces in units))

        def job(i: int, w: "_Worker") -> None:
            fi, start, pieces = units[i]
            w.fill(files[fi], start, pieces)
        try:
            parallel.run(len(units), job, self.threads, lambda: _Worker(self.pid, bufsize), _Worker.close)
        finally:
            for f in files:
                f.close()

    def close(self) -> None:
        pass

    @property
    def nfiles(self) -> int:
        return len(self.plan)


class _Worker:
    """One reused buffer; fills a piece of a pages file from its planned
    pieces, STEP bytes at a time. Why so small: read from the process, written to
    the file and hashed while still in the CPU's cache; with 16 MiB at a
    time each of the three passes went to memory (the write into tmpfs
    alone cost a 1 GiB dump ~0.4 s of CPU)."""

    def __init__(self, pid: int, size: int = STEP):
        self.pid = pid
        self.size = size
        self.buf = bytearray(size)
        self.buf_addr = libc.buffer_address(self.buf)
        self.view = memoryview(self.buf)
        self._mem_fd: Optional[int] = None

    def fill(self, out, start: int, pieces: List[Tuple[int, int, bool]]) -> None:
        """Write `pieces` into the pages file `out` (image._BlockFile) from
        offset `start` on, taking the CRCs of what is written as it goes."""
        faults.point("dump.pages")
        crc = BlockCRC()
        segs: List[Tuple[int, int, bool]] = []
        for addr, n, force in pieces:
            for off in range(0, n, self.size):
                segs.append((addr + off, min(self.size, n - off), force))
        pieces = segs
        pos = start
        i = 0
        while i < len(pieces):
            batch: List[Tuple[int, int]] = []
            used = 0
            force = pieces[i][2]
            while (i < len(pieces) and len(batch) < IOV_BATCH and used + pieces[i][1] <= self.size
                   and pieces[i][2] == force):
                batch.append(pieces[i][:2])
                used += pieces[i][1]
                i += 1
            if not batch:   # a piece larger than the buffer: a planning bug
                raise EngineError(f"page piece of {pieces[i][1]} bytes exceeds the {self.size}-byte buffer")
            self._read(batch, used, force)
            out.pwrite(self.view[:used], pos)
            crc.update(self.view[:used])
            pos += used
        out.written(start, pos - start, crc.hexdigest())

    def _mem(self) -> int:
        if self._mem_fd is None:
            self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        return self._mem_fd

    def _read(self, batch: List[Tuple[int, int]], used: int, force_mem: bool) -> None:
        got = 0
        if not force_mem:
            try:
                got = libc.vm_readv(self.pid, [(self.buf_addr, used)], batch)
            except SysError:
                got = 0
        if got == used:
            return
        # Short read: the kernel stopped at a page it would not read
        # (PROT_NONE, or a page that vanished). /proc/PID/mem uses FOLL_FORCE.
        pos = 0
        fd = self._mem()
        for addr, n in batch:
            if pos + n <= got:
                pos += n
                continue
            skip = max(0, got - pos)
            k = os.preadv(fd, [self.view[pos + skip:pos + n]], addr + skip)
            if k != n - skip:
                raise EngineError(f"cannot read {n - skip} bytes of pid {self.pid} memory at "
                                  f"{addr + skip:#x} (got {k})", pid=self.pid)
            pos += n

    def close(self) -> None:
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None


def _batches(runs: Sequence[Sequence[int]]):
    """The runs in batches of at most IOV_BATCH runs and, past the first
    run, WRITE_STEP bytes: each batch's buffer pages are freed before the
    next is written, so the new process's pages reuse them."""
    batch: List[Sequence[int]] = []
    nbytes = 0
    for r in runs:
        if batch and (len(batch) >= IOV_BATCH or nbytes + r[1] * PAGE > WRITE_STEP):
            yield batch
            batch, nbytes = [], 0
        batch.append(r)
        nbytes += r[1] * PAGE
    if batch:
        yield batch


class PageSource:
    """The pages files of an image, as the image reader verified them: the
    very bytes whose sha256 was checked (ImageReader.data), never the file
    opened again by path (imagecheck.py: read once) - or the file mapped
    under a read lease, checked after every write (_check_leases)."""

    def __init__(self, buffers: Sequence, leases: Sequence = ()):
        # leases[i]: the fd whose read lease keeps file i as verified while
        # it is mapped, not copied (imagecheck.map_leased); None: a copy.
        self.leases: List[Optional[int]] = list(leases) + [None] * (len(buffers) - len(leases))
        self.spans: List[Tuple[int, int, int]] = []    # (file, offset, end) of every checked run
        self._recyclable: Optional[bool] = None
        self.dropped = False
        self.maps: List = []
        self.addrs: List[int] = []
        self.sizes: List[int] = []
        self._anchors: list = []
        for buf in buffers:
            size = len(buf)
            self.sizes.append(size)
            if size == 0:
                self.maps.append(None)
                self.addrs.append(0)
                continue
            if not isinstance(buf, (mmap.mmap, bytearray)):
                buf = bytearray(buf)     # a small file kept as bytes: from_buffer needs a writable buffer
            anchor = (ctypes.c_char * size).from_buffer(buf)
            self._anchors.append(anchor)
            self.maps.append(buf)
            self.addrs.append(ctypes.addressof(anchor))

    def check_runs(self, runs: Sequence[Sequence[int]]) -> None:
        """Every run lies inside its file. Raises Refusal(image-invalid)."""
        for r in runs:
            if (not isinstance(r, list) or len(r) != 4
                    or not all(isinstance(x, int) and x >= 0 for x in r)):
                raise Refusal("image-invalid", f"bad page run {r!r}")
            addr, npages, fi, off = r
            if fi >= len(self.sizes) or off + npages * PAGE > self.sizes[fi] or addr % PAGE:
                raise Refusal("image-invalid", f"page run {addr:#x}+{npages} points outside the pages files")
            self.spans.append((fi, off, off + npages * PAGE))

    def drop(self) -> None:
        """In ckpt, once the restorer is forked: let go of this process's
        copy of the pages (the restorer holds them copy-on-write), so that
        what the restorer releases after writing is really freed."""
        self.dropped = True
        # A leased file's mapping too: its pages are the page cache's, but
        # its page table is this process's. Torn down now, while the
        # restorer works on the other CPU, not in close() once the process
        # is back (1 GiB on tmpfs, mapped page by page: ~35 ms). The mapping
        # stays valid: a later read faults the file's bytes in again.
        for buf in self.maps:
            if isinstance(buf, mmap.mmap):
                buf.madvise(mmap.MADV_DONTNEED)

    def keep_from_children(self) -> None:
        """In the restorer, before it clones the new process: no child of
        it gets the page mappings (MADV_DONTFORK). The clone's address
        space is cleared at once, and copying then unmapping the page
        table of a 1 GiB mapping cost ~25 ms of CPU (imagecheck's
        fork_copies_ptes gives a mapped file one: it is copied on fork)."""
        for buf in self.maps:
            if isinstance(buf, mmap.mmap):
                try:
                    buf.madvise(mmap.MADV_DONTFORK)
                except (OSError, AttributeError):
                    pass    # copied then, as before

    def recyclable(self) -> bool:
        """Every checked run has its own page-aligned piece of a file (as
        PageDumper lays them out): a piece written into the process is never
        read again, so it can be freed at once."""
        if self._recyclable is None:
            spans = sorted(self.spans)
            self._recyclable = all(off % PAGE == 0 for _, off, _ in spans) and all(
                a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))
        return self._recyclable

    def _release(self, batch: Sequence[Sequence[int]]) -> None:
        """Free the buffer pages of runs just written: the new process's
        pages are allocated next, and reusing memory freed a moment ago
        spares them the cost of memory the kernel has not touched lately
        (on a VM with free page reporting, a fault on the host per page)."""
        if not self.recyclable():
            return
        for _, n, fi, off in batch:
            buf = self.maps[fi]
            if isinstance(buf, mmap.mmap) and self.leases[fi] is None:     # a mapped file frees nothing
                buf.madvise(mmap.MADV_DONTNEED, off, n * PAGE)

    def write_runs(self, pid: int, runs: Sequence[Sequence[int]], mem_fd: Optional[int] = None, fill=None) -> int:
        """Write runs into process `pid` (process_vm_writev, batched);
        returns bytes written. Raises EngineError on a short write. The
        buffer pages written are freed (_release): each run is written once.
        `fill` (engine/uffdfill.py AnonFill, whose ranges hold the runs):
        copied by UFFDIO_COPY instead; what it could not copy is left in
        fill.leftover, for this method once fill is closed."""
        faults.point("restore.pages")
        if self.dropped:
            raise EngineError("the page data was dropped by this process (it is the restorer's)")
        total = 0
        if fill is not None:
            for r in runs:
                _, n, fi, off = r
                done = fill.copy(r, self.addrs[fi] + off)
                total += done
                self._check_leases([r])
                if done:
                    self._release([[r[0], done // PAGE, fi, off]])
            return total
        if mem_fd is not None:
            # Non-writable private mappings: /proc/PID/mem writes with
            # FOLL_FORCE, copy-on-writing the page as a debugger's would.
            for addr, n, fi, off in runs:
                mv = memoryview(self.maps[fi])[off:off + n * PAGE]
                try:
                    k = os.pwritev(mem_fd, [mv], addr)
                finally:
                    mv.release()
                if k != n * PAGE:
                    raise EngineError(f"short write into pid {pid} memory at {addr:#x}", pid=pid)
                total += k
            self._check_leases(runs)
            self._release(runs)
            return total
        for batch in _batches(runs):
            local = [(self.addrs[fi] + off, n * PAGE) for _, n, fi, off in batch]
            remote = [(addr, n * PAGE) for addr, n, _, _ in batch]
            want = sum(n for _, n in local)
            got = libc.vm_writev(pid, local, remote)
            if got != want:
                raise EngineError(f"short process_vm_writev into pid {pid}: {got} of {want} bytes", pid=pid)
            total += got
            self._check_leases(batch)
            self._release(batch)
        return total

    def _check_leases(self, runs: Sequence[Sequence[int]]) -> None:
        """The mapped files the runs were just written from are still
        leased, so what was written is what was verified: a lease breaks
        before anyone can open its file for writing (imagecheck.map_leased).
        Raises Refusal(image-invalid); the restore then kills the process."""
        from .imagecheck import lease_held
        for fi in {r[2] for r in runs}:
            fd = self.leases[fi]
            if fd is not None and not lease_held(fd):
                raise Refusal("image-invalid", f"{page_file_name(fi)} was opened for writing while it was "
                              "restored: its pages may not be the ones verified")

    def close(self) -> None:
        """Drop the exports; the buffers belong to the image reader."""
        self._anchors.clear()
        self.maps.clear()
