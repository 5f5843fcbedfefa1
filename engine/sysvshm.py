"""System V shared memory segments (shmget/shmat: postgres, X11 MIT-SHM
clients, older databases): dumped and restored with the same id, key,
size, mode, owner and contents, or refused.

A segment shows in /proc/PID/maps as a shared mapping of "/SYSV<key in
hex> (deleted)" on device 00:01 whose inode number is the shmid
(ipc/shm.c newseg sets i_ino to the id); "(deleted)" is always there (the
shm file is never linked), so whether it was IPC_RMID'd is read from
/proc/sysvipc/shm (mode SHM_DEST, key 0). Same IPC namespace as ckpt
(engine/check.py refuses any other), so that table lists every segment
of the process.

Dump (engine/check.py classify_vma -> "sysvshm", survey_vma): each
mapping must be one whole attach (offset 0, the segment's size rounded to
pages: shmat maps no less); a mapping split by mprotect or partly unmapped
is refused, as is a hugetlb segment (VmFlags "ht"). Who else attaches:
shm_nattch counts mappings (shm_open per VMA, fork and splits included),
so a segment attached more often than by the dump's mappings has an
attacher outside the dump (memory-peer-outside: it would go on with the
old segment). Each mapping records the segment's /proc/sysvipc/shm row;
the first mapping of the dump (a tree: its first member's) carries the
pages, read through the process's own mapping (ckpt never attaches at
dump: its shmat would change shm_lpid, shm_atime and shm_dtime).

Restore, before any process exists (preflight): a segment with the id
still there is reused only when it is provably the one dumped: same key,
size, mode, owners, creator, shm_ctime and shm_atime (nobody attached it
since the dump; the dump's kill only detached, moving shm_dtime and
shm_lpid to a process of the dump), nattch 0, not removed; its contents
are compared with the image (ckpt attaches it read-only for that) before
the process is made. Anything else holding the id or the key is refused
(sysv-shm); the segment is neither reused nor replaced. A segment that is
gone is made again (materialize): /proc/sys/kernel/shm_next_id picks the
id of the next shmget (the kernel unsets it once used; the id got is
verified: the kernel takes the next free index at or above it; never
written back: see _release_next_id), created by ckpt as
the creator uid/gid (per-thread ids, raw setresuid/setresgid), then
IPC_SET owner, SHM_LOCK, contents written through ckpt's own attach.
The process shmat()s it by id during its build (Builder.map_steps,
attach_call); a segment that was IPC_RMID'd is removed again by the
restorer once every member attached it, before any runs (seal). A failed
restore removes what it made (Made.undo), never a segment it did not.

Not restored (README "Known limits"): shm_cpid (ckpt made it), shm_atime,
shm_dtime and shm_ctime (now), shm_lpid (the last restored attacher).
"""

from __future__ import annotations

import ctypes
import os
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from .errors import EngineError, Refusal

PAGE = 4096
TABLE = "/proc/sysvipc/shm"
NEXT_ID = "/proc/sys/kernel/shm_next_id"
IPC_PRIVATE = 0
IPC_CREAT, IPC_EXCL = 0o1000, 0o2000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
SHM_LOCK = 11
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
SHM_DEST, SHM_LOCKED = 0o1000, 0o2000
IPCMNI = 32768          # ids' index part (ipc/util.h; no ipcmni_extend)
U32 = (1 << 32) - 1
INT_MAX = (1 << 31) - 1
# the row of /proc/sysvipc/shm (ipc/shm.c sysvipc_shm_proc_show), in order
COLUMNS = ("key", "shmid", "mode", "size", "cpid", "lpid", "nattch", "uid", "gid", "cuid", "cgid",
           "atime", "dtime", "ctime")
# the record of a mapping: the row, and whether this mapping carries the pages
FIELDS = COLUMNS + ("data",)
SYS = {"x86_64": {"shmat": 30, "shmctl": 31}, "aarch64": {"shmat": 196, "shmctl": 195}}
TABLE_KEY = "tree:sysvshm"      # ctx.shared: the table read once for a whole tree
REFUSED_KEY = "sysvshm-refused"   # Survey.memo: ids of segments a refused mapping shows


def is_sysv(path: str) -> bool:
    return path.startswith("/SYSV")


