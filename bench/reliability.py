#!/usr/bin/env python3
"""Reliability figures: every fault point, and ckpt SIGKILLed at random
instants of dumps and restores (`make reliability`).

    python3 bench/reliability.py --out bench/reliability.json [--kills 200] [--no-points]

Fault points: tests/fault_support.py run_points (the same as
tests/test_fault_points.py): covered/total.

Kills. A faultee target (tests/targets/faultee.py: one fd of every kind, a
thread, a secret and counters only in memory) is dumped by `ckpt dump`
(no --leave-running: the real thing, which kills the target once the image
is committed), and ckpt is SIGKILLed after a random delay drawn uniformly
from [0, 1.1 x the time a whole dump takes]. Then, once nothing of that
ckpt is left: either no complete-looking image exists and the target
carries on intact (same masks, fds, cwd, untraced, running; its own check
of every fd, the secret, both counters going on), or the dump had finished
(a committed image that verifies and restores, the target gone). Anything
else is a failure. The same for `ckpt restore` of one image: either no
process with the image's PID or TIDs exists, or a complete one (its own
check ok); and the image is byte for byte what it was.

The JSON file is shared with other figures (keys are replaced, not the
file), so several tools can write into it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fault_support as fs  # noqa: E402
from engine_core_support import become_subreaper  # noqa: E402
from engine.fds._peercred import HELPER_NAME  # noqa: E402


def _session_gone(sid: int) -> bool:
    """No process left in the session ckpt was started in (ckpt, its
    worker or restorer)."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            return False
    return True


