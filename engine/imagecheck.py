"""Images are trusted like binaries, so they are checked the way an installer
checks what it installs, before one byte of them is believed.

* Who could have changed it. The image directory and everything in it
  belong to the caller (the effective uid) and are writable by no one else;
  every directory above it belongs to root or the caller and is writable by
  no one else, unless it is sticky (/tmp, /var/tmp): there others may add
  names but cannot rename or remove ours, so the next component only has to
  be ours or root's. Otherwise `image-unsafe`.
* No indirection. The path the user gave is resolved once (their symlinks
  are their choice); from "/" down every component is then opened with
  O_NOFOLLOW, and nothing inside the image is ever followed through a
  symlink: files are opened with openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) under the image's directory
  fd, or component by component with O_NOFOLLOW where openat2 is missing.
  Only regular files and directories may be in an image (a fifo would hang
  the reader, a device would be read as data).
* Read once. Each file is read through that one fd into memory, hashed
  there, and those bytes are what restore uses; no file is opened again by
  path after its digest was checked (a writer racing the restore can change
  the file, not what is restored from it). Pages files are mapped rather
  than copied when a read lease on that fd can be had (map_leased): no one
  can then open the file for writing without first breaking the lease,
  and the restore checks the lease after every write from the mapping, so
  the pages written are those hashed, or the restore stops (image-invalid)
  and kills the process.

The semantic checks of the records (paths, fd numbers, sizes, address
ranges, credentials) are in :func:`check_records`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Iterator, List, Optional, Tuple

from .errors import Refusal, UsageError

# Bounds on what an image can make the reader do before its digests are
# checked: a manifest is a few KiB, an image a few hundred files.
MAX_MANIFEST = 16 << 20
MAX_FILES = 100_000
MAX_DEPTH = 8
MAX_NAME = 1024
BIG = 64 << 10          # files at least this large are read into anonymous mmaps (page-aligned, releasable)
_CHUNK = 8 << 20


def _hex_digits(s: str, n: int) -> bool:
    """re.match(r"^[0-9a-f]{n}$", s), which `$` lets end in one newline, with
    str methods: re costs every restore ~20 ms under TCG."""
    if len(s) == n + 1 and s[-1] == "\n":
        s = s[:-1]
    return len(s) == n and not s.strip("0123456789abcdef")


def unsafe(detail: str, path: Optional[str] = None) -> Refusal:
    return Refusal("image-unsafe", detail, path=path)


def invalid(detail: str) -> Refusal:
    return Refusal("image-invalid", detail)


# -- who may write ---------------------------------------------------------------

def _who(uid: int) -> str:
    try:
        import pwd
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _check_ancestor(path: str, st: os.stat_result, me: int) -> None:
    if st.st_uid not in (0, me):
        raise unsafe(f"{path} belongs to {_who(st.st_uid)}, who could replace the image", path=path)
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise unsafe(f"{path} is writable by {'others' if st.st_mode & 0o002 else 'its group'} "
                     f"(mode {stat.S_IMODE(st.st_mode):04o}) and not sticky: anyone there could replace the image",
                     path=path)


def _check_own(path: str, st: os.stat_result, me: int, what: str) -> None:
    if st.st_uid != me:
        raise unsafe(f"{what} {path} belongs to {_who(st.st_uid)}, not to the caller {_who(me)}", path=path)
    if st.st_mode & 0o022:
        raise unsafe(f"{what} {path} is writable by {'others' if st.st_mode & 0o002 else 'its group'} "
                     f"(mode {stat.S_IMODE(st.st_mode):04o})", path=path)


def open_image_dir(directory: str) -> Tuple[int, str]:
    """(fd, resolved path) of the image directory, opened O_RDONLY from "/"
    down with O_NOFOLLOW at every component, each checked as above.
    Raises UsageError (no such directory), Refusal(image-unsafe)."""
    if "\0" in directory:
        raise UsageError("the image directory name holds a NUL byte")
    real = os.path.realpath(directory)
    me = os.geteuid()
    parts = [p for p in real.split("/") if p]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if parts:
            _check_ancestor("/", st, me)
        here = ""
        for i, comp in enumerate(parts):
            last = i == len(parts) - 1
            here += "/" + comp
            flags = (os.O_RDONLY if last else os.O_PATH) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                nfd = os.open(comp, flags, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise UsageError(f"{real}: no such image directory") from None
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    if last:
                        raise UsageError(f"{real}: no such image directory (not a directory)") from None
                    # realpath resolved it a moment ago: it was swapped for a symlink since
                    raise unsafe(f"{here} changed while it was opened (now a symlink or not a directory)",
                                 path=here) from None
                raise UsageError(f"{here}: {e.strerror}") from None
            os.close(fd)
            fd = nfd
            parent_sticky = bool(st.st_mode & stat.S_ISVTX) and bool(st.st_mode & 0o022)
            st = os.fstat(fd)
            if last:
                _check_own(here, st, me, "the image directory")
            else:
                _check_ancestor(here, st, me)
                if parent_sticky and st.st_uid not in (0, me):
                    raise unsafe(f"{here} belongs to {_who(st.st_uid)}", path=here)
        if not parts:
            os.close(fd)
            fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            _check_own("/", os.fstat(fd), me, "the image directory")
        return fd, real
    except BaseException:
        os.close(fd)
        raise


def scan(dfd: int, root: str) -> Dict[str, os.stat_result]:
    """{relative name: lstat} of every regular file under the image
    directory fd. Refuses symlinks, special files, and directories that
    are not the caller's alone."""
    me = os.geteuid()
    out: Dict[str, os.stat_result] = {}

    def walk(fd: int, prefix: str, depth: int) -> None:
        for name in sorted(os.listdir(fd)):
            rel = prefix + name
            shown = f"{root}/{rel}"
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise unsafe(f"the image holds a symlink, {rel}; an image is never read through one", path=shown)
            if stat.S_ISDIR(st.st_mode):
                if depth >= MAX_DEPTH:
                    raise invalid(f"directories nested too deep at {rel}")
                _check_own(shown, st, me, "the image's directory")
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as e:
                    raise unsafe(f"{rel} changed while the image was read: {e.strerror}", path=shown) from None
                try:
                    if (os.fstat(sub).st_dev, os.fstat(sub).st_ino) != (st.st_dev, st.st_ino):
                        raise unsafe(f"{rel} changed while the image was read", path=shown)
                    walk(sub, rel + "/", depth + 1)
                finally:
                    os.close(sub)
                continue
            if not stat.S_ISREG(st.st_mode):
                raise unsafe(f"the image holds {rel}, which is not a regular file "
                             f"(mode {st.st_mode:o})", path=shown)
            _check_own(shown, st, me, "the image file")
            out[rel] = st
            if len(out) > MAX_FILES:
                raise invalid(f"more than {MAX_FILES} files")

    walk(dfd, "", 0)
    return out


