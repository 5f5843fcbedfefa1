"""The image directory: written atomically, verified before it is trusted.

Layout (all files 0600, directories 0700):
    DIR/manifest.json   format version, engine version, arch, kernel release,
                        creation time, and {name: {sha256, size}} of every file
                        but the pages files: {crc32, size} (a CRC-32 of each
                        1 MiB block, engine/pagecrc.py says why; format 6)
    DIR/<anything>      written through ImageWriter, named in the manifest

A dump writes into ``DIR.partial`` and renames it to ``DIR`` only after every
file is written, fsync'd and hashed; a crash leaves ``DIR.partial`` behind,
never something that looks like a complete image.
"""

from __future__ import annotations

import errno
import os
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import BinaryIO, Dict, Optional

from . import FORMAT_VERSION, __version__, faults, fastjson, pagecrc
from .sha256 import sha256
from .errors import EngineError, Refusal, UsageError

MANIFEST = "manifest.json"
# Formats this engine reads. 5 differs from 6 only in the pages files' entries
# (a sha256 of the whole file): those are checked as any other file's. 6
# differs from 7 only by core.json "mempolicy" missing (the default policy),
# 7 from 8 by attrs tsc, mdwe and memory_merge missing (their defaults), 8
# from 9 by threads' "mempolicy" (the leader's), 9 from 10 by "membarrier" (0).
READ_FORMATS = (5, 6, 7, 8, 9, 10, 11, 12, FORMAT_VERSION)
_CHUNK = 8 << 20


_bufs = None      # a threading.local, made on first use (importing threading costs a dump ~1 ms)


def _read_buffer(size: int) -> memoryview:
    """A per-thread reusable read buffer of at least min(size, _CHUNK)
    bytes. Why: a fresh bytearray(_CHUNK) per file costs the kernel 2048
    page faults and 8 MiB of zeroing, which dominated verifying the five
    small files of a small process's image (several ms)."""
    global _bufs
    if _bufs is None:
        import threading
        _bufs = threading.local()   # two threads racing here: one's buffer is dropped, no harm
    want = max(4096, min(size, _CHUNK))
    buf = getattr(_bufs, "buf", None)
    if buf is None or len(buf) < want:
        buf = _bufs.buf = memoryview(bytearray(want))
    return buf


def _new_digest(name: str):
    """(the manifest field, a hasher) for image file `name`."""
    if pagecrc.is_pages_file(name):
        return pagecrc.KEY, pagecrc.BlockCRC()
    return "sha256", sha256()


def _digest_file(path: str, name: str) -> dict:
    """The manifest entry of a file written by path: {field: digest, size}. Raises OSError."""
    key, h = _new_digest(name)
    with open(path, "rb", buffering=0) as f:
        view = _read_buffer(os.fstat(f.fileno()).st_size)
        while True:
            n = f.readinto(view)
            if not n:
                break
            h.update(view[:n])   # hashlib releases the GIL for large buffers
    return {key: h.hexdigest(), "size": os.path.getsize(path)}


def _fsync_path(path: str) -> None:
    """fsync a file or directory by path (any fd on the inode flushes it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PARALLEL_MIN = 4 << 20       # verify: files smaller than this are hashed without threads
# verify: pages files' bytes below this are CRC'd without threads. The
# CRCs run ~2.3 GB/s a thread here (their pages faulted in by the reads);
# importing threading costs a ckpt run ~2.5 ms: a 50-process tree's 4.7
# MiB of pages were checked 3 ms sooner in one thread (fresh process, 15
# runs each: verify 21.5 -> 18.2 ms).
CRC_PARALLEL_MIN = 8 << 20
SEG = 8 << 20                # verify: bytes of a pages file one job CRCs (a multiple of pagecrc.BLOCK)
WRITEBACK_STEP = 8 << 20     # start the writeback of every this many bytes written
KEEP_OPEN = 256              # ImageWriter.write_bytes: files kept open until sync_files (fds)


def _keep_open() -> int:
    """KEEP_OPEN, or a quarter of the soft RLIMIT_NOFILE when that is less:
    the fds kept never crowd out the dump's own (a tree's pidfds, mem fds)."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return KEEP_OPEN if soft == resource.RLIM_INFINITY else max(0, min(KEEP_OPEN, soft // 4))

