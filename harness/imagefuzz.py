"""Mutated images against `ckpt restore`: every one must be refused before
any process exists, without a traceback, writing nothing outside the paths
it was given (issue 13, engine/imagecheck.py).

One real process (tests/targets/mutant_sink.c: files, a pipe and a unix
datagram pair with queued data, a deleted file, timerfd, eventfd, epoll,
inotify, 1 MiB of memory) and one small process tree (tests/targets/
fuzz_tree.c: a zombie, a file and a pipe its members share, a member
sharing its parent's fd table and fs) are dumped
once; every third case takes the tree. Each case copies its image, breaks
it one way and runs `python3 -m engine restore` (and `ckpt show`) on the
copy:

  flip       bits of a file flipped (the manifest only in its file table)
  truncate   a file cut short
  missing    a file or a directory of the image removed
  extra      a file the manifest does not name added
  symlink    a file, a directory or the manifest replaced by a symlink to an
             identical copy outside the image (checksums would pass if
             followed), or a symlink added
  special    a file replaced by a fifo or a device node, or one added
  perms      a file or directory of the image writable by others or owned by
             someone else; the directory holding the image writable by
             others and not sticky
  semantic   a record edited to an invalid value (paths with NUL or "..",
             fd numbers, sizes, address ranges, counts, credentials, ...)
             and the manifest re-hashed so every checksum passes (for the
             tree: tree.json or one member's records). Only
             values that break a rule of the kernel or of the image format:
             a forgery consistent with itself (two datagrams instead of one,
             another offset) looks like a real image - that is what the
             owner and permission checks are for

A case passes when ckpt exits 3 (refused) with the expected kind of reason,
the test-only hook (CKPT_TEST_PROCESS_MARK) never fired, no process was
created (none left, none reparented to the runner, which is a subreaper),
stderr holds no traceback, and nothing changed outside: the image copy as
mutated, the cwd/TMPDIR/HOME ckpt ran with (fresh and empty), the pidfile's
directory, the files outside the image the mutations planted, and the
sink's own directory. Cases depend only on (seed, index).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from harness.imagefuzz_edits import (MANIFEST, RECORDS, _files, edit_records, m_content,  # noqa: F401
                                     m_semantic, reseal)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINK_SRC = os.path.join(REPO, "tests", "targets", "mutant_sink.c")
KINDS = ("flip", "truncate", "missing", "extra", "symlink", "special", "perms", "semantic")
EXPECT = {"flip": {"image-invalid"}, "truncate": {"image-invalid"}, "missing": {"image-invalid"},
          "extra": {"image-invalid"}, "symlink": {"image-unsafe"}, "special": {"image-unsafe"},
          "perms": {"image-unsafe"}, "semantic": None,   # None: any refusal reason
          "none": set()}                                 # the control: no refusal is right
NOBODY = 65534


def _subreaper() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER


def _engine_env(extra: Optional[dict] = None) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": REPO, "LANG": "C.UTF-8"}
    env.update(extra or {})
    return env


TREE_SRC = os.path.join(REPO, "tests", "targets", "fuzz_tree.c")
SEEDS = ("sink", "tree")


def seed_for(index: int) -> str:
    """Which seed image case `index` mutates: every third case the tree."""
    return "tree" if index % 3 == 2 else "sink"


def seed_image(work: str, which: str = "sink") -> dict:
    """Compile and start the target (the sink, or a small process tree with
    a zombie and open files its members share), dump it with the real
    engine (it is killed and reaped). Returns {"img", "pids", "w", "which"}."""
    os.makedirs(work, exist_ok=True)
    _subreaper()
    src = SINK_SRC if which == "sink" else TREE_SRC
    exe = os.path.join(work, os.path.basename(src)[:-2])
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, src], check=True, capture_output=True)
    w, ready = os.path.join(work, "w"), os.path.join(work, "ready")
    os.makedirs(w, exist_ok=True)
    argv = [exe, ready, w] + (["sink"] if which == "sink" else [])
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    try:
        end = time.monotonic() + 20
        while not os.path.exists(ready):
            if p.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the {which} target did not start")
            time.sleep(0.01)
        with open(ready) as f:
            words = f.read().split()
        pids = [p.pid] if which == "sink" else [int(x) for x in words]
        img = os.path.join(work, "img")
        r = subprocess.run([sys.executable, "-m", "engine", "dump", "-t", str(p.pid), "-D", img],
                           capture_output=True, text=True, close_fds=True, timeout=120, env=_engine_env(),
                           stdin=subprocess.DEVNULL, cwd=REPO)
        if r.returncode != 0:
            raise RuntimeError(f"dump failed: {r.stderr}")
        p.wait(timeout=20)
        end = time.monotonic() + 20     # its children were reparented to us (a subreaper)
        while any(os.path.exists(f"/proc/{x}") for x in pids) and time.monotonic() < end:
            _reap_children()
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return {"img": img, "pids": pids, "w": w, "which": which}


# -- what is compared before and after ---------------------------------------------

def tree(path: str) -> Dict[str, tuple]:
    """{relative path: (type, mode, uid, size, sha256 or link target)} of a tree, not following symlinks."""
    out: Dict[str, tuple] = {}
    if not os.path.lexists(path):
        return out
    for root, dirs, names in os.walk(path):
        for n in sorted(dirs + names):
            p = os.path.join(root, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, path)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = ""
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_size
                        if not stat.S_ISDIR(st.st_mode) else 0, what)
    return out


# -- mutations: each returns a description, or None when it does not apply ------------


def _files_span(data: bytes) -> Tuple[int, int]:
    """Byte range of the manifest's "files" table (its other fields - creation
    time, engine version - are not what restores the process)."""
    start = data.index(b'"files"')
    depth, i = 0, data.index(b"{", start)
    for j in range(i, len(data)):
        depth += {ord("{"): 1, ord("}"): -1}.get(data[j], 0)
        if depth == 0:
            return start, j + 1
    return start, len(data)


def m_flip(img, outside, rng):
    name = rng.choice(_files(img))
    p = os.path.join(img, name)
    data = bytearray(open(p, "rb").read())
    if not data:
        return None
    lo, hi = _files_span(bytes(data)) if name == MANIFEST else (0, len(data))
    flips = []
    done = set()
    for _ in range(rng.choice((1, 1, 2, 8))):
        i = rng.randrange(lo, hi)
        x = 1 << rng.randrange(8)
        if (i, x) in done:
            continue        # the same bit twice would undo the flip: no mutation at all
        done.add((i, x))
        data[i] ^= x
        flips.append(f"{i}^{x:#x}")
    with open(p, "wb") as f:
        f.write(data)
    return f"flip {name} {','.join(flips)}"


def m_truncate(img, outside, rng):
    cands = [n for n in _files(img) if os.path.getsize(os.path.join(img, n)) > 0]
    name = rng.choice(cands)
    p = os.path.join(img, name)
    n = rng.randrange(os.path.getsize(p))
    os.truncate(p, n)
    return f"truncate {name} to {n}"


def m_missing(img, outside, rng):
    dirs = sorted(d for d in os.listdir(img) if os.path.isdir(os.path.join(img, d)))
    if dirs and rng.random() < 0.15:
        d = rng.choice(dirs)
        shutil.rmtree(os.path.join(img, d))
        return f"remove directory {d}/"
    name = rng.choice(_files(img))
    os.unlink(os.path.join(img, name))
    return f"remove {name}"


def m_extra(img, outside, rng):
    dirs = [""] + sorted(d + "/" for d in os.listdir(img) if os.path.isdir(os.path.join(img, d)))
    where = rng.choice(dirs + ["newdir/"])
    name = where + rng.choice(["evil.json", "pages-999.img", "core.json.bak", ".hidden", "x"])
    p = os.path.join(img, name)
    if os.path.lexists(p):
        return None
    os.makedirs(os.path.dirname(p), mode=0o700, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))))
    os.close(fd)
    return f"extra file {name}"


def _copy_out(img, outside, rel) -> str:
    src = os.path.join(img, rel)
    dst = os.path.join(outside, rel.replace("/", "_") + ".copy")
    if os.path.isdir(src):
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


def m_symlink(img, outside, rng):
    v = rng.randrange(5)
    if v == 0 or v == 1:       # a file (v 1: the manifest) -> identical copy outside
        name = MANIFEST if v == 1 else rng.choice(_files(img, manifest=False))
        dst = _copy_out(img, outside, name)
        os.unlink(os.path.join(img, name))
        os.symlink(dst if rng.random() < 0.5 else os.path.relpath(dst, os.path.dirname(os.path.join(img, name))),
                   os.path.join(img, name))
        return f"symlink {name} -> identical copy outside"
    if v == 2:                 # a directory -> identical copy outside
        dirs = sorted(d for d in os.listdir(img) if os.path.isdir(os.path.join(img, d)))
        if not dirs:
            return None
        d = rng.choice(dirs)
        dst = _copy_out(img, outside, d)
        shutil.rmtree(os.path.join(img, d))
        os.symlink(dst, os.path.join(img, d))
        return f"symlink directory {d}/ -> identical copy outside"
    if v == 3:                 # an extra symlink to a secret outside
        secret = os.path.join(outside, "secret")
        with open(secret, "w") as f:
            f.write("not for the image\n")
        os.symlink(secret, os.path.join(img, "pages-001.img"))
        return "extra symlink pages-001.img -> a file outside"
    name = rng.choice(_files(img, manifest=False))   # a dangling symlink in place of a file
    os.unlink(os.path.join(img, name))
    os.symlink(os.path.join(outside, "nowhere"), os.path.join(img, name))
    return f"dangling symlink {name}"


def m_special(img, outside, rng):
    v = rng.randrange(3)
    name = rng.choice(_files(img, manifest=v != 2))
    p = os.path.join(img, name)
    if v == 2:
        p = os.path.join(img, "extra-fifo")
        os.mkfifo(p, 0o600)
        return "extra fifo"
    os.unlink(p)
    if v == 0:
        os.mkfifo(p, 0o600)
        return f"fifo in place of {name}"
    os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5))    # /dev/zero: reads forever
    return f"char device (1,5) in place of {name}"


def m_perms(img, outside, rng):
    v = rng.randrange(6)
    if v == 0:
        name = rng.choice(_files(img))
        bits = rng.choice((0o020, 0o002, 0o022))
        os.chmod(os.path.join(img, name), 0o600 | bits)
        return f"chmod {name} +{bits:03o}"
    if v == 1:
        os.chmod(img, 0o700 | rng.choice((0o020, 0o002, 0o1777 & ~0o700)))
        return "image directory writable by others"
    if v == 2:
        dirs = sorted(d for d in os.listdir(img) if os.path.isdir(os.path.join(img, d)))
        if not dirs:
            return None
        d = rng.choice(dirs)
        os.chmod(os.path.join(img, d), 0o777)
        return f"chmod {d}/ 0777"
    if v == 3:
        name = rng.choice(_files(img))
        os.chown(os.path.join(img, name), NOBODY, NOBODY)
        return f"chown {name} to nobody"
    if v == 4:
        os.chown(img, NOBODY, NOBODY)
        return "chown the image directory to nobody"
    os.chmod(os.path.dirname(img), 0o777)       # the parent: writable by all, not sticky
    return "the directory holding the image is 0777 (not sticky)"


def m_none(img, outside, rng):
    return "none (the control: this image must restore)"


MUTATORS = {"none": m_none, "flip": m_flip, "truncate": m_truncate, "missing": m_missing, "extra": m_extra,
            "symlink": m_symlink, "special": m_special, "perms": m_perms, "semantic": m_semantic}
WEIGHTS = {"flip": 3, "truncate": 2, "missing": 2, "extra": 2, "symlink": 2, "special": 1, "perms": 2,
           "semantic": 8}


# -- one case -------------------------------------------------------------------------------

def _reap_children() -> List[int]:
    out = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if not pid:
            return out
        out.append(pid)


def _children() -> List[int]:
    pids = []
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
                pids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return pids


def run_case(seed: dict, base: str, seed_n: int, index: int, kind: Optional[str] = None,
             timeout: float = 60, mutator: Optional[Callable] = None) -> dict:
    """Mutate a copy of the seed image (deterministic in seed_n, index) and
    run ckpt restore on it. Returns the row."""
    rng = random.Random(seed_n * 1_000_003 + index)
    kinds = sorted(WEIGHTS)
    # the first cases take every kind in turn, so that even a short run tries each
    kind = kind or (KINDS[index] if index < len(KINDS) else rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0])
    case = os.path.join(base, f"case-{index:04d}")
    holder = os.path.join(case, "holder")       # the directory holding the image
    img = os.path.join(holder, "img")
    outside = os.path.join(case, "outside")
    for d in ("cwd", "tmp", "home", "out", "outside"):
        os.makedirs(os.path.join(case, d))
    os.makedirs(holder, 0o755)
    shutil.copytree(seed["img"], img, symlinks=True)
    desc = None
    for _ in range(10):
        desc = (mutator or MUTATORS[kind])(img, outside, rng)
        if desc:
            break
        shutil.rmtree(img)
        shutil.copytree(seed["img"], img, symlinks=True)
    before = {"holder": tree(holder), "outside": tree(outside), "w": tree(seed["w"])}
    mark = os.path.join(case, "mark")
    pidfile = os.path.join(case, "out", "pidfile")
    env = _engine_env({"TMPDIR": os.path.join(case, "tmp"), "HOME": os.path.join(case, "home"),
                       "CKPT_TEST_PROCESS_MARK": mark})
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "engine", "restore", "-D", img, "--pidfile", pidfile, "--json"],
                           capture_output=True, text=True, close_fds=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL, cwd=os.path.join(case, "cwd"))
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or "", (e.stderr or "") if isinstance(e.stderr, str) else ""
    ms = round((time.monotonic() - t0) * 1000, 1)
    try:   # `ckpt show` reads the same image: it may show it or refuse it, never crash
        sh = subprocess.run([sys.executable, "-m", "engine", "show", "-D", img, "--json"], capture_output=True,
                            text=True, close_fds=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                            cwd=os.path.join(case, "cwd"))
        show = {0: "shown", 2: "usage", 3: "refused"}.get(sh.returncode, f"exit {sh.returncode}")
        err += "\n" + sh.stderr if ("Traceback" in sh.stderr or "internal error" in sh.stderr) else ""
    except subprocess.TimeoutExpired:
        show = "hung"
    created = os.path.exists(mark)
    reasons: List[str] = []
    try:
        res = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        reasons = [x.get("reason") for x in res.get("refusals", [])]
    except (ValueError, AttributeError):
        res = {}
    # A process created anyway was reparented to this runner (a subreaper)
    # when the restorer exited: our children are exactly those (ckpt itself
    # was reaped by subprocess). Never a PID from /proc alone: PIDs are
    # reused by other processes on the machine.
    leftover: List[int] = []
    for _ in range(50):
        kids = _children()
        if not kids:
            break
        leftover += kids
        for pid in kids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        _reap_children()
    leftover += _reap_children()
    after = {"holder": tree(holder), "outside": tree(outside), "w": tree(seed["w"])}
    written = sorted(f"{d}/{n}" for d in ("cwd", "tmp", "home", "out") for n in os.listdir(os.path.join(case, d)))
    written += [f"{k}: changed" for k in before if before[k] != after[k]]
    outcome = {0: "restored", 2: "usage", 3: "refused", 4: "failed", None: "hung"}.get(rc, f"exit {rc}")
    traceback = "Traceback" in err or "internal error" in err
    want = EXPECT[kind]
    right = outcome == "refused" and bool(reasons) and (want is None or all(x in want for x in reasons))
    ok = right and not created and not leftover and not traceback and not written and show != "hung"
    return {"index": index, "seed": seed["which"], "kind": kind, "mutation": desc, "outcome": outcome, "reasons": reasons,
            "show": show, "created": created, "leftover": sorted(set(leftover)), "traceback": traceback, "written": written,
            "ok": ok, "ms": ms, "stderr": err.strip()[-400:]}


def cleanup_case(base: str, index: int) -> None:
    case = os.path.join(base, f"case-{index:04d}")
    if os.path.isdir(case):
        os.chmod(case, 0o700)
        shutil.rmtree(case, ignore_errors=True)


def summarize(rows: List[dict], seed_n: int) -> dict:
    by_kind: Dict[str, Dict[str, int]] = {}
    by_seed = {w: sum(r["seed"] == w for r in rows) for w in SEEDS}
    reasons: Dict[str, int] = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"cases": 0, "refused": 0, "failed": 0})
        k["cases"] += 1
        k["refused" if r["ok"] else "failed"] += 1
        for x in r["reasons"]:
            reasons[x] = reasons.get(x, 0) + 1
    return {"seed": seed_n, "cases": len(rows), "refused_ok": sum(r["ok"] for r in rows),
            "failures": sum(not r["ok"] for r in rows),
            "processes_created": sum(r["created"] or bool(r["leftover"]) for r in rows),
            "tracebacks": sum(r["traceback"] for r in rows),
            "files_written_outside": sum(bool(r["written"]) for r in rows),
            "outcomes": {o: sum(r["outcome"] == o for r in rows) for o in sorted({r["outcome"] for r in rows})},
            "by_kind": by_kind, "by_seed_image": by_seed, "reasons": reasons,
            "ms_median": sorted(r["ms"] for r in rows)[len(rows) // 2] if rows else 0,
            "failed_cases": [{k: r[k] for k in ("index", "seed", "kind", "mutation", "outcome", "reasons", "stderr")}
                             for r in rows if not r["ok"]][:50]}


def run(n: int, seed_n: int, base: str, keep: bool = False, progress=None) -> Tuple[dict, List[dict]]:
    """`n` cases from seed `seed_n` under `base` (made fresh). Returns (summary, rows)."""
    os.makedirs(base, exist_ok=True)
    seeds = {w: seed_image(os.path.join(base, f"seed-{w}"), w) for w in SEEDS}
    rows = []
    for i in range(n):
        row = run_case(seeds[seed_for(i)], base, seed_n, i)
        rows.append(row)
        if progress:
            progress(row)
        if not keep:
            cleanup_case(base, i)
    return summarize(rows, seed_n), rows
