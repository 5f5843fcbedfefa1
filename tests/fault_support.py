"""Running ckpt against the faultee target (tests/targets/faultee.py) and
judging the aftermath: used by tests/test_fault_points.py,
tests/test_reliability.py and bench/reliability.py.

A dump that failed or was killed must leave the target as it was: running,
untraced, not stopped, same signal masks (every thread), fds and cwd as
/proc shows them, and its own verdict (every fd, the secret, both counters
going on) ok; and no complete-looking image. A restore that failed or was
killed must leave no process with the image's PID or TIDs and the image
byte for byte as it was, and a restore afterwards must work.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from engine_core_support import alive, wait_for  # noqa: F401  (re-exported)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAULTEE = os.path.join(HERE, "targets", "faultee.py")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def ckpt(args: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ckpt; one that hangs is killed with its children (its own
    session) and reported as exit -1, "hung"."""
    p = ckpt_popen(args, env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        return subprocess.CompletedProcess(p.args, -1, out, f"hung for {timeout} s\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def ckpt_popen(args: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    e = dict(os.environ)
    e.pop("CKPT_FAULT", None)
    e.pop("CKPT_FAULT_TRACE", None)
    e.update(env or {})
    return subprocess.Popen([PYTHON, "-m", "engine"] + args, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, close_fds=True, stdin=subprocess.DEVNULL,
                            start_new_session=True)


VARIANT_ARGS = {"": [], "tree": ["--child"], "pty": ["--pty"]}
# The tree's dumps act as on a kernel whose fdinfo lacks eventfd-semaphore
# (Linux < 6.6): its eventfd is probed, so the probe's fault point is
# passed and failed too (engine/fds/_efdprobe.py).
VARIANT_ENV = {"tree": {"CKPT_TEST_EVENTFD_NO_SEMAPHORE_LINE": "1"}}


def start_target(d: str, variant: str = "") -> subprocess.Popen:
    os.makedirs(d, exist_ok=True)
    p = subprocess.Popen([PYTHON, FAULTEE, d] + VARIANT_ARGS[variant], cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    wait_for(lambda: os.path.exists(os.path.join(d, "ready")) or p.poll() is not None, 15, what="the target")
    if p.poll() is not None:
        raise AssertionError(f"target exited with {p.returncode}")
    return p


def verdict(d: str, pid: int, timeout: float = 20.0) -> dict:
    """Ask the target to check itself (SIGUSR1) and return its verdict."""
    path = os.path.join(d, "verdict.json")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: os.path.exists(path), timeout, what=f"the verdict of pid {pid}")
    with open(path) as f:
        return json.load(f)


def facts(pid: int) -> dict:
    """What /proc shows that a failed dump must not change."""
    def status(path):
        with open(path) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    st = status(f"/proc/{pid}/status")
    threads = {}
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        t = status(f"/proc/{pid}/task/{tid}/status")
        threads[tid] = {k: t.get(k) for k in ("SigBlk", "SigPnd", "TracerPid")}
    fds = {}
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            info = [line for line in f.read().splitlines() if line.split(":")[0] in ("pos", "flags")]
        fds[fd] = (os.readlink(f"/proc/{pid}/fd/{fd}"), info)
    return {"status": {k: st.get(k) for k in ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd", "Umask", "Uid",
                                               "Gid", "Name", "TracerPid", "Seccomp", "NoNewPrivs")},
            "state": st.get("State", "")[:1], "threads": threads, "fds": fds,
            "cwd": os.readlink(f"/proc/{pid}/cwd")}


def tree_hash(path: str) -> str:
    """sha256 over every file of a directory tree: names, modes and bytes."""
    h = hashlib.sha256()
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(root, n)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, path)}\0{st.st_mode:o}\0".encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def kill_reap(p) -> None:
    pid = p.pid if isinstance(p, subprocess.Popen) else p
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if isinstance(p, subprocess.Popen):
        p.wait()
        return
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
            if got:
                return
        except ChildProcessError:
            if not alive(pid):
                return
        time.sleep(0.01)


