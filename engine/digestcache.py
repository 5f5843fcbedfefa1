"""sha256 of unchanged files remembered across ckpt runs (mapped libraries:
every dump and every restore of every process hashes libc again).

A cached digest is used only for the very same version of the very same
inode: the key is (dev, ino, generation, size, mtime, ctime) of the file
as fstat shows it on the fd about to be used. ctime cannot be set from
user space and changes on every write, truncate, utime and rename of the
inode - except that it comes from a coarse clock, so a rewrite within the
same tick as the previous change keeps it. Hence the rule that makes the
key sufficient: a digest is stored only when the file's ctime was more
than SETTLED_NS older than the moment its hashing started. Any change
after that moment gets a ctime of at least that moment (the clock would
have to be set back by more than SETTLED_NS), so it no longer matches.

Only on local file systems whose ctime and generation mean that (ext4,
xfs, btrfs, tmpfs); never over overlayfs, FUSE or network file systems.
The cache file is root's, mode 0600, in a directory writable by root
only; one that is not is ignored, never trusted. It is only a cache:
losing it (or a write race between two ckpt runs: the last rename wins)
costs a re-hash, never a wrong answer.

CKPT_DIGEST_CACHE: another file, or "off".
"""

from __future__ import annotations

import os
import stat
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Callable, Dict, Optional

from . import fastjson

DEFAULT_PATH = "/var/cache/ckpt/digests.json"
SETTLED_NS = 2_000_000_000          # ctime this much older than the hash start: no same-tick rewrite
MAX_ENTRIES = 4096
# statfs f_type of the file systems whose ctime/generation are trusted here
TRUSTED_FS = {0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs"}

def _path() -> Optional[str]:
    p = os.environ.get("CKPT_DIGEST_CACHE", DEFAULT_PATH)
    return None if p in ("", "off") else p


# This run's view of the cache file: None until first needed, then a _View.
_cache: Optional["_View"] = None


class _View:
    """The cache file as this run read it. A lookup finds its one entry in
    the raw text (the file holds every library of every process dumped on
    the machine: thousands of entries, whose parse was ~3-5 ms of each
    dump and restore of a small process on a host, for the one or two
    digests a run looks up); the whole is parsed only to store an entry."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.parsed: Optional[Dict[str, dict]] = None

    def get(self, k: str) -> Optional[dict]:
        if self.parsed is not None:
            return self.parsed.get(k)
        # The writer (_save, fastjson) puts each entry as "KEY":{...} with no
        # "}" inside {...}; a key is digits and colons (key()), so its quoted
        # form followed by ":" occurs only where that key is. The last one
        # wins, as in json.loads.
        needle = b'"' + k.encode() + b'":'
        at = self.raw.rfind(needle)
        if at < 0:
            return None
        end = self.raw.find(b"}", at)
        try:
            v = fastjson.loads(self.raw[at + len(needle):end + 1]) if end > 0 else None
        except ValueError:
            return None
        return v if _entry_ok(v) else None

    def entries(self) -> Dict[str, dict]:
        if self.parsed is None:
            self.parsed = {}
            try:
                data = fastjson.loads(self.raw) if self.raw else None
            except ValueError:
                data = None
            if isinstance(data, dict):
                self.parsed = {k: v for k, v in data.items() if _entry_ok(v)}
        return self.parsed


def _entry_ok(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("sha256"), str)


def _view() -> _View:
    global _cache
    if _cache is None:
        _cache = _View(_read())
    return _cache


def _read() -> bytes:
    """The cache file's bytes when it can be trusted (root's, 0600, in a
    directory only root writes, under 4 MiB) and looks whole (it ends as
    a JSON object of objects ends, "}}", or is "{}"), else b"": as if there
    were none. (The whole is parsed only to store: a file cut short must not
    be searched.)"""
    path = _path()
    if not path:
        return b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        st = os.fstat(fd)
        dst = os.stat(os.path.dirname(path), follow_symlinks=False)
        if (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077
                and dst.st_uid == os.geteuid() and not dst.st_mode & 0o022 and st.st_size < (4 << 20)):
            raw = os.read(fd, st.st_size + 1)
            body = raw.strip()
            if body[:1] == b"{" and (body[-2:] == b"}}" or body == b"{}"):
                return raw
    except OSError:
        pass
    finally:
        os.close(fd)
    return b""


def _load() -> Dict[str, dict]:
    """Every entry of the cache file (parsed whole)."""
    return _view().entries()


def _save(cache: Dict[str, dict]) -> None:
    path = _path()
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if len(cache) > MAX_ENTRIES:
            for k in sorted(cache, key=lambda k: cache[k].get("at", 0))[:len(cache) - MAX_ENTRIES]:
                del cache[k]
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, fastjson.dumps(cache, separators=(",", ":")).encode())
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass


def _fs_trusted(fd: int, dev: Optional[int] = None, memo: Optional[dict] = None) -> bool:
    """Is the file at `fd` on a TRUSTED_FS? With `memo` (a dump's or
    restore's ctx.shared) and `dev` (the file's st_dev), one statfs per
    device for that run: a device is one superblock while it is mounted,
    and under TCG a statfs is ~1-2 ms of each of a dozen files (issue 15).
    Never across runs: an unmounted device's number can be reused."""
    k = f"fsmagic:{dev}"
    if memo is not None and dev is not None and k in memo:
        fs = memo[k]
    else:
        from .fstype import magic
        fs = magic(f"/proc/self/fd/{fd}")    # statfs follows the fd to its superblock
        if memo is not None and dev is not None:
            memo[k] = fs
    return fs in TRUSTED_FS


def key(st: os.stat_result, generation: Optional[int]) -> str:
    return f"{st.st_dev}:{st.st_ino}:{generation}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def digest(fd: int, generation: Optional[int], compute: Callable[[int], str], memo: Optional[dict] = None) -> str:
    """sha256 hex of the regular file open at `fd` (`generation`: its
    FS_IOC_GETVERSION, None when unknown): remembered, or `compute(fd)`.
    `memo`: the run's ctx.shared, where statfs answers are kept per device."""
    st = os.fstat(fd)
    if generation is None or not stat.S_ISREG(st.st_mode) or _path() is None or not _fs_trusted(fd, st.st_dev, memo):
        return compute(fd)
    k = key(st, generation)
    view = _view()
    hit = view.get(k)
    if hit is not None:
        return hit["sha256"]
    started = time.time_ns()
    value = compute(fd)
    after = os.fstat(fd)
    if (started - st.st_ctime_ns > SETTLED_NS and key(after, generation) == k):
        cache = view.entries()
        cache[k] = {"sha256": value, "at": started}
        _save(cache)
    return value
