"""File identity and ghost files, shared by regular-file fds and file-backed
memory mappings.

The trap this module exists for (linux-cr, 2010): a process holds a file
that is later renamed, deleted or renamed-over; a naive restore reopens the
*path* and quietly gets the wrong file. So:

* a file that still has its name is recorded with its identity (dev, ino,
  size, mtime, sha256) and, at restore, reopened by path only once the path
  is shown to name the same file (``--file-validation``);
* a file with no name left (nlink 0, renamed-over, memfd) is a *ghost*: its
  data goes into the image, holes kept as holes, and it is recreated as an
  unlinked file on the same filesystem.

One file mapped and opened several times is recorded and recreated once per
dump/restore (``ctx.shared``), so a ghost written through an fd is still the
ghost seen through a mapping of it.
"""

from __future__ import annotations

import errno
import os
import stat
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from . import digestcache, fstype, unlinked
from .errors import EngineError, Refusal
from .sha256 import sha256

_CHUNK = 4 << 20
_DELETED = " (deleted)"
MEMFD_PREFIX = "/memfd:"


# -- identity -----------------------------------------------------------------

def sha256_fd(fd: int, size: Optional[int] = None) -> str:
    """sha256 of a file's bytes from offset 0, read with pread so the fd's
    offset is not moved (the fd may be shared with the target)."""
    h = sha256()
    off = 0
    while True:
        chunk = os.pread(fd, _CHUNK, off)
        if not chunk:
            break
        h.update(chunk)
        off += len(chunk)
        if size is not None and off >= size:
            break
    return h.hexdigest()


def identity_of(st: os.stat_result) -> dict:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}


_FS_IOC_GETVERSION = 0x80087601   # _IOR('v', 1, long)


def generation(fd: int) -> Optional[int]:
    """The inode's generation number (ext4, tmpfs, xfs, btrfs...): inode
    numbers are reused once a file is freed, dev+ino+generation are not."""
    import fcntl
    import struct
    try:
        return struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETVERSION, b"\0" * 8))[0]
    except OSError:
        return None


def _wants_digest(mode: str) -> bool:
    return mode in ("strict", "digest")