class Target:
    """A running faultee with what it showed before anything was done to it."""

    def __init__(self, d: str, variant: str = ""):
        self.dir = d
        self.popen = start_target(d, variant)
        self.pid = self.popen.pid
        self.child = _children(self.pid)[0] if variant == "tree" else None
        with open(os.path.join(d, "secret.sha")) as f:
            self.secret = f.read().strip()
        self.first = verdict(d, self.pid)
        assert self.first["ok"], self.first
        self.before = facts(self.pid)
        self.child_before = facts(self.child) if self.child else None

    def intact(self) -> List[str]:
        """What is wrong with the target now, [] when it carries on as before."""
        if not alive(self.pid):
            return ["the target is gone"]
        problems = []
        wait_for(lambda: facts(self.pid)["status"]["TracerPid"] == "0", 5, "the tracer to let go") \
            if facts(self.pid)["status"]["TracerPid"] != "0" else None
        now = facts(self.pid)
        if now["state"] in ("T", "t"):
            problems.append(f"the target is stopped (state {now['state']})")
        for k in ("status", "threads", "fds", "cwd"):
            if now[k] != self.before[k]:
                problems.append(f"{k} differs: {self.before[k]} -> {now[k]}")
        if self.child:
            if not alive(self.child):
                return problems + ["the child is gone"]
            cnow = facts(self.child)
            for k in ("status", "threads", "fds", "cwd"):
                if cnow[k] != self.child_before[k]:
                    problems.append(f"child's {k} differs: {self.child_before[k]} -> {cnow[k]}")
        try:
            v = verdict(self.dir, self.pid)
        except AssertionError as e:
            return problems + [str(e)]
        if not v["ok"]:
            problems.append(f"its own check: {v['errors']}")
        if v["secret"] != self.secret:
            problems.append("the secret changed")
        if v["counter"] <= self.first["counter"] or v["thread_counter"] <= self.first["thread_counter"]:
            problems.append(f"counters did not go on: {self.first['counter']}/{self.first['thread_counter']} -> "
                            f"{v['counter']}/{v['thread_counter']}")
        return problems

    def kill(self) -> None:
        kill_reap(self.popen)


def _children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def no_image(img: str) -> List[str]:
    """A failed dump leaves no image that looks complete (nothing at DIR,
    and DIR.partial, if any, has no manifest)."""
    out = []
    if os.path.lexists(img):
        out.append(f"{img} exists after a failed dump")
    if os.path.isdir(img + ".partial"):
        r = ckpt(["restore", "-D", img + ".partial"])
        if r.returncode != 3 or "incomplete image" not in r.stderr:
            out.append(f"{img}.partial is not refused as incomplete: {r.returncode} {r.stderr.strip()[-200:]}")
    return out


def image_pids(img: str) -> List[int]:
    """Every PID and TID the image restores (the root's first)."""
    with open(os.path.join(img, "core.json")) as f:
        core = json.load(f)
    out = [core["pid"]] + [t["tid"] for t in core.get("threads", [])]
    tree = os.path.join(img, "tree.json")
    if os.path.exists(tree):
        with open(tree) as f:
            members = json.load(f)
        for m in members if isinstance(members, list) else members.get("members", []):
            if m["pid"] not in out:
                out.append(m["pid"])
    return out


def restore_ok(img: str, d: str, last_counter: int) -> List[str]:
    """Restore `img` (no fault) and judge it: its own verdict ok and the
    counter going on from the dumped value. The process is killed after."""
    r = ckpt(["restore", "-D", img])
    if r.returncode != 0:
        return [f"restore afterwards failed ({r.returncode}): {r.stderr.strip()}"]
    pids = image_pids(img)
    try:
        v = verdict(d, pids[0])
        out = []
        if not v["ok"]:
            out.append(f"restored process's own check: {v['errors']}")
        if v["counter"] < last_counter:
            out.append(f"restored counter {v['counter']} is behind the dumped {last_counter}")
        return out
    finally:
        kill_all(pids)


