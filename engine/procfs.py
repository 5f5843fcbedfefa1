"""Pure parsers over /proc text, with an injectable procfs root.

Parsers take text and return plain data; `Proc(pid, root)` reads the files.
Tests feed the parsers canned text. OSError from /proc is translated at one
boundary (:meth:`Proc.read`) into ``no-such-process`` when the process is
gone.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from .errors import Refusal

PF_KTHREAD = 0x00200000

# /proc/PID/stat field numbers (proc(5)), 1-based as in the man page.
_STAT_FIELDS = {
    "state": 3, "ppid": 4, "pgrp": 5, "session": 6, "tty_nr": 7, "flags": 9,
    "num_threads": 20, "start_code": 26, "end_code": 27, "start_stack": 28,
    "exit_signal": 38, "start_data": 45, "end_data": 46, "start_brk": 47,
    "arg_start": 48, "arg_end": 49, "env_start": 50, "env_end": 51,
}


def parse_stat(text: str) -> dict:
    """/proc/PID/stat. The command name may hold spaces and ')' — split at
    the LAST ')' (psutil does the same). Raises ValueError on garbage."""
    lpar = text.index("(")
    rpar = text.rindex(")")
    out: dict = {"pid": int(text[:lpar]), "comm": text[lpar + 1:rpar]}
    rest = text[rpar + 2:].split()
    # rest[0] is field 3 (state)
    for name, num in _STAT_FIELDS.items():
        idx = num - 3
        if idx < len(rest):
            out[name] = rest[idx] if name == "state" else int(rest[idx])
    return out


def parse_status(text: str) -> Dict[str, str]:
    """/proc/PID/status as {key: value-string}."""
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def status_fields(text: str, keys) -> Dict[str, str]:
    """The `keys` of /proc/PID/status text, as parse_status() gives them
    (value stripped; a key that is not there is left out), without parsing
    the other ~55 lines: the per-thread reads of a dump (signal sets,
    sameness with the leader) want two to ten of them. A key is found only
    at the start of a line; Name (the only field a process writes) has its
    newlines escaped by the kernel, so it cannot fake one."""
    out = {}
    for k in keys:
        tag = k + ":"
        if text.startswith(tag):
            i = len(tag)
        else:
            i = text.find("\n" + tag)
            if i < 0:
                continue
            i += 1 + len(tag)
        j = text.find("\n", i)
        out[k] = (text[i:] if j < 0 else text[i:j]).strip()
    return out


def read_all(path: str) -> bytes:
    """The whole of a /proc file by os.read: no file object per read (a
    tree's freeze and a thread survey read these per task). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 8192)
        while len(data) >= 8192:        # a seq_file returns all it has when it fits: only then read on
            more = os.read(fd, 65536)
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    return data


def read_status_fields(path: str, keys) -> Dict[str, str]:
    """status_fields() of the file at `path`. Raises OSError."""
    return status_fields(read_all(path).decode("utf-8", "surrogateescape"), keys)


def read_all(path: str) -> bytes:
    """The whole file, by os.open/os.read: no file object (open() makes a
    FileIO and a buffered reader per call; a 50-process tree's survey reads
    ~900 /proc files). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if not data:
            return data
        chunks = [data]
        while True:
            more = os.read(fd, 65536)
            if not more:
                break
            chunks.append(more)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_SELF: dict = {}

#: Memos of ckpt's own state (its cgroups, namespaces, root, credentials,
#: limits ...), each read once per PID and operation: a tree's survey asks
#: per member. Per operation as well as per PID, because a process may run
#: several (the host tests in one pytest worker, a warm engine): the machine
#: changes between them (a cgroup hierarchy mounted, then gone), and a value
#: kept from the first refused the next ("no such hierarchy here").
SELF_MEMOS: list = [_SELF]


def self_memo(d: dict) -> dict:
    SELF_MEMOS.append(d)
    return d


def forget_self() -> None:
    """At the start of every dump, check, restore and survey."""
    for d in SELF_MEMOS:
        d.clear()


def self_status() -> Dict[str, str]:
    """ckpt's own /proc/self/status, parsed once per process (a survey and
    a restore's checks ask it once per task: credentials, CapEff). ckpt
    never changes its own credentials; a helper child that does (fds
    _peercred) is another PID, so the memo is per PID. Do not modify the
    dict. Raises OSError."""
    got = _SELF.get("status")
    pid = os.getpid()
    if got is None or got[0] != pid:
        with open("/proc/self/status") as f:
            got = _SELF["status"] = (pid, parse_status(f.read()))
    return got[1]


def self_limits() -> List[List[int]]:
    """ckpt's own rlimits as parse_limits() gives them, from one read of
    /proc/self/limits per process instead of a prlimit(2) per limit (a
    tree's survey asks once per member). ckpt never changes its own
    limits. Do not modify the list. Raises OSError, ValueError."""
    got = _SELF.get("limits")
    pid = os.getpid()
    if got is None or got[0] != pid:
        got = _SELF["limits"] = (pid, parse_limits(read_all("/proc/self/limits").decode()))
    return got[1]


def parse_maps(text: str) -> List[dict]:
    """/proc/PID/maps lines as dicts: start, end, perms, offset, dev, inode,
    path ('' for anonymous; may end in ' (deleted)'; may contain spaces)."""
    vmas = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(None, 5)
        rng, perms, off, dev, ino = parts[:5]
        path = parts[5] if len(parts) > 5 else ""
        start, end = rng.split("-")
        vmas.append({"start": int(start, 16), "end": int(end, 16), "perms": perms,
                     "offset": int(off, 16), "dev": dev, "inode": int(ino), "path": path})
    return vmas


_HEX = frozenset("0123456789abcdef")


def parse_smaps_flags(text: str) -> Dict[int, List[str]]:
    """{vma start: VmFlags list} from /proc/PID/smaps."""
    out: Dict[int, List[str]] = {}
    cur: Optional[int] = None
    pkey = "0"
    # By first character: a mapping's line starts with a lowercase hex
    # digit, every field's with a capital (Size:, Rss:, ... VmFlags:); the
    # ~20 field lines of a mapping are passed over without a split.
    for line in text.split("\n"):
        c = line[:1]
        if c in _HEX:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                try:
                    cur = int(head.split("-")[0], 16)
                except ValueError:
                    continue
                pkey = "0"
        elif c == "P":
            if line.startswith("ProtectionKey:"):     # x86 with PKU, before VmFlags (arch_show_smap)
                pkey = line.split()[1]
        elif c == "V" and line.startswith("VmFlags:") and cur is not None:
            # A protection key (pkey_mprotect) as a pseudo flag: no VmFlags
            # letter shows it, and a mapping made again would have key 0
            out[cur] = line.split()[1:] + ([f"pkey{pkey}"] if pkey != "0" else [])
    return out


def parse_fdinfo(text: str) -> Dict[str, str]:
    """fdinfo "key: value" lines; the first occurrence of a key wins."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() not in out:
            out[k.strip()] = v.strip()
    return out


def parse_auxv(data: bytes) -> List[int]:
    """/proc/PID/auxv as a flat list of u64 (type, value, ..., AT_NULL, 0)."""
    n = len(data) // 8
    return list(struct.unpack(f"<{n}Q", data[:n * 8]))


# pagemap(5): one u64 per page.
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE_OR_SHARED = 1 << 61


# translate() tables over the top byte (bits 56-63) of each pagemap entry:
# b"1" for a page to save, b"0" otherwise.
_WANT_ANY = bytes(0x31 if b & 0xC0 else 0x30 for b in range(256))
_WANT_ANON = bytes(0x31 if (b & 0xC0) and not (b & 0x20) else 0x30 for b in range(256))


def pagemap_runs(data: bytes, base: int, anon_only: bool, page: int = 4096) -> List[List[int]]:
    """Runs [addr, npages] of pages worth saving from raw pagemap bytes of the
    range starting at `base`: present or swapped; with `anon_only` (private
    file mappings) only those not backed by the file (bit 61 clear: the
    copy-on-written ones). Works on the entries' top bytes with C-speed
    slicing/translate/find: a 1 GiB mapping has 262,144 entries."""
    n = len(data) // 8
    top = data[7:n * 8:8]                      # little-endian: byte 7 holds bits 56-63
    flags = top.translate(_WANT_ANON if anon_only else _WANT_ANY)
    out = []
    find = flags.find
    i = find(b"1")
    while i >= 0:
        j = find(b"0", i)
        if j < 0:
            j = len(flags)
        out.append([base + i * page, j - i])
        i = find(b"1", j)
    return out


RLIM_INFINITY = (1 << 64) - 1


def parse_limits(text: str) -> List[List[int]]:
    """/proc/PID/limits as [[soft, hard], ...] in RLIMIT_* order (the
    kernel prints them in that order: fs/proc/base.c lnames[]). Reading
    this file needs no CAP_SYS_RESOURCE, unlike prlimit(2) on a process of
    another user. Raises ValueError on an unexpected layout."""
    out = []
    for line in text.splitlines()[1:]:
        if not line.strip():
            continue
        # "Max open files            1024                 4096                 files"
        fields = line[26:].split()
        if len(fields) < 2:
            raise ValueError(f"bad limits line {line!r}")
        out.append([RLIM_INFINITY if f == "unlimited" else int(f) for f in fields[:2]])
    return out


def parse_sigmask(hexstr: str) -> int:
    return int(hexstr, 16)


class Proc:
    """Files of one process under a procfs root (default /proc)."""

    def __init__(self, pid: int, root: str = "/proc"):
        self.pid = pid
        self.root = root
        self.dir = f"{root}/{pid}"

    def path(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def _gone(self, e: OSError) -> Refusal:
        return Refusal("no-such-process", f"the process went away ({e.strerror})", pid=self.pid)

    def read(self, name: str) -> str:
        """Text of /proc/PID/name. Raises Refusal(no-such-process) if gone."""
        try:
            return read_all(self.path(name)).decode("utf-8", "surrogateescape")
        except (FileNotFoundError, ProcessLookupError) as e:
            raise self._gone(e) from None
        except OSError as e:
            if e.errno == _errno.ESRCH:
                raise self._gone(e) from None
            raise

    def read_bytes(self, name: str) -> bytes:
        try:
            return read_all(self.path(name))
        except (FileNotFoundError, ProcessLookupError) as e:
            raise self._gone(e) from None

    def readlink(self, name: str) -> str:
        try:
            return os.readlink(self.path(name))
        except (FileNotFoundError, ProcessLookupError) as e:
            raise self._gone(e) from None

    def stat(self) -> dict:
        return parse_stat(self.read("stat"))

    def status(self) -> Dict[str, str]:
        return parse_status(self.read("status"))

    def maps(self) -> List[dict]:
        return parse_maps(self.read("maps"))

    def vmflags(self) -> Dict[int, List[str]]:
        return parse_smaps_flags(self.read("smaps"))

    def fds(self) -> List[int]:
        try:
            return sorted(int(n) for n in os.listdir(self.path("fd")))
        except (FileNotFoundError, ProcessLookupError) as e:
            raise self._gone(e) from None

    def fdinfo_text(self, fd: int) -> str:
        return self.read(f"fdinfo/{fd}")

    def children(self) -> List[int]:
        """Child PIDs: task/PID/children (CONFIG_PROC_CHILDREN) or a scan."""
        try:
            text = self.read(f"task/{self.pid}/children")
            return [int(x) for x in text.split()]
        except OSError:
            pass
        kids = []
        for name in os.listdir(self.root):
            if name.isdigit():
                try:
                    with open(f"{self.root}/{name}/stat") as f:
                        if parse_stat(f.read())["ppid"] == self.pid:
                            kids.append(int(name))
                except (OSError, ValueError):
                    continue
        return kids
