"""Mutant engines: ``ckpt`` with exactly one thing broken, to prove the judge.

A mutant runs the real engine (``engine.cli.main``) and breaks one thing,
either by editing the image between a real ``ckpt dump`` and a real
``ckpt restore`` (re-sealing manifest.json, so the image still verifies),
or, where the break is behaviour rather than data, by wrapping the engine
(a restart instead of a restore, an older image, a refusal not made, a
check not done). The scenario corpus must *kill* every mutant: some
scenario's judge must fail it (an outcome other than the expected one).

    mutants.py NAME dump    -t PID -D DIR --json [...]   (ckpt's arguments)
    mutants.py NAME restore -D DIR --pidfile F --json [...]
    mutants.py --list

It speaks ckpt's CLI contract (its exit codes and --json come from ckpt)
and says on stderr, one line, what it did, so the mutant table can tell
"not applicable" from "survived":

    mutant NAME: applied: <what was broken>
    mutant NAME: no target in image (<what is missing>)    -> behaves as ckpt
    mutant NAME: error: <why the mutation itself failed>   -> exit 4

Stdlib only: it runs in guests as /opt/crucible/harness/mutants.py, next to
/opt/crucible/engine (and locally from the repo, where harness/ sits next
to engine/).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:     # /opt/crucible in a guest, the repo locally
    sys.path.insert(0, _ROOT)

MANIFEST = "manifest.json"
PAGE = 4096
O_APPEND = 0o2000
O_NONBLOCK = 0o4000
SIDE = ".mutant"             # sidecar files live next to the image dir, never inside it


class NoTarget(Exception):
    """The image has nothing this mutant breaks: it behaves exactly as ckpt."""


class MutantError(Exception):
    """The mutation itself failed (a bug of the mutant, not a kill)."""


def say(name: str, text: str) -> None:
    sys.stderr.write(f"mutant {name}: {text}\n")
    sys.stderr.flush()


# -- the image: read, edit, re-seal ----------------------------------------------------

class Image:
    """An image directory opened for editing; ``seal()`` rewrites the
    manifest's sha256/size of every file that changed."""

    def __init__(self, path: str):
        self.dir = path
        with open(os.path.join(path, MANIFEST)) as f:
            self.manifest = json.load(f)
        self._json: Dict[str, object] = {}
        self.changed: set = set()

    def json(self, name: str):
        if name not in self._json:
            with open(os.path.join(self.dir, name)) as f:
                self._json[name] = json.load(f)
        return self._json[name]

    def put_json(self, name: str) -> None:
        # The engine writes JSON with indent=1, sort_keys=True: keep that.
        self.write(name, json.dumps(self._json[name], indent=1, sort_keys=True).encode())

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.dir, name), "rb") as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        if name not in self.manifest["files"]:
            raise MutantError(f"{name} is not in the image")
        path = os.path.join(self.dir, name)
        os.chmod(path, 0o600)
        with open(path, "wb") as f:
            f.write(data)
        self.changed.add(name)

    def pwrite(self, name: str, data: bytes, off: int) -> None:
        fd = os.open(os.path.join(self.dir, name), os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        self.changed.add(name)

    def seal(self) -> None:
        for name in sorted(self.changed):
            path = os.path.join(self.dir, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self.manifest["files"][name] = {"sha256": h.hexdigest(), "size": os.path.getsize(path)}
        tmp = os.path.join(self.dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.manifest, indent=1, sort_keys=True))
        os.replace(tmp, os.path.join(self.dir, MANIFEST))


def _leaders(fds: List[dict]) -> List[dict]:
    return [r for r in fds if r.get("dup_of") is None or r.get("dup_of") == r.get("fd")]


def _first(recs, pred, what: str) -> dict:
    for r in sorted(recs, key=lambda r: r.get("fd", 0)):
        if pred(r):
            return r
    raise NoTarget(what)


# -- image edits (each returns what it broke; raises NoTarget) -------------------------

def m_drop_offset(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] in ("regular", "ghost") and r.get("pos"),
               "no file fd with a non-zero offset")
    old, r["pos"] = r["pos"], 0
    img.put_json("fds.json")
    return f"fd {r['fd']} offset {old} -> 0"


def m_drop_append(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] in ("regular", "ghost") and r.get("flags", 0) & O_APPEND,
               "no O_APPEND file fd")
    r["flags"] &= ~O_APPEND
    img.put_json("fds.json")
    return f"fd {r['fd']} loses O_APPEND"


def m_lose_nonblock(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r.get("flags", 0) & O_NONBLOCK, "no O_NONBLOCK fd")
    r["flags"] &= ~O_NONBLOCK
    img.put_json("fds.json")
    return f"fd {r['fd']} ({r['kind']}) loses O_NONBLOCK"


def m_lose_cloexec(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(fds, lambda r: r.get("cloexec") is True, "no close-on-exec fd")
    r["cloexec"] = False
    img.put_json("fds.json")
    return f"fd {r['fd']} ({r['kind']}) loses close-on-exec"


def _page_files(img: Image) -> Dict[int, str]:
    from engine.memory import page_file_name
    return {i: page_file_name(i) for i in range(img.json("mm.json")["page_files"])}


def m_zero_page(img: Image) -> str:
    """The middle one of the non-zero pages of the largest unnamed private
    anonymous mapping (an mmap'd region: not [heap] or [stack], which the
    allocator and the call chain own): a lost or misplaced page write. (The
    middle: the edges of a merged mapping are often someone else's, e.g.
    the TLS.)"""
    mm = img.json("mm.json")
    files = _page_files(img)
    cands = [v for v in mm["vmas"] if v["kind"] == "anon" and v["perms"].endswith("p")
             and not v["path"] and v["pages"]]
    cands.sort(key=lambda v: (-sum(run[1] for run in v["pages"]), v["start"]))
    zero = bytes(PAGE)
    for v in cands:
        nonzero = []
        for addr, n, fi, off in v["pages"]:
            data = img.read(files[fi])
            nonzero += [(addr + k * PAGE, fi, off + k * PAGE) for k in range(n)
                        if data[off + k * PAGE: off + (k + 1) * PAGE] != zero]
        if nonzero:
            addr, fi, off = nonzero[len(nonzero) // 2]
            img.pwrite(files[fi], zero, off)
            return f"page {addr:#x} of mapping {v['start']:#x}-{v['end']:#x} zeroed"
    raise NoTarget("no non-zero anonymous page")


def m_lose_timerfd_ticks(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] == "timerfd" and r.get("ticks"), "no timerfd with expirations")
    old, r["ticks"] = r["ticks"], 0
    img.put_json("fds.json")
    return f"timerfd fd {r['fd']} ticks {old} -> 0"


def m_swap_epoll_data(img: Image) -> str:
    fds = img.json("fds.json")

    def two(r):
        return r["kind"] == "epoll" and len({t["data"] for t in r.get("targets", [])}) >= 2
    r = _first(_leaders(fds), two, "no epoll with two registrations of different data")
    ts = sorted(r["targets"], key=lambda t: t["tfd"])
    a = ts[0]
    b = next(t for t in ts[1:] if t["data"] != a["data"])
    a["data"], b["data"] = b["data"], a["data"]
    img.put_json("fds.json")
    return f"epoll fd {r['fd']}: data of tfd {a['tfd']} and tfd {b['tfd']} swapped"


def m_drop_pipe_byte(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] in ("pipe", "fifo") and r.get("data") and r.get("data_len"),
               "no pipe or fifo with queued bytes")
    data = img.read(r["data"])
    img.write(r["data"], data[:-1])
    for other in fds:     # every end of that pipe names the same queue (ckpt checks they agree)
        if other.get("data") == r["data"]:
            other["data_len"] -= 1
    img.put_json("fds.json")
    return f"{r['kind']} fd {r['fd']}: last of {len(data)} queued bytes dropped"


def m_drop_unix_message(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r.get("sock") in ("unix-pair", "unix-named") and r.get("lengths") and r.get("data"),
               "no unix socket with queued data")
    n = r["lengths"].pop()
    data = img.read(r["data"])
    img.write(r["data"], data[:len(data) - n])
    r["data_len"] -= n
    # FIONREAD (re-checked by the engine after the refill): all queued bytes
    # on a stream socket, the first message's length on the others.
    if r.get("type") == 1:
        r["fionread"] = r["data_len"]
    elif not r["lengths"]:
        r["fionread"] = 0
    img.put_json("fds.json")
    return f"unix socket fd {r['fd']}: last queued message ({n} bytes) dropped"


def m_drop_tcp_byte(img: Image) -> str:
    """The last byte of an established TCP connection's receive queue is
    dropped, the sequence numbers kept consistent (the peer never resends
    it): the stream silently loses one byte."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r.get("sock") == "tcp-conn" and (r.get("repair") or {}).get("inq_len"),
               "no tcp connection with bytes to read")
    n = r["repair"]["inq_len"]
    data = img.read(r["data"])
    img.write(r["data"], data[:n - 1] + data[n:])
    r["repair"]["inq_len"] = n - 1
    img.put_json("fds.json")
    return f"tcp connection fd {r['fd']}: the last of {n} bytes to read dropped"


def m_drop_eventfd_count(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] == "eventfd" and r.get("count"), "no eventfd with a count")
    old, r["count"] = r["count"], 0
    img.put_json("fds.json")
    return f"eventfd fd {r['fd']} count {old} -> 0"


def m_revive_dead_pidfd(img: Image) -> str:
    """A pidfd of a dead process comes back naming the process itself (a
    restore that opens every pidfd on a live PID)."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] == "pidfd" and r.get("pid") == -1, "no pidfd of a dead process")
    r["pid"] = img.json("core.json")["pid"]
    r.pop("dead", None)
    r.pop("exit", None)
    img.put_json("fds.json")
    return f"pidfd fd {r['fd']} of a dead process -> of pid {r['pid']}"


def m_shift_inotify_wd(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] == "inotify" and r.get("watches"), "no inotify watch")
    w = max(r["watches"], key=lambda w: w["wd"])
    w["wd"] += 1        # the highest: no two watches share a wd
    img.put_json("fds.json")
    return f"inotify fd {r['fd']}: watch {w['path']} wd {w['wd'] - 1} -> {w['wd']}"


def m_ghost_mode(img: Image) -> str:
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] == "ghost" and isinstance(r.get("ghost"), dict)
               and r["ghost"].get("mode", 0) & 0o7777 != 0o644, "no ghost file with a mode other than 0644")
    g = r["ghost"]
    old, g["mode"] = g["mode"], (g["mode"] & ~0o7777) | 0o644
    img.put_json("fds.json")
    return f"ghost of fd {r['fd']}: mode {old & 0o7777:04o} -> 0644"


def m_split_shared(img: Image) -> str:
    fds = img.json("fds.json")
    by_fd = {r["fd"]: r for r in fds}
    f = _first(fds, lambda r: r.get("dup_of") not in (None, r.get("fd"))
               and by_fd.get(r["dup_of"], {}).get("kind") in ("regular", "ghost", "directory"),
               "no two fds sharing one open file")
    lead = by_fd[f["dup_of"]]
    copy = json.loads(json.dumps(lead))
    copy.update({k: f[k] for k in ("fd", "cloexec", "flags", "pos", "link") if k in f})
    fds[fds.index(f)] = copy
    img.put_json("fds.json")
    return f"fd {f['fd']} (shared with fd {lead['fd']}) restored as a separate open file"


def _members(img: Image) -> List[dict]:
    try:
        return img.json("tree.json")["members"]
    except FileNotFoundError:
        return []


def _mm_names(img: Image) -> List[str]:
    """Every process's mm.json: a single process's, or each live tree member's."""
    members = _members(img)
    if not members:
        return ["mm.json"]
    return [m["dir"] + "mm.json" for m in members if not m.get("zombie")]