def pages_of(size: int) -> int:
    return -(-size // PAGE) * PAGE


def read_table(path: str = TABLE) -> Dict[int, dict]:
    """{shmid: row} of every segment of ckpt's IPC namespace."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
    except OSError:         # no SysV IPC in this kernel
        return {}
    out = {}
    for line in lines:
        f = line.split()
        if len(f) < len(COLUMNS):
            continue
        row = {k: int(x, 8) if k == "mode" else int(x) for k, x in zip(COLUMNS, f)}
        out[row["shmid"]] = row
    return out


def table_for(ctx) -> Dict[int, dict]:
    """The table, once per tree dump (every member frozen by then)."""
    shared = getattr(ctx, "shared", None) if ctx is not None and getattr(ctx, "tree_root", None) is not None else None
    if shared is None:
        return read_table()
    got = shared.get(TABLE_KEY)
    if got is None:
        got = shared[TABLE_KEY] = read_table()
    return got


# -- dump ----------------------------------------------------------------------

def survey_vma(vma: dict, table: Dict[int, dict]) -> dict:
    """The segment record of a SysV mapping (vma["sysv"]); raises Refusal."""
    path = vma["path"]
    if "ht" in vma.get("flags", ()):
        raise Refusal("unsupported-mapping", "System V shared memory segment on hugetlbfs (SHM_HUGETLB)", path=path)
    if vma["perms"][3] != "s":
        raise Refusal("unsupported-mapping", "private mapping of a System V segment", path=path)
    shmid = vma["inode"]
    row = table.get(shmid)
    if row is None:
        raise Refusal("unsupported-mapping", f"System V segment {shmid} is not in {TABLE}", path=path)
    if vma["offset"] != 0 or vma["end"] - vma["start"] != pages_of(row["size"]):
        raise Refusal("unsupported-mapping", f"part of System V segment {shmid} ({row['size']} bytes) mapped "
                      f"({vma['end'] - vma['start']} bytes at offset {vma['offset']}): split by mprotect or "
                      "partly unmapped; a restore attaches whole segments", path=path)
    if row["mode"] & ~0o3777:
        raise Refusal("unsupported-mapping", f"System V segment {shmid} mode {row['mode']:o}", path=path)
    if row["mode"] & SHM_DEST:
        # a removed segment dies with the dump's kill: the restore must make
        # it again, which it cannot where shm_next_id cannot be written (a
        # container's read-only /proc/sys) - known now, not after the kill
        r = next_id_problem()
        if r is not None:
            raise r
    return dict(row, data=False)


def next_id_problem() -> "Optional[Refusal]":
    """Why a segment cannot be made again here with a chosen id, or None."""
    if os.geteuid() != 0:
        return Refusal("capability", "recreating System V segments with their ids and creators needs "
                       "ckpt to run as root (shm_next_id, the creator's uid and gid)")
    if not os.path.exists(NEXT_ID):
        return Refusal("kernel-missing", f"{NEXT_ID} (CONFIG_CHECKPOINT_RESTORE) is missing")
    if not os.access(NEXT_ID, os.W_OK):
        return Refusal("sysv-shm", f"{NEXT_ID} cannot be written here (a read-only /proc/sys, as in a "
                       "container): a segment could not be made again with its id")
    return None


def outside(attaches: list, refused=()) -> list:
    """[(pid, vma, Refusal)] for segments attached more often than by the
    dump's mappings `attaches` [(pid, vma)] (vma["sysv"] set): another
    process attaches them too. Marks the first mapping of each segment as
    the one whose pages are dumped. `refused`: ids of segments one of whose
    mappings is refused already (not counted: not judged here)."""
    count: Dict[int, list] = {}
    for pid, v in attaches:
        count.setdefault(v["sysv"]["shmid"], []).append((pid, v))
    out = []
    for shmid, held in count.items():
        for i, (_, v) in enumerate(held):
            v["sysv"]["data"] = i == 0
        if shmid in refused:
            continue
        pid, v = held[0]
        n = v["sysv"]["nattch"]
        if n > len(held):
            out.append((pid, v, Refusal(
                "memory-peer-outside", f"System V segment {shmid} (key {v['sysv']['key'] & U32:#x}) is attached "
                f"{n} times, {len(held)} of them by the dump: a process outside it attaches it too "
                f"(last attach or detach by pid {v['sysv']['lpid']}, created by pid {v['sysv']['cpid']})",
                path=v["path"])))
        elif n < len(held):
            out.append((pid, v, Refusal(
                "unsupported-mapping", f"System V segment {shmid} counts {n} attaches, the dump maps it "
                f"{len(held)} times", path=v["path"])))
    return out


def tree_problems(members) -> list:
    """tree.tree_problems' part: [(member, what, Refusal)]."""
    attaches, by_pid, refused = [], {}, set()
    for m in members:
        if m.survey is None:
            continue
        by_pid[m.pid] = m
        attaches += [(m.pid, v) for v in m.survey.vmas if v.get("kind") == "sysvshm"]
        refused.update(m.survey.memo.get(REFUSED_KEY, ()))
    return [(by_pid[pid], f"mapping {v['start']:x}-{v['end']:x}", r) for pid, v, r in outside(attaches, refused)]


# -- image records ---------------------------------------------------------------

def check_record(v: dict) -> Optional[str]:
    """What is wrong with a sysvshm mapping record (None: nothing)."""
    s = v.get("sysv")
    if not isinstance(s, dict) or set(s) != set(FIELDS):
        return "no System V segment record"
    if not isinstance(s["data"], bool) or not all(isinstance(s[k], int) and not isinstance(s[k], bool)
                                                  for k in COLUMNS):
        return "System V segment record malformed"
    if not -(1 << 31) <= s["key"] <= INT_MAX or not 0 <= s["shmid"] <= INT_MAX or s["mode"] & ~0o3777:
        return f"System V segment key {s['key']} id {s['shmid']} mode {s['mode']:o}"
    if s["mode"] & SHM_DEST and s["key"] != IPC_PRIVATE:
        return "a removed System V segment keeps no key"
    if not 0 < s["size"] <= 1 << 46 or v["end"] - v["start"] != pages_of(s["size"]) or v["offset"] != 0:
        return f"System V segment of {s['size']} bytes mapped as {v['end'] - v['start']} at offset {v['offset']}"
    if not all(0 <= s[k] < U32 for k in ("uid", "gid", "cuid", "cgid")) or not \
            all(0 <= s[k] <= INT_MAX for k in ("cpid", "lpid", "atime", "dtime", "ctime")) or not 0 < s["nattch"] <= INT_MAX:
        return "System V segment owner, pid or time out of range"
    if v["inode"] != s["shmid"] or v["perms"][3] != "s" or not is_sysv(v["path"]):
        return "System V mapping does not name its segment"
    if "w" in v["perms"] and "mw" not in v["flags"]:
        return "a read-only attach (SHM_RDONLY) mapped writable"
    if v["pages"] and not s["data"]:
        return "pages of a System V segment in a mapping that does not carry them"
    return None


def segments(attaches: list) -> Dict[int, dict]:
    """{shmid: {"rec", "data": (pid, vma), "pids"}} of an image's mappings
    [(pid, vma)] (each passed check_record). Every mapping of a segment
    agrees on it, exactly one carries its pages. Raises image-invalid."""
    out: Dict[int, dict] = {}
    for pid, v in attaches:
        s = v["sysv"]
        seg = out.setdefault(s["shmid"], {"rec": {k: s[k] for k in COLUMNS}, "data": None, "pids": set(), "n": 0})
        if seg["rec"] != {k: s[k] for k in COLUMNS}:
            raise Refusal("image-invalid", f"mm.json: the mappings of System V segment {s['shmid']} disagree on it")
        if s["data"]:
            if seg["data"] is not None:
                raise Refusal("image-invalid", f"mm.json: System V segment {s['shmid']} has its pages twice")
            seg["data"] = (pid, v)
        seg["pids"].add(pid)
        seg["n"] += 1
    for shmid, seg in out.items():
        if seg["data"] is None:
            raise Refusal("image-invalid", f"mm.json: no mapping carries the pages of System V segment {shmid}")
        if seg["n"] != seg["rec"]["nattch"]:
            raise Refusal("image-invalid", f"mm.json: System V segment {shmid} was attached {seg['rec']['nattch']} "
                          f"times, the image maps it {seg['n']} times")
    keys = [seg["rec"]["key"] for seg in out.values() if seg["rec"]["key"] != IPC_PRIVATE]
    if len(keys) != len(set(keys)):
        raise Refusal("image-invalid", "mm.json: two System V segments with one key")
    return out


# -- restore ---------------------------------------------------------------------

def _describe(rec: dict) -> str:
    return f"System V segment {rec['shmid']} (key {rec['key'] & U32:#x})"


def same_segment(rec: dict, row: dict, pids) -> Optional[str]:
    """Why `row` (the table now) is not provably the dumped segment `rec`
    left behind by the dump's kill (None: it is, contents aside)."""
    if rec["mode"] & SHM_DEST:
        return "it was removed (IPC_RMID) at the dump, yet a segment holds its id"
    for k in ("key", "size", "mode", "uid", "gid", "cuid", "cgid", "cpid", "ctime"):
        if row[k] != rec[k]:
            return f"its {k} is {row[k]}, the dump's {rec[k]} (another segment, or changed since)"
    if row["nattch"]:
        return f"it is attached {row['nattch']} times (last by pid {row['lpid']})"
    if row["atime"] != rec["atime"]:
        return f"it was attached since the dump (by pid {row['lpid']})"
    if row["lpid"] not in pids and row["lpid"] != rec["lpid"]:
        return f"pid {row['lpid']}, not of the dump, detached it last"
    return None


def preflight(segs: Dict[int, dict], pids) -> List[Refusal]:
    """What the restore must refuse before any process exists. Marks a
    segment found intact (contents aside: materialize compares them) for
    reuse."""
    out: List[Refusal] = []
    if not segs:
        return out
    table = read_table()
    by_key = {r["key"]: r for r in table.values() if r["key"] != IPC_PRIVATE}
    mni = _ipcmni()
    by_index = {r["shmid"] % mni: r for r in table.values()}
    make = False
    for shmid, seg in sorted(segs.items()):
        rec = seg["rec"]
        seg["reuse"] = False
        row = table.get(shmid)
        if row is not None:
            why = same_segment(rec, row, pids)
            if why:
                out.append(Refusal("sysv-shm", f"{_describe(rec)}: id {shmid} is taken and not reused: {why}"))
            else:
                seg["reuse"] = True
            continue
        make = True
        other = by_key.get(rec["key"]) if not rec["mode"] & SHM_DEST else None
        if other is not None:
            out.append(Refusal("sysv-shm", f"{_describe(rec)}: its key is held by segment {other['shmid']}"))
        other = by_index.get(shmid % mni)
        if other is not None:
            out.append(Refusal("sysv-shm", f"{_describe(rec)}: segment {other['shmid']} holds its index"))
    if make:
        r = next_id_problem()
        if r is not None:
            out.append(r)
    return out


def _ipcmni() -> int:
    """The ids' index range: 32768, or 16M when the kernel was booted with
    ipcmni_extend (then shmmni may exceed 32768; ipc/util.h)."""
    try:
        with open("/proc/sys/kernel/shmmni") as f:
            return IPCMNI if int(f.read()) <= IPCMNI else 1 << 24
    except (OSError, ValueError):
        return IPCMNI


_lib = None


def _libc():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.shmat.restype = ctypes.c_void_p
        lib.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
        lib.shmdt.argtypes = (ctypes.c_void_p,)
        lib.shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
        lib.shmctl.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
        _lib = lib
    return _lib


def _err(what: str) -> EngineError:
    e = ctypes.get_errno()
    return EngineError(f"{what}: {os.strerror(e)}", errno=e)


def stat(shmid: int) -> Optional[dict]:
    """shmctl(IPC_STAT) (glibc's struct shmid_ds, the same on x86_64 and
    aarch64 but for ipc_perm.mode, a u16 and its padding or a u32: read
    as a little-endian u32); None: no such segment."""
    buf = ctypes.create_string_buffer(256)
    if _libc().shmctl(shmid, IPC_STAT, buf) != 0:
        return None
    import struct
    key, uid, gid, cuid, cgid, mode = struct.unpack_from("<iIIIII", buf, 0)
    size, atime, dtime, ctime, cpid, lpid, nattch = struct.unpack_from("<QqqqiiQ", buf, 48)
    return {"key": key, "shmid": shmid, "mode": mode & 0o7777, "size": size, "cpid": cpid, "lpid": lpid,
            "nattch": nattch, "uid": uid, "gid": gid, "cuid": cuid, "cgid": cgid, "atime": atime,
            "dtime": dtime, "ctime": ctime}


def _set_owner(shmid: int, uid: int, gid: int, mode: int) -> None:
    buf = ctypes.create_string_buffer(256)
    if _libc().shmctl(shmid, IPC_STAT, buf) != 0:
        raise _err(f"shmctl({shmid}, IPC_STAT)")
    import struct
    struct.pack_into("<II", buf, 4, uid, gid)
    struct.pack_into("<I", buf, 20, mode & 0o777)
    if _libc().shmctl(shmid, IPC_SET, buf) != 0:
        raise _err(f"shmctl({shmid}, IPC_SET)")


def _write_next_id(value: int) -> None:
    with open(NEXT_ID, "w") as f:
        f.write(f"{value}\n")


def _create_as(rec: dict) -> int:
    """shmget with shm_next_id set, as the creator's uid and gid (this
    thread's only: raw setresuid/setresgid, not glibc's, which would change
    every thread of ckpt), so shm_perm.cuid/cgid are the dumped ones.
    Returns the id the kernel gave."""
    from .arch import current
    from .libc import syscall
    sysnr = current().SYS
    euid, egid = os.geteuid(), os.getegid()
    key = IPC_PRIVATE if rec["mode"] & SHM_DEST else rec["key"]
    _write_next_id(rec["shmid"])
    try:
        switched = (rec["cuid"], rec["cgid"]) != (euid, egid)
        if switched:
            syscall(sysnr["setresgid"], -1, rec["cgid"], -1, name="setresgid")
            try:
                syscall(sysnr["setresuid"], -1, rec["cuid"], -1, name="setresuid")
            except BaseException:
                syscall(sysnr["setresgid"], -1, egid, -1, name="setresgid")
                raise
        try:
            got = _libc().shmget(key, rec["size"], IPC_CREAT | IPC_EXCL | (rec["mode"] & 0o777))
            if got < 0:
                err = _err(f"shmget(key {key & U32:#x}, {rec['size']} bytes)")
        finally:
            if switched:
                syscall(sysnr["setresuid"], -1, euid, -1, name="setresuid")
                syscall(sysnr["setresgid"], -1, egid, -1, name="setresgid")
    finally:
        _release_next_id()
    if got < 0:
        raise err
    return got


def _release_next_id() -> None:
    """shm_next_id back to unset. The kernel unsets it once a shmget used
    it, and refuses a write of -1 (its range is 0..INT_MAX): a shmget that
    failed before taking it (a bad size) leaves it set for the next
    shmget of anyone; a throwaway segment takes it instead."""
    try:
        with open(NEXT_ID) as f:
            if int(f.read()) < 0:
                return
    except (OSError, ValueError):
        return
    spare = _libc().shmget(IPC_PRIVATE, PAGE, IPC_CREAT | 0o600)
    if spare >= 0:
        _libc().shmctl(spare, IPC_RMID, None)


class Made:
    """The segments a restore made (ids with the creation's cpid and
    ctime): removed again if the restore fails, and only if the id still
    names the segment made (a removed one's id may be another's by then)."""

    def __init__(self) -> None:
        self.made: List[tuple] = []     # (shmid, cpid, ctime)

    def undo(self) -> None:
        for shmid, cpid, ctime in self.made:
            now = stat(shmid)
            if now is not None and now["cpid"] == cpid and now["ctime"] >= ctime:
                _libc().shmctl(shmid, IPC_RMID, None)
        self.made.clear()


def _attach_local(shmid: int, readonly: bool) -> int:
    addr = _libc().shmat(shmid, None, SHM_RDONLY if readonly else 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise _err(f"shmat({shmid}) in ckpt")
    return addr


def _image_runs(seg: dict, source) -> list:
    """[(offset in the segment, npages, file, file offset)] of its pages."""
    _, v = seg["data"]
    return [(addr - v["start"], n, fi, off) for addr, n, fi, off in v["pages"]]


def _differs(base: int, size: int, runs: list, source) -> Optional[int]:
    """The first offset where the segment at `base` is not the image's
    pages (a page the image does not hold reads as zeros); None: equal."""
    covered = 0
    zero = bytes(PAGE)
    for rel, n, fi, off in sorted(runs):
        for pos in range(covered, rel, PAGE):
            if ctypes.string_at(base + pos, PAGE) != zero:
                return pos
        want = memoryview(source.maps[fi])[off:off + n * PAGE]
        try:
            if ctypes.string_at(base + rel, n * PAGE) != want:
                return rel
        finally:
            want.release()
        covered = rel + n * PAGE
    for pos in range(covered, size, PAGE):
        if ctypes.string_at(base + pos, PAGE) != zero:
            return pos
    return None


def materialize(segs: Dict[int, dict], sources: Dict[int, object]) -> Made:
    """Make (or, marked reusable by preflight, check) every segment, in ckpt,
    after the pre-flight and before the process is made. `sources`: {pid:
    PageSource} of the process (tree member) whose mapping carries the
    pages. Raises Refusal (a reused segment's contents differ) or
    EngineError; what it made is removed then."""
    made = Made()
    try:
        for shmid, seg in sorted(segs.items()):
            rec = seg["rec"]
            size = pages_of(rec["size"])
            pid, v = seg["data"]
            source = sources[pid]
            runs = _image_runs(seg, source)     # checked against the pages files with every mapping's
            if seg.get("reuse"):
                base = _attach_local(shmid, True)
                try:
                    at = _differs(base, size, runs, source)
                finally:
                    _libc().shmdt(ctypes.c_void_p(base))
                source._check_leases(v["pages"])
                if at is not None:
                    raise Refusal("sysv-shm", f"{_describe(rec)} outlived the dump, but its contents differ from "
                                  f"the image's at offset {at:#x}: not reused")
                continue
            got = _create_as(rec)
            if got != shmid:
                _libc().shmctl(got, IPC_RMID, None)
                raise EngineError(f"{_describe(rec)}: shmget made id {got} (another segment took the id since "
                                  "the pre-flight)")
            now = stat(shmid)
            made.made.append((shmid, now["cpid"] if now else os.getpid(), now["ctime"] if now else 0))
            if (rec["uid"], rec["gid"]) != (rec["cuid"], rec["cgid"]):
                _set_owner(shmid, rec["uid"], rec["gid"], rec["mode"])
            if rec["mode"] & SHM_LOCKED and _libc().shmctl(shmid, SHM_LOCK, None) != 0:
                raise _err(f"shmctl({shmid}, SHM_LOCK)")
            if runs:
                base = _attach_local(shmid, False)
                try:
                    for rel, n, fi, off in runs:
                        ctypes.memmove(base + rel, source.addrs[fi] + off, n * PAGE)
                finally:
                    _libc().shmdt(ctypes.c_void_p(base))
                source._check_leases(v["pages"])
    except BaseException:
        made.undo()
        raise
    return made


def attach_call(arch, v: dict) -> tuple:
    """(syscall nr, args, prot it maps with) of the process's shmat of
    mapping v: read-only where the attach was (no VM_MAYWRITE: "mw"
    absent from its VmFlags)."""
    flags = 0 if "mw" in v["flags"] else SHM_RDONLY
    prot = 1 | (0 if flags else 2)
    return SYS[arch.MACHINE]["shmat"], (v["sysv"]["shmid"], v["start"], flags), prot


def seal(vmas: list) -> None:
    """In the restorer, once every process attached: a segment that was
    IPC_RMID'd at the dump is removed again (it lives on while attached;
    Linux lets an attached, removed segment be attached again by id)."""
    done = set()
    for v in vmas:
        s = v.get("sysv") if v.get("kind") == "sysvshm" else None
        if s is None or not s["mode"] & SHM_DEST or s["shmid"] in done:
            continue
        done.add(s["shmid"])
        if _libc().shmctl(s["shmid"], IPC_RMID, None) != 0:
            raise _err(f"shmctl({s['shmid']}, IPC_RMID)")