# -- opening without following ---------------------------------------------------

_SYS_OPENAT2 = 437          # the same number on every architecture (asm-generic)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_works: Optional[bool] = None


def _openat2(dfd: int, name: str, flags: int) -> int:
    from .libc import libc
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dfd), ctypes.c_char_p(os.fsencode(name)),
                     ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), name)
    return r


def _walk_open(dfd: int, name: str, flags: int) -> int:
    """openat component by component, O_NOFOLLOW at each (no openat2)."""
    parts = name.split("/")
    fd = dfd
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            if fd != dfd:
                os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        if fd != dfd:
            os.close(fd)


def open_beneath(dfd: int, name: str) -> int:
    """A read-only fd on `name` under the directory fd `dfd`, never through
    a symlink and never outside it. O_NONBLOCK: a fifo put there does not
    hang the reader (it is refused by its fstat). Raises OSError (ELOOP,
    EXDEV for a symlink or an escape)."""
    global _openat2_works
    if not valid_name(name):
        raise OSError(errno.EINVAL, "bad image file name", name)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    if _openat2_works is not False:
        try:
            fd = _openat2(dfd, name, flags)
            _openat2_works = True
            return fd
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.E2BIG, errno.EPERM) or _openat2_works:
                raise
            _openat2_works = False   # old kernel, or a seccomp filter that says no
    return _walk_open(dfd, name, flags)


def valid_name(name) -> bool:
    """A file name as ImageWriter makes them: relative, no empty, "." or
    ".." component, no NUL, bounded."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\0" in name or "\\" in name:
        return False
    parts = name.split("/")
    return len(parts) <= MAX_DEPTH and all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts)


def read_file(dfd: int, name: str, root: str, *, want_size: Optional[int] = None,
              expect: Optional[os.stat_result] = None, limit: Optional[int] = None,
              hasher=None, leases: Optional[dict] = None, populate: bool = True):
    """The bytes of image file `name`, read once through an fd opened with
    open_beneath and checked like the scan checked it (the same inode,
    a regular file of the caller's, not writable by others). Small files
    come back as bytes, big ones in an anonymous mmap. Raises Refusal.

    `hasher`: updated with every piece just read, while it is still in the
    CPU cache (a second pass over a 64 MiB file reads it back from memory).
    `leases` (a dict): a big file that can be leased is not copied but
    mapped (map_leased), its fd kept in leases[name] for Lease checks;
    `populate`=False leaves its pages to be faulted in by the caller (who
    hashes it by pieces on several threads, image.ImageReader.verify)."""
    shown = f"{root}/{name}"
    try:
        fd = open_beneath(dfd, name)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EXDEV):
            raise unsafe(f"{name} is reached through a symlink; an image is never read through one",
                         path=shown) from None
        if e.errno == errno.ENOENT:
            raise invalid(f"{name} is missing") from None
        raise invalid(f"cannot open {name}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise unsafe(f"{name} is not a regular file", path=shown)
        _check_own(shown, st, os.geteuid(), "the image file")
        if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise unsafe(f"{name} was replaced while the image was read", path=shown)
        size = st.st_size
        if want_size is not None and size != want_size:
            raise invalid(f"{name} is {size} bytes, manifest says {want_size}")
        if limit is not None and size > limit:
            raise invalid(f"{name} is {size} bytes, more than {limit}")
        if leases is not None and size >= BIG:
            buf = map_leased(fd, size, hasher, populate)
            if buf is not None:
                leases[name] = fd
                fd = -1         # kept open: the lease is checked through it (Lease)
                return buf
        # MAP_POPULATE: the pages are faulted in by one call, not one fault each during the read
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0x8000)) \
            if size >= BIG else bytearray(size)
        step = HASH_STEP if hasher is not None else _CHUNK
        try:
            view = memoryview(buf)
            got = 0
            while got < size:
                n = os.preadv(fd, [view[got:got + min(step, size - got)]], got)
                if n <= 0:
                    raise invalid(f"{name} became shorter while it was read")
                if hasher is not None:
                    hasher.update(view[got:got + n])    # hashlib releases the GIL for large buffers
                got += n
            if os.pread(fd, 1, size):
                raise invalid(f"{name} grew while it was read")
            view.release()
        except BaseException:
            view.release()
            if isinstance(buf, mmap.mmap):
                buf.close()
            raise
        return buf if isinstance(buf, mmap.mmap) else bytes(buf)
    except OSError as e:
        raise invalid(f"cannot read {name}: {e.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)


# A read lease (fcntl F_SETLEASE F_RDLCK) on an image file: granted only
# while no one has the file open for writing (a writable shared mapping
# counts), and every later open for writing or truncate first breaks it
# and waits for the holder, for /proc/sys/fs/lease-break-time seconds. So
# while the lease is still held (F_GETLEASE answers F_RDLCK: a break in
# progress answers F_UNLCK), the file's bytes are those hashed, and the
# file can be mapped instead of copied into memory (a copy of 1 GiB cost
# ~0.6 s of CPU: allocating the buffer, then reading into it). The signal
# announcing a break is made SIGURG (ignored by default): SIGIO would kill ckpt.
F_SETSIG, F_SETLEASE, F_GETLEASE = 10, 1024, 1025
# File systems whose files hold their own bytes, so that every writer goes
# through the inode the lease is on. Not overlayfs (its upper file, written
# by its own path, breaks no lease on the overlay's inode), nor network or
# FUSE file systems (written elsewhere): there the file is copied.
LEASE_FS = {0x01021994: "tmpfs", 0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x9123683E: "btrfs"}
SIGURG = 23         # not signal.SIGURG: importing signal (enum) costs every restore ~5 ms
MADV_POPULATE_READ = 22
HASH_STEP = 1 << 20
LEASE_STEP = 8 << 20


def map_leased(fd: int, size: int, hasher=None, populate: bool = True):
    """fd's file mapped private under a read lease, hashed into `hasher`; None
    when no lease can be had (a writer has it open, a file system not in
    LEASE_FS, leases disabled by sysctl): the caller copies the file then."""
    import fcntl
    from .fstype import magic
    if magic(f"/proc/self/fd/{fd}") not in LEASE_FS:
        return None
    try:
        fcntl.fcntl(fd, F_SETSIG, SIGURG)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return None
    buf = None
    try:
        # Writable (never written: ctypes takes only a writable buffer's
        # address) but populated for reading: MAP_POPULATE would write-fault
        # a writable private mapping, i.e. copy every page.
        buf = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            if populate:
                buf.madvise(MADV_POPULATE_READ)
        except OSError:
            pass    # before 5.14: the hashing faults the pages in
        if hasher is not None:
            with memoryview(buf) as v:
                for off in range(0, size, LEASE_STEP):
                    hasher.update(v[off:off + LEASE_STEP])   # hashlib releases the GIL for large buffers
        if fcntl.fcntl(fd, F_GETLEASE) != fcntl.F_RDLCK:
            raise invalid("an image file was opened for writing while it was verified")
        return buf
    except BaseException:
        if buf is not None:
            buf.close()
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        raise


def fork_copies_ptes(buf) -> None:
    """Make a fork copy the page table of `buf` (a populated private file
    mapping of map_leased), so that the restorer, forked after the
    verification, reads the verified pages without faulting each one in
    again (~90 ms of CPU per GiB). A fork skips the page table of a file
    mapping that has no anonymous pages (mm/memory.c vma_needs_copy: "a
    page fault will fill them correctly"); one byte written back with
    its own value gives it one, a private copy of the first page with the
    same bytes (what was verified: the file is never written). Where the
    page cache maps a file by 2 MiB entries (large folios, 6.x) a fork
    copies none of those anyway, and the restorer faults once per 2 MiB:
    cheap; the saving is on kernels that map it page by page."""
    try:
        if len(buf):
            buf[0] = buf[0]
    except (TypeError, ValueError, IndexError):
        pass    # not a writable mapping: the restorer faults the pages in


def lease_held(fd: int) -> bool:
    """The read lease of map_leased is still unbroken on fd."""
    import fcntl
    try:
        return fcntl.fcntl(fd, F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False


def check_manifest_files(files, crc_ok: bool = True) -> None:
    """The file table: valid names, {sha256: 64 hex, size: int >= 0}, or for
    a pages file (format 6, `crc_ok`) {crc32: 8 hex per 1 MiB block, size}
    instead (engine/pagecrc.py). Exactly one digest per file."""
    from . import pagecrc
    if not isinstance(files, dict):
        raise invalid("manifest has no file table")
    if len(files) > MAX_FILES:
        raise invalid(f"manifest lists more than {MAX_FILES} files")
    for name, meta in files.items():
        if not valid_name(name) or name == "manifest.json":
            raise invalid(f"manifest names a file {name!r}: not a plain relative name inside the image")
        if (not isinstance(meta, dict) or not isinstance(meta.get("size"), int)
                or isinstance(meta.get("size"), bool) or meta["size"] < 0):
            raise invalid(f"manifest entry for {name} is malformed")
        if "sha256" in meta:
            ok = pagecrc.KEY not in meta and isinstance(meta["sha256"], str) and _hex_digits(meta["sha256"], 64)
        else:
            crc = meta.get(pagecrc.KEY)
            ok = (crc_ok and pagecrc.is_pages_file(name) and isinstance(crc, str)
                  and _hex_digits(crc, 8 * pagecrc.nblocks(meta["size"])) and not crc.endswith("\n"))
        if not ok:
            raise invalid(f"manifest entry for {name} is malformed")


# -- while restoring -------------------------------------------------------------

PROCESS_MARK_ENV = "CKPT_TEST_PROCESS_MARK"


def process_creation_hook() -> None:
    """Test-only: with CKPT_TEST_PROCESS_MARK=FILE, append a line to FILE
    just before restore creates its first process (the restorer fork), so a
    test can prove an image was refused before any process existed."""
    path = os.environ.get(PROCESS_MARK_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


class malformed_as_invalid:
    """A record that makes a validator or an opener trip over its own shape
    (a missing key, a string where a number belongs, a list too short) is a
    malformed record: Refusal(image-invalid), never an internal error. The
    engine's own records pass these checks (the round-trip tests), so only
    a damaged or edited image gets here."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if typ is not None and issubclass(typ, (KeyError, TypeError, ValueError, IndexError, AttributeError,
                                                OverflowError, RecursionError)):
            raise invalid(f"{self.what}: a malformed record ({typ.__name__}: {e})") from e
        return False