def m_unshare_tree_memory(img: Image) -> str:
    """A MAP_SHARED mapping two tree members share comes back as two
    mappings with the same bytes: a write by one is no longer seen by the
    other (the member gets a copy of the owner's pages and no link)."""
    from engine.memory import page_file_name
    dirs = {m["pid"]: m.get("dir", "") for m in _members(img)}
    for m in _members(img):
        if not m.get("dir") or m.get("zombie"):
            continue
        mm_name = m["dir"] + "mm.json"
        mm = img.json(mm_name)
        for v in mm["vmas"]:
            link = v.get("tree_shared")
            if not link or link[0] not in dirs:
                continue
            owner_pid, owner_start = link[0], link[1]
            odir = dirs[owner_pid]
            omm = img.json(odir + "mm.json")
            ov = next((x for x in omm["vmas"] if x["start"] == owner_start), None)
            if ov is None:
                raise MutantError(f"owner {owner_pid} has no mapping at {owner_start:#x}")
            data = b"".join(img.read(odir + page_file_name(fi))[off:off + n * PAGE]
                            for _, n, fi, off in ov.get("pages") or [])
            if mm.get("page_files", 0) == 0:
                mm["page_files"] = 1
                pf = m["dir"] + page_file_name(0)
                with open(os.path.join(img.dir, pf), "wb"):
                    pass
                img.manifest["files"][pf] = {}
            fi = mm["page_files"] - 1
            pf = m["dir"] + page_file_name(fi)
            base = os.path.getsize(os.path.join(img.dir, pf))
            with open(os.path.join(img.dir, pf), "ab") as f:
                f.write(data)
            img.changed.add(pf)
            shift, pages, at = v["start"] - ov["start"], [], base
            for addr, n, _, _ in ov.get("pages") or []:
                pages.append([addr + shift, n, fi, at])
                at += n * PAGE
            v["pages"], v["pages_bytes"] = pages, len(data)
            del v["tree_shared"]
            img.put_json(mm_name)
            return (f"member {m['pid']}'s mapping {v['start']:#x}-{v['end']:#x}, shared with {owner_pid}, "
                    "restored as a copy of its pages")
    raise NoTarget("no MAP_SHARED mapping shared by two members")


def m_split_shmem_parts(img: Image) -> str:
    """Two mappings of one shared anonymous object (split by mprotect,
    mapped twice) come back as two objects: the second part's record gets
    an inode of its own, so the restore makes it anew with only the pages
    it carried (engine/shmem.py)."""
    for name in _mm_names(img):
        mm = img.json(name)
        seen = {}
        for v in mm["vmas"]:
            if v.get("kind") != "shmem" or v.get("tree_shared"):
                continue
            k = (v["dev"], v["inode"])
            if k in seen:
                v["inode"] += 1 << 40
                img.put_json(name)
                return (f"{name}: mapping {v['start']:#x}-{v['end']:#x}, a part of the object at "
                        f"{seen[k]:#x}, made an object of its own")
            seen[k] = v["start"]
    raise NoTarget("no shared anonymous object mapped in two parts")


def m_lose_sigmask(img: Image) -> str:
    core = img.json("core.json")
    if not core["sigmask"]:
        raise NoTarget("no blocked signals")
    old, core["sigmask"] = core["sigmask"], 0
    img.put_json("core.json")
    return f"signal mask {old:#x} -> 0"


def m_lose_sigaction(img: Image) -> str:
    core = img.json("core.json")
    # A caught signal first: an ignored one may only be inherited (SIGHUP
    # under nohup), not the process's own doing.
    sigs = sorted((int(s) for s, a in core["sigactions"].items() if a[0]),
                  key=lambda s: (core["sigactions"][str(s)][0] == 1, s))
    if not sigs:
        raise NoTarget("no signal with a non-default action")
    s = sigs[0]
    old = core["sigactions"][str(s)][0]
    core["sigactions"][str(s)] = [0, 0, 0, 0]
    img.put_json("core.json")
    return f"signal {s} action {'SIG_IGN' if old == 1 else hex(old)} -> SIG_DFL"


def m_reset_rlimits(img: Image) -> str:
    import resource
    from engine import libc
    core = img.json("core.json")
    mine = [list(resource.getrlimit(i)) for i in range(len(libc.RLIMIT_NAMES))]
    # RLIM_INFINITY: getrlimit says -1, /proc/PID/limits (the image) says 2**64-1
    mine = [[(x & (2 ** 64 - 1)) for x in lim] for lim in mine]
    diff = [libc.RLIMIT_NAMES[i] for i, (a, b) in enumerate(zip(core["rlimits"], mine)) if a != b]
    if not diff:
        raise NoTarget("every rlimit is already the default")
    core["rlimits"] = mine
    img.put_json("core.json")
    return "rlimits reset to the restorer's: " + ", ".join(diff)


def m_change_umask(img: Image) -> str:
    core = img.json("core.json")
    old = core["umask"]
    core["umask"] = 0o077 if old != 0o077 else 0o022
    img.put_json("core.json")
    return f"umask {old:03o} -> {core['umask']:03o}"


def m_reset_process_attrs(img: Image) -> str:
    """The process attributes, I/O priority and NUMA policy a clone of the
    restorer would have (engine/procattrs.py, sched.py "ioprio", mempolicy.py)."""
    core = img.json("core.json")
    default = {"dumpable": 1, "child_subreaper": 0, "keep_caps": 0, "thp_disable": 0, "mce_kill": 2,
               "coredump_filter": 0x33, "io_flusher": 0}
    attrs = core.get("attrs") or {}
    diff = [f"{k} {attrs[k]} -> {v}" for k, v in default.items() if k in attrs and attrs[k] != v]
    for where, rec in [("", core)] + [(f"thread {t['tid']} ", t) for t in core.get("threads", [])]:
        if rec.get("sched", {}).get("ioprio"):
            diff.append(f"{where}ioprio {rec['sched']['ioprio']:#x} -> 0")
            rec["sched"]["ioprio"] = 0
    if core.get("membarrier"):
        diff.append(f"membarrier {core['membarrier']:#x} -> 0")
        core["membarrier"] = 0
    if core.get("mempolicy", [0, 0])[0]:
        diff.append(f"mempolicy {core['mempolicy']} -> default")
        core["mempolicy"] = [0, 0]
    if not diff:
        raise NoTarget("every process attribute is already the default")
    attrs.update(default)
    img.put_json("core.json")
    return ", ".join(diff)


def m_lose_cwd(img: Image) -> str:
    core = img.json("core.json")
    if core["cwd"]["path"] == "/":
        raise NoTarget("cwd is already /")
    st = os.stat("/")
    old = core["cwd"]["path"]
    core["cwd"] = {"path": "/", "dev": st.st_dev, "ino": st.st_ino}
    img.put_json("core.json")
    return f"cwd {old} -> /"


def m_change_mprotect(img: Image) -> str:
    """A read-only private file mapping comes back writable: nothing the
    process does notices, only its maps show it."""
    mm = img.json("mm.json")
    for v in mm["vmas"]:
        if v["kind"] == "file" and v["perms"] == "r--p":
            v["perms"] = "rw-p"
            img.put_json("mm.json")
            return f"mapping {v['start']:#x}-{v['end']:#x} {v['path']} r--p -> rw-p"
    raise NoTarget("no read-only private file mapping")