_SFR = None


def _sync_file_range(fd: int, off: int, n: int):
    """sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE); False when the
    kernel or file system does not have it. Raises OSError (EIO...)."""
    global _SFR
    if _SFR is None:
        import ctypes
        from .libc import libc
        _SFR = libc.sync_file_range
        _SFR.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    if _SFR(fd, off, n, 2) == 0:        # SYNC_FILE_RANGE_WRITE
        return True
    import ctypes
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))


class _HashingFile:
    """A write-only binary file that hashes what passes through it, so a
    large image file is never read back just to be checksummed."""

    def __init__(self, raw: BinaryIO, name: str = ""):
        self._raw = raw
        self.key, self._hash = _new_digest(name)
        self.size = 0
        self._queued = 0        # bytes [0, _queued) already handed to writeback

    def write(self, data) -> int:
        try:
            n = self._raw.write(data)
            if self.size + len(data) - self._queued >= WRITEBACK_STEP:
                self._start_writeback(self.size + len(data))
        except OSError as e:
            raise _translate_oserror(e, "cannot write image") from e
        self._hash.update(data)
        self.size += len(data)
        return n

    def _start_writeback(self, end: int) -> None:
        """Start writing [_queued, end) to the disk now, without waiting
        (sync_file_range SYNC_FILE_RANGE_WRITE): the fsync at commit then
        has little left to do, so the durable image costs the frozen
        process less. A no-op on tmpfs; where unsupported, fsync does it all."""
        self._raw.flush()
        if _sync_file_range(self._raw.fileno(), self._queued, end - self._queued) is False:
            self._queued = float("inf")     # not supported here: stop asking
            return
        self._queued = end

    def fileno(self) -> int:
        return self._raw.fileno()

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def entry(self) -> dict:
        """The file's manifest entry."""
        return {self.key: self._hash.hexdigest(), "size": self.size}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _BlockFile:
    """A pages file filled in pieces at given offsets, by several threads at
    once (memory.PageDumper): each piece, a whole number of pagecrc.BLOCKs
    long but for the file's last, comes with the CRCs of its blocks, taken
    by its writer from the very buffer it wrote."""

    key = pagecrc.KEY

    def __init__(self, fd: int, name: str):
        self._fd = fd
        self.name = name
        self._pieces: Dict[int, tuple] = {}     # offset: (length, hex CRCs)
        self.closed = False

    def pwrite(self, data, off: int) -> None:
        view = memoryview(data)
        try:
            while len(view):
                n = os.pwrite(self._fd, view, off)
                view, off = view[n:], off + n
        except OSError as e:
            raise _translate_oserror(e, "cannot write image") from e
        finally:
            view.release()

    def written(self, off: int, n: int, crcs: str) -> None:
        """[off, off + n) is written and its blocks' CRCs are `crcs`; its
        writeback starts now (see _HashingFile._start_writeback)."""
        self._pieces[off] = (n, crcs)
        global _SFR_UNSUPPORTED
        if not _SFR_UNSUPPORTED:
            try:
                if _sync_file_range(self._fd, off, n) is False:
                    _SFR_UNSUPPORTED = True
            except OSError as e:
                raise _translate_oserror(e, "cannot write image") from e

    @property
    def size(self) -> int:
        return sum(n for n, _ in self._pieces.values())

    def entry(self) -> dict:
        out, pos = [], 0
        for off in sorted(self._pieces):
            n, crcs = self._pieces[off]
            if off != pos or (pos % pagecrc.BLOCK):
                raise EngineError(f"{self.name}: pieces not contiguous at {pos} (a planning bug)")
            out.append(crcs)
            pos += n
        return {self.key: "".join(out), "size": pos}

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SFR_UNSUPPORTED = False