# -- what the records say ----------------------------------------------------------

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
INF = U64                      # RLIM_INFINITY as the image records it


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_READ: dict = {}     # (pid, what) -> value: what this process read of the kernel's limits


def _once(what: str, read):
    """read() once per process: a restore of a tree checks every member's
    records against the same limits (4 /proc reads a member otherwise)."""
    key = (os.getpid(), what)
    if key not in _READ:
        _READ[key] = read()
    return _READ[key]


def _sysctl(path: str, default: int) -> int:
    return _once(path, lambda: _read_sysctl(path, default))


def _read_sysctl(path: str, default: int) -> int:
    from .procfs import read_all     # no text file object: half the syscalls
    try:
        return int(read_all(path).split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _abs_path_ok(p: str) -> bool:
    """A path as the kernel names files (d_path): absolute, no empty, "."
    or ".." component. Whatever the image says is recreated or reopened
    there, so a ".." could aim it anywhere."""
    return p.startswith("/") and (p == "/" or all(c not in ("", ".", "..") for c in p[1:].split("/")))


def _walk(obj, where: str, depth: int = 0) -> Iterator[Tuple[str, object, object]]:
    """(where, key, value) of every item of a record, nested."""
    if depth > 32:
        raise invalid(f"{where}: nested too deep")
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield where, k, v
            yield from _walk(v, f"{where}.{k}", depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield where, i, v
            yield from _walk(v, f"{where}[{i}]", depth + 1)


def _item_bad(k, v) -> bool:
    """_check_strings_and_paths' rules for one item, as a yes/no."""
    if isinstance(v, str):
        if "\0" in v or (k == "path" and v.startswith("/") and not _abs_path_ok(v)):
            return True
    if isinstance(k, str) and "\0" in k:
        return True
    if isinstance(v, dict):
        if isinstance(v.get("ghost"), str) and "name" in v and not v.get("memfd"):
            name = v["name"]
            if not isinstance(name, str):
                return True
            from .files import original_path
            if not _abs_path_ok(original_path(name)):
                return True
        if "dev" in v and "ino" in v and "path" in v:
            if not isinstance(v["path"], str) or not _abs_path_ok(v["path"]):
                return True
            for f in ("dev", "ino", "size", "mode", "uid", "gid"):
                if f in v and (not _int(v[f]) or v[f] < 0):
                    return True
    return False


def _any_bad(obj, depth: int = 0) -> bool:
    """Whether _check_strings_and_paths would refuse `obj`: the same walk
    and rules without the path names of every item (which cost a restore
    of a 50-process tree ~0.2 s); those are made only for the message.
    A list's items have no key to object to (an index): numbers are
    passed over, strings looked at for a NUL only."""
    if isinstance(obj, list):
        if depth + 1 > 32:
            return bool(obj)
        for v in obj:
            c = v.__class__
            if c is int or c is bool or c is float or v is None:
                continue
            if c is str:
                if "\0" in v:
                    return True
                continue
            if c is list:
                if _any_bad(v, depth + 1):
                    return True
                continue
            if _item_bad(0, v) or (isinstance(v, (dict, list)) and _any_bad(v, depth + 1)):
                return True
        return False
    if not isinstance(obj, dict):
        return False
    if depth + 1 > 32:
        return bool(obj)
    for k, v in obj.items():
        if isinstance(k, str) and "\0" in k:
            return True
        c = v.__class__
        if c is int or c is bool or c is float or v is None:
            # most items (addresses, sizes, page runs): nothing below
            continue
        if c is str:
            # _item_bad's rules for a string (its key looked at above)
            if "\0" in v or (k == "path" and v.startswith("/") and not _abs_path_ok(v)):
                return True
            continue
        if c is list:
            # _item_bad objects to a list for its key only (above)
            if _any_bad(v, depth + 1):
                return True
            continue
        if c is dict and depth + 2 <= 32:
            if _dict_bad(k, v, depth + 1):
                return True
            continue
        if _item_bad(k, v):
            return True
        if isinstance(v, (dict, list)) and _any_bad(v, depth + 1):
            return True
    return False


# A flat record's verdict (a dict of strings and numbers only: a mapped
# file's identity), by its items and their exact types. A tree's members
# map the same libraries, each member's mm.json a record of each mapping
# of them: a restore of a 50-process tree judged ~750 such records, a few
# distinct. Exact types in the key: 1, 1.0 and True are equal in Python.
_FLAT_VERDICTS: dict = {}
_SCALARS = frozenset((int, bool, float, type(None), str))


def _dict_bad(k, v: dict, depth: int) -> bool:
    """_item_bad(k, v) or _any_bad(v, depth), for a dict item v of a dict
    whose key k passed, at a depth where v may hold items: a flat one's
    verdict does not depend on that depth, and is remembered."""
    types = tuple(map(type, v.values()))
    if not _SCALARS.issuperset(types):
        return _item_bad(k, v) or _any_bad(v, depth)
    key = (tuple(v.items()), types)
    bad = _FLAT_VERDICTS.get(key)
    if bad is None:
        bad = _item_bad(k, v) or _any_bad(v, depth)
        if len(_FLAT_VERDICTS) > 4096:
            _FLAT_VERDICTS.clear()
        _FLAT_VERDICTS[key] = bad
    return bad


def _check_strings_and_paths(rec, where: str) -> None:
    """No string anywhere holds a NUL (the engine stores binary names in
    hex); every file path (a "path" key, a file identity, a ghost's name)
    is absolute and has no "..", "." or empty component."""
    if not _any_bad(rec):
        return
    _explain_strings_and_paths(rec, where)
    raise invalid(f"{where}: a string with a NUL byte or a path that is not plain")


def _explain_strings_and_paths(rec, where: str) -> None:
    """Raise the refusal naming the first item _any_bad objects to."""
    for w, k, v in _walk(rec, where):
        if isinstance(v, str) and "\0" in v:
            raise invalid(f"{w}.{k}: a string with a NUL byte")
        if isinstance(k, str) and "\0" in k:
            raise invalid(f"{w}: a key with a NUL byte")
        if k == "path" and isinstance(v, str) and v.startswith("/") and not _abs_path_ok(v):
            raise invalid(f"{w}.path {v!r}: not a plain absolute path")
        # A deleted file's record has a ghost id (a string); other records
        # (a unix socket's) use "ghost" as a flag beside a hex "name".
        if isinstance(v, dict) and isinstance(v.get("ghost"), str) and "name" in v and not v.get("memfd"):
            name = v["name"]
            if not isinstance(name, str):
                raise invalid(f"{w}.{k}: ghost name is not a string")
            from .files import original_path
            if not _abs_path_ok(original_path(name)):
                raise invalid(f"{w}.{k}: deleted file's path {name!r} is not a plain absolute path")
        if isinstance(v, dict) and ("dev" in v and "ino" in v and "path" in v):
            if not isinstance(v["path"], str) or not _abs_path_ok(v["path"]):
                raise invalid(f"{w}.{k}: file path {v['path']!r} is not a plain absolute path")
            for f in ("dev", "ino", "size", "mode", "uid", "gid"):
                if f in v and (not _int(v[f]) or v[f] < 0):
                    raise invalid(f"{w}.{k}.{f}: {v[f]!r} is not a non-negative integer")


def ghost_of(rec):
    """The deleted-file record in an fd record ({"ghost": {...}}), a
    mapping's or the exe's file record (the ghost record itself: {"ghost":
    id, "extents": ...}, or {"file": identity}), or None."""
    if not isinstance(rec, dict):
        return None
    g = rec.get("ghost")
    if isinstance(g, dict):
        return g if _is_file_ghost(g) else None
    return rec if isinstance(g, str) and _is_file_ghost(rec) else None


def _is_file_ghost(g) -> bool:
    """A deleted file kept with its data (files.dump_ghost), not a removed
    directory or device node (unlinked.py: no data, a "path")."""
    return isinstance(g, dict) and ("extents" in g or "data_bytes" in g or "name" in g)


def _size_in(reader, name: str) -> Optional[int]:
    """Size of an image file as the (verified) reader holds it, or None."""
    try:
        return reader.size(name)
    except Refusal:
        return None


def _check_ghost(g: dict, reader, where: str) -> None:
    """A deleted file's record: size and extents within bounds, the extents
    adding up to the data file the image holds."""
    for f in ("size", "data_bytes", "mode"):
        if not _int(g.get(f)) or g[f] < 0 or g[f] > (1 << 62):
            raise invalid(f"{where}: ghost {f} {g.get(f)!r}")
    if not isinstance(g.get("ghost"), str) or not valid_name(f"ghosts/{g['ghost']}.data"):
        raise invalid(f"{where}: ghost id {g.get('ghost')!r}")
    ext = g.get("extents")
    if not isinstance(ext, list):
        raise invalid(f"{where}: ghost extents")
    total, last = 0, 0
    for e in ext:
        if (not isinstance(e, list) or len(e) != 2 or not all(_int(x) and x >= 0 for x in e) or e[1] == 0
                or e[0] < last or e[0] + e[1] > g["size"]):
            raise invalid(f"{where}: ghost extent {e!r} (size {g['size']})")
        last = e[0] + e[1]
        total += e[1]
    if total != g["data_bytes"]:
        raise invalid(f"{where}: ghost extents hold {total} bytes, the record says {g['data_bytes']}")
    name = f"ghosts/{g['ghost']}.data"
    if _size_in(reader, name) != total:
        raise invalid(f"{where}: {name} does not hold the ghost's {total} bytes")


def _check_creds(creds: dict) -> None:
    """Well-formed ids; and the rule of who may restore whom: root may
    restore any credentials the image records (uid 0 only when the image
    says uid 0); anyone else only their own uid and gid, never more."""
    for k in ("uid", "gid"):
        ids = creds.get(k)
        if not isinstance(ids, list) or len(ids) != 4 or not all(_int(x) and 0 <= x < U32 for x in ids):
            raise invalid(f"core.json creds {k} {ids!r}")
    groups = creds.get("groups", [])
    if not isinstance(groups, list) or not all(_int(x) and 0 <= x < U32 for x in groups) or len(groups) > 65536:
        raise invalid("core.json creds groups")
    caps = creds.get("caps")
    if not isinstance(caps, dict) or not all(isinstance(caps.get(c), str) and _hex_digits(caps[c], 16)
                                             for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")):
        raise invalid("core.json creds caps")
    if creds.get("no_new_privs") not in ("0", "1"):
        raise invalid("core.json creds no_new_privs")
    audit = creds.get("audit", [0, 0])
    if not isinstance(audit, list) or len(audit) != 2 or not all(_int(x) and 0 <= x <= U32 for x in audit):
        raise invalid("core.json creds audit")
    me = os.geteuid()
    if me != 0:
        uid, gid = os.getuid(), os.getgid()
        if any(u != uid for u in creds["uid"]) or any(g != gid for g in creds["gid"]) \
                or not set(groups) <= set(os.getgroups()) | {gid}:
            raise Refusal("capability", f"the image is of uid {creds['uid']} gid {creds['gid']}: "
                          f"ckpt run by uid {uid} restores only processes of its own uid and gid")
        if any(caps[c] != "0" * 16 for c in ("CapInh", "CapPrm", "CapEff", "CapAmb")):
            raise Refusal("capability", "the image's process had capabilities; only root restores those")


I63 = (1 << 63) - 1
# The numbers and words of each fd kind's record, with the range the kernel
# gives them: a handler that clamps or defaults an out-of-range value (an
# eventfd count of 2**64 written as 2**64-2, an end "x" opened read-write)
# would restore something else than was dumped, silently. A field named
# here must be present; its handler reads it.
_U = lambda hi: ("int", 0, hi)
from .fds.procfile import OWN as _PF_OWN, SYSTEM as _PF_SYSTEM  # noqa: E402 (next to its one use)
_PROCFILE_NAMES = _PF_OWN | _PF_SYSTEM
KIND_FIELDS = {
    "eventfd": {"count": _U(U64 - 1), "semaphore": ("bool",)},
    "signalfd": {"sigmask": _U(U64)},
    "timerfd": {"ticks": _U(U64), "interval_ns": _U(I63), "remaining_ns": _U(I63), "abstime": ("bool",),
                "clockid": _U(63)},
    "pipe": {"size": ("int", 1, 1 << 31), "data_len": _U(1 << 31), "end": ("word", "r", "w", "rw")},
    "fifo": {"size": ("int", 1, 1 << 31), "end": ("word", "r", "w", "rw")},
    "epoll": {"targets": ("list",)},
    "inotify": {"watches": ("list",)},
    "procfile": {"proc": ("word", "own", "system"), "name": ("word",) + tuple(sorted(_PROCFILE_NAMES))},
}


def _field_ok(v, spec) -> bool:
    if spec[0] == "int":
        return _int(v) and spec[1] <= v <= spec[2]
    if spec[0] == "bool":
        return isinstance(v, bool)
    if spec[0] == "word":
        return isinstance(v, str) and v in spec[1:]
    return isinstance(v, list)


def _check_kind_fields(r: dict, fds: set) -> None:
    where = f"fds.json: fd {r['fd']} ({r['kind']})"
    for k, spec in KIND_FIELDS.get(r["kind"], {}).items():
        if k not in r or not _field_ok(r[k], spec):
            raise invalid(f"{where}: {k} {r.get(k)!r}")
    if r["kind"] == "pipe" and r["data_len"] > r["size"]:
        raise invalid(f"{where}: {r['data_len']} bytes queued in a {r['size']}-byte pipe")
    if r["kind"] == "epoll":
        seen = set()
        for t in r["targets"]:
            # "via": the fd holding a file registered under a number closed
            # or reused since (engine/fds/epoll.py); tfd itself is any fd number
            if (not isinstance(t, dict) or not _int(t.get("tfd"))
                    or (t["tfd"] not in fds if "via" not in t else
                        not (_int(t["via"]) and t["via"] in fds and 0 <= t["tfd"] < (1 << 20) and t["via"] != t["tfd"]))
                    or set(t) - {"tfd", "events", "data", "via"}
                    or not _field_ok(t.get("events"), _U(U32)) or not _field_ok(t.get("data"), _U(U64))):
                raise invalid(f"{where}: target {t!r}")
            key = (t["tfd"], json_key(t))
            if key in seen:
                raise invalid(f"{where}: target {t!r} twice")
            seen.add(key)
    if r["kind"] == "inotify":
        wds = set()
        for w in r["watches"]:
            if (not isinstance(w, dict) or not _field_ok(w.get("wd"), ("int", 1, (1 << 31) - 1)) or w["wd"] in wds
                    or not _field_ok(w.get("mask"), _U(U32))
                    or not (isinstance(w.get("path"), str) if "fd_of" not in w
                            else "path" not in w and _field_ok(w["fd_of"], ("int", 0, (1 << 31) - 1)))):
                raise invalid(f"{where}: watch {w!r}")
            wds.add(w["wd"])
    lengths = r.get("lengths")
    if lengths is not None:
        if (not isinstance(lengths, list) or not all(_int(n) and 0 <= n <= (1 << 31) for n in lengths)
                or not _int(r.get("data_len")) or sum(lengths) != r["data_len"]):
            raise invalid(f"{where}: queued message lengths {lengths!r} (data_len {r.get('data_len')!r})")


def json_key(obj) -> str:
    from . import fastjson
    return fastjson.dumps(obj, sort_keys=True)


SS_ONSTACK, SS_DISABLE, SS_AUTODISARM = 1, 2, 1 << 31
MINSIGSTKSZ = 2048
ROBUST_LIST_HEAD = 24            # sizeof(struct robust_list_head) on 64-bit
RSEQ_MIN, RSEQ_ALIGN = 32, 32


def _task_size() -> int:
    """The top of user address space: 47 bits on x86_64 (56 with 5-level
    paging), at most 52 on aarch64."""
    return _once("task_size", _read_task_size)


def _read_task_size() -> int:
    if os.uname().machine == "x86_64":
        from .procfs import read_all
        try:
            la57 = any(line.startswith(b"flags") and b" la57" in line
                       for line in read_all("/proc/cpuinfo").splitlines())
        except OSError:
            la57 = True
        return (1 << 56) if la57 else (1 << 47) - 4096
    return 1 << 52


def _check_task_words(t: dict, where: str) -> None:
    """sigaltstack, robust list, rseq and the tid address of a task (the
    leader or a thread), as the kernel accepts them."""
    sp, flags, size = t["sigaltstack"]
    flags = flags & U32 if -(1 << 31) <= flags <= U32 else -1    # read as a C int: SS_AUTODISARM is negative
    if not (0 <= sp <= U64 and 0 <= size <= U64) or flags < 0 \
            or flags & ~(SS_ONSTACK | SS_DISABLE | SS_AUTODISARM) \
            or (not flags & SS_DISABLE and size < MINSIGSTKSZ):
        raise invalid(f"{where}: sigaltstack {t['sigaltstack']}")
    head, length = t["robust_list"]
    if not 0 <= head <= U64 or (head and length != ROBUST_LIST_HEAD):
        raise invalid(f"{where}: robust list {t['robust_list']}")
    r = t["rseq"]
    if r["pointer"] and (r["pointer"] % RSEQ_ALIGN or not RSEQ_MIN <= r["size"] <= 4096 or r["flags"]
                         or not 0 <= r["signature"] <= U32 or not 0 < r["pointer"] <= U64):
        raise invalid(f"{where}: rseq {r}")
    if not 0 <= t["tid_address"] <= U64:
        raise invalid(f"{where}: tid_address")


def check_records(reader, core: dict, vmas: List[dict], fdrecs: List[dict]) -> None:
    """Every field restore uses, in its range, before any process exists
    (after restore.check_core/check_mm/check_fd_records, which check the
    types). Raises Refusal(image-invalid), or Refusal(capability) for
    credentials this caller may not give."""
    pid_max = _sysctl("/proc/sys/kernel/pid_max", 1 << 22)
    for tid in [core["pid"]] + [t.get("tid") for t in core.get("threads", []) if isinstance(t, dict)]:
        if not _int(tid) or not 0 < tid < pid_max:
            raise invalid(f"core.json: PID/TID {tid!r} outside 1..{pid_max - 1}")
    for rec, where in ((core, "core.json"), (vmas, "mm.json")):
        _check_strings_and_paths(rec, where)
    if not 0 <= core["umask"] <= 0o777:
        raise invalid(f"core.json: umask {core['umask']:o}")
    if not 0 <= core["sigmask"] <= U64 or not 0 <= core["personality"] <= U32:
        raise invalid("core.json: sigmask or personality out of range")
    comm = core["comm"]
    if len(comm.encode()) > 15 or "\0" in comm:
        raise invalid(f"core.json: comm {comm!r} longer than the kernel's 15 bytes")
    for i, (cur, mx) in enumerate(core["rlimits"]):
        if not (0 <= cur <= U64 and 0 <= mx <= U64) or cur > mx:
            raise invalid(f"core.json: rlimit {i} soft {cur} above hard {mx}")
    for t in core["itimers"]:
        if any(x < 0 for x in t) or t[1] >= 1_000_000 or t[3] >= 1_000_000:
            raise invalid(f"core.json: itimer {t}")
    # What the kernel would refuse while the new process is built (after it
    # exists): refused here instead, before.
    for sig, act in core["sigactions"].items():
        if int(sig) in (9, 19) or any(not 0 <= x <= U64 for x in act):
            raise invalid(f"core.json: sigaction {sig} {act} (SIGKILL and SIGSTOP have none)")
    top = _task_size()
    _check_task_words(core, "core.json")
    for t in core.get("threads", []):
        _check_task_words(t, f"core.json thread {t['tid']}")
    m = core["mm"]
    low = _sysctl("/proc/sys/vm/mmap_min_addr", 4096)
    for k, v in m.items():
        if _int(v) and not low <= v < top:
            raise invalid(f"core.json mm.{k} {v:#x} outside the address space")
    for a, b in (("start_code", "end_code"), ("start_data", "end_data"), ("start_brk", "brk"),
                 ("arg_start", "arg_end"), ("env_start", "env_end")):
        if m[a] > m[b] or (a == "start_code" and m[a] == m[b]):
            raise invalid(f"core.json mm: {a} {m[a]:#x} above {b} {m[b]:#x}")
    aux = core["auxv"]
    if len(aux) % 2 or len(aux) > 2 * 64 or aux[-2:] != [0, 0] or any(not 0 <= x <= U64 for x in aux):
        raise invalid("core.json: auxv is not a terminated list of (type, value) pairs")
    _check_creds(core["creds"])
    from . import cgroups, pdeath
    if not pdeath.check_record(core.get("pdeath_signal", 0)):
        raise invalid("core.json pdeath_signal")
    if not cgroups.check_record(core.get("cgroups")):
        raise invalid("core.json cgroups")
    from . import fsroot
    if not fsroot.check_record(core.get("root")):
        raise invalid("core.json root")
    sess = core["session"]
    # 0: the kernel's session and group (engine/sessionids.py); in a
    # session 0 only group 0 and groups with a leader exist
    if not all(0 <= sess[k] < pid_max for k in ("sid", "pgid")) or (sess["sid"] == core["pid"] != sess["pgid"]) \
            or (sess["pgid"] == 0 != sess["sid"]):
        raise invalid(f"core.json: session {sess} (a session leader leads its own group)")
    for v in vmas:
        if v["path"] == "[vsyscall]":
            continue
        if v["end"] > top or v["offset"] < 0 or v["offset"] % 4096 or v["offset"] > (1 << 62):
            raise invalid(f"mm.json: mapping {v['start']:#x}-{v['end']:#x} offset {v['offset']:#x} out of range")
        for run in v["pages"]:
            if run[1] <= 0 or run[2] < 0 or run[3] < 0 or run[3] % 4096:
                raise invalid(f"mm.json: page run {run!r}")
        if ghost_of(v.get("file")) is not None:
            _check_ghost(ghost_of(v["file"]), reader, "mm.json")
        if v["kind"] == "sysvshm":
            from .sysvshm import check_record
            why = check_record(v)
            if why:
                raise invalid(f"mm.json: mapping {v['start']:#x}: {why}")
    check_fd_records(reader, fdrecs)


def in_flight(r) -> list:
    """The records of the files in flight in a socket record's queued
    messages (engine/fds/_inflight.py: "anc", one entry per message)."""
    anc = r.get("anc") if isinstance(r, dict) else None
    if anc is None:
        return []
    if not isinstance(anc, list) or not all(a is None or (isinstance(a, dict) and isinstance(a.get("fds", []), list))
                                            for a in anc):
        raise invalid(f"fds.json: fd {r.get('fd')}: ancillary records {anc!r:.80}")
    return [n for a in anc if a for n in a.get("fds", [])]


def check_fd_records(reader, fdrecs: List[dict]) -> None:
    """The fd records' fields in range and their names and paths plain
    (check_records' part for fds.json; the fd-level host tests restore
    through it too, so a record shape it mistakes shows there first)."""
    _check_strings_and_paths(fdrecs, "fds.json")
    nr_open = _sysctl("/proc/sys/fs/nr_open", 1 << 20)
    fds = {r["fd"] for r in fdrecs}
    for r in fdrecs:
        if "dup_of" not in r and "ofd_of" not in r:   # ofd_of: another tree member's open file (engine/tree.py)
            _check_kind_fields(r, fds)
        for n in in_flight(r):
            if not isinstance(n, dict) or not isinstance(n.get("kind"), str):
                raise invalid(f"fds.json: fd {r['fd']}: a file in flight {n!r}")
            _check_kind_fields(dict(n, fd=r["fd"]), fds)
            for k in ("flags", "pos"):
                if not _int(n.get(k)) or not 0 <= n[k] < (1 << 63):
                    raise invalid(f"fds.json: fd {r['fd']}: a file in flight with {k} {n.get(k)!r}")
            if ghost_of(n) is not None:
                _check_ghost(ghost_of(n), reader, f"fds.json fd {r['fd']} (in flight)")
        if not 0 <= r["fd"] < min(nr_open, 1 << 31):
            raise invalid(f"fds.json: fd {r['fd']} outside 0..{nr_open - 1}")
        for k in ("flags", "pos"):
            if k in r and (not _int(r[k]) or not 0 <= r[k] < (1 << 63)):
                raise invalid(f"fds.json: fd {r['fd']} {k} {r[k]!r}")
        a = r.get("async")
        if a is not None and not (isinstance(a, dict) and set(a) == {"owner_type", "owner", "signal"} and
                                  a["owner_type"] in (0, 1, 2) and _int(a["owner"]) and 0 <= a["owner"] < (1 << 22)
                                  and _int(a["signal"]) and 0 <= a["signal"] <= 64):
            raise invalid(f"fds.json: fd {r['fd']} async {a!r}")
        if "dup_of" in r and (not _int(r["dup_of"]) or r["dup_of"] == r["fd"]):
            raise invalid(f"fds.json: fd {r['fd']} dup_of {r['dup_of']!r}")
        if ghost_of(r) is not None:
            _check_ghost(ghost_of(r), reader, f"fds.json fd {r['fd']}")
        data = r.get("data")
        if data is not None:
            size = _size_in(reader, data) if isinstance(data, str) and valid_name(data) else None
            if size is None:
                raise invalid(f"fds.json: fd {r['fd']} data {data!r} is not a file of the image")
            if _int(r.get("data_len")) and r["data_len"] != size:
                raise invalid(f"fds.json: fd {r['fd']} data_len {r['data_len']} but {data} holds {size} bytes")
    # A dup shares its leader's open file: only its number and close-on-exec
    # are its own; restore takes the rest from the leader, so a dup that says
    # otherwise is not a dup the dump made.
    dups = {r["fd"]: r for r in fdrecs if "dup_of" in r}
    leaders = {r["fd"]: r for r in fdrecs if "dup_of" not in r}
    for r in fdrecs:
        if "dup_of" in r or "ofd_of" in r:
            extra = set(r) ^ (SHARER_KEYS | {"dup_of" if "dup_of" in r else "ofd_of"})
            if extra:
                raise invalid(f"fds.json: fd {r['fd']} shares another record's open file, and has or lacks "
                              f"{', '.join(sorted(extra))}")
    for r in dups.values():
        if r["dup_of"] in dups:
            raise invalid(f"fds.json: fd {r['fd']} is a dup of a dup ({r['dup_of']})")
        _same_open_file(r, leaders[r["dup_of"]], "fds.json")


# A record that shares another's open file (a dup, or in a tree an fd
# another member opened: "ofd_of") is these keys, as dump writes it; restore
# takes everything else from the other record, so a field it carries besides
# would be ignored.
SHARER_KEYS = {"fd", "kind", "flags", "pos", "cloexec", "link"}


def _same_open_file(r: dict, lead: dict, where: str) -> None:
    """A record sharing `lead`'s open file agrees with it but for its fd
    number and close-on-exec."""
    for k in ("kind", "link", "pos"):
        if r.get(k) != lead.get(k):
            raise invalid(f"{where}: fd {r['fd']} shares the open file of fd {lead['fd']} but has another "
                          f"{k} ({r.get(k)!r})")
    if not _int(r.get("flags")) or r["flags"] & ~os.O_CLOEXEC != (lead.get("flags") or 0) & ~os.O_CLOEXEC:
        raise invalid(f"{where}: fd {r['fd']} shares the open file of fd {lead['fd']} but has other status flags")


XSAVE_HEADER = 512          # the legacy FXSAVE area, then the 64-byte XSAVE header


def check_xstate(core: dict, blob: bytes, where: str = "xstate.bin") -> None:
    """The saved FPU/xstate blob: the size the dump recorded, and on x86_64
    an XSAVE header the kernel takes (standard format: XCOMP_BV 0, the
    reserved bytes 0), else PTRACE_SETREGSET would fail in the new process."""
    want = core["xstate"].get("bytes")
    if want is not None and (not _int(want) or len(blob) != want):
        raise invalid(f"{where} is {len(blob)} bytes, the dump saved {want!r}")
    if os.uname().machine == "x86_64":
        if len(blob) < XSAVE_HEADER + 64:
            raise invalid(f"{where}: {len(blob)} bytes, shorter than an XSAVE area")
        xcomp = int.from_bytes(blob[XSAVE_HEADER + 8:XSAVE_HEADER + 16], "little")
        if xcomp or any(blob[XSAVE_HEADER + 16:XSAVE_HEADER + 64]):
            raise invalid(f"{where}: not a standard-format XSAVE header")


def used_files(core: dict, vmas: List[dict], fdrecs: List[dict], npage_files: int, prefix: str = "") -> set:
    """The image files one process's records use (its prefix in a tree)."""
    from .memory import page_file_name
    used = {"core.json", "mm.json", "fds.json", "xstate.bin"} | {page_file_name(i) for i in range(npage_files)}
    if core.get("threads"):
        from .threads import XSTATE_FILE
        used.add(XSTATE_FILE)
    for r in fdrecs:
        if isinstance(r.get("data"), str):
            used.add(r["data"])
        if r.get("kind") == "tty":      # a pty master's queues (engine/fds/tty.py)
            used.update(r[k] for k in ("out", "in") if isinstance(r.get(k), str))
    ghosts = [ghost_of(r) for r in fdrecs] + [ghost_of(v.get("file")) for v in vmas] + [ghost_of(core.get("exe"))]
    ghosts += [ghost_of(n) for r in fdrecs for n in in_flight(r)]
    used |= {f"ghosts/{g['ghost']}.data" for g in ghosts if g is not None and isinstance(g.get("ghost"), str)}
    return {prefix + n for n in used}


def tree_used_files(members: List[tuple]) -> set:
    """used_files of every member of a tree, [(dir, core, vmas, fdrecs, npage_files)]."""
    used = set()
    for d, core, vmas, fdrecs, npf in members:
        used |= used_files(core, vmas, fdrecs, npf, d)
    return used


def check_all_used(reader, used: set) -> None:
    """Every file of the image is one the records use: a data file nothing
    refers to means the records are not the ones that were dumped with it
    (fds.json emptied to "[]" leaves the pipes' queued bytes behind)."""
    unused = sorted(set(reader.files) - used)
    if unused:
        raise invalid(f"files no record uses: {', '.join(unused[:5])}")


def check_tree(reader, members: List[dict], fdrecs_of: Dict[int, List[dict]],
               cores_of: Optional[Dict[int, dict]] = None) -> None:
    """A tree image (engine/tree.py): a zombie member has no records, a live
    one its own, whose session and group are the ones tree.json gives it; a
    zombie is in its parent's session (or its own) and in a group of the
    tree or its parent's; an fd shared with another member ("ofd_of") agrees
    with the record it names; a member holding an earlier member's fd table
    (tree.json share / leave, engine/sharing.py) has no fd records, one
    holding its fs the same cwd and umask. Raises
    Refusal(image-invalid)."""
    by_pid = {m["pid"]: m for m in members}
    pids = set(by_pid)
    for m in members:
        if not 0 < m["exit_signal"] <= 64:
            raise invalid(f"tree.json: member {m['pid']} exit signal {m['exit_signal']}")
        core = (cores_of or {}).get(m["pid"])
        if core is not None and (core["session"]["sid"], core["session"]["pgid"]) != (m["sid"], m["pgid"]):
            raise invalid(f"tree.json: member {m['pid']} in session {m['sid']} group {m['pgid']}, its core.json "
                          f"says {core['session']}")
        parent = by_pid.get(m["ppid"])
        if "zombie" in m and parent is not None and (
                m["sid"] not in (parent["sid"], m["pid"]) or m["pgid"] not in pids | {parent["pgid"]}):
            raise invalid(f"tree.json: zombie {m['pid']} in session {m['sid']} group {m['pgid']}: not its "
                          "parent's nor its own")
    for m in members:
        # the image's names searched for a zombie's alone (each live
        # member's search was 250 names of a 50-process tree, 50 times)
        if "zombie" in m and m["dir"] and any(n.startswith(m["dir"]) for n in reader.files):
            raise invalid(f"tree.json: member {m['pid']} is a zombie but its records are in the image")
        if "zombie" not in m and m["dir"] + "core.json" not in reader.files:
            raise invalid(f"tree.json: member {m['pid']} has no records")
    from .sharing import owners
    files, fs = owners(members, "files"), owners(members, "fs")
    for m in members:
        pid = m["pid"]
        if files.get(pid, pid) != pid and fdrecs_of.get(pid):
            # Its fd table is an earlier member's (restored there): records of
            # its own would be a second table no dump makes.
            raise invalid(f"tree.json: member {pid} holds the fd table of {files[pid]} but has fds of its own")
        if fs.get(pid, pid) != pid and cores_of is not None:
            mine, theirs = cores_of.get(pid), cores_of.get(fs[pid])
            if mine is None or theirs is None or (mine["cwd"], mine["umask"]) != (theirs["cwd"], theirs["umask"]):
                raise invalid(f"tree.json: member {pid} holds the fs of {fs[pid]}, but its cwd or umask differs")
    for pid, recs in fdrecs_of.items():
        for r in recs:
            if "ofd_of" not in r:
                continue
            opid, ofd = r["ofd_of"]
            theirs = {x["fd"]: x for x in fdrecs_of.get(opid, [])}
            lead = theirs.get(ofd)
            if lead is not None and "dup_of" in lead:
                lead = theirs.get(lead["dup_of"])
            if lead is None or "ofd_of" in lead:
                raise invalid(f"tree member {pid} fd {r['fd']}: ofd_of {r['ofd_of']} names no open file")
            _same_open_file(r, lead, f"tree member {pid}")