def record_identity(path: str, open_path: str, ctx, *, fd: Optional[int] = None,
                    pid: Optional[int] = None, opened: Optional[int] = None,
                    st: Optional[os.stat_result] = None) -> dict:
    """Identity of the file open at `open_path` (a /proc/PID/fd/N or
    map_files path), which is known by the name `path`. Refuses when `path`
    no longer names that file. Memoised per (dev, ino) in ctx.shared.
    `opened`: read through this fd (a duplicate of the target's: pread
    leaves its offset alone) instead of opening the file again - an open
    would break a lease on it. `st`: os.stat(open_path), when the caller
    has just taken it (map_dump)."""
    if st is None:
        st = os.stat(open_path)
    key = f"ident:{st.st_dev}:{st.st_ino}"
    cached = ctx.shared.get(key)
    # Whether `path` names this inode is asked once per (path, inode) in a
    # dump: a process maps each library 4-5 times, and under TCG each stat
    # is ~1 ms (issue 15); the frozen process's mappings are recorded as of
    # one moment, as its fds are.
    named = f"named:{st.st_dev}:{st.st_ino}:{path}"
    if ctx.shared.get(named):
        pst = st
    else:
        try:
            pst = os.stat(path)
        except FileNotFoundError:
            pst = None
    if pst is None or (pst.st_dev, pst.st_ino) != (st.st_dev, st.st_ino):
        # The kernel's name for the open file no longer leads to it (another
        # mount namespace, or a race with a rename): reopening by name would
        # give another file.
        raise Refusal("file-changed", "its path no longer names the open file "
                      f"(open: dev {st.st_dev} ino {st.st_ino}; path: "
                      + ("missing" if pst is None else f"dev {pst.st_dev} ino {pst.st_ino}") + ")",
                      pid=pid, fd=fd, path=path)
    ctx.shared[named] = True
    if cached is not None:
        # one inode, maybe under several names (hard links): each fd keeps the
        # name it was opened by; only the costly parts are shared
        return dict(cached, path=path)
    ident = {"path": path, **identity_of(st)}
    rfd = os.open(open_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK) if opened is None else opened
    try:
        ident["generation"] = generation(rfd)
        if _wants_digest(ctx.options.file_validation) and stat.S_ISREG(st.st_mode):
            import fcntl
            if fcntl.fcntl(rfd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
                raise Refusal("file-lock", "a lease on a write-only open file: its bytes cannot be read for the "
                              f"--file-validation {ctx.options.file_validation} digest without opening the file "
                              "again, which breaks the lease (use --file-validation size)", pid=pid, fd=fd, path=path)
            ident["sha256"] = digestcache.digest(rfd, ident["generation"], sha256_fd, ctx.shared)
    finally:
        if opened is None:
            os.close(rfd)
    ctx.shared[key] = ident
    return dict(ident)


_UNASKED = object()     # check_identity: the generation was not asked of the fd


def _generation_of(path: str, opened: Optional[int]) -> Optional[int]:
    if opened is not None:
        return generation(opened)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return generation(fd)
    finally:
        os.close(fd)


def _readable(opened: int) -> int:
    """`opened` itself when it can be read, else a read-only reopen of the
    very same inode through /proc/self/fd (an O_WRONLY or O_PATH fd): never
    a new lookup of the path."""
    import fcntl
    fl = fcntl.fcntl(opened, fcntl.F_GETFL)
    if fl & getattr(os, "O_PATH", 0o10000000) or fl & os.O_ACCMODE == os.O_WRONLY:
        return os.open(f"/proc/self/fd/{opened}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    return opened


def _fmt_time(ns: int) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 1_000_000_000:09d}"


def check_identity(ident: dict, ctx, *, fd: Optional[int] = None, pid: Optional[int] = None,
                   opened: Optional[int] = None) -> os.stat_result:
    """Raise file-missing / file-changed unless ident["path"] (or the open
    fd `opened`) is the recorded file, per --file-validation:

    strict  same node: same dev+ino; any node: same size, mtime and sha256
    digest  same node: same dev+ino; any node: same size and sha256 (a
            touched mtime with identical content is accepted)
    size    same node: same dev+ino; any node: same size
    none    the path exists

    Two stages. Without `opened` (the restore pre-flight) everything but the
    content is checked: type, dev+ino+generation, size, mtime. With `opened`
    (the fd restore will hand to the process) everything is checked again
    on what was opened, and the content is hashed from that fd, every time:
    a check of the path followed by an open of the path is a race (a
    same-size rewrite in the same mtime tick, a rename-over), so the digest
    is only ever taken from the opened file, once per open - or, for the
    very same inode version as fstat shows it on that fd, remembered from an
    earlier run (engine/digestcache.py: keyed on dev, ino, generation, size,
    mtime and ctime, and only for files whose ctime had settled before they
    were hashed - a key of (dev, ino, size, mtime) alone could not see a
    same-size rewrite within one coarse clock tick).
    """
    path = ident["path"]
    mode = ctx.options.file_validation
    try:
        st = os.fstat(opened) if opened is not None else os.stat(path)
    except FileNotFoundError:
        raise Refusal("file-missing", "no file at this path any more", pid=pid, fd=fd, path=path) from None
    except OSError as e:
        raise Refusal("file-missing", f"cannot reach it: {e.strerror}", pid=pid, fd=fd, path=path) from None

    def changed(detail: str) -> Refusal:
        return Refusal("file-changed", detail, pid=pid, fd=fd, path=path)

    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(ident["mode"]):
        raise changed(f"file type {stat.filemode(ident['mode'])[0]} -> {stat.filemode(st.st_mode)[0]}")
    if mode == "none":
        return st
    rfd = _readable(opened) if opened is not None else None
    gen = _UNASKED
    try:
        if ctx.same_node:
            if (st.st_dev, st.st_ino) != (ident["dev"], ident["ino"]):
                raise changed(f"another file at this path (dev {ident['dev']} ino {ident['ino']} -> "
                              f"dev {st.st_dev} ino {st.st_ino}): renamed-over or replaced")
            if ident.get("generation") is not None:
                gen = _generation_of(path, rfd)
                if gen is not None and gen != ident["generation"]:
                    raise changed(f"another file at this path (inode {st.st_ino} was freed and reused: "
                                  f"generation {ident['generation']} -> {gen}): replaced")
        if st.st_size != ident["size"]:
            raise changed(f"size {ident['size']} -> {st.st_size}")
        if mode == "size" or not stat.S_ISREG(st.st_mode):
            return st
        if mode == "strict" and st.st_mtime_ns != ident["mtime_ns"]:
            raise changed(f"mtime {_fmt_time(ident['mtime_ns'])} -> {_fmt_time(st.st_mtime_ns)}")
        want = ident.get("sha256")
        if want is None:
            raise changed("the image has no content digest for it (dumped with --file-validation "
                          "size/none); restore with --file-validation size")
        if rfd is None:
            return st        # the content is checked on the opened file
        # No shortcut on "same mtime": ext4 timestamps are taken from a
        # coarse clock, so a same-size rewrite within a few ms keeps mtime.
        # The digest cache is keyed on ctime too, and only holds files
        # whose ctime had settled before they were hashed (digestcache.py).
        # (the generation asked above of this very fd, when it was: one
        # ioctl less of each mapped library's open, issue 15)
        if digestcache.digest(rfd, generation(rfd) if gen is _UNASKED else gen, sha256_fd, ctx.shared) != want:
            raise changed("content differs (same size, different sha256): rewritten after the dump")
        if os.fstat(rfd).st_size != ident["size"]:
            raise changed(f"size changed while it was being checked ({ident['size']} -> "
                          f"{os.fstat(rfd).st_size})")
        return st
    finally:
        if rfd is not None and rfd != opened:
            os.close(rfd)


# -- ghosts -------------------------------------------------------------------

def _extents(fd: int, size: int):
    """Data extents of a file as (offset, length), holes skipped
    (lseek SEEK_DATA/SEEK_HOLE; a filesystem without them reports one extent)."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # only a hole from here to EOF
                return
            if e.errno == errno.EINVAL:     # no SEEK_DATA support: all data
                yield (off, size - off)
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        end = min(end, size)
        if end > start:
            yield (start, end - start)
        off = end


def ghost_key(st: os.stat_result) -> str:
    return f"ghost:{st.st_dev}:{st.st_ino}"


def dump_ghost(open_path: str, name: str, ctx, *, fd: Optional[int] = None,
               pid: Optional[int] = None) -> dict:
    """Save a nameless file's contents into the image once; return its
    record {"ghost": id, ...}. Refuses unlinked-too-large past --ghost-limit
    (holes do not count: a 1 GiB sparse file with 4 KiB of data is 4 KiB)."""
    st = os.stat(open_path)
    key = ghost_key(st)
    done = ctx.shared.get(key)
    if done is not None:
        return {**done, "name": name}   # one inode, but each fd or mapping shows its own name
    try:    # O_NOATIME: reading it must not change the atime it is saved with
        rfd = os.open(open_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        rfd = os.open(open_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents = list(_extents(rfd, st.st_size))
        data_bytes = sum(n for _, n in extents)
        limit = ctx.options.ghost_limit
        if data_bytes > limit:
            raise Refusal("unlinked-too-large",
                          f"deleted file holds {data_bytes} bytes of data (size {st.st_size}), over the "
                          f"ghost limit {limit}; raise it with --ghost-limit", pid=pid, fd=fd, path=name)
        seals = None
        memfd = name.startswith(MEMFD_PREFIX)
        if memfd:
            try:
                import fcntl
                seals = fcntl.fcntl(rfd, 1034)   # F_GET_SEALS
            except OSError:
                seals = 0
        gid = f"g{st.st_dev}-{st.st_ino}"
        rec = {"ghost": gid, "name": name, "memfd": memfd, "seals": seals,
               **({"uncounted": not _open_for_write(rfd)} if memfd else {}),
               **identity_of(st), "atime_ns": st.st_atime_ns, "extents": extents, "data_bytes": data_bytes}
        if ctx.image is not None:
            h = sha256()
            with ctx.image.open(f"ghosts/{gid}.data") as out:
                for off, n in extents:
                    while n:
                        chunk = os.pread(rfd, min(n, _CHUNK), off)
                        if not chunk:
                            raise EngineError(f"{name}: deleted file shrank while being saved")
                        out.write(chunk)
                        h.update(chunk)
                        off += len(chunk)
                        n -= len(chunk)
            rec["data_sha256"] = h.hexdigest()
    finally:
        os.close(rfd)
    ctx.shared[key] = rec
    return dict(rec)


def _open_for_write(fd: int) -> bool:
    """Does the inode behind `fd` (ckpt's read-only open) have an open
    file that counts as a writer (i_writecount > 0: exec of it fails
    ETXTBSY)? A memfd's own file, the one memfd_create made, never counts
    (alloc_file_pseudo takes no write access); a reopen for writing
    (/proc/PID/fd/N with O_RDWR) does. A read lease is granted exactly when
    no file counts (fs/locks.c check_conflicting_open), and is dropped at
    once. Any other answer (a lease there already) is taken as "counts":
    the restore then reopens as before."""
    import fcntl
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return True
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def writer_file(rec: dict, ctx, flags: int) -> Optional[int]:
    """For a writable use (an fd opened for writing, a mapping that may
    write) of a memfd whose writers did not count at the dump: a dup of the
    restored memfd's own file (made by memfd_create: it does not count
    either) with `flags`' status flags, instead of a reopen, which would
    count and make exec(memfd) fail ETXTBSY (zdtm memfd04/05). Exact: with
    no counted writer, every writable file of it in the dump was that one
    file (dups of one open file description). None: reopen as usual."""
    if not rec.get("uncounted") or flags & os.O_ACCMODE == os.O_RDONLY:
        return None
    gfd = restore_ghost(rec, ctx)
    import fcntl
    fcntl.fcntl(gfd, fcntl.F_SETFL, flags & ~OPEN_ONLY)
    return os.dup(gfd)


def _memfd_name(name: str) -> str:
    base = name[len(MEMFD_PREFIX):]
    return base[:-len(_DELETED)] if base.endswith(_DELETED) else base


def original_path(name: str) -> str:
    return name[:-len(_DELETED)] if name.endswith(_DELETED) else name


def check_recreatable(name: str, *, fd: Optional[int] = None, pid: Optional[int] = None) -> None:
    """Dump-time pre-flight for a deleted file (not a memfd): restore
    recreates it unlinked in its old directory (so on the same filesystem
    and mount, as fstat and /proc/PID/fd show them), which must therefore
    exist and be writable: not on a read-only mount, not closed to ckpt by
    its permissions. Checked here, while a refusal leaves the target
    unharmed, rather than found out at restore, after it was killed."""
    parent = os.path.dirname(original_path(name)) or "/"

    def refuse(detail: str) -> Refusal:
        return Refusal("unlinked-unrestorable", f"deleted file cannot be recreated: {detail}",
                       pid=pid, fd=fd, path=name)

    try:
        pst = os.stat(parent)
    except OSError as e:
        raise refuse(f"its directory {parent}: {e.strerror}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise refuse(f"{parent} is not a directory")
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise refuse(f"{parent} is on a read-only mount")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"no write permission in {parent}")


def validate_ghost(rec: dict, ctx, *, fd: Optional[int] = None, pid: Optional[int] = None) -> None:
    for key, typ in (("ghost", str), ("size", int), ("extents", list), ("name", str)):
        if not isinstance(rec.get(key), typ):
            raise Refusal("image-invalid", f"ghost record lacks {key}", pid=pid, fd=fd)
    path = f"ghosts/{rec['ghost']}.data"
    if ctx.image.size(path) != rec.get("data_bytes"):
        raise Refusal("image-invalid", f"{path} does not hold the recorded data", pid=pid, fd=fd)
    if not rec.get("memfd"):
        parent = os.path.dirname(original_path(rec["name"])) or "/"
        if not os.path.isdir(parent):
            raise Refusal("file-missing", f"cannot recreate the deleted file: its directory {parent} is gone",
                          pid=pid, fd=fd, path=rec["name"])
        # Every name the ghost is known by (hard links, all unlinked) is
        # made before any is removed: an inode with nlink 0 cannot be linked.
        names = ctx.shared.setdefault(f"ghostnames:{rec['ghost']}", [])
        if rec["name"] not in names:
            names.append(rec["name"])


_MFD_ALLOW_SEALING, _MFD_NOEXEC_SEAL, _MFD_EXEC = 0x2, 0x8, 0x10
_F_SEAL_SEAL, _F_SEAL_EXEC = 0x1, 0x20


def _have_seals(fd: int) -> int:
    import fcntl
    try:
        return fcntl.fcntl(fd, 1034)   # F_GET_SEALS
    except OSError:
        return 0


def _memfd_for(rec: dict) -> int:
    """A memfd with the recorded name, made so that the recorded mode and
    seals can be put on it: MFD_EXEC when the mode has x bits (vm.memfd_noexec
    may default to no-exec), MFD_NOEXEC_SEAL when F_SEAL_EXEC is recorded
    (it comes with mode 0666: the x bits are already off)."""
    seals = rec.get("seals") or 0
    # F_GET_SEALS is exactly F_SEAL_SEAL on a memfd made without
    # MFD_ALLOW_SEALING; anything else (0 included) was made sealable
    flags = 0 if seals == _F_SEAL_SEAL else _MFD_ALLOW_SEALING
    if seals & _F_SEAL_EXEC:
        extra = _MFD_NOEXEC_SEAL
    elif stat.S_IMODE(rec["mode"]) & 0o111:
        extra = _MFD_EXEC
    else:
        extra = 0
    name = _memfd_name(rec["name"])
    try:
        return os.memfd_create(name, flags | extra | os.MFD_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EINVAL or not extra:
            raise
    return os.memfd_create(name, flags | os.MFD_CLOEXEC)   # a kernel before 6.3: no such flags


def restore_ghost(rec: dict, ctx) -> int:
    """Recreate a ghost once per restore; returns an fd on it that reads
    rec["name"], owned by ctx.shared (callers reopen it with their own
    flags, never close it)."""
    key = f"ghostfd:{rec['ghost']}"
    have = ctx.shared.get(key)
    if have is not None:
        return ctx.shared.get(f"{key}:{rec['name']}", have)
    aliases = {}
    if rec.get("memfd"):
        gfd = _memfd_for(rec)
    else:
        # Created under its old name(s) and unlinked again, so the fd reads
        # "<path> (deleted)" as before (O_TMPFILE would read "/dir/#ino").
        names = [rec["name"]] + [n for n in ctx.shared.get(f"ghostnames:{rec['ghost']}", ()) if n != rec["name"]]
        made = unlinked.create_file([original_path(n) for n in names])
        gfd = made.pop(original_path(rec["name"]))
        aliases = {n: made[original_path(n)] for n in names[1:]}
    try:
        # the verified bytes (imagecheck.py: never the file reopened by path)
        data = memoryview(ctx.image.data(f"ghosts/{rec['ghost']}.data"))
        try:
            pos = 0
            for off, n in rec["extents"]:
                if pos + n > len(data):
                    raise Refusal("image-invalid", f"ghost {rec['ghost']} data is short")
                while n:
                    k = os.pwrite(gfd, data[pos:pos + min(n, _CHUNK)], off)
                    pos += k
                    off += k
                    n -= k
        finally:
            data.release()
        os.ftruncate(gfd, rec["size"])
        # After the data (writes and chown clear set-user/group-ID): owner,
        # all 12 mode bits, times; seals last (F_SEAL_EXEC freezes the x bits).
        unlinked.apply_attrs(gfd, rec)
        missing = (rec.get("seals") or 0) & ~_have_seals(gfd) if rec.get("memfd") else 0
        if missing:     # F_ADD_SEALS of nothing is EPERM on an unsealable memfd
            import fcntl
            fcntl.fcntl(gfd, 1033, missing)   # F_ADD_SEALS
        if not rec.get("memfd"):
            # The writable descriptions that made it go now, before any
            # inotify watch is back on the file (engine/fds/inotify.py
            # finish): their last close reports IN_CLOSE_WRITE, which the
            # process would read as a close of its own. Read-only ones
            # serve every later reopen.
            got = _read_only([gfd] + list(aliases.values()))
            gfd, aliases = got[0], dict(zip(aliases, got[1:]))
    except BaseException:
        for fd in [gfd] + list(aliases.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    ctx.shared.setdefault("_close_after_restore", []).extend(aliases.values())
    ctx.shared[key] = gfd
    for n, afd in aliases.items():
        ctx.shared[f"{key}:{n}"] = afd
    ctx.shared.setdefault("_close_after_restore", []).append(gfd)
    return gfd


# Flags only open() looks at, never replayed on a reopen. O_TMPFILE
# (__O_TMPFILE | O_DIRECTORY) stays in f_flags of a file made with it; on a
# reopen it would ask for a new temporary file in a directory.
OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC | os.O_NOCTTY | getattr(os, "O_TMPFILE", 0o20200000)


def _read_only(fds: List[int]) -> List[int]:
    """Read-only descriptions of the files behind `fds` instead of them
    (closed once every new one is open; on a failure they stay as they were)."""
    new: List[int] = []
    try:
        for fd in fds:
            new.append(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in new:
            os.close(fd)
        raise
    for fd in fds:
        os.close(fd)
    return new


def reopen(fd: int, flags: int) -> int:
    """A new open file description on the file behind `fd`, with `flags`
    (access mode, O_APPEND, ...): through /proc/self/fd, which works for
    unlinked files too."""
    keep = flags & ~OPEN_ONLY
    return os.open(f"/proc/self/fd/{fd}", keep | os.O_CLOEXEC)


def close_shared(ctx) -> None:
    """Close the ghost fds a restore kept open (call once the new process has
    its own fds)."""
    for gfd in ctx.shared.pop("_close_after_restore", []):
        try:
            os.close(gfd)
        except OSError:
            pass


# -- memory mappings (called by the core) -------------------------------------

def map_dump(pid: int, vma: dict, ctx) -> dict:
    """Record for a file-backed mapping: {"file": identity} or {"ghost": ...}."""
    name = vma["path"]
    open_path = vma["map_files"]
    try:
        st = os.stat(open_path)
    except OSError as e:
        raise Refusal("unsupported-mapping", f"cannot open the mapped file: {e.strerror}",
                      pid=pid, path=name) from None
    # One statfs per device, not per mapping (a device is one superblock;
    # a process maps each library 4-5 times)
    fs = ctx.shared.get(f"fsmagic:{st.st_dev}", -1)
    if fs == -1:
        fs = ctx.shared[f"fsmagic:{st.st_dev}"] = fstype.magic(open_path)
    if fstype.pseudo(fs):
        raise Refusal("pseudo-file", f"mapping of a file on the {fstype.name(fs)} pseudo filesystem: "
                      "kernel state, not stored bytes", pid=pid, path=name)
    if fstype.handle(fs):
        raise Refusal("unsupported-mapping", f"mapping of a {fstype.name(fs)} object", pid=pid, path=name)
    if not stat.S_ISREG(st.st_mode):
        raise Refusal("unsupported-mapping", f"mapping of a non-regular file ({stat.filemode(st.st_mode)})",
                      pid=pid, path=name)
    if st.st_nlink == 0 or name.endswith(_DELETED):
        if st.st_nlink > 0:
            alias = _surviving_link(open_path, st)
            if alias is not None:
                return {"file": record_identity(alias, open_path, ctx, pid=pid)}
            raise Refusal("file-missing", f"mapped file lost this name but has {st.st_nlink} other hard "
                          "link(s), none of which could be found", pid=pid, path=name)
        if not name.startswith(MEMFD_PREFIX):
            check_recreatable(name, pid=pid)
        return dump_ghost(open_path, name, ctx, pid=pid)
    return {"file": record_identity(name, open_path, ctx, pid=pid, st=st)}


def map_validate(rec: dict, ctx) -> None:
    if "ghost" in rec:
        validate_ghost(rec, ctx)
    elif isinstance(rec.get("file"), dict) and isinstance(rec["file"].get("path"), str):
        check_identity(rec["file"], ctx, pid=ctx.pid)
    else:
        raise Refusal("image-invalid", "mapping record names no file")


def map_writable(vma: dict) -> bool:
    """Is a mapping's file to be opened for writing? A MAP_SHARED mapping
    of a file opened with write access may be made writable whatever its
    protection now (VM_MAYWRITE, VmFlags "mw"; do_mmap clears it, and
    VM_SHARED, for a file without FMODE_WRITE): one restored from a
    read-only open could not be mprotect()ed writable again (EACCES)."""
    return vma["perms"][3] == "s" and ("w" in vma["perms"] or "mw" in vma.get("flags", ()))


def map_open(rec: dict, ctx, writable: bool) -> int:
    flags = os.O_RDWR if writable else os.O_RDONLY
    if "ghost" in rec:
        own = writer_file(rec, ctx, flags)
        if own is not None:
            return own
        # O_NOATIME: mmap() touches atime (file_accessed), and the ghost's
        # atime was already put back
        gfd = restore_ghost(rec, ctx)
        try:
            return reopen(gfd, flags | os.O_NOATIME)
        except PermissionError:     # neither the owner nor CAP_FOWNER
            return reopen(gfd, flags)
    ident = rec["file"]
    try:
        fd = os.open(ident["path"], flags | os.O_CLOEXEC)
    except OSError as e:
        raise Refusal("file-missing", f"cannot open: {e.strerror}", pid=ctx.pid, path=ident["path"]) from None
    try:
        check_identity(ident, ctx, pid=ctx.pid, opened=fd)   # the file we opened, not a racing replacement
    except BaseException:
        os.close(fd)
        raise
    return fd


def _surviving_link(open_path: str, st: os.stat_result) -> Optional[str]:
    """Another name of a file whose opened name was unlinked (nlink > 0):
    ask the kernel for a connected dentry through a file handle
    (name_to_handle_at + open_by_handle_at), and accept it only when it leads
    to the same dev+ino. None when no such name can be found."""
    from . import handles
    try:
        path = handles.reconnect_path(open_path)
    except OSError:
        return None
    if not path or path.endswith(_DELETED):
        return None
    try:
        pst = os.stat(path)
    except OSError:
        return None
    if (pst.st_dev, pst.st_ino) != (st.st_dev, st.st_ino):
        return None
    return path