def m_drop_cow_page(img: Image) -> str:
    """A private file mapping's written (copy-on-write) page is left out of
    the image, so the restore maps the file's own bytes there: an engine
    that takes a file-backed private page for clean. The middle one of the
    pages that differ from the file, in the private file mapping with the
    most of them."""
    mm = img.json("mm.json")
    files = _page_files(img)
    best = None
    for v in mm["vmas"]:
        if v["kind"] != "file" or not v["perms"].endswith("p") or not v.get("pages"):
            continue
        path = ((v.get("file") or {}).get("file") or {}).get("path") or v["path"]
        try:
            with open(path, "rb") as f:
                differ = []
                for ri, (addr, n, fi, off) in enumerate(v["pages"]):
                    data = img.read(files[fi])
                    for k in range(n):
                        f.seek(v["offset"] + addr + k * PAGE - v["start"])
                        if f.read(PAGE).ljust(PAGE, b"\0") != data[off + k * PAGE: off + (k + 1) * PAGE]:
                            differ.append((ri, k))
        except OSError:
            continue
        if differ and (best is None or len(differ) > len(best[1])):
            best = (v, differ)
    if best is None:
        raise NoTarget("no private file mapping with a page that differs from its file")
    v, differ = best
    ri, k = differ[len(differ) // 2]
    addr, n, fi, off = v["pages"][ri]
    keep = [[addr, k, fi, off]] if k else []
    if k + 1 < n:
        keep.append([addr + (k + 1) * PAGE, n - k - 1, fi, off + (k + 1) * PAGE])
    v["pages"][ri:ri + 1] = keep
    v["pages_bytes"] = sum(r[1] for r in v["pages"]) * PAGE
    img.put_json("mm.json")
    return f"page {addr + k * PAGE:#x} of {v['path']} ({v['perms']}) left to the file's bytes"


def m_reset_thread_sched(img: Image) -> str:
    """Every thread restored with the leader's scheduling (nice, policy and
    priority, CPU affinity): an engine that sets them once, per process."""
    core = img.json("core.json")
    lead = core.get("sched") or {}
    diff = []
    for t in core.get("threads") or []:
        ts = t.get("sched") or {}
        changed = [k for k in ("attr", "nice", "affinity") if k in ts and k in lead and ts[k] != lead[k]]
        if changed:
            diff.append(f"thread {t['tid']} " + ", ".join(
                f"{k} {ts[k]} -> {lead[k]}" for k in changed if k != "attr") + (" (attr)" if "attr" in changed else ""))
            for k in changed:
                ts[k] = json.loads(json.dumps(lead[k]))
    if not diff:
        raise NoTarget("no thread scheduled otherwise than the leader")
    img.put_json("core.json")
    return "; ".join(diff)


def m_swap_thread_tls(img: Image) -> str:
    """Two threads' thread pointers (x86_64 fs_base, aarch64 tpidr: their
    TLS, their pthread_self) swapped: registers restored to the wrong thread."""
    core = img.json("core.json")
    ts = core.get("threads") or []
    key = next((k for k in ("fs_base", "tpidr") if ts and k in ts[0].get("regs", {})), None)
    pair = [t for t in ts if key and t["regs"].get(key)]
    if len(pair) < 2 or pair[0]["regs"][key] == pair[1]["regs"][key]:
        raise NoTarget("fewer than two threads besides the leader")
    a, b = pair[0], pair[1]
    a["regs"][key], b["regs"][key] = b["regs"][key], a["regs"][key]
    img.put_json("core.json")
    return f"threads {a['tid']} and {b['tid']}: {key} swapped"


MXCSR_OFF, MXCSR_DEFAULT = 24, 0x1F80     # in the XSAVE area's legacy (FXSAVE) region


def m_reset_mxcsr(img: Image) -> str:
    """The SSE control/status register (MXCSR: rounding mode, exception
    masks, flush-to-zero) of every thread reset to its power-on value: an
    engine that restores the registers but not all of the FPU state."""
    if "xstate.bin" not in img.manifest["files"] or "fs_base" not in img.json("core.json").get("regs", {}):
        raise NoTarget("no x86_64 FPU state (MXCSR) in the image")
    import struct
    what = []
    blob = bytearray(img.read("xstate.bin"))
    old = struct.unpack_from("<I", blob, MXCSR_OFF)[0]
    if old != MXCSR_DEFAULT:
        struct.pack_into("<I", blob, MXCSR_OFF, MXCSR_DEFAULT)
        img.write("xstate.bin", bytes(blob))
        what.append(f"leader {old:#x}")
    recs = img.json("core.json").get("threads") or []
    if recs:
        from engine.threads import XSTATE_FILE
        data, off = bytearray(img.read(XSTATE_FILE)), 0
        for r in recs:
            o = struct.unpack_from("<I", data, off + MXCSR_OFF)[0]
            if o != MXCSR_DEFAULT:
                struct.pack_into("<I", data, off + MXCSR_OFF, MXCSR_DEFAULT)
                what.append(f"thread {r['tid']} {o:#x}")
            off += r["xstate_size"]
        if len(what) > (1 if old != MXCSR_DEFAULT else 0):
            img.write(XSTATE_FILE, bytes(data))
    if not what:
        raise NoTarget(f"MXCSR is already {MXCSR_DEFAULT:#x} in every thread")
    return f"MXCSR -> {MXCSR_DEFAULT:#x}: " + ", ".join(what)


def m_reset_sockopt(img: Image) -> str:
    """One option the process set on a socket comes back as a fresh
    socket's (the image's record and list of set options edited alike, so
    the engine's own read-back agrees): the first one ckpt copies."""
    import socket
    from engine.fds import _sockbase, _sockopts
    policy = {row[0]: row[5] for row in _sockopts.TABLE}
    kinds = {"tcp": (socket.SOCK_STREAM, socket.IPPROTO_TCP), "udp": (socket.SOCK_DGRAM, socket.IPPROTO_UDP)}
    fds = img.json("fds.json")
    for r in _leaders(fds):
        names = [n for n in sorted(r.get("set") or []) if policy.get(n) == "copy"]
        if not names or not isinstance(r.get("opts"), dict):
            continue
        head = str(r.get("sock", "")).split("-")[0]
        if head in kinds:
            family, (typ, proto) = r.get("family", socket.AF_INET), kinds[head]
        elif head == "unix":
            family, typ, proto = socket.AF_UNIX, r.get("type", socket.SOCK_STREAM), 0
        else:
            continue
        with socket.socket(family, typ, proto) as fresh:
            default = _sockopts.read_all(fresh, family, _sockbase.proto_key(family, typ, proto))
        name = names[0]
        old, r["opts"][name] = r["opts"][name], default.get(name)
        r["set"] = [n for n in r["set"] if n != name]
        img.put_json("fds.json")
        return f"{r['sock']} fd {r['fd']}: {name} {old} -> {default.get(name)} (a fresh socket's)"
    raise NoTarget("no socket with an option set")


def m_disarm_posix_timer(img: Image) -> str:
    """One armed POSIX timer comes back disarmed (created, same ID, clock
    and signal: only timer_gettime tells)."""
    core = img.json("core.json")
    for t in core.get("posix_timers") or []:
        if any(t.get("spec", [0])[2:]):
            old, t["spec"] = t["spec"], [0, 0, 0, 0]
            img.put_json("core.json")
            return f"POSIX timer {t['id']} {old} -> disarmed"
    raise NoTarget("no armed POSIX timer")


def m_reset_itimers(img: Image) -> str:
    """The interval timers (setitimer) come back disarmed."""
    core = img.json("core.json")
    timers = core.get("itimers") or []
    if not any(any(t) for t in timers):
        raise NoTarget("no armed interval timer")
    old, core["itimers"] = timers, [[0] * len(t) for t in timers]
    img.put_json("core.json")
    return f"itimers {old} -> disarmed"


def m_double_pending_signal(img: Image) -> str:
    """One saved pending signal queued twice at restore (a real-time one:
    standard signals do not queue, a second one merges): delivered twice."""
    core = img.json("core.json")
    lists = [(f"{where}", lst) for where, lst in sorted((core.get("signals") or {}).items())] + \
        [(f"thread {t['tid']} {where}", lst) for t in core.get("threads") or []
         for where, lst in sorted((t.get("signals") or {}).items())]
    for where, lst in lists:
        for i, si in enumerate(lst):
            if si.get("signo", 0) >= 32:
                lst.insert(i + 1, json.loads(json.dumps(si)))
                img.put_json("core.json")
                return f"pending signal {si['signo']} ({where}) queued twice"
    raise NoTarget("no pending real-time signal")


def m_drop_file_lock(img: Image) -> str:
    """One file lock (POSIX, OFD or flock) the process held is not taken
    again at restore."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: any(lk.get("kind") != "LEASE" for lk in r.get("locks") or []),
               "no file lock (other than a lease)")
    lk = next(lk for lk in r["locks"] if lk.get("kind") != "LEASE")
    r["locks"].remove(lk)
    if not r["locks"]:
        del r["locks"]
    img.put_json("fds.json")
    return f"fd {r['fd']}: {lk.get('kind')} {lk.get('rw')} lock at {lk.get('start')} dropped"


def m_move_brk(img: Image) -> str:
    """The program break restored one page lower (one page higher if the
    heap is that small), its [heap] mapping as dumped: /proc shows the same
    mappings, sbrk(0) another break, and the next brk(2) that grows the
    heap collides with the mapping (malloc falls back to mmap)."""
    core = img.json("core.json")
    old = core.get("brk")
    if not old:
        raise NoTarget("no program break")
    new = old - PAGE if old - PAGE >= core["mm"]["start_brk"] else old + PAGE
    core["brk"] = core["mm"]["brk"] = new
    img.put_json("core.json")
    return f"brk {old:#x} -> {new:#x}"


def m_drop_thread(img: Image) -> str:
    """The last thread (other than the leader) is not restored: the
    process comes back with one thread fewer."""
    core = img.json("core.json")
    ts = core.get("threads") or []
    if not ts:
        raise NoTarget("a single-threaded process")
    from engine.threads import XSTATE_FILE
    gone = ts.pop()
    data = img.read(XSTATE_FILE)
    img.write(XSTATE_FILE, data[:len(data) - gone["xstate_size"]])
    img.put_json("core.json")
    return f"thread {gone['tid']} dropped ({len(ts) + 1} threads -> {len(ts)})"


def m_lose_thread_sigmask(img: Image) -> str:
    """A thread other than the leader comes back with no signal blocked."""
    core = img.json("core.json")
    t = next((t for t in core.get("threads") or [] if t.get("sigmask")), None)
    if t is None:
        raise NoTarget("no thread besides the leader with blocked signals")
    old, t["sigmask"] = t["sigmask"], 0
    img.put_json("core.json")
    return f"thread {t['tid']} signal mask {old:#x} -> 0"


def m_rename_thread(img: Image) -> str:
    """A thread other than the leader comes back with the leader's name."""
    core = img.json("core.json")
    t = next((t for t in core.get("threads") or [] if t.get("comm") != core.get("comm")), None)
    if t is None:
        raise NoTarget("no thread named otherwise than the leader")
    old, t["comm"] = t["comm"], core["comm"]
    img.put_json("core.json")
    return f"thread {t['tid']} name {old!r} -> {core['comm']!r}"


def m_restorer_auxv(img: Image) -> str:
    """The auxiliary vector comes back as the restorer's own (an engine
    that does not hand PR_SET_MM the saved one)."""
    import struct
    core = img.json("core.json")
    with open("/proc/self/auxv", "rb") as f:
        raw = f.read()
    mine = list(struct.unpack(f"<{len(raw) // 8}Q", raw))
    if mine == core.get("auxv"):
        raise NoTarget("the saved auxv is the restorer's")
    old, core["auxv"] = core.get("auxv") or [], mine
    img.put_json("core.json")
    differ = sorted({old[i] for i in range(0, min(len(old), len(mine)) - 1, 2) if old[i + 1] != mine[i + 1]})
    return f"auxv replaced by the restorer's (AT_ types {differ} differ)"


def m_share_to_private(img: Image) -> str:
    """A MAP_SHARED file mapping comes back MAP_PRIVATE: the same bytes
    now, but the process's writes no longer reach the file (nor do other
    writers' reach it)."""
    mm = img.json("mm.json")
    v = next((v for v in mm["vmas"] if v["kind"] == "file" and v["perms"].endswith("s")), None)
    if v is None:
        raise NoTarget("no MAP_SHARED file mapping")
    old, v["perms"] = v["perms"], v["perms"][:3] + "p"
    img.put_json("mm.json")
    return f"mapping {v['start']:#x}-{v['end']:#x} {v['path']} {old} -> {v['perms']}"


def m_drop_tree_child(img: Image) -> str:
    """One member of a process tree is not restored: the last one that has
    no children and that no other member's image refers to (a zombie
    first: it holds nothing else)."""
    tree = img.json("tree.json") if "tree.json" in img.manifest["files"] else None
    members = (tree or {}).get("members") or []
    if len(members) < 2:
        raise NoTarget("not a process tree")
    parents = {m.get("ppid") for m in members}
    named = set()
    for m in members:
        for name, key in (("fds.json", "ofd_of"), ("mm.json", "tree_shared")):
            path = m.get("dir", "") + name
            if path not in img.manifest["files"]:
                continue
            recs = img.json(path)
            recs = recs.get("vmas", []) if isinstance(recs, dict) else recs
            named |= {r[key][0] for r in recs if isinstance(r, dict) and isinstance(r.get(key), list)}
    cands = [m for m in members[1:] if m["pid"] not in parents and m["pid"] not in named]
    if not cands:
        raise NoTarget("every child has children or is referred to by another member")
    gone = sorted(cands, key=lambda m: (not m.get("zombie"), members.index(m)))[0]
    tree["members"] = [m for m in members if m is not gone]
    img.put_json("tree.json")
    return f"member {gone['pid']} ({gone.get('comm')}{', a zombie' if gone.get('zombie') else ''}) not restored"


def m_lose_robust_list(img: Image) -> str:
    """The leader's robust futex list (set_robust_list: what the kernel
    releases, for others waiting, when the thread dies holding a robust
    mutex) is not registered again."""
    core = img.json("core.json")
    old = core.get("robust_list")
    if not old or not old[0]:
        raise NoTarget("no robust list registered")
    core["robust_list"] = [0, old[1]]
    img.put_json("core.json")
    return f"robust list {old[0]:#x}/{old[1]} -> none"


def m_lose_sigaltstack(img: Image) -> str:
    """The leader's alternate signal stack (sigaltstack) is lost: a handler
    asked to run on it (SA_ONSTACK) runs on the normal stack."""
    core = img.json("core.json")
    old = core.get("sigaltstack")
    if not old or not old[0]:
        raise NoTarget("no alternate signal stack")
    core["sigaltstack"] = [0, 2, 0]        # SS_DISABLE
    img.put_json("core.json")
    return f"sigaltstack {old} -> disabled"


def _tasks(core: dict) -> List[Tuple[str, dict]]:
    """(what, record) of the leader and of every other thread."""
    return [("leader", core)] + [(f"thread {t['tid']}", t) for t in core.get("threads") or []]


U64 = 2 ** 64
EINTR, ERESTARTS = 4, (512, 513, 514, 516)   # -ERESTARTSYS, NOINTR, NOHAND, RESTART_BLOCK


def m_eintr_not_restart(img: Image) -> str:
    """Every task dumped inside an interrupted call that must restart (the
    kernel's -ERESTARTxxx, or the EINTR only the freeze caused) returns
    EINTR from it instead: an engine that lets the restored call fail."""
    from engine.arch import x86_64
    core = img.json("core.json")
    if "orig_rax" not in core.get("regs", {}):
        raise NoTarget("not x86_64 registers (aarch64 keeps the restart decision outside them)")
    hit = []
    for what, rec in _tasks(core):
        r = rec["regs"]
        nr, err = r["orig_rax"] - U64 if r["orig_rax"] >= 2 ** 63 else r["orig_rax"], U64 - r["rax"]
        if nr >= 0 and (err in ERESTARTS or (err == EINTR and nr in x86_64.FREEZE_EINTR)):
            r["rax"], r["orig_rax"] = U64 - EINTR, U64 - 1
            hit.append(f"{what} (call {nr})")
    if not hit:
        raise NoTarget("no task inside an interrupted call")
    img.put_json("core.json")
    return "EINTR instead of a restart: " + ", ".join(hit)


# callee-saved: what the code around a blocked call keeps its own state in
CALLEE_SAVED = {"rbx": ("rbx", "rbp", "r12", "r13", "r14", "r15"),
                "x19": tuple(f"x{i}" for i in range(19, 29))}


def m_clobber_thread_regs(img: Image) -> str:
    """The callee-saved general-purpose registers of one thread other than
    the leader (x86_64 rbx, rbp, r12-r15; aarch64 x19-x28) come back as
    zeros: an engine that gives a thread its stack pointer, PC and thread
    pointer only. The last such thread."""
    found = _threaded(img)
    if not found:
        raise NoTarget("no process with threads besides its leader")
    d, core = found[0]
    ts = core["threads"]
    regs = ts[-1]["regs"]
    names = next((v for k, v in CALLEE_SAVED.items() if k in regs), None)
    if names is None:
        raise NoTarget("registers of an unknown layout")
    old = {n: regs[n] for n in names if regs[n]}
    if not old:
        raise NoTarget("its callee-saved registers are already zero")
    for n in names:
        regs[n] = 0
    img.put_json(d + "core.json")
    return f"thread {ts[-1]['tid']}: {', '.join(sorted(old))} -> 0"


FCW_OFF, FCW_DEFAULT = 0, 0x37F          # the x87 control word, in the XSAVE area's legacy region


def m_reset_thread_fpu(img: Image) -> str:
    """The FPU control state (x87 control word and MXCSR: rounding mode,
    exception masks) of every thread but the leader reset to its power-on
    value, the leader's kept: an engine that sets the FPU state of the
    leader only."""
    import struct
    core = img.json("core.json")
    recs = core.get("threads") or []
    if "fs_base" not in core.get("regs", {}):
        raise NoTarget("no x86_64 FPU state in the image")
    if not recs:
        raise NoTarget("a single-threaded process")
    from engine.threads import XSTATE_FILE
    data, off, what = bytearray(img.read(XSTATE_FILE)), 0, []
    for r in recs:
        cw, mx = struct.unpack_from("<H", data, off + FCW_OFF)[0], struct.unpack_from("<I", data, off + MXCSR_OFF)[0]
        if (cw, mx) != (FCW_DEFAULT, MXCSR_DEFAULT):
            struct.pack_into("<H", data, off + FCW_OFF, FCW_DEFAULT)
            struct.pack_into("<I", data, off + MXCSR_OFF, MXCSR_DEFAULT)
            what.append(f"thread {r['tid']} (fcw {cw:#x}, mxcsr {mx:#x})")
        off += r["xstate_size"]
    if not what:
        raise NoTarget("every thread's FPU control state is already the default")
    img.write(XSTATE_FILE, bytes(data))
    return "FPU control reset: " + ", ".join(what)


XMM_OFF, XMM_LEN = 160, 256          # XMM0-15 in the XSAVE area's legacy region
YMMH_OFF, YMMH_LEN = 576, 256        # their upper halves (YMM_Hi128), the first extended component


def _threaded(img: Image) -> List[Tuple[str, dict]]:
    """(image dir, core.json) of the dumped process and of every tree
    member that has threads besides its leader, root first."""
    dirs = [""] + [m["dir"] for m in _members(img)[1:] if m.get("dir") and not m.get("zombie")]
    out = []
    for d in dirs:
        if d + "core.json" in img.manifest["files"] and img.json(d + "core.json").get("threads"):
            out.append((d, img.json(d + "core.json")))
    return out


def m_zero_thread_vectors(img: Image) -> str:
    """The vector registers (XMM0-15 and their AVX upper halves) of every
    thread but the leader come back as zeros, their control state kept: an
    engine that gives threads an FPU state of their own but not its
    contents."""
    import struct
    from engine.threads import XSTATE_FILE
    what = []
    for d, core in _threaded(img):
        if "fs_base" not in core.get("regs", {}):
            raise NoTarget("no x86_64 FPU state in the image")
        data, off, hit = bytearray(img.read(d + XSTATE_FILE)), 0, False
        for r in core["threads"]:
            size = r["xstate_size"]
            spans = [(XMM_OFF, XMM_LEN)]
            if size >= YMMH_OFF + YMMH_LEN and struct.unpack_from("<Q", data, off + 512)[0] & 4:
                spans.append((YMMH_OFF, YMMH_LEN))
            if any(any(data[off + a:off + a + n]) for a, n in spans):
                for a, n in spans:
                    data[off + a:off + a + n] = bytes(n)
                what.append(str(r["tid"]))
                hit = True
            off += size
        if hit:
            img.write(d + XSTATE_FILE, bytes(data))
    if not what:
        raise NoTarget("no thread besides a leader with vector registers in use")
    return "vector registers zeroed in threads " + ", ".join(what)


def m_pending_to_thread(img: Image) -> str:
    """The signals pending for the whole process (its shared queue) come
    back pending for the leader alone: the same signals, the same values,
    but no other thread can take them any more, and /proc's ShdPnd and
    SigPnd tell."""
    core = img.json("core.json")
    sig = core.get("signals") or {}
    if not sig.get("shared"):
        raise NoTarget("no process-wide pending signal")
    moved = sig["shared"]
    sig["thread"] = list(sig.get("thread") or []) + moved
    sig["shared"] = []
    img.put_json("core.json")
    return f"{len(moved)} process-wide pending signal(s) ({sorted({s.get('signo') for s in moved})}) -> the leader's queue"


def m_pending_to_process(img: Image) -> str:
    """The signals pending for the leader alone (its own queue: tgkill,
    pthread_kill) come back pending for the whole process: any thread may
    take them now, and /proc's SigPnd and ShdPnd tell."""
    core = img.json("core.json")
    sig = core.get("signals") or {}
    if not sig.get("thread"):
        raise NoTarget("no signal pending for the leader alone")
    moved = sig["thread"]
    sig["shared"] = list(sig.get("shared") or []) + moved
    sig["thread"] = []
    img.put_json("core.json")
    return f"{len(moved)} signal(s) pending for the leader ({sorted({s.get('signo') for s in moved})}) -> process-wide"


def _mem_at(img: Image, addr: int) -> Tuple[str, int]:
    """(page file, offset) of the byte at `addr` in the image's memory."""
    files = _page_files(img)
    for v in img.json("mm.json")["vmas"]:
        if v["start"] <= addr < v["end"]:
            for a, n, fi, off in v.get("pages") or []:
                if a <= addr < a + n * PAGE:
                    return files[fi], off + addr - a
            raise NoTarget(f"the page of {addr:#x} is not in the image")
    raise NoTarget(f"no mapping holds {addr:#x}")


def m_corrupt_environ(img: Image) -> str:
    """One character of the environment strings (in the stack, between
    env_start and env_end) changed: the last one of the last variable."""
    mm = img.json("core.json").get("mm") or {}
    if not mm.get("env_end") or mm["env_end"] - mm.get("env_start", 0) < 2:
        raise NoTarget("no environment")
    addr = mm["env_end"] - 2            # env_end - 1 is the last string's NUL
    name, off = _mem_at(img, addr)
    old = img.read(name)[off:off + 1]
    if old == b"\0":
        raise NoTarget("the environment ends in an empty string")
    new = b"X" if old != b"X" else b"Y"
    img.pwrite(name, new, off)
    return f"environment byte at {addr:#x}: {old!r} -> {new!r}"


def m_reset_personality(img: Image) -> str:
    core = img.json("core.json")
    if not core.get("personality"):
        raise NoTarget("the personality is already the default (0)")
    old, core["personality"] = core["personality"], 0
    img.put_json("core.json")
    return f"personality {old:#x} -> 0"


def m_reset_timer_slack(img: Image) -> str:
    """Every thread's timer slack back to its default (the value it
    returns to): an engine that does not set PR_SET_TIMERSLACK."""
    core = img.json("core.json")
    what = []
    for who, rec in _tasks(core):
        s = rec.get("sched") or {}
        if "timerslack_ns" in s and s["timerslack_ns"] != s.get("default_timerslack_ns"):
            what.append(f"{who} {s['timerslack_ns']} -> {s['default_timerslack_ns']}")
            s["timerslack_ns"] = s["default_timerslack_ns"]
    if not what:
        raise NoTarget("every timer slack is its default")
    img.put_json("core.json")
    return "timer slack: " + ", ".join(what)


def m_lose_no_new_privs(img: Image) -> str:
    core = img.json("core.json")
    creds = core.get("creds") or {}
    if str(creds.get("no_new_privs", "0")) == "0":
        raise NoTarget("no_new_privs is not set")
    creds["no_new_privs"] = "0"
    img.put_json("core.json")
    return "no_new_privs 1 -> 0"


def m_reset_dumpable(img: Image) -> str:
    """The dumpable flag alone back to 1 (a restore that changes
    credentials resets it, as the kernel does on setuid)."""
    attrs = img.json("core.json").get("attrs") or {}
    if attrs.get("dumpable", 1) == 1:
        raise NoTarget("the process is dumpable already")
    old, attrs["dumpable"] = attrs["dumpable"], 1
    img.put_json("core.json")
    return f"dumpable {old} -> 1"


def m_lose_rseq(img: Image) -> str:
    """The leader's rseq area is not registered again: glibc still
    believes it is (its cpu_id field keeps the last value the old process's
    kernel wrote; restartable sequences are never aborted)."""
    core = img.json("core.json")
    old = core.get("rseq")
    if not old or not old.get("pointer"):
        raise NoTarget("no rseq registration")
    core["rseq"] = dict(old, pointer=0)
    img.put_json("core.json")
    return f"rseq {old['pointer']:#x}/{old.get('size')} -> unregistered"


def _tree_child(img: Image, pred, what: str) -> Tuple[dict, dict]:
    tree = img.json("tree.json") if "tree.json" in img.manifest["files"] else None
    members = (tree or {}).get("members") or []
    for m in members[1:]:
        if pred(m, members[0]):
            return tree, m
    raise NoTarget(what)


def m_regroup_tree_child(img: Image) -> str:
    """A child in its parent's process group comes back leading a group of
    its own (setpgid(0, 0)): a job-control signal to the group misses it."""
    tree, m = _tree_child(img, lambda m, root: not m.get("zombie") and m["pgid"] != m["pid"]
                          and m["sid"] != m["pid"], "no tree child in another's process group")
    old, m["pgid"] = m["pgid"], m["pid"]
    img.put_json("tree.json")
    core = img.json(m["dir"] + "core.json")       # which ckpt checks against tree.json
    core["session"]["pgid"] = m["pid"]
    img.put_json(m["dir"] + "core.json")
    return f"member {m['pid']}: process group {old} -> {m['pid']} (its own)"


def m_resession_tree_child(img: Image) -> str:
    """A child in its parent's session comes back leading a session (and a
    group) of its own (setsid): out of its parent's job control and
    terminal."""
    tree, m = _tree_child(img, lambda m, root: not m.get("zombie") and m["sid"] != m["pid"],
                          "no live tree child in another's session")
    old = (m["sid"], m["pgid"])
    m["sid"] = m["pgid"] = m["pid"]
    img.put_json("tree.json")
    core = img.json(m["dir"] + "core.json")
    core["session"].update(sid=m["pid"], pgid=m["pid"])
    img.put_json(m["dir"] + "core.json")
    return f"member {m['pid']}: (session, group) {old} -> its own"


def m_tree_exit_signal(img: Image) -> str:
    """A child comes back with another exit signal (SIGURG, ignored by
    default, for SIGCHLD): its parent gets no SIGCHLD, and a plain
    waitpid() no longer sees it (a clone child)."""
    tree, m = _tree_child(img, lambda m, root: not m.get("zombie") and m["exit_signal"] == 17,
                          "no live tree child with exit signal SIGCHLD")
    m["exit_signal"] = 23
    img.put_json("tree.json")
    core = img.json(m["dir"] + "core.json")
    if core.get("exit_signal") == 17:
        core["exit_signal"] = 23
        img.put_json(m["dir"] + "core.json")
    return f"member {m['pid']}: exit signal SIGCHLD -> SIGURG"


def m_merge_open_files(img: Image) -> str:
    """Two fds that opened one file each for themselves come back sharing
    one open file (the second a dup of the first: its offset and status
    flags the first's): an engine that reopens a path once."""
    fds = img.json("fds.json")
    seen: Dict[tuple, dict] = {}
    for r in sorted(_leaders(fds), key=lambda r: r["fd"]):
        f = r.get("file") if isinstance(r.get("file"), dict) else None
        if r["kind"] != "regular" or not f:
            continue
        key = (f.get("dev"), f.get("ino"))
        first = seen.setdefault(key, r)
        if first is not r:
            lead = {k: v for k, v in r.items() if k in ("fd", "cloexec", "link")}
            r.clear()
            r.update(lead, kind=first["kind"], dup_of=first["fd"], flags=first["flags"], pos=first["pos"])
            img.put_json("fds.json")
            return f"fd {r['fd']} (its own open of {f.get('path')}) -> a dup of fd {first['fd']}"
    raise NoTarget("no file opened twice on its own")


ADVICE = ("dc", "dd", "wf", "hg", "nh")     # the madvise VmFlags ckpt sets again (engine/check.py MADVISE_FLAGS)


def m_drop_madvise(img: Image) -> str:
    """One madvise advice (don't fork, don't dump, wipe on fork, (no)
    huge pages) of the largest mapping that has one is not given again:
    an engine that maps memory back with its protection only."""
    mm = img.json("mm.json")
    cands = [v for v in mm["vmas"] if any(f in ADVICE for f in v.get("flags") or [])
             and not v["path"].startswith("[")]       # [vvar] and the like: the kernel's
    if not cands:
        raise NoTarget("no mapping with madvise advice")
    v = max(cands, key=lambda v: (v["end"] - v["start"], -v["start"]))
    f = next(f for f in v["flags"] if f in ADVICE)
    v["flags"] = [x for x in v["flags"] if x != f]
    img.put_json("mm.json")
    return f"mapping {v['start']:#x}-{v['end']:#x} {v['path'] or '(anonymous)'} loses VmFlags {f}"


def m_drop_capability(img: Image) -> str:
    """The highest capability in the effective set is left out of it (still
    permitted): the process finds EPERM where it had the right."""
    caps = (img.json("core.json").get("creds") or {}).get("caps") or {}
    eff = int(caps.get("CapEff") or "0", 16)
    if not eff:
        raise NoTarget("no effective capability")
    bit = eff.bit_length() - 1
    caps["CapEff"] = f"{eff & ~(1 << bit):016x}"
    img.put_json("core.json")
    return f"capability {bit} dropped from the effective set"


def m_reset_cgroup(img: Image) -> str:
    """The process comes back in the root cgroup of every hierarchy (ckpt's
    own would do as well): out of its service's limits and accounting."""
    core = img.json("core.json")
    moved = [f"{c or 'v2'}:{path}" for c, path in core.get("cgroups") or [] if path != "/"]
    if not moved:
        raise NoTarget("the process is in the root cgroup everywhere")
    core["cgroups"] = [[c, "/"] for c, _ in core["cgroups"]]
    img.put_json("core.json")
    return "cgroups -> / (were " + ", ".join(moved) + ")"


def m_reset_oom_score_adj(img: Image) -> str:
    core = img.json("core.json")
    s = core.get("sched") or {}
    if not s.get("oom_score_adj"):
        raise NoTarget("oom_score_adj is already 0")
    old, s["oom_score_adj"] = s["oom_score_adj"], 0
    img.put_json("core.json")
    return f"oom_score_adj {old} -> 0"


def m_reset_winsize(img: Image) -> str:
    """A pty pair comes back with a fresh pty's window size (0 x 0): a
    full-screen program draws for no screen until the next SIGWINCH."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r.get("tty") == "master" and any(r.get("winsize") or []),
               "no pty master with a window size")
    old, r["winsize"] = r["winsize"], [0] * len(r["winsize"])
    img.put_json("fds.json")
    return f"pty {r.get('index')} (master fd {r['fd']}): window size {old} -> {r['winsize']}"


def m_narrow_signalfd(img: Image) -> str:
    """A signalfd comes back without the lowest signal of its mask: that
    signal is no longer read through it."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r["kind"] == "signalfd" and r.get("sigmask"), "no signalfd with a mask")
    m = r["sigmask"]
    low = (m & -m).bit_length()
    r["sigmask"] = m & (m - 1)
    img.put_json("fds.json")
    return f"signalfd fd {r['fd']}: signal {low} left out of its mask"


def _ghost_records(node, gid: str):
    """Every ghost record naming `gid`, anywhere in a JSON document."""
    if isinstance(node, dict):
        if node.get("ghost") == gid and "data_sha256" in node:
            yield node
        for v in node.values():
            yield from _ghost_records(v, gid)
    elif isinstance(node, list):
        for v in node:
            yield from _ghost_records(v, gid)


def m_corrupt_ghost_byte(img: Image) -> str:
    """One byte of a deleted (or memfd) file's saved contents changed, its
    record's digest made to match: the file comes back with a wrong byte.
    The middle byte of the first ghost with data."""
    names = sorted(n for n in img.manifest["files"] if n.startswith("ghosts/") and n.endswith(".data")
                   and img.manifest["files"][n].get("size"))
    if not names:
        raise NoTarget("no deleted file with contents")
    name = names[0]
    data = bytearray(img.read(name))
    at = len(data) // 2
    data[at] ^= 0x5A
    img.write(name, bytes(data))
    gid = name[len("ghosts/"):-len(".data")]
    digest = hashlib.sha256(data).hexdigest()
    for doc in sorted(n for n in img.manifest["files"] if n.endswith(".json") and n != MANIFEST):
        recs = list(_ghost_records(img.json(doc), gid))
        for r in recs:
            r["data_sha256"] = digest
        if recs:
            img.put_json(doc)
    return f"ghost {gid}: byte {at} of {len(data)} changed"


def m_drop_groups(img: Image) -> str:
    creds = img.json("core.json").get("creds") or {}
    if not creds.get("groups"):
        raise NoTarget("no supplementary group")
    old, creds["groups"] = creds["groups"], []
    img.put_json("core.json")
    return f"supplementary groups {old} -> none"


def m_reset_sched(img: Image) -> str:
    """The leader's scheduling policy, priority and nice back to a plain
    SCHED_OTHER at nice 0 (its threads keep theirs)."""
    core = img.json("core.json")
    s = core.get("sched") or {}
    attr = s.get("attr") or {}
    if not (attr.get("policy") or attr.get("priority") or attr.get("nice") or s.get("nice")):
        raise NoTarget("the leader is SCHED_OTHER at nice 0")
    old = (attr.get("policy"), attr.get("nice"))
    attr.update(policy=0, priority=0, nice=0, flags=0)
    s["nice"] = 0
    img.put_json("core.json")
    return f"leader's (policy, nice) {old} -> (0, 0)"


def m_drop_seccomp(img: Image) -> str:
    """The seccomp filters are not installed again: a sandboxed process
    comes back unsandboxed."""
    core = img.json("core.json")
    sc = core.get("seccomp") or {}
    if not sc.get("mode"):
        raise NoTarget("no seccomp")
    old = (sc.get("mode"), len(sc.get("filters") or []))
    core["seccomp"] = {"filters": [], "mode": 0}
    for t in core.get("threads") or []:
        if isinstance(t.get("seccomp"), dict):
            t["seccomp"] = {"filters": [], "mode": 0}
    img.put_json("core.json")
    return f"seccomp (mode, filters) {old} -> (0, 0)"


def m_rename_process(img: Image) -> str:
    core = img.json("core.json")
    old = core.get("comm")
    if not old:
        raise NoTarget("no name")
    core["comm"] = "ckpt-restore" if old != "ckpt-restore" else "ckpt"
    img.put_json("core.json")
    return f"comm {old!r} -> {core['comm']!r}"


def m_lose_thread_robust_list(img: Image) -> str:
    """A thread besides the leader loses its robust futex list."""
    core = img.json("core.json")
    t = next((t for t in core.get("threads") or [] if (t.get("robust_list") or [0])[0]), None)
    if t is None:
        raise NoTarget("no thread besides the leader with a robust list")
    old, t["robust_list"] = t["robust_list"], [0, t["robust_list"][1]]
    img.put_json("core.json")
    return f"thread {t['tid']}: robust list {old[0]:#x} -> none"


def m_lose_thread_tid_address(img: Image) -> str:
    """Every thread besides the leader loses its clear_child_tid: when one
    exits, nothing wakes a pthread_join of it (and glibc never frees its
    stack)."""
    core = img.json("core.json")
    ts = [t for t in core.get("threads") or [] if t.get("tid_address")]
    if not ts:
        raise NoTarget("no thread besides the leader with a clear_child_tid")
    for t in ts:
        t["tid_address"] = 0
    img.put_json("core.json")
    return f"threads {[t['tid'] for t in ts]}: clear_child_tid -> none"


def m_drop_udp_datagram(img: Image) -> str:
    """The last datagram queued on a UDP socket is not queued again."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: str(r.get("sock", "")).startswith("udp") and r.get("msgs") and r.get("data"),
               "no UDP socket with datagrams queued")
    m = r["msgs"].pop()
    data = img.read(r["data"])
    img.write(r["data"], data[:len(data) - m["len"]])
    img.put_json("fds.json")
    return f"udp fd {r['fd']}: its last queued datagram ({m['len']} bytes from {m.get('src')}) dropped"


ECHO, LFLAG_OFF = 0o10, 12          # struct termios(2): c_iflag, c_oflag, c_cflag, c_lflag (u32 each)


def m_flip_termios_echo(img: Image) -> str:
    """A pty pair comes back with ECHO flipped in its termios: typed
    characters echoed that were not, or not that were."""
    import struct
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r.get("tty") == "master" and r.get("termios"), "no pty master with termios")
    t = bytearray(bytes.fromhex(r["termios"]))
    lflag = struct.unpack_from("<I", t, LFLAG_OFF)[0]
    struct.pack_into("<I", t, LFLAG_OFF, lflag ^ ECHO)
    r["termios"] = t.hex()
    img.put_json("fds.json")
    return f"pty {r.get('index')}: ECHO {'on -> off' if lflag & ECHO else 'off -> on'}"


def m_drop_pty_byte(img: Image) -> str:
    """The last byte queued in a pty pair is dropped: of the bytes waiting
    for the master's reader (the program's output), else of the raw-mode
    input waiting for the slave's reader. Its count is made to match, so
    the refill check agrees."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r.get("tty") == "master" and not r.get("outside")
               and (r.get("out") or (r.get("in") and "in_lines" not in r)), "no pty with raw bytes queued")
    name = "out" if r.get("out") else "in"
    data = img.read(r[name])
    img.write(r[name], data[:-1])
    r[f"{name}_len"] = len(data) - 1
    img.put_json("fds.json")
    return f"pty {r.get('index')} (master fd {r['fd']}): last of {len(data)} bytes queued " \
           f"{'for the master' if name == 'out' else 'for the slave'} dropped"