def _translate_oserror(e: OSError, what: str) -> EngineError:
    import errno as _errno
    if e.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return EngineError(f"{what}: no space left on device ({e.filename or ''})".rstrip(" ()"), errno=e.errno)
    return EngineError(f"{what}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), errno=e.errno)


class ImageWriter:
    """Writes an image into ``DIR.partial``; ``commit()`` makes it ``DIR``.

    Use as a context manager: leaving the block without ``commit()`` (an
    exception, a refusal) removes the partial directory.
    """

    def __init__(self, directory: str):
        self.final = os.path.abspath(directory.rstrip("/") or "/")
        if os.path.lexists(self.final):
            raise UsageError(f"image directory {self.final} already exists; choose a new one")
        parent = os.path.dirname(self.final)
        if not os.path.isdir(parent):
            raise UsageError(f"cannot create image {self.final}: {parent} is not a directory")
        self.partial = self.final + ".partial"
        if os.path.lexists(self.partial):
            # A leftover of a dump that crashed: it was never complete, so it
            # is safe to replace, and keeping it would block every retry.
            import shutil   # only on this path: shutil pulls in bz2/lzma (C modules) at import
            shutil.rmtree(self.partial, ignore_errors=True)
        try:
            os.mkdir(self.partial, 0o700)
            os.chmod(self.partial, 0o700)  # umask must not loosen it
        except OSError as e:
            raise _translate_oserror(e, f"cannot create {self.partial}") from e
        self._files: Dict[str, dict] = {}
        self._open: Dict[str, _HashingFile] = {}
        self._raw_paths: set = set()
        self._dirs: set = set()         # directories made under partial (_check_name)
        self._kept = 0                  # files write_bytes left open for sync_files
        self._keep_open = _keep_open()
        self.committed = False

    # -- writing ---------------------------------------------------------
    def _check_name(self, name: str) -> str:
        faults.point("image.write", name)
        if name == MANIFEST or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad image file name {name!r}")
        if name in self._files or name in self._open or name in self._raw_paths:
            raise ValueError(f"image file {name!r} written twice")
        path = os.path.join(self.partial, name)
        d = os.path.dirname(path)
        if d != self.partial and d not in self._dirs:
            # once per directory, not a stat per file (a tree's member writes five)
            os.makedirs(d, 0o700, exist_ok=True)
            self._dirs.add(d)
        return path

    def open(self, name: str) -> _HashingFile:
        """A new file in the image, hashed as it is written; close it when done."""
        path = self._check_name(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _translate_oserror(e, "cannot write image") from e
        f = _HashingFile(os.fdopen(fd, "wb", buffering=0), name)
        self._open[name] = f
        return f

    def open_pages(self, name: str) -> _BlockFile:
        """A new pages file written in pieces at offsets (_BlockFile), by
        several threads at once; close it when done."""
        if not pagecrc.is_pages_file(name):
            raise ValueError(f"{name!r} is not a pages file name")
        path = self._check_name(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _translate_oserror(e, "cannot write image") from e
        f = _BlockFile(fd, name)
        self._open[name] = f
        return f

    def raw_path(self, name: str) -> str:
        """A path for a file the caller writes itself (e.g. a sparse ghost
        file written with holes); it is hashed at commit time."""
        path = self._check_name(name)
        self._raw_paths.add(name)
        return path

    def write_bytes(self, name: str, data: bytes) -> None:
        """A whole file. Left open (up to KEEP_OPEN of them) for
        sync_files, which then fsyncs it through its own fd instead of
        opening it again by path (an open and a close fewer a file: a
        tree's dump writes five for every member)."""
        f = self.open(name)
        try:
            f.write(data)
        except BaseException:
            f.close()
            raise
        if self._kept >= self._keep_open:
            try:
                f.close()
            except OSError as e:
                raise _translate_oserror(e, "cannot write image") from e
        else:
            self._kept += 1

    def write_json(self, name: str, obj) -> None:
        # Compact: with an indent, json falls back to its pure-Python encoder
        # (~5x slower: milliseconds of a small dump). `ckpt show` is for reading.
        self.write_bytes(name, fastjson.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

    # -- finishing -------------------------------------------------------
    def sync_files(self) -> None:
        """fsync and hash every file written so far, so that commit() has
        only what is written after (the dump reads the pending signals after
        this, to keep the window in which a signal can still arrive short).
        Raises EngineError."""
        try:
            faults.point("image.fsync")
            for name, f in list(self._open.items()):
                if not f.closed:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                else:
                    # Closed by its writer: its data may still be only in the
                    # page cache, and the rename below must not publish an
                    # image whose pages a crash could lose.
                    _fsync_path(os.path.join(self.partial, name))
                self._files[name] = f.entry()
            self._open.clear()
            self._kept = 0
            for name in sorted(self._raw_paths):
                path = os.path.join(self.partial, name)
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fchmod(fd, 0o600)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._files[name] = _digest_file(path, name)
            self._raw_paths.clear()
        except OSError as e:
            raise _translate_oserror(e, "cannot write image") from e

    def commit(self, meta: Optional[dict] = None) -> str:
        """fsync everything, write the manifest, rename into place."""
        self.sync_files()
        try:
            manifest = {
                "format": FORMAT_VERSION,
                "engine": __version__,
                "arch": os.uname().machine,
                "kernel": os.uname().release,
                "created": time.time(),
                "files": self._files,
            }
            if meta:
                manifest["meta"] = meta
            data = fastjson.dumps(manifest, indent=1, sort_keys=True).encode()
            faults.point("image.manifest")
            mpath = os.path.join(self.partial, MANIFEST)
            fd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            faults.point("image.fsync_dirs")
            for root, dirs, _ in os.walk(self.partial):
                for d in dirs:
                    _fsync_path(os.path.join(root, d))
            _fsync_path(self.partial)
            faults.point("image.rename")
            os.rename(self.partial, self.final)
        except OSError as e:
            raise _translate_oserror(e, "cannot write image") from e
        try:
            faults.point("image.fsync_parent")
            dfd = os.open(os.path.dirname(self.final), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException as e:
            # The rename may not survive a crash, and the caller is told the
            # dump failed: a complete-looking image must not stay behind.
            try:
                os.rename(self.final, self.partial)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise _translate_oserror(e, "cannot write image") from e
            raise
        self.committed = True
        return self.final

    def abort(self) -> None:
        for f in self._open.values():
            try:
                f.close()
            except OSError:
                pass
        self._open.clear()
        import shutil
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()


def _leasable(name: str) -> bool:
    """Page files are mapped under a lease rather than copied when they
    can be (imagecheck.map_leased): only memory.PageSource reads them, and
    it checks the lease after every write it makes from them."""
    return pagecrc.is_pages_file(name)


def _mismatch(name: str, meta: dict, got: str) -> str:
    if "sha256" in meta:
        return f"{name} does not match its sha256 (altered or damaged)"
    i = pagecrc.first_bad_block(got, meta[pagecrc.KEY])
    return (f"{name} does not match its crc32 at block {i} (bytes {i * pagecrc.BLOCK}-"
            f"{min(meta['size'], (i + 1) * pagecrc.BLOCK) - 1}): altered or damaged")


class ImageReader:
    """An image opened for restore or show, checked as engine/imagecheck.py
    says (owner, permissions, no symlinks; `image-unsafe`). ``verify()``
    reads every file once through its fd, checks its digest against the
    manifest and that nothing was added or removed, and keeps the bytes:
    ``read_bytes``/``data`` then give exactly what was verified."""

    def __init__(self, directory: str):
        from . import imagecheck
        self.dir = os.path.abspath(directory)
        if not os.path.isdir(self.dir):
            raise UsageError(f"{self.dir}: no such image directory")
        self.fd, self.dir = imagecheck.open_image_dir(self.dir)
        self._data: Dict[str, object] = {}
        self._leases: Dict[str, int] = {}     # name: fd holding the read lease of a mapped file
        self._verified = False
        try:
            self._load_manifest(imagecheck)
        except BaseException:
            self.close()
            raise

    def _load_manifest(self, imagecheck) -> None:
        if self.dir.endswith(".partial"):
            # Even with its manifest written: a dump that died before the
            # commit rename did not finish (its target carries on).
            raise Refusal("image-invalid", f"{self.dir} is an incomplete image (a dump that did not finish)")
        try:
            st = os.stat(MANIFEST, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            if os.path.isdir(self.dir + ".partial") or self.dir.endswith(".partial"):
                raise Refusal("image-invalid", f"{self.dir} is an incomplete image (a dump that did not finish)")
            if os.listdir(self.fd):
                raise Refusal("image-invalid", f"{self.dir} has no {MANIFEST}: damaged, or not a ckpt image") \
                    from None
            raise UsageError(f"{self.dir} is not a ckpt image (no {MANIFEST})") from None
        raw = imagecheck.read_file(self.fd, MANIFEST, self.dir, expect=st, limit=imagecheck.MAX_MANIFEST)
        try:
            self.manifest = fastjson.loads(bytes(raw))
            files = self.manifest["files"]
            fmt = self.manifest["format"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise Refusal("image-invalid", f"unreadable manifest: {e}") from e
        if type(fmt) is not int or fmt not in READ_FORMATS:
            raise Refusal("image-invalid", f"image format {fmt}, this engine reads formats "
                          f"{', '.join(map(str, READ_FORMATS))}")
        imagecheck.check_manifest_files(files, crc_ok=fmt >= 6)
        for key, typ in (("arch", str), ("kernel", str), ("meta", dict)):
            if key in self.manifest and not isinstance(self.manifest[key], typ):
                raise Refusal("image-invalid", f"manifest {key} is not a {typ.__name__}")
        self.files: Dict[str, dict] = files

    @property
    def arch(self) -> str:
        return self.manifest.get("arch", "?")

    def check_arch(self) -> None:
        if self.arch != os.uname().machine:
            raise Refusal("arch-mismatch", f"image is {self.arch}, this machine is {os.uname().machine}")

    def check_tree(self) -> Dict[str, os.stat_result]:
        """Every entry of the image a regular file or directory of the
        caller's, writable by no one else, none a symlink; {name: lstat}.
        Raises Refusal(image-unsafe)."""
        from . import imagecheck
        return imagecheck.scan(self.fd, self.dir)

    def verify(self, threads: int = 2) -> None:
        """Every file present, of the recorded size and digest (sha256, or
        for a pages file a CRC-32 per block); no extras;
        each read once into memory and kept. The files are read and hashed
        in `threads` threads (reads and hashlib release the GIL), largest
        first. Raises Refusal(image-invalid, image-unsafe)."""
        from . import imagecheck

        def bad(what: str) -> Refusal:
            return Refusal("image-invalid", what)

        present = self.check_tree()
        present.pop(MANIFEST, None)
        extra = set(present) - set(self.files)
        if extra:
            raise bad(f"files not in the manifest: {', '.join(sorted(extra)[:5])}")
        for name, meta in sorted(self.files.items()):
            if name not in present:
                raise bad(f"{name} is missing")
            if present[name].st_size != meta["size"]:
                raise bad(f"{name} is {present[name].st_size} bytes, manifest says {meta['size']}")

        def load(name: str):
            if pagecrc.KEY in self.files[name]:     # its CRCs are taken below, by block
                buf = imagecheck.read_file(self.fd, name, self.dir, want_size=self.files[name]["size"],
                                           expect=present[name], leases=self._leases, populate=False)
                return name, buf, None
            h = sha256()
            buf = imagecheck.read_file(self.fd, name, self.dir, want_size=self.files[name]["size"],
                                       expect=present[name], hasher=h,
                                       leases=self._leases if _leasable(name) else None)
            return name, buf, h.hexdigest()

        names = sorted(self.files, key=lambda n: -self.files[n]["size"])
        failed = None

        def guarded(name: str):
            try:
                return load(name)
            except Refusal as e:
                return e

        # A second file of at least PARALLEL_MIN bytes is worth a thread;
        # a small image is read here. engine/parallel.py, not
        # concurrent.futures: its import (logging...) cost ~7-14 ms.
        if threads <= 1 or len(names) < 2 or self.files[names[1]]["size"] < PARALLEL_MIN:
            results = [guarded(n) for n in names]
        else:
            from . import parallel
            results = [None] * len(names)

            def job(i: int, _) -> None:
                results[i] = guarded(names[i])
            parallel.run(len(names), job, threads)
        for res in results:
            if isinstance(res, Refusal):
                failed = failed or res
                continue
            name, buf, got = res
            self._data[name] = buf
            if got is not None and got != self.files[name]["sha256"] and failed is None:
                failed = bad(_mismatch(name, self.files[name], got))
        if failed is None:
            failed = self._check_crcs(threads)
        if failed is not None:
            self.close()
            raise failed
        self._verified = True
        # Every file is in memory now: the directory is not needed any more
        # (and a caller that forgets close() leaks no fd).
        os.close(self.fd)
        self.fd = -1

    def _check_crcs(self, threads: int) -> Optional[Refusal]:
        """The block CRCs of every pages file loaded, SEG bytes a job on
        `threads` threads (a mapped file's pages faulted in by each job's
        CRC reads); then every mapped file's lease still held, so that what
        was checked is what the file holds. The first mismatch, or None.

        Not populated first (MADV_POPULATE_READ): that takes the missing
        pages one at a time, where a read fault maps its neighbours too
        (fault-around, or a whole large folio). Measured on the host, 1 GiB
        restored, same image, engines alternating, 12 rounds: 1.21x faster
        from tmpfs and 1.26x from ext4 without it."""
        from . import imagecheck, parallel
        units = [(name, off, min(SEG, meta["size"] - off)) for name, meta in sorted(self.files.items())
                 if pagecrc.KEY in meta for off in range(0, meta["size"], SEG)]
        got: list = [None] * len(units)

        def job(i: int, _) -> None:
            name, off, n = units[i]
            buf = self._data[name]
            h = pagecrc.BlockCRC()
            with memoryview(buf) as v:
                h.update(v[off:off + n])
            got[i] = h.hexdigest()
        # Threads for CRC_PARALLEL_MIN bytes or more: below, importing
        # threading and starting one costs more than the CRCs they share
        parallel.run(len(units), job, threads if sum(u[2] for u in units) >= CRC_PARALLEL_MIN else 1)
        for name in sorted(self._leases):
            imagecheck.fork_copies_ptes(self._data[name])
        digests: Dict[str, list] = {}
        for (name, _, _), crcs in zip(units, got):
            digests.setdefault(name, []).append(crcs)
        for name, meta in sorted(self.files.items()):
            if pagecrc.KEY not in meta:
                continue
            crcs = "".join(digests.get(name, []))
            if crcs != meta[pagecrc.KEY]:
                return Refusal("image-invalid", _mismatch(name, meta, crcs))
            if name in self._leases and not imagecheck.lease_held(self._leases[name]):
                return Refusal("image-invalid", f"{name} was opened for writing while it was verified")
        return None

    def path(self, name: str) -> str:
        """The name of an image file, for messages and for "is it there":
        never to be opened (the bytes are ``read_bytes`` / ``data``)."""
        if name not in self.files:
            raise Refusal("image-invalid", f"the image has no {name}")
        return os.path.join(self.dir, name)

    def data(self, name: str):
        """The verified contents of `name`: bytes, or an mmap for a big file
        (a buffer: len(), slicing, memoryview). Before verify() (ckpt show),
        read once through the same safe open, unverified."""
        self.path(name)
        buf = self._data.get(name)
        if buf is None:
            from . import imagecheck
            buf = self._data[name] = imagecheck.read_file(self.fd, name, self.dir,
                                                          want_size=self.files[name]["size"])
        return buf

    def lease_fd(self, name: str) -> Optional[int]:
        """The fd holding the read lease under which `name` is mapped, not
        copied (imagecheck.map_leased); None for a file held in memory."""
        return self._leases.get(name)

    def size(self, name: str) -> int:
        return len(self.data(name))

    def read_bytes(self, name: str) -> bytes:
        buf = self.data(name)
        return buf if isinstance(buf, bytes) else bytes(buf)

    def read_json(self, name: str):
        try:
            return fastjson.loads(self.read_bytes(name))
        except (ValueError, RecursionError) as e:
            raise Refusal("image-invalid", f"{name}: not valid JSON: {e}") from e

    def close(self) -> None:
        """Release the kept bytes and the directory fd."""
        for buf in self._data.values():
            if hasattr(buf, "close"):
                try:
                    buf.close()
                except BufferError:   # still exported (a PageSource not closed): freed with it
                    pass
        self._data.clear()
        for fd in self._leases.values():
            os.close(fd)        # the lease ends with the last reference to the file (its mapping's)
        self._leases.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