def kill_all(pids: List[int]) -> None:
    """SIGKILL and reap every process of a restored image (root first: a
    tree's other members are then ours to reap, we are the subreaper)."""
    for pid in pids:
        if alive(pid):
            kill_reap(pid)
    reap_zombies(pids)


def reap_zombies(pids: List[int], timeout: float = 2.0) -> None:
    """Reap those of `pids` that died as our children (this process is a
    subreaper: a tree member orphaned when its parent was killed comes to
    us, as it would to PID 1)."""
    end = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < end:
            try:
                got, _ = os.waitpid(pid, os.WNOHANG | 0x40000000)
            except ChildProcessError:
                break
            if got:
                break
            if alive(pid):
                break
            time.sleep(0.01)


# -- fault points ------------------------------------------------------------------

INJECTED_EXIT = 4


def _injected(r: subprocess.CompletedProcess, fid: str) -> List[str]:
    if r.returncode == INJECTED_EXIT and f"fault injected at {fid} " in r.stderr:
        return []
    return [f"fault not injected (exit {r.returncode}): {r.stderr.strip()[-300:]}"]


def make_image(d: str, trace: Optional[str] = None, variant: str = "") -> dict:
    """A faultee (VARIANT_ARGS: a tree of two, a pty pair) dumped (and so
    killed) into d/img: {img, dir, counter}."""
    t = Target(os.path.join(d, "t"), variant)
    img = os.path.join(d, "img")
    env = dict(VARIANT_ENV.get(variant, {}), **({"CKPT_FAULT_TRACE": trace} if trace else {}))
    r = ckpt(["dump", "-t", str(t.pid), "-D", img], env=env)
    t.popen.wait()
    if t.child:
        kill_reap(t.child)      # reparented to us once its parent died
    if r.returncode != 0:
        raise AssertionError(f"reference dump failed: {r.stderr}")
    return {"img": img, "dir": t.dir, "counter": t.first["counter"]}


def reference(d: str) -> dict:
    """A traced dump and restore of a faultee, and of a faultee tree: the
    fault ids they pass, with their call sites ("dump", "restore": the
    single process's; "tree_dump", "tree_restore": what only the tree
    passes), every call site reached ("sites"), and images to restore again."""
    from engine.faults import read_trace
    out: dict = {"sites": set()}
    for variant in VARIANTS:
        kind = variant + "_" if variant else ""
        sd = os.path.join(d, variant or "single")
        os.makedirs(sd, exist_ok=True)
        im = make_image(sd, os.path.join(sd, "dump.trace"), variant)
        r = ckpt(["restore", "-D", im["img"]], env={"CKPT_FAULT_TRACE": os.path.join(sd, "restore.trace")})
        if r.returncode != 0:
            raise AssertionError(f"reference restore failed: {r.stderr}")
        kill_all(image_pids(im["img"]))
        out[kind + "image"] = im
        for phase in ("dump", "restore"):
            path = os.path.join(sd, f"{phase}.trace")
            ids = read_trace(path)
            with open(path) as f:
                out["sites"] |= {line.split()[1] for line in f if " " in line.strip()}
            out[kind + phase] = {k: v for k, v in ids.items() if not kind or k not in out[phase]}
    return out


def dump_point(fid: str, d: str, variant: str = "") -> List[str]:
    """Dump a fresh faultee (variant) with the fault at `fid`; what went wrong."""
    t = Target(os.path.join(d, "t"), variant)
    img = os.path.join(d, "img")
    try:
        r = ckpt(["dump", "-t", str(t.pid), "-D", img], env=dict(VARIANT_ENV.get(variant, {}), CKPT_FAULT=fid))
        return _injected(r, fid) + no_image(img) + t.intact()
    finally:
        t.kill()
        if t.child:
            kill_reap(t.child)


def restore_point(fid: str, im: dict) -> List[str]:
    """Restore im with the fault at `fid`: no process left, the image
    unchanged, and a restore afterwards works; what went wrong."""
    img = im["img"]
    before = tree_hash(img)
    pids = image_pids(img)
    reap_zombies(pids)
    r = ckpt(["restore", "-D", img], env={"CKPT_FAULT": fid})
    problems = _injected(r, fid)
    left = [p for p in pids if alive(p)]
    if left:
        problems.append(f"process left behind: {left}")
        kill_all(pids)
    reap_zombies(pids)
    if tree_hash(img) != before:
        problems.append("the image changed")
    return problems + restore_ok(img, im["dir"], im["counter"])