def _worker_of(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _stray_engines() -> list:
    """ckpt processes reparented to us (this tool is a subreaper) after
    their ckpt was killed: a worker forked just before the kill."""
    out = []
    for pid in _worker_of(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"\0-m\0engine\0" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def _reap_children() -> None:
    while True:
        try:
            p, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not p:
            return


def _wait_ckpt_gone(p, victims, spare=()) -> bool:
    """ckpt, its worker or restorer and any ckpt process reparented to us
    are gone (`spare`: PIDs judged otherwise, the restored process's)."""
    p.wait()
    ok = True
    for v in (set(victims) | set(_stray_engines())) - set(spare):
        try:
            fs.wait_for(lambda: not fs.alive(v), 20, f"ckpt's worker {v} to finish")
        except AssertionError:
            ok = False
    _reap_children()
    return ok


def time_dump(work: str) -> float:
    d = tempfile.mkdtemp(prefix="timing-", dir=work)
    t = fs.Target(os.path.join(d, "t"))
    t0 = time.monotonic()
    r = fs.ckpt(["dump", "-t", str(t.pid), "-D", os.path.join(d, "img")])
    took = time.monotonic() - t0
    t.popen.wait()
    if r.returncode != 0:
        raise SystemExit(f"reliability: a plain dump fails: {r.stderr}")
    return took


def kill_dumps(n: int, work: str, rng: random.Random, target: str = "ckpt") -> dict:
    """SIGKILL `target` ("ckpt", or "worker": the dump's tracer itself) at
    n random instants of dumps."""
    os.makedirs(work, exist_ok=True)
    span = 1.1 * statistics.median(time_dump(work) for _ in range(2))
    out = {"kills": 0, "aborted_target_intact": 0, "completed_image_ok": 0, "failures": [],
           "delay_max_s": round(span, 3),
           "killed": "SIGKILL of ckpt" if target == "ckpt" else "SIGKILL of the dump's tracer (ckpt's worker)"}
    t = None
    for i in range(n):
        d = os.path.join(work, f"k{i}")
        os.makedirs(d, exist_ok=True)
        if t is None:
            t = fs.Target(os.path.join(d, "t"))
        img = os.path.join(d, "img")
        delay = rng.uniform(0, span)
        p = fs.ckpt_popen(["dump", "-t", str(t.pid), "-D", img])
        victims = []
        end = time.monotonic() + delay
        while time.monotonic() < end and p.poll() is None:
            if target == "worker":
                victims = _worker_of(p.pid) or victims
            time.sleep(0.002)
        if target == "worker":
            victims = _worker_of(p.pid) or victims
            for v in victims:
                try:
                    os.kill(v, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            victims = _worker_of(p.pid)
            p.kill()
        out["kills"] += 1
        if not _wait_ckpt_gone(p, victims):
            out["failures"].append({"run": i, "delay_s": round(delay, 4), "problems": ["ckpt's worker went on"]})
        if p.returncode not in (0, -signal.SIGKILL) and target == "ckpt":
            out["failures"].append({"run": i, "delay_s": round(delay, 4),
                                    "problems": [f"ckpt failed by itself ({p.returncode}): {p.stderr.read()[-300:]}"]})
        if os.path.exists(os.path.join(img, "manifest.json")):
            # The kill came after the commit: the dump is done.
            problems = []
            if fs.alive(t.pid):
                problems.append("image committed but the target still runs")
            t.kill()
            problems += fs.restore_ok(img, t.dir, t.first["counter"])
            t = None
            if problems:
                out["failures"].append({"run": i, "delay_s": round(delay, 4), "problems": problems})
            else:
                out["completed_image_ok"] += 1
        else:
            problems = fs.no_image(img) + t.intact()
            if problems and not fs.alive(t.pid):
                problems.append(f"(target exit {t.popen.poll()}; ckpt exit {p.returncode}: "
                                f"{p.stderr.read().strip()[-200:]})")
            if problems:
                out["failures"].append({"run": i, "delay_s": round(delay, 4), "problems": problems})
                t.kill()
                t = None
            else:
                out["aborted_target_intact"] += 1
            shutil.rmtree(img + ".partial", ignore_errors=True)
    if t is not None:
        t.kill()
    return out


def interrupt_runs(n: int, work: str, rng: random.Random, command: str = "check",
                   sig: int = signal.SIGINT) -> dict:
    """SIGINT (a ^C; or `sig`) to `ckpt check` or `ckpt dump --leave-running`
    at n random instants: the target carries on intact every time."""
    os.makedirs(work, exist_ok=True)
    t = fs.Target(os.path.join(work, "t"))
    t0 = time.monotonic()
    r = fs.ckpt([command, "-t", str(t.pid)] + (["-D", os.path.join(work, "timing"), "--leave-running"]
                                               if command == "dump" else []))
    span = 1.1 * (time.monotonic() - t0)
    if r.returncode not in (0, 3):
        raise SystemExit(f"reliability: a plain {command} fails: {r.stderr}")
    out = {"kills": 0, "target_intact": 0, "failures": [], "delay_max_s": round(span, 3),
           "killed": f"{signal.Signals(sig).name} to ckpt {command}"}
    for i in range(n):
        delay = rng.uniform(0, span)
        img = os.path.join(work, f"img{i}")
        p = fs.ckpt_popen([command, "-t", str(t.pid)] + (["-D", img, "--leave-running"] if command == "dump" else []))
        time.sleep(delay)
        victims = _worker_of(p.pid)
        p.send_signal(sig)
        out["kills"] += 1
        problems = [] if _wait_ckpt_gone(p, victims) else ["ckpt's worker went on"]
        problems += t.intact()
        if command == "dump" and not os.path.exists(os.path.join(img, "manifest.json")):
            problems += fs.no_image(img)
        if problems:
            out["failures"].append({"run": i, "delay_s": round(delay, 4), "problems": problems})
            t.kill()
            t = fs.Target(os.path.join(work, f"t{i}"))
        else:
            out["target_intact"] += 1
        shutil.rmtree(img, ignore_errors=True)
    t.kill()
    return out


def kill_restores(n: int, work: str, rng: random.Random, target: str = "ckpt") -> dict:
    """SIGKILL `target` ("ckpt", or "restorer": the process that builds
    the new one and traces it) at n random instants of restores."""
    im = fs.make_image(os.path.join(work, "rimg"))
    img = im["img"]
    pids = fs.image_pids(img)
    before = fs.tree_hash(img)
    times = []
    for _ in range(2):
        t0 = time.monotonic()
        r = fs.ckpt(["restore", "-D", img])
        times.append(time.monotonic() - t0)
        if r.returncode != 0:
            raise SystemExit(f"reliability: a plain restore fails: {r.stderr}")
        fs.kill_reap(pids[0])
    span = 1.1 * statistics.median(times)
    out = {"kills": 0, "aborted_no_process": 0, "completed_process_ok": 0, "failures": [],
           "delay_max_s": round(span, 3),
           "killed": "SIGKILL of ckpt" if target == "ckpt" else "SIGKILL of the restorer (ckpt's child, the tracer)"}
    for i in range(n):
        if any(fs.alive(x) for x in pids):
            # pid_max is small here: another process took one of the image's
            # PIDs meanwhile. A new image, new PIDs.
            im = fs.make_image(os.path.join(work, f"rimg{i}"))
            img, pids = im["img"], fs.image_pids(im["img"])
            before = fs.tree_hash(img)
        delay = rng.uniform(0, span)
        p = fs.ckpt_popen(["restore", "-D", img])
        victims = []
        # ckpt's children but the ones with the image's PIDs (a helper
        # forked with the PID for SO_PEERCRED, engine/fds/_peercred.py).
        def restorers():
            return [c for c in _worker_of(p.pid) if c not in pids]
        if target != "ckpt":
            # The restorer lives only while it builds: the delay counts from its fork.
            fs.wait_for(lambda: restorers() or p.poll() is not None, 30, "the restorer")
            delay = rng.uniform(0, span / 3)
        end = time.monotonic() + delay
        while time.monotonic() < end and p.poll() is None:
            victims = restorers() or victims
            time.sleep(0.002)
        victims = restorers() or victims
        if target == "ckpt":
            p.kill()
        else:
            for v in victims:
                try:
                    os.kill(v, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        out["kills"] += 1
        problems = []
        p.wait()
        if p.returncode not in (0, -signal.SIGKILL) and target == "ckpt":
            problems.append(f"ckpt failed by itself ({p.returncode}): {p.stderr.read()[-300:]}")
        if not _wait_ckpt_gone(p, victims, spare=pids):
            problems.append("the restorer went on")
        helper = _helper_gone(pids[0]) if target == "ckpt" else None
        if helper:
            problems.append(helper)
        if fs.alive(pids[0]):
            done, reaped = True, False
            try:
                v = fs.verdict(im["dir"], pids[0])
                if not v["ok"]:
                    problems.append(f"a restored process that is not right: {v['errors']}")
            except AssertionError:
                if fs.alive(pids[0]):
                    problems.append("a half-restored process survived (no answer to its check)")
                else:
                    # On its way out when looked at: fine only if it was
                    # killed as its restorer died (PTRACE_O_EXITKILL), not
                    # if it ran half-restored and died of that.
                    status = _reap_status(pids[0])
                    reaped = status is not None
                    if reaped and not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                        problems.append(f"a half-restored process ran and died (wait status {status:#x})")
                    done = False
            if not reaped:     # (a reaped PID may be another process's already)
                fs.kill_reap(pids[0])
        else:
            done = False
            left = [x for x in pids if fs.alive(x)]
            if left:
                problems.append(f"threads left: {left}")
        if fs.tree_hash(img) != before:
            problems.append("the image changed")
        if problems:
            out["failures"].append({"run": i, "delay_s": round(delay, 4), "problems": problems})
        elif done:
            out["completed_process_ok"] += 1
        else:
            out["aborted_no_process"] += 1
    return out


def _helper_gone(pid: int):
    """ckpt may die while its peer-credentials helper holds the restored
    process's pid (engine/fds/_peercred.py, which names itself so): that
    one must go by itself at once, killed as ckpt died or done with its
    one call. None if so (or if no helper held it); else what is wrong."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            if f.read().strip() != HELPER_NAME:
                return None
    except OSError:
        return None
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:       # not ours: gone is all that can be seen
            got, status = (pid, 0) if not fs.alive(pid) else (0, 0)
        if got == pid:
            if (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL) or \
                    (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                return None
            return f"ckpt's peer-credentials helper ended otherwise (wait status {status:#x})"
        time.sleep(0.01)
    return "ckpt's peer-credentials helper outlived ckpt"


def _reap_status(pid: int):
    """The wait status of a dead child of ours (the subreaper), or None."""
    try:
        got, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return status if got == pid else None


def merge_json(path: str, update: dict) -> None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data.update(update)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.rename(tmp, path)


def render_kills(name: str, k: dict) -> str:
    good = k["kills"] - len(k["failures"])
    parts = [f"{k2.replace('_', ' ')} {v}" for k2, v in k.items()
             if k2 not in ("kills", "failures", "delay_max_s", "killed")]
    lines = [f"{name}: {good}/{k['kills']} safe ({', '.join(parts)}; {k['killed']} "
             f"at 0-{k['delay_max_s']:.2f} s)"]
    for f in k["failures"][:10]:
        lines.append(f"  run {f['run']} at {f['delay_s']} s: {'; '.join(f['problems'])[:400]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "reliability.json"))
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--worker-kills", type=int, default=50,
                    help="also SIGKILL the tracers themselves (dump worker, restorer) this many times; "
                         "a dump worker killed mid-injection is the known residual, reported, not failed")
    ap.add_argument("--interrupts", type=int, default=50, help="SIGINTs to ckpt check and to ckpt dump")
    ap.add_argument("--no-points", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    become_subreaper()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="crucible-reliability-")
    res: dict = {}
    bad = 0
    try:
        if not args.no_points:
            ref = fs.reference(os.path.join(work, "ref"))
            rows = fs.run_points(ref, os.path.join(work, "points"))
            print(fs.render_points(rows))
            ok = sum(1 for r in rows if not r["problems"])
            res["fault_points"] = {"covered": ok, "total": len(rows), "rows": rows}
            bad += len(rows) - ok
        if args.kills:
            kd = kill_dumps(args.kills, os.path.join(work, "kd"), rng)
            print(render_kills("kill ckpt dump", kd))
            kr = kill_restores(args.kills, os.path.join(work, "kr"), rng)
            print(render_kills("kill ckpt restore", kr))
            res["kill_dump"], res["kill_restore"] = kd, kr
            bad += len(kd["failures"]) + len(kr["failures"])
        if args.interrupts:
            for cmd in ("check", "dump"):
                ki = interrupt_runs(args.interrupts, os.path.join(work, f"ki-{cmd}"), rng, cmd)
                print(render_kills(f"^C ckpt {cmd}", ki))
                res[f"interrupt_{cmd}"] = ki
                bad += len(ki["failures"])
            kc = interrupt_runs(args.interrupts, os.path.join(work, "kc"), rng, "check", signal.SIGKILL)
            print(render_kills("kill ckpt check", kc))
            res["kill_check"] = kc
            bad += len(kc["failures"])
        if args.worker_kills:
            kw = kill_dumps(args.worker_kills, os.path.join(work, "kw"), rng, target="worker")
            print(render_kills("kill the dump's tracer itself", kw))
            kr = kill_restores(args.worker_kills, os.path.join(work, "krw"), rng, target="restorer")
            print(render_kills("kill the restorer itself", kr))
            res["kill_dump_worker"], res["kill_restore_restorer"] = kw, kr
            bad += len(kr["failures"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["reliability_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    merge_json(args.out, res)
    print(f"reliability: written to {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