def m_drop_fd_owner(img: Image) -> str:
    """One open file's F_SETOWN owner and F_SETSIG signal are not set again
    (its O_ASYNC flag is): SIGIO, SIGURG and lease breaks go nowhere, or
    come as SIGIO instead of the signal the process waits for."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: isinstance(r.get("async"), dict)
               and (r["async"].get("owner") or r["async"].get("signal")), "no fd with an F_SETOWN owner or signal")
    old = dict(r["async"])
    r["async"].update(owner=0, signal=0)
    img.put_json("fds.json")
    return f"fd {r['fd']}: owner {old.get('owner')} (type {old.get('owner_type')}), signal {old.get('signal')} -> none"


def m_reset_autogroup_nice(img: Image) -> str:
    """A session leader's scheduling autogroup comes back at nice 0 (the
    one setsid(2) gives): the session's share of the CPU changes."""
    attrs = img.json("core.json").get("attrs") or {}
    if not attrs.get("autogroup_nice"):
        raise NoTarget("no autogroup nice other than 0")
    old, attrs["autogroup_nice"] = attrs["autogroup_nice"], 0
    img.put_json("core.json")
    return f"autogroup nice {old} -> 0"


def m_netlink_autobind(img: Image) -> str:
    """A netlink socket is not bound again: the kernel binds it on its
    first send, to the pid when that is free, so only a socket whose port
    id was not the pid comes back with another one (replies and
    multicast addressed to the old port go nowhere)."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r.get("sock") == "netlink" and r.get("portid") and not r.get("groups"),
               "no bound netlink socket without multicast groups")
    old, r["portid"] = r["portid"], 0
    img.put_json("fds.json")
    return f"netlink fd {r['fd']}: port id {old} -> unbound (the kernel picks one)"


def m_ping_unbound(img: Image) -> str:
    """A ping socket comes back unbound: the kernel picks another ident at
    its first send, and echo replies to the old one go nowhere."""
    fds = img.json("fds.json")
    r = _first(_leaders(fds), lambda r: r.get("sock") == "ping" and r.get("addr") and r["addr"][1],
               "no ping socket bound to an ident")
    old, r["addr"] = r["addr"], None
    img.put_json("fds.json")
    return f"ping fd {r['fd']}: bound to {old[0]} ident {old[1]} -> unbound"


def m_reset_ids(img: Image) -> str:
    """The real, effective, saved and filesystem uids and gids come back as
    the restorer's (root's): a daemon that keeps an unprivileged id in its
    saved set (to switch to it later) finds root there instead."""
    creds = img.json("core.json").get("creds") or {}
    old = (creds.get("uid"), creds.get("gid"))
    if not any(creds.get("uid") or []) and not any(creds.get("gid") or []):
        raise NoTarget("every uid and gid is already 0")
    creds["uid"] = [0] * len(creds["uid"])
    creds["gid"] = [0] * len(creds["gid"])
    img.put_json("core.json")
    return f"uids {old[0]} gids {old[1]} -> 0"


def _all_tasks(img: Image) -> List[Tuple[str, str, dict]]:
    """(image dir, what, task record) of every thread of the dumped process
    and of every tree member, root first."""
    dirs = [""] + [m["dir"] for m in _members(img)[1:] if m.get("dir") and not m.get("zombie")]
    return [(d, what, rec) for d in dirs if d + "core.json" in img.manifest["files"]
            for what, rec in _tasks(img.json(d + "core.json"))]


def m_lose_chroot(img: Image) -> str:
    """A chrooted process comes back with the restorer's root directory: an
    engine that restores the cwd but never chroot()s (the first process of
    the image that has a root of its own)."""
    dirs = [""] + [m["dir"] for m in _members(img)[1:] if m.get("dir") and not m.get("zombie")]
    for d in dirs:
        if d + "core.json" in img.manifest["files"] and img.json(d + "core.json").get("root"):
            core = img.json(d + "core.json")
            old, core["root"] = core["root"], None
            img.put_json(d + "core.json")
            return f"{d or 'the process'}: root directory {old['path']} -> the restorer's"
    raise NoTarget("no chrooted process")


def m_lose_syscall_dispatch(img: Image) -> str:
    """Syscall user dispatch (PR_SET_SYSCALL_USER_DISPATCH) is not set
    again on the first task that had it on: its calls from outside the
    allowed range run instead of raising SIGSYS."""
    for d, what, rec in _all_tasks(img):
        if rec.get("sud"):
            old, rec["sud"] = rec["sud"], None
            img.put_json(d + "core.json")
            return f"{d}{what}: syscall user dispatch (selector {old['selector']:#x}) -> off"
    raise NoTarget("no task with syscall user dispatch on")


def m_leader_eintr_not_restart(img: Image) -> str:
    """The leader (the main thread) alone, dumped inside an interrupted call
    that must restart, returns EINTR from it instead; its other threads
    restart theirs (eintr-not-restart breaks them all)."""
    from engine.arch import x86_64
    core = img.json("core.json")
    r = core.get("regs", {})
    if "orig_rax" not in r:
        raise NoTarget("not x86_64 registers (aarch64 keeps the restart decision outside them)")
    nr, err = r["orig_rax"] - U64 if r["orig_rax"] >= 2 ** 63 else r["orig_rax"], U64 - r["rax"]
    if not (nr >= 0 and (err in ERESTARTS or (err == EINTR and nr in x86_64.FREEZE_EINTR))):
        raise NoTarget("the leader is not inside an interrupted call")
    r["rax"], r["orig_rax"] = U64 - EINTR, U64 - 1
    img.put_json("core.json")
    return f"the leader's call {nr} returns EINTR instead of restarting"


def _sysv_attaches(img: Image) -> List[Tuple[str, dict]]:
    """(mm.json name, mapping) of every System V attach in the image, in
    member order (engine/sysvshm.py: each carries its segment's record)."""
    out = []
    for d in [""] + [m["dir"] for m in _members(img)[1:] if m.get("dir") and not m.get("zombie")]:
        name = d + "mm.json"
        if name in img.manifest["files"]:
            out += [(name, v) for v in img.json(name)["vmas"] if v.get("sysv")]
    return out


def m_corrupt_sysv_shm_byte(img: Image) -> str:
    """One byte of a System V segment's contents changes (a segment made
    again but filled wrongly, or from the wrong pages): the first non-zero
    byte of the first segment whose pages hold one, flipped."""
    files = _page_files(img)
    for _, v in _sysv_attaches(img):
        for addr, n, fi, off in v["pages"]:
            data = img.read(files[fi])[off: off + n * PAGE]
            at = next((i for i, b in enumerate(data) if b), None)
            if at is not None:
                img.pwrite(files[fi], bytes([data[at] ^ 0xFF]), off + at)
                return f"System V segment {v['sysv']['shmid']}: byte {addr - v['start'] + at:#x} flipped"
    raise NoTarget("no System V segment with a non-zero byte")


def m_keep_sysv_shm(img: Image) -> str:
    """A removed System V segment (IPC_RMID while attached: it lives on
    only while attached) comes back not removed: it outlives the process
    and stays in the namespace, visible and attachable by key or id."""
    from engine.sysvshm import SHM_DEST
    hits = [(name, v) for name, v in _sysv_attaches(img) if v["sysv"]["mode"] & SHM_DEST]
    if not hits:
        raise NoTarget("no removed System V segment")
    shmid = hits[0][1]["sysv"]["shmid"]
    for name, v in hits:
        if v["sysv"]["shmid"] == shmid:
            v["sysv"]["mode"] &= ~SHM_DEST
            img.put_json(name)
    return f"System V segment {shmid}: SHM_DEST dropped (not removed again)"


def m_shift_sysv_shmid(img: Image) -> str:
    """A System V segment comes back under another id (the next index):
    an engine that makes segments again but lets the kernel pick their ids,
    so the id a process saved (and passes to shmctl) names another one."""
    hits = _sysv_attaches(img)
    if not hits:
        raise NoTarget("no System V segment")
    shmid = hits[0][1]["sysv"]["shmid"]
    taken = {v["sysv"]["shmid"] for _, v in hits}
    new = shmid + 1
    while new in taken:
        new += 1
    for name, v in hits:
        if v["sysv"]["shmid"] == shmid:
            v["sysv"]["shmid"] = v["inode"] = new
            img.put_json(name)
    return f"System V segment {shmid} -> id {new}"


def m_merge_split_mappings(img: Image) -> str:
    """Two adjacent mappings the original kept apart come back as one: the
    first pair alike in all but their anonymous memory's anon_vma (a forked
    child's inherited mapping and one it made beside it, a region moved
    beside another: engine/build.py kept_apart, which a restore must keep
    apart) has its two records joined into one, so the restore maps them as
    one mapping. The same bytes at the same addresses, but /proc/PID/maps
    shows one mapping where there were two, and an mremap across the seam,
    which failed (EFAULT), now succeeds."""
    from engine.build import kept_apart
    dirs = [""] + [m["dir"] for m in _members(img)[1:] if m.get("dir") and not m.get("zombie")]
    for d in dirs:
        name = d + "mm.json"
        if name not in img.manifest["files"]:
            continue
        vmas = img.json(name)["vmas"]
        apart = kept_apart(vmas)
        for i in range(1, len(vmas)):
            a, b = vmas[i - 1], vmas[i]
            if b["start"] in apart and a["end"] == b["start"]:
                a["end"] = b["end"]
                a["pages"] = a["pages"] + b["pages"]
                a["pages_bytes"] = a.get("pages_bytes", 0) + b.get("pages_bytes", 0)
                del vmas[i]
                img.put_json(name)
                return f"{d or 'the process'}: mappings {a['start']:#x}-{b['start']:#x} and " \
                       f"{b['start']:#x}-{b['end']:#x} ({b['kind']} {b['perms']}) mapped as one"
    raise NoTarget("no adjacent mappings kept apart")


def m_drop_fd(img: Image) -> str:
    """The highest-numbered fd is not restored (a kind an engine skips)."""
    fds = img.json("fds.json")
    if not fds:
        raise NoTarget("no fd")
    r = max(fds, key=lambda r: r["fd"])
    if any(o.get("dup_of") == r["fd"] and o is not r for o in fds):
        raise NoTarget(f"fd {r['fd']} leads others")
    fds.remove(r)
    img.put_json("fds.json")
    return f"fd {r['fd']} ({r['kind']}) not restored"


EDITS: Dict[str, Tuple[Callable[[Image], str], str]] = {
    "drop-offset": (m_drop_offset, "one file fd's offset restored as 0"),
    "drop-append": (m_drop_append, "one file fd loses O_APPEND"),
    "zero-page": (m_zero_page, "one page of anonymous memory restored as zeros"),
    "lose-timerfd-ticks": (m_lose_timerfd_ticks, "a timerfd's unread expirations are lost"),
    "swap-epoll-data": (m_swap_epoll_data, "two epoll registrations' data swapped"),
    "drop-pipe-byte": (m_drop_pipe_byte, "one queued pipe/fifo byte dropped"),
    "ghost-mode-0644": (m_ghost_mode, "a deleted-but-open file restored with mode 0644"),
    "lose-sigmask": (m_lose_sigmask, "the blocked-signal mask is lost"),
    "reset-rlimits": (m_reset_rlimits, "rlimits reset to the defaults"),
    "change-umask": (m_change_umask, "the umask changes"),
    "split-shared-fds": (m_split_shared, "two fds sharing one open file become two open files"),
    "lose-cloexec": (m_lose_cloexec, "one fd loses close-on-exec"),
    "lose-nonblock": (m_lose_nonblock, "one fd loses O_NONBLOCK"),
    "drop-unix-message": (m_drop_unix_message, "one queued unix-socket message dropped"),
    "drop-tcp-byte": (m_drop_tcp_byte, "one byte of a TCP connection's receive queue dropped"),
    "shift-inotify-wd": (m_shift_inotify_wd, "an inotify watch comes back under another wd"),
    "drop-eventfd-count": (m_drop_eventfd_count, "an eventfd's count is lost"),
    "revive-dead-pidfd": (m_revive_dead_pidfd, "a dead process's pidfd comes back naming a live one"),
    "lose-sigaction": (m_lose_sigaction, "one signal's action reset to SIG_DFL"),
    "change-mprotect": (m_change_mprotect, "a read-only mapping comes back writable"),
    "lose-cwd": (m_lose_cwd, "the working directory becomes /"),
    "reset-process-attrs": (m_reset_process_attrs, "the I/O priority and process attributes (core dump filter, "
                            "dumpable, subreaper, ...) reset to the restorer's"),
    "unshare-tree-memory": (m_unshare_tree_memory, "a MAP_SHARED mapping of two tree members becomes two copies"),
    "split-shmem-parts": (m_split_shmem_parts, "two mappings of one shared anonymous object come back as two objects"),
    "drop-cow-page": (m_drop_cow_page, "a private file mapping's written page comes back as the file's bytes"),
    "reset-thread-sched": (m_reset_thread_sched, "every thread gets the leader's nice, policy and CPU affinity"),
    "swap-thread-tls": (m_swap_thread_tls, "two threads' thread pointers (TLS, pthread_self) swapped"),
    "reset-mxcsr": (m_reset_mxcsr, "the SSE control register (MXCSR: rounding, exception masks) reset"),
    "reset-sockopt": (m_reset_sockopt, "one socket option the process set comes back as a fresh socket's"),
    "disarm-posix-timer": (m_disarm_posix_timer, "one armed POSIX timer comes back disarmed"),
    "reset-itimers": (m_reset_itimers, "the interval timers (setitimer) come back disarmed"),
    "double-pending-signal": (m_double_pending_signal, "one pending real-time signal queued twice"),
    "drop-file-lock": (m_drop_file_lock, "one file lock is not taken again"),
    "move-brk": (m_move_brk, "the program break comes back a page off, its [heap] mapping as dumped"),
    "drop-thread": (m_drop_thread, "one thread of a multi-threaded process is not restored"),
    "lose-thread-sigmask": (m_lose_thread_sigmask, "a thread besides the leader loses its blocked-signal mask"),
    "rename-thread": (m_rename_thread, "a thread besides the leader gets the leader's name"),
    "restorer-auxv": (m_restorer_auxv, "the auxiliary vector comes back as the restorer's"),
    "share-to-private": (m_share_to_private, "a MAP_SHARED file mapping comes back MAP_PRIVATE"),
    "drop-tree-child": (m_drop_tree_child, "one child of a process tree is not restored"),
    "lose-robust-list": (m_lose_robust_list, "the leader's robust futex list is not registered again"),
    "lose-sigaltstack": (m_lose_sigaltstack, "the alternate signal stack is lost"),
    "eintr-not-restart": (m_eintr_not_restart, "a call interrupted by the freeze returns EINTR instead of restarting"),
    "clobber-thread-regs": (m_clobber_thread_regs, "a thread besides the leader loses its callee-saved registers"),
    "reset-thread-fpu": (m_reset_thread_fpu, "the threads besides the leader lose their FPU control state "
                         "(rounding, exception masks)"),
    "zero-thread-vectors": (m_zero_thread_vectors, "the threads besides the leader lose their vector registers' "
                            "contents"),
    "pending-to-thread": (m_pending_to_thread, "process-wide pending signals come back pending for the leader only"),
    "pending-to-process": (m_pending_to_process, "signals pending for the leader alone come back pending "
                           "for the process"),
    "corrupt-environ": (m_corrupt_environ, "one character of the environment strings changes"),
    "reset-personality": (m_reset_personality, "the personality comes back as 0"),
    "reset-timer-slack": (m_reset_timer_slack, "the timer slack comes back as its default"),
    "lose-no-new-privs": (m_lose_no_new_privs, "no_new_privs is lost"),
    "reset-dumpable": (m_reset_dumpable, "a non-dumpable process comes back dumpable"),
    "lose-rseq": (m_lose_rseq, "the leader's rseq area is not registered again"),
    "regroup-tree-child": (m_regroup_tree_child, "a tree child comes back leading a process group of its own"),
    "resession-tree-child": (m_resession_tree_child, "a tree child comes back leading a session of its own"),
    "tree-exit-signal": (m_tree_exit_signal, "a tree child comes back with SIGURG as its exit signal"),
    "drop-fd": (m_drop_fd, "the highest-numbered fd is not restored"),
    "merge-split-mappings": (m_merge_split_mappings, "two adjacent mappings the original kept apart (their "
                             "anon_vmas) come back merged into one"),
    "corrupt-sysv-shm-byte": (m_corrupt_sysv_shm_byte, "one byte of a System V shared memory segment changes"),
    "keep-sysv-shm": (m_keep_sysv_shm, "a removed System V segment comes back not removed (it outlives the process)"),
    "shift-sysv-shmid": (m_shift_sysv_shmid, "a System V segment comes back under another id"),
    "drop-madvise": (m_drop_madvise, "one mapping loses one madvise advice (VmFlags dc, dd, wf, hg, nh)"),
    "drop-capability": (m_drop_capability, "one capability is left out of the effective set"),
    "reset-cgroup": (m_reset_cgroup, "the process comes back in the root cgroup of every hierarchy"),
    "reset-oom-score-adj": (m_reset_oom_score_adj, "oom_score_adj comes back as 0"),
    "reset-winsize": (m_reset_winsize, "a pty pair comes back with a fresh pty's window size"),
    "narrow-signalfd": (m_narrow_signalfd, "a signalfd loses one signal of its mask"),
    "corrupt-ghost-byte": (m_corrupt_ghost_byte, "one byte of a deleted file's contents changes"),
    "drop-groups": (m_drop_groups, "the supplementary groups are lost"),
    "reset-sched": (m_reset_sched, "the leader's scheduling policy and nice come back as SCHED_OTHER, 0"),
    "drop-seccomp": (m_drop_seccomp, "the seccomp filters are not installed again"),
    "rename-process": (m_rename_process, "the process comes back under another name (comm)"),
    "lose-thread-robust-list": (m_lose_thread_robust_list, "a thread besides the leader loses its robust futex list"),
    "lose-thread-tid-address": (m_lose_thread_tid_address, "the threads besides the leader lose their "
                                "clear_child_tid"),
    "drop-udp-datagram": (m_drop_udp_datagram, "one queued UDP datagram dropped"),
    "flip-termios-echo": (m_flip_termios_echo, "a pty comes back with ECHO flipped in its termios"),
    "merge-open-files": (m_merge_open_files, "two separate opens of one file come back as one shared open file"),
    "drop-pty-byte": (m_drop_pty_byte, "one byte queued in a pty pair dropped"),
    "drop-fd-owner": (m_drop_fd_owner, "one fd's F_SETOWN owner and F_SETSIG signal are not set again"),
    "netlink-autobind": (m_netlink_autobind, "a netlink socket is left unbound (the kernel picks its port id)"),
    "ping-unbound": (m_ping_unbound, "a ping socket comes back unbound (another ident at its first send)"),
    "reset-autogroup-nice": (m_reset_autogroup_nice, "a session leader's autogroup comes back at nice 0"),
    "reset-ids": (m_reset_ids, "the uids and gids (real, effective, saved, fs) come back as 0"),
    "lose-chroot": (m_lose_chroot, "a chrooted process comes back with the restorer's root directory"),
    "lose-syscall-dispatch": (m_lose_syscall_dispatch, "syscall user dispatch is not set again (no SIGSYS for "
                              "calls outside the allowed range)"),
    "leader-eintr-not-restart": (m_leader_eintr_not_restart, "the main thread's call interrupted by the freeze "
                                 "returns EINTR instead of restarting"),
}


def apply_edit(name: str, img_dir: str) -> str:
    """Apply mutant `name`'s image edit to `img_dir` and re-seal it. Returns
    what it broke; raises NoTarget (image untouched)."""
    img = Image(img_dir)
    what = EDITS[name][0](img)
    img.seal()
    return what


# -- behaviour mutants -----------------------------------------------------------------

def _opt(argv: List[str], *names: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _ckpt(argv: List[str]) -> int:
    from engine import cli
    sys.stdout.flush()
    return cli.main(argv)


def _proc_facts(pid: int) -> dict:
    """What a fresh start needs and how to tell it reached the dumped state."""
    def read(n):
        with open(f"/proc/{pid}/{n}", "rb") as f:
            return f.read()
    status = dict(ln.split(":", 1) for ln in read("status").decode().splitlines() if ":" in ln)
    return {"argv": [a.decode(errors="surrogateescape") for a in read("cmdline").split(b"\0")[:-1]],
            "env": [e.decode(errors="surrogateescape") for e in read("environ").split(b"\0")[:-1]],
            "cwd": os.readlink(f"/proc/{pid}/cwd"), "exe": os.readlink(f"/proc/{pid}/exe"),
            "sigblk": status.get("SigBlk", "").strip(),
            "syscall": read("syscall").split()[0].decode() if read("syscall").split() else ""}


def _exec_fresh(facts: dict) -> None:
    """In a new child: a new session, stdio on /dev/null, no other fds, the
    dumped argv/env/cwd; never returns."""
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)
        os.chdir(facts["cwd"])
        env = dict(e.split("=", 1) for e in facts["env"] if "=" in e)
        os.execve(facts["exe"], facts["argv"], env)
    finally:
        os._exit(127)


def _clone_same_pid(pid: int) -> int:
    """fork(2) under a chosen PID: clone3 with set_tid (the engine's struct
    clone_args). 0 in the child, like fork."""
    from engine.arch import current
    arch = current()
    libc = ctypes.CDLL(None, use_errno=True)
    tid = (ctypes.c_int * 1)(pid)
    args = arch.CloneArgs(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tid), set_tid_size=1)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(435), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))  # clone3
    if ret < 0:
        raise MutantError(f"clone3(set_tid={pid}): errno {ctypes.get_errno()}")
    return ret