VARIANTS = ("", "tree", "pty")


def _pty_taken(img: str) -> bool:
    """A pty index of the image is held by someone else (devpts hands out
    the lowest free one, so other ptys opened meanwhile may take it)."""
    try:
        with open(os.path.join(img, "fds.json")) as f:
            recs = json.load(f)
    except OSError:
        return False
    for r in recs:
        idx = r.get("index") if isinstance(r, dict) and r.get("kind") == "tty" else None
        if isinstance(idx, int) and os.path.exists(f"/dev/pts/{idx}"):
            return True
    return False


def run_points(ref: dict, workdir: str, lanes: int = 2) -> List[dict]:
    """Every point of the reference traces, dump ones on fresh targets and
    restore ones on `lanes` images (a variant's own points on its own
    image); rows {point, phase, site, problems}."""
    from concurrent.futures import ThreadPoolExecutor
    rows: List[dict] = []
    dumps = [(fid, v) for v in VARIANTS for fid in ref[(v + "_" if v else "") + "dump"]]
    singles = list(ref["restore"])
    images = [ref["image"]] + [make_image(os.path.join(workdir, f"lane{i}")) for i in range(1, lanes)]
    work = [[(fid, images[k], "") for fid in singles[k::lanes]] for k in range(lanes)]
    for i, v in enumerate(VARIANTS[1:]):
        work[-1 - i % lanes] += [(fid, ref[v + "_image"], v) for fid in ref[v + "_restore"]]

    def key(v, phase):
        return (v + "_" if v else "") + phase

    def one_dump(i_item):
        i, (fid, v) = i_item
        return {"point": fid, "phase": f"{v} dump".strip(), "site": ref[key(v, "dump")][fid],
                "problems": dump_point(fid, os.path.join(workdir, f"d{i}"), v)}

    def lane(items):
        out = []
        for n, (fid, im, v) in enumerate(items):
            if any(alive(p) for p in image_pids(im["img"])) or _pty_taken(im["img"]):
                # pid_max is small here: another process took one of the
                # image's PIDs (or pty index) meanwhile. A new image.
                im = make_image(os.path.join(workdir, f"re{id(items)}-{n}"), variant=v)
                items[n:] = [(f, im if vv == v else i2, vv) for f, i2, vv in items[n:]]
            problems = restore_point(fid, im)
            for attempt in range(3):
                if not (problems and _pty_taken(im["img"]) and "is taken (/dev/pts/" in " ".join(problems)):
                    break
                # Another process's pty took the image's index between the
                # faulted restore and the one after (our ends are closed by
                # then): the machine's doing, not the engine's. Again, anew.
                im = make_image(os.path.join(workdir, f"pty{id(items)}-{n}-{attempt}"), variant=v)
                items[n:] = [(f, im if vv == v else i2, vv) for f, i2, vv in items[n:]]
                problems = restore_point(fid, im)
            out.append({"point": fid, "phase": f"{v} restore".strip(), "site": ref[key(v, "restore")][fid],
                        "problems": problems})
        return out

    with ThreadPoolExecutor(max_workers=lanes) as pool:
        rows += list(pool.map(one_dump, enumerate(dumps)))
        for part in pool.map(lane, work):
            rows += part
    return rows


def render_points(rows: List[dict]) -> str:
    ok = sum(1 for r in rows if not r["problems"])
    lines = [f"fault points: {ok}/{len(rows)} covered ({100.0 * ok / max(1, len(rows)):.0f}%)",
             f"{'point':<40} {'site':<40} result"]
    for r in rows:
        lines.append(f"{r['point']:<40} {r['site']:<40} {'ok' if not r['problems'] else '; '.join(r['problems'])}")
    return "\n".join(lines)