def _wait_free(pid: int, seconds: float = 5.0) -> None:
    end = time.monotonic() + seconds
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
        time.sleep(0.01)


def _wait_same_point(pid: int, facts: dict, seconds: float = 20.0) -> None:
    """Until the fresh process blocks the same signals and sleeps in the same
    syscall as the dumped one (a faithful faker hides its start-up)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            now = _proc_facts(pid)
        except (OSError, ValueError):
            time.sleep(0.02)
            continue
        if now["sigblk"] == facts["sigblk"] and now["syscall"] == facts["syscall"]:
            return
        time.sleep(0.02)


def _fake_restore(name: str, argv: List[str], same_pid: bool) -> int:
    img = _opt(argv, "-D", "--images-dir")
    pidfile = _opt(argv, "--pidfile")
    with open(img + SIDE + ".json") as f:
        facts = json.load(f)
    t0 = time.monotonic()
    if same_pid:
        _wait_free(facts["pid"])
        child = _clone_same_pid(facts["pid"])
    else:
        child = os.fork()
    if child == 0:
        _exec_fresh(facts)
    _wait_same_point(child, facts)
    say(name, f"applied: started {facts['argv'][:3]} afresh as pid {child} (dumped pid {facts['pid']})")
    if pidfile:
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{child}\n")
        os.rename(pidfile + ".tmp", pidfile)
    print(json.dumps({"ok": True, "command": "restore",
                      "result": {"pid": child, "restore_ms": round((time.monotonic() - t0) * 1000, 2)}}))
    return 0


def _restart_dump(name: str, argv: List[str]) -> int:
    pid = int(_opt(argv, "-t", "--tree"))
    img = _opt(argv, "-D", "--images-dir")
    facts = dict(_proc_facts(pid), pid=pid)
    rc = _ckpt(argv)
    if rc == 0:
        with open(img + SIDE + ".json", "w") as f:
            json.dump(facts, f)
    return rc


def _older_dump(name: str, argv: List[str]) -> int:
    """An image taken ~0.5 s before the real one (the process ran meanwhile)
    is the one left at DIR."""
    img = _opt(argv, "-D", "--images-dir")
    older = img + SIDE + "-older"
    shutil.rmtree(older, ignore_errors=True)
    first = list(argv)
    first[first.index(img)] = older
    if "--leave-running" not in first:
        first.append("--leave-running")
    import io
    import contextlib
    with contextlib.redirect_stdout(io.StringIO()):
        rc = _ckpt(first)
    if rc != 0:
        shutil.rmtree(older, ignore_errors=True)
        say(name, "no target in image (the first, earlier dump did not succeed)")
        return _ckpt(argv)
    time.sleep(0.5)
    rc = _ckpt(argv)
    if rc == 0:
        newer = img + SIDE + "-newer"
        shutil.rmtree(newer, ignore_errors=True)
        os.rename(img, newer)
        os.rename(older, img)
        say(name, "applied: DIR holds an image taken 0.5 s before the dump")
    else:
        shutil.rmtree(older, ignore_errors=True)
    return rc


def _drop_saved_pending(img_dir: str) -> Optional[str]:
    """An engine that saves pending signals (a core.json key naming
    "pending", a list, or a dict of lists): drop one of them. None when
    the image holds none."""
    img = Image(img_dir)
    core = img.json("core.json")
    # engine/signals.py keeps them as core.json "signals": {"thread": [...], "shared": [...]}
    for key in sorted(k for k in core if "pend" in k.lower() or k == "signals"):
        v = core[key]
        lists = [(key, v)] if isinstance(v, list) else \
            [(f"{key}.{k}", x) for k, x in sorted(v.items()) if isinstance(x, list)] if isinstance(v, dict) else []
        for where, lst in lists:
            if lst:
                lst.pop(0)
                img.put_json("core.json")
                img.seal()
                return f"one of the saved pending signals ({where}) dropped"
    return None


def _no_pending_refusal(name: str, argv: List[str]) -> int:
    """Lose a pending signal. Today's engine refuses pending signals and
    saves none: the mutant skips that refusal, so they are lost. An engine
    that saves them (core.json "pending..."): one is dropped from the image."""
    from engine import check
    orig = check._check_process
    hit = []

    def patched(s, *args, **kw):   # the engine's signature may grow (tree context)
        st = s.status
        pend = {k: st.get(k) for k in ("SigPnd", "ShdPnd") if int(st.get(k, "0") or "0", 16)}
        if pend:
            hit.append(pend)
            s.status = dict(st, **{k: "0000000000000000" for k in pend})
        try:
            return orig(s, *args, **kw)
        finally:
            s.status = st
    check._check_process = patched
    rc = _ckpt(argv)
    img = _opt(argv, "-D", "--images-dir")
    dropped = _drop_saved_pending(img) if rc == 0 else None
    if dropped:
        say(name, f"applied: {dropped}")
    elif hit and rc == 0:
        say(name, f"applied: pending signals {hit[0]} not refused, not saved")
    else:
        say(name, "no target in image (no pending signals)")
    return rc


def _no_identity_check(name: str, argv: List[str]) -> int:
    """Restore with the file-identity re-check off: a replaced file of the
    same size is reopened as if it were the dumped one."""
    img = _opt(argv, "-D", "--images-dir")
    n = m = 0
    try:
        with open(os.path.join(img, "fds.json")) as f:
            n = sum(1 for r in json.load(f) if isinstance(r.get("file"), dict))
        with open(os.path.join(img, "mm.json")) as f:     # mapped files are re-checked too
            m = len({v["file"].get("path") for v in json.load(f)["vmas"] if isinstance(v.get("file"), dict)})
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    argv = [a for i, a in enumerate(argv) if a != "--file-validation" and (i == 0 or argv[i - 1] != "--file-validation")]
    if n or m:
        say(name, f"applied: restore with --file-validation none ({n} reopened file fds, {m} mapped files)")
    else:
        say(name, "no target in image (no reopened or mapped file)")
    return _ckpt(argv + ["--file-validation", "none"])


def _default_mss(name: str, argv: List[str]) -> int:
    """Restore with no segment size set for the repair connect, as ckpt did
    before restored connections kept theirs: connect computes the MSS once,
    from TCP's default clamp (536), and TCP_REPAIR_OPTIONS puts the recorded
    clamp back later without computing it again, so every rebuilt
    connection sends 524-byte segments for good (engine/fds/_tcpconn.py
    _start). No image edit does this alone: the one recorded clamp is both
    the user MSS set for the connect and the clamp set after it, and a
    clamp below TCP's minimum (which skips the first) breaks the second too.
    The user MSS cap is set to 0 for this restore: none is set."""
    from engine.fds import _tcpconn
    img = _opt(argv, "-D", "--images-dir")
    n = 0
    try:
        with open(os.path.join(img, MANIFEST)) as f:
            files = [k for k in json.load(f)["files"] if k == "fds.json" or k.endswith("/fds.json")]
        for name_ in files:
            with open(os.path.join(img, name_)) as f:
                n += sum(1 for r in json.load(f) if r.get("sock") == "tcp-conn" and isinstance(r.get("repair"), dict)
                         and r["repair"].get("mss", 0) >= _tcpconn.TCP_MIN_MSS)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if n:
        _tcpconn.MAX_USER_MSS = 0           # min(clamp, 0): no user MSS for the connect
        say(name, f"applied: {n} tcp connection end(s) rebuilt at the kernel's default segment size "
                  "(no TCP_MAXSEG before the repair connect)")
    else:
        say(name, "no target in image (no tcp connection rebuilt in repair mode)")
    return _ckpt(argv)


# name: (what it breaks, dump(name, argv) or None, restore(name, argv) or None)
BEHAVIOURS: Dict[str, Tuple[str, Optional[Callable], Optional[Callable]]] = {
    "restart": ("dump kills the process; restore starts it afresh (new PID, same argv/cwd/env)",
                _restart_dump, lambda n, a: _fake_restore(n, a, same_pid=False)),
    "restart-same-pid": ("dump kills the process; restore starts it afresh under the same PID (clone3 set_tid)",
                         _restart_dump, lambda n, a: _fake_restore(n, a, same_pid=True)),
    "older-image": ("restores an image taken 0.5 s before the dump", _older_dump, None),
    "lose-pending-signal": ("pending signals are neither refused nor saved", _no_pending_refusal, None),
    "reopen-replaced-file": ("the file-identity re-check is off at restore", None, _no_identity_check),
    "default-mss": ("restored TCP connections come back at TCP's default segment size (536 less options)",
                    None, _default_mss),
}


# What in the judge catches each mutant (shown for survivors in the table).
CAUGHT_BY: Dict[str, str] = {
    "restart": "the dumped PID checked from outside; an in-memory secret; a counter that continues",
    "restart-same-pid": "an in-memory secret and a counter that continues (the PID matches)",
    "older-image": "a counter that advances while running, compared with its value at the dump",
    "lose-pending-signal": "a scenario with a pending signal (dump expected to refuse, or the signal delivered)",
    "reopen-replaced-file": "a scenario replacing a file with a same-size one (expects file-changed)",
    "default-mss": "each connection's segment size (TCP_MAXSEG) read from outside after the restore, not below the "
                   "original's or the path's (socket/tcp-established, tcp-half-closed, tcp-peer-outside, "
                   "tcp-options)",
    "drop-offset": "the per-fd offset check on a file fd with a non-zero offset",
    "drop-append": "the O_APPEND flag / append-at-end check",
    "zero-page": "seeded memory compared page by page, a quiet workload's whole memory digested "
                 "(process/quiet-memory), or the process crashing",
    "lose-timerfd-ticks": "timerfd expirations read and counted exactly",
    "swap-epoll-data": "epoll data compared per registration",
    "drop-pipe-byte": "pipe/fifo queues drained and compared byte for byte",
    "ghost-mode-0644": "a ghost file with a mode other than 0644, its mode checked",
    "lose-sigmask": "the signal mask compared (the workload's blocked SIGUSR1 kills it)",
    "reset-rlimits": "a scenario that changes an rlimit, rlimits compared",
    "change-umask": "umask compared (/proc status diff or a umask scenario)",
    "split-shared-fds": "two fds sharing one open file: move one, read the other's offset; which fds share an "
                        "open file, every fd's (kcmp from outside: stdout and stderr too)",
    "lose-cloexec": "close-on-exec compared per fd",
    "lose-nonblock": "O_NONBLOCK compared per fd (status flags)",
    "drop-unix-message": "both ends' unix socket queues drained and compared",
    "drop-tcp-byte": "both ends' TCP queues drained and compared byte for byte (socket/tcp-established)",
    "shift-inotify-wd": "inotify wds compared (fdinfo) or events carrying the old wd",
    "drop-eventfd-count": "the eventfd count read and compared",
    "revive-dead-pidfd": "the PID each pidfd names (fdinfo Pid), a signal 0 sent through it (scenarios/anon/pidfd)",
    "lose-sigaction": "every signal action compared",
    "change-mprotect": "the /proc maps diff (perms of every mapping)",
    "lose-cwd": "the cwd compared",
    "reset-process-attrs": "workload.process.attrs read back by the process (scenarios/process/attrs.yaml, "
                           "io-flusher.yaml: every thread's task flags); "
                           "I/O priority, coredump_filter, THP_enabled and numa_maps compared from outside",
    "unshare-tree-memory": "tree children write to a MAP_SHARED page after the restore; the parent must see it, and they its",
    "split-shmem-parts": "one inode under every part of an object, its bytes, and a write through one mapping read "
                         "through the other (mmap/shared-anon-parts)",
    "drop-cow-page": "a quiet workload's whole private memory digested from outside (harness/memstate.py, "
                     "process/quiet-memory)",
    "reset-thread-sched": "per-thread nice/policy/priority from /proc/PID/task/TID/stat and the thread's own "
                          "getpriority (threads/blocked: a thread at nice 7)",
    "swap-thread-tls": "each thread's pthread_self (read through its thread pointer) compared with the recorded one, "
                       "or the process crashing (threads/*)",
    "reset-mxcsr": "workload.process.fp_round: the rounding mode set before the dump, 1/3 recomputed and fegetround "
                   "(process/fp-round)",
    "reset-sockopt": "every socket's options read from outside (pidfd_getfd) and compared; the options a scenario "
                     "set read back by the workload (socket/tcp-options)",
    "disarm-posix-timer": "workload.process.posix_timers: timer_gettime of each timer after the restore "
                          "(process/posix-timers); /proc/PID/timers does not show it",
    "reset-itimers": "workload.process.itimers: getitimer of each after the restore (process/state)",
    "double-pending-signal": "pending signals taken with sigtimedwait, counted and in order (process/pending-signals)",
    "drop-file-lock": "the locks fdinfo shows compared from outside; the lock tested by an outside process "
                      "(locks/*)",
    "move-brk": "a quiet workload's brk(0) right before and right after its quiet sleep (process/quiet-memory); "
                "/proc shows the break only page-rounded, as the [heap] end",
    "drop-thread": "the TIDs compared from outside; every recorded thread must answer (threads/*)",
    "lose-thread-sigmask": "each thread's SigBlk compared from outside (threads/masks)",
    "rename-thread": "each thread's name compared from outside; the workload names its threads (threads/*)",
    "restorer-auxv": "/proc/PID/auxv compared from outside (every scenario)",
    "share-to-private": "the maps diff (perms s/p) and the workload's mapping checks (mmap/shared-readonly)",
    "drop-tree-child": "every child judged after the restore: same pid, parent, group, session, its exit status "
                       "collected by the parent (tree/*); the program tree compared (programs/*)",
    "lose-robust-list": "each thread's robust list head read from outside (get_robust_list) and compared (every "
                        "scenario: glibc registers one per thread)",
    "lose-sigaltstack": "workload.process.altstack: the process reads its sigaltstack back (process/altstack)",
    "eintr-not-restart": "a thread blocked in a raw read(2) that must not fail (threads/blocked, fp-round, "
                         "leave-running: Python's own calls retry an EINTR); the raw reads of threads/signal-over-call",
    "clobber-thread-regs": "a thread holding nine registers across its read(2) compares them after "
                           "(threads/registers); the thread crashing (threads/*)",
    "reset-thread-fpu": "each thread's rounding mode and 1/3 after the restore (threads/fp-round)",
    "zero-thread-vectors": "a thread holding xmm8 across its read(2) compares it after (threads/registers)",
    "pending-to-thread": "ShdPnd and each thread's SigPnd compared from outside (process/pending-signals, "
                         "threads/masks)",
    "pending-to-process": "SigPnd and ShdPnd compared from outside (process/pending-signals: one sent to the "
                          "main thread alone)",
    "corrupt-environ": "/proc/PID/environ compared from outside (every scenario)",
    "reset-personality": "/proc/PID/personality compared from outside; the process reads it back (process/attrs)",
    "reset-timer-slack": "/proc/PID/timerslack_ns compared from outside; the process reads it back (process/attrs)",
    "lose-no-new-privs": "NoNewPrivs compared from outside; the process reads it back (process/attrs)",
    "reset-dumpable": "the process reads PR_GET_DUMPABLE back (process/attrs)",
    "lose-rseq": "the process asks the kernel whether its rseq area is still registered (every scenario: glibc "
                 "registers one per thread)",
    "regroup-tree-child": "every child's process group checked by the parent (tree/children); stat.pgrp compared",
    "resession-tree-child": "every child's session and group checked by its parent (tree/*)",
    "tree-exit-signal": "the parent's waitpid() collects every child's exit status (tree/*)",
    "drop-fd": "the open fds listed by the process and every fd compared from outside (every scenario)",
    "merge-split-mappings": "each seam /proc/PID/maps showed between two alike neighbours before the dump must "
                            "still be there after the restore (statediff.kept_apart: every scenario); the "
                            "workload's own mremap across the seam must still fail EFAULT (mmap/kept-apart)",
    "merge-open-files": "each fd's offset; two opens of one file proved independent by moving one "
                        "(files/offsets, files/many-fds)",
    "drop-capability": "CapEff compared from outside, the process's and each thread's (every scenario: the "
                       "workload runs with capabilities)",
    "reset-cgroup": "/proc/PID/cgroup compared from outside (every scenario run outside the root cgroup)",
    "reset-oom-score-adj": "/proc/PID/oom_score_adj compared from outside; read back by the process (process/attrs)",
    "reset-winsize": "the pty's window size read back by the workload (tty/pair-raw)",
    "narrow-signalfd": "the signalfd's mask compared from outside (fdinfo sigmask) and the signals read through "
                       "it (anon/signalfd)",
    "corrupt-ghost-byte": "the contents of deleted files compared byte for byte (unlink/*)",
    "drop-groups": "Groups compared from outside; read back by the process (process/attrs)",
    "reset-sched": "the policy and nice of /proc/PID/stat compared from outside; read back by the process "
                   "(process/attrs: SCHED_BATCH)",
    "drop-seccomp": "Seccomp and Seccomp_filters compared from outside; read back by the process (process/attrs)",
    "rename-process": "comm and Name compared from outside (every scenario)",
    "lose-thread-robust-list": "each thread's robust list head read from outside (get_robust_list: threads/*)",
    "lose-thread-tid-address": "each thread reads its clear_child_tid back (PR_GET_TID_ADDRESS: threads/*)",
    "drop-udp-datagram": "the UDP receive queue drained and compared datagram by datagram (socket/udp*)",
    "flip-termios-echo": "the pty's termios read back by the workload (tty/*)",
    "drop-madvise": "each mapping's madvise advice (smaps VmFlags dc, dd, wf, hg, nh) compared from outside "
                    "(mmap/advice)",
    "drop-pty-byte": "the pty's queues drained and compared byte for byte by the workload (tty/pair-raw, "
                     "tty/pair-packet, tty/canonical-*)",
    "drop-fd-owner": "every fd's owner and signal read back by the process (F_GETOWN_EX, F_GETSIG: "
                     "pipe/owner-signal, locks/lease-read, lease-write)",
    "netlink-autobind": "a request answered on the same port id, the local address compared (socket/netlink-route, "
                        "socket/netlink-port: a port id other than the pid)",
    "ping-unbound": "the local address compared and an echo request answered on the same ident (socket/ping)",
    "reset-autogroup-nice": "/proc/PID/autogroup's nice compared from outside; read back by the process "
                            "(process/attrs)",
    "reset-ids": "Uid and Gid compared from outside; getresuid/getresgid read back by the process "
                 "(process/attrs: a saved uid and a real and saved gid other than 0)",
    "lose-chroot": "/proc/PID/root compared from outside; the process's own / (device, inode) compared with "
                   "its jail's (process/chroot)",
    "lose-syscall-dispatch": "a call made from outside the allowed range with the selector at BLOCK must raise "
                             "SIGSYS, one with it at ALLOW must run (process/syscall-dispatch)",
    "leader-eintr-not-restart": "the main thread waits in raw rt_sigtimedwait(2) calls (ctypes: CPython's own "
                                "retry an EINTR) and counts those that fail EINTR (process/main-eintr)",
    "corrupt-sysv-shm-byte": "each segment's bytes compared by the workload (mmap/sysv-shm)",
    "keep-sysv-shm": "each segment's IPC_STAT read back by the workload: key, mode with SHM_DEST, size, attaches "
                     "(mmap/sysv-shm)",
    "shift-sysv-shmid": "each segment's id compared with the one the workload saved (the mapping's inode number: "
                        "mmap/sysv-shm)",
}


def names() -> List[str]:
    return sorted(list(BEHAVIOURS) + list(EDITS))


def describe(name: str) -> str:
    return BEHAVIOURS[name][0] if name in BEHAVIOURS else EDITS[name][1]


def run(name: str, argv: List[str]) -> int:
    if name not in BEHAVIOURS and name not in EDITS:
        sys.stderr.write(f"mutants: unknown mutant {name!r} (known: {', '.join(names())})\n")
        return 2
    cmd = argv[0] if argv else ""
    try:
        if name in BEHAVIOURS:
            _, on_dump, on_restore = BEHAVIOURS[name]
            hook = on_dump if cmd == "dump" else on_restore if cmd == "restore" else None
            return hook(name, argv) if hook else _ckpt(argv)
        rc = _ckpt(argv)
        if cmd == "dump" and rc == 0:
            img = _opt(argv, "-D", "--images-dir")
            try:
                say(name, "applied: " + apply_edit(name, img))
            except NoTarget as e:
                say(name, f"no target in image ({e})")
        return rc
    except (MutantError, OSError, ValueError, KeyError) as e:
        say(name, f"error: {type(e).__name__}: {e}")
        return 4


def main(argv: List[str]) -> int:
    if argv[:1] == ["--list"]:
        for n in names():
            print(f"{n:22} {describe(n)}")
        return 0
    if len(argv) < 2:
        sys.stderr.write("usage: mutants.py NAME dump|restore CKPT-ARGS... | mutants.py --list\n")
        return 2
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
