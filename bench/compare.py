#!/usr/bin/env python3
"""ckpt against criu on the same processes, in one run, on this machine.

Runs where both tools are (a guest: harness/compare_bench.py copies it in;
the host, when criu is installed there). Standard library only: a guest's
own python3 runs it.

For every case (touched MiB x where the image goes) and round, one memhog
(tests/targets/memhog.c) is started for each tool and dumped (the tool
kills it), then restored; the tools alternate which goes first. Times are
the wall time of the tool's command, its own start-up included (ckpt is a
Python program: interpreter start and imports are part of its cost, as
criu's exec is of criu's). After each restore the process must be running
and 64 sampled words of its memory must hold what memhog wrote, else the
run fails - a fast wrong restore must not look like a win. Each row also
gives the frozen time each tool reports (ckpt's frozen_ms, criu's
frozen_time) and ckpt's durable_ms (start to the committed image fsync'd);
with --leave-running the memhogs are dumped left running, so the frozen
time is the time until the target runs again (ckpt's never waits for the
fsyncs then: it commits after the release).

Many tasks (issue 11): with --swarm (tests/targets/swarm.c), a tree of N
small processes and one process with N threads, dumped and restored the
same way; each restore must give back all N processes (same PIDs, asleep)
or all N threads. Besides wall time these rows carry the frozen time each
tool reports: ckpt's frozen_ms (--json), criu's frozen_time from its
stats-dump image (freeze to kill).

Not the same work: ckpt fsyncs every image file before it commits (a
crash never leaves a torn image), criu does not; the row says so, and
also gives criu's dump plus an fsync of its image (criu_dump_durable_s,
dump_durable_speed_ckpt_over_criu): the same durability, compared.

usage: compare.py --memhog PATH [--sizes 1,64] [--dirs /dev/shm,/var/tmp] [--leave-running]
                  [--swarm PATH] [--swarm-cases tree:50,threads:50]
                  [--rounds 3] [--ckpt "ckpt"] [--ckpt-base CMD] [--criu "criu"] [--out FILE]

--ckpt-base: another ckpt (an older engine) measured beside, as tool
"ckpt_base": before/after figures from the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def _subreaper() -> None:
    # The restored processes are orphaned when the restorer exits (criu -d,
    # ckpt): be their reaper, so each is reaped here and not by PID 1 late.
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _start(memhog: str, mib: int, work: str) -> subprocess.Popen:
    ready = os.path.join(work, "ready")
    if os.path.exists(ready):
        os.unlink(ready)
    p = subprocess.Popen([memhog, str(mib), ready], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    end = time.monotonic() + 300
    line = ""
    while not line.endswith("\n"):       # created, then written: wait for the whole line
        if p.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"memhog {mib} MiB did not get ready")
        time.sleep(0.005)
        try:
            with open(ready) as f:
                line = f.read()
        except FileNotFoundError:
            pass
    p.region = int(line.split()[1], 16) if mib else 0      # memhog writes "ready ADDR"
    return p


def _sample(pid: int, mib: int, start: int) -> None:
    """64 random words of the memhog region at `start` (word i = i * golden ratio)."""
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    if state not in "RSD":
        raise RuntimeError(f"restored pid {pid} is in state {state}")
    if not mib:
        return
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for _ in range(64):
            i = random.randrange(1, mib * MIB // 8)
            (v,) = struct.unpack("<Q", os.pread(fd, 8, start + i * 8))
            if v != (i * 0x9E3779B97F4A7C15) & ((1 << 64) - 1):
                raise RuntimeError(f"restored pid {pid}: memory differs at word {i}")
    finally:
        os.close(fd)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.002)


def _timed(argv, what: str):
    c0, t0 = _cpu(), time.monotonic()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, close_fds=True)
    wall, cpu = time.monotonic() - t0, _cpu() - c0
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {' '.join(argv)}\n{r.stderr[-2000:]}")
    return wall, cpu, r.stdout


def _sync_tree(img: str) -> float:
    """Seconds to make a criu image as durable as ckpt's at its exit
    (fsync of every file, then of the directory): criu's dump plus this is
    the same work as ckpt's dump, which fsyncs before it commits."""
    t0 = time.monotonic()
    for base, _, files in os.walk(img):
        for name in files:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - t0


def _injected(tool: str, out: str) -> dict:
    """ckpt's injected syscalls in one restore (engine/batch.py): ptrace
    round trips, and calls run in batches; {} when it does not say (criu,
    an older ckpt)."""
    if not tool.startswith("ckpt"):
        return {}
    try:
        inj = json.loads(out)["result"].get("injected") or {}
    except (ValueError, KeyError, AttributeError):
        return {}
    return {"restore_round_trips": inj.get("round_trips"), "restore_batched_calls": inj.get("batched_calls")}


def one(tool: str, cmd, memhog: str, mib: int, where: str, work: str, leave_running: bool = False) -> dict:
    """Dump and restore one fresh memhog with `tool`; wall/CPU seconds, the
    frozen time the tool reports (ckpt's frozen_ms; criu's frozen_time:
    freeze to kill, or to the release of a target left running) and ckpt's
    durable_ms (from its start until the committed image is fsync'd).
    `leave_running`: dumped with --leave-running (frozen time is then the
    time until the target runs again), killed here before the restore."""
    p = _start(memhog, mib, work)
    lr = ["--leave-running"] if leave_running else []
    img = tempfile.mkdtemp(prefix=f"cmp-{tool}-", dir=where)
    pidfile = os.path.join(work, f"{tool}.pid")
    restored = None
    try:
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        os.sync()
        if tool.startswith("ckpt"):
            os.rmdir(img)           # ckpt makes the directory itself (it must not exist)
            d = _timed(cmd + ["dump", "-t", str(p.pid), "-D", img, "--json"] + lr, "ckpt dump")
            res = json.loads(d[2])["result"]
            frozen, durable = res.get("frozen_ms"), res.get("durable_ms")
        else:
            d = _timed(cmd + ["dump", "-t", str(p.pid), "-D", img, "-o", "dump.log"] + lr, "criu dump")
            frozen, durable = _criu_frozen_ms(img), None
        if leave_running:
            if p.poll() is not None:
                raise RuntimeError(f"{tool} dump --leave-running: the target died")
            p.kill()
        p.wait(timeout=60)          # both kill the dumped process (unless left running)
        synced = None if tool.startswith("ckpt") else _sync_tree(img)
        if tool.startswith("ckpt"):
            r = _timed(cmd + ["restore", "-D", img, "--pidfile", pidfile, "--json"], "ckpt restore")
        else:
            r = _timed(cmd + ["restore", "-D", img, "-d", "--pidfile", pidfile, "-o", "restore.log"],
                       "criu restore")
        with open(pidfile) as f:
            restored = int(f.read().split()[0])
        _sample(restored, mib, p.region)
        out = {"dump_s": d[0], "dump_cpu_s": d[1], "restore_s": r[0], "restore_cpu_s": r[1],
               "frozen_ms": frozen, "durable_ms": durable, **_injected(tool, r[2])}
        if synced is not None:
            out["dump_durable_s"] = d[0] + synced
        return out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if restored:
            _kill(restored)
        shutil.rmtree(img, ignore_errors=True)


# -- many tasks (tests/targets/swarm.c) ----------------------------------------

def _start_swarm(swarm: str, mode: str, n: int, work: str) -> subprocess.Popen:
    ready = os.path.join(work, "ready")
    if os.path.exists(ready):
        os.unlink(ready)
    p = subprocess.Popen([swarm, mode, str(n), ready], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    end = time.monotonic() + 300
    while not os.path.exists(ready):        # renamed into place once complete
        if p.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"swarm {mode} {n} did not get ready")
        time.sleep(0.005)
    return p


def _members(root: int) -> list:
    """root and its descendants (by /proc/PID/task/*/children)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def _asleep(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "SR"
    except OSError:
        return False


def _check_swarm(restored: int, mode: str, n: int, pids: list) -> None:
    if mode == "tree":
        got = sorted(_members(restored))
        if got != sorted(pids):
            raise RuntimeError(f"restored tree has {len(got)} processes {got[:5]}..., not the dumped {len(pids)}")
        bad = [q for q in got if not _asleep(q)]
    else:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{restored}/task"))
        if len(tids) != n:
            raise RuntimeError(f"restored process has {len(tids)} threads, not {n}")
        bad = [t for t in tids if not _asleep(t)]
    if bad:
        raise RuntimeError(f"restored tasks not asleep: {bad[:5]}")


def _reap_all(timeout: float = 60) -> None:
    """Every child and adopted orphan (we are their subreaper) reaped."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            time.sleep(0.002)


def _criu_frozen_ms(img: str):
    """frozen_time (µs) of criu's stats-dump image, in ms; None if it
    cannot be read. The file: two magics (u32 each), a u32 size, then a
    StatsEntry protobuf whose field 1 (dump) holds freezing_time (1),
    frozen_time (2), ... as varints (criu images/stats.proto)."""
    def varint(b, i):
        v = shift = 0
        while True:
            c = b[i]
            i += 1
            v |= (c & 0x7f) << shift
            shift += 7
            if not c & 0x80:
                return v, i

    def fields(b):
        i, out = 0, {}
        while i < len(b):
            key, i = varint(b, i)
            wt = key & 7
            if wt == 0:
                out[key >> 3], i = varint(b, i)
            elif wt == 2:
                n, i = varint(b, i)
                out[key >> 3], i = b[i:i + n], i + n
            else:
                raise ValueError(f"wire type {wt}")
        return out
    try:
        with open(os.path.join(img, "stats-dump"), "rb") as f:
            data = f.read()
        (size,) = struct.unpack_from("<I", data, 8)
        dump = fields(fields(data[12:12 + size])[1])
        return round(dump[2] / 1000, 2)
    except (OSError, ValueError, KeyError, IndexError, struct.error):
        return None


def one_swarm(tool: str, cmd, swarm: str, mode: str, n: int, where: str, work: str) -> dict:
    """Dump and restore one fresh swarm with `tool`; wall/CPU seconds and
    the frozen time the tool reports."""
    p = _start_swarm(swarm, mode, n, work)
    pids = _members(p.pid) if mode == "tree" else [p.pid]
    if mode == "tree" and len(pids) != n:
        raise RuntimeError(f"swarm tree has {len(pids)} processes, not {n}")
    img = tempfile.mkdtemp(prefix=f"cmp-{tool}-", dir=where)
    pidfile = os.path.join(work, f"{tool}.pid")
    restored = None
    try:
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        os.sync()
        if tool.startswith("ckpt"):
            os.rmdir(img)
            d = _timed(cmd + ["dump", "-t", str(p.pid), "-D", img, "--json"], "ckpt dump")
            frozen = json.loads(d[2])["result"].get("frozen_ms")
        else:
            d = _timed(cmd + ["dump", "-t", str(p.pid), "-D", img, "-o", "dump.log"], "criu dump")
            frozen = _criu_frozen_ms(img)
        p.wait(timeout=60)
        _reap_all()                 # the killed members, orphaned to us
        if tool.startswith("ckpt"):
            r = _timed(cmd + ["restore", "-D", img, "--pidfile", pidfile, "--json"], "ckpt restore")
        else:
            r = _timed(cmd + ["restore", "-D", img, "-d", "--pidfile", pidfile, "-o", "restore.log"],
                       "criu restore")
        with open(pidfile) as f:
            restored = int(f.read().split()[0])
        _check_swarm(restored, mode, n, pids)
        return {"dump_s": d[0], "dump_cpu_s": d[1], "restore_s": r[0], "restore_cpu_s": r[1], "frozen_ms": frozen,
                **_injected(tool, r[2])}
    finally:
        for q in (_members(restored) if restored else []) + [p.pid]:
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.wait()
        _reap_all()
        shutil.rmtree(img, ignore_errors=True)


def _row(got: dict, rounds: int, cmds: dict, **what) -> dict:
    row = dict(what, rounds=rounds)
    for tool, runs in got.items():
        for k in ("dump_s", "restore_s", "dump_cpu_s", "restore_cpu_s", "frozen_ms", "restore_round_trips",
                  "restore_batched_calls", "dump_durable_s", "durable_ms"):
            vals = [r[k] for r in runs if r.get(k) is not None]
            if vals:
                row[f"{tool}_{k}"] = round(statistics.median(vals), 4)
        row[f"{tool}_samples"] = {k: [round(r[k], 4) for r in runs] for k in ("dump_s", "restore_s")}
    # speed ratios as issue 15 writes them: other time / ckpt time (> 1: ckpt faster)
    for other, name in (("criu", "criu"), ("ckpt_base", "base")):
        if other not in cmds or "ckpt" not in cmds:
            continue
        for k in ("dump", "restore"):
            row[f"{k}_speed_ckpt_over_{name}"] = round(row[f"{other}_{k}_s"] / row[f"ckpt_{k}_s"], 2)
        if row.get(f"{other}_dump_durable_s"):
            # the same work: criu's dump and its image fsync'd, against ckpt's (which fsyncs)
            row[f"dump_durable_speed_ckpt_over_{name}"] = round(row[f"{other}_dump_durable_s"] / row["ckpt_dump_s"], 2)
        if row.get("ckpt_frozen_ms") and row.get(f"{other}_frozen_ms"):
            row[f"frozen_speed_ckpt_over_{name}"] = round(row[f"{other}_frozen_ms"] / row["ckpt_frozen_ms"], 2)
    return row


def run_swarm(swarm: str, cases, where: str, rounds: int, cmds: dict) -> list:
    rows = []
    work = tempfile.mkdtemp(prefix="cmp-work-")
    try:
        for mode, n in cases:
            got = {t: [] for t in cmds}
            failed: dict = {}
            for i in range(rounds):
                order = list(cmds) if i % 2 == 0 else list(reversed(list(cmds)))
                for tool in order:
                    if tool in failed:
                        continue
                    try:
                        got[tool].append(one_swarm(tool, cmds[tool], swarm, mode, n, where, work))
                    except RuntimeError as e:
                        # a tool that cannot do this case: said in the row, the others go on
                        failed[tool] = str(e)[-600:]
                        print(f"compare: {tool} failed on {mode} {n}: {e}", file=sys.stderr, flush=True)
            row = _row({t: r for t, r in got.items() if t not in failed}, rounds,
                       {t: c for t, c in cmds.items() if t not in failed}, case=f"{mode} {n}", image_on=where)
            for tool, why in failed.items():
                row[f"{tool}_failed"] = why
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run(memhog: str, sizes, dirs, rounds: int, cmds: dict, leave_running: bool = False) -> list:
    rows = []
    work = tempfile.mkdtemp(prefix="cmp-work-")
    try:
        for mib in sizes:
            for where in dirs:
                got = {t: [] for t in cmds}
                for i in range(rounds):
                    order = list(cmds) if i % 2 == 0 else list(reversed(list(cmds)))
                    for tool in order:
                        got[tool].append(one(tool, cmds[tool], memhog, mib, where, work, leave_running))
                row = _row(got, rounds, cmds, touched_mib=mib, image_on=where)
                if leave_running:
                    row["leave_running"] = True
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _version(cmd) -> str:
    try:
        r = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=30, close_fds=True)
        return " ".join((r.stdout or r.stderr).split())
    except OSError as e:
        return f"unavailable: {e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memhog", required=True)
    ap.add_argument("--sizes", default="1,64", help="touched MiB per case, comma-separated")
    ap.add_argument("--dirs", default="/dev/shm,/var/tmp", help="where the images go (tmpfs, disk)")
    ap.add_argument("--swarm", help="tests/targets/swarm.c built: also the tree and threads cases")
    ap.add_argument("--swarm-cases", default="tree:50,threads:50", help="MODE:N, comma-separated")
    ap.add_argument("--swarm-dir", default="/dev/shm", help="where the swarm cases' images go")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ckpt", default="ckpt", help="the ckpt command (split like a shell would)")
    ap.add_argument("--ckpt-base", default="", help="an older ckpt command, measured as ckpt_base")
    ap.add_argument("--criu", default="criu", help="the criu command; empty: ckpt only")
    ap.add_argument("--leave-running", action="store_true",
                    help="dump the memhogs with --leave-running (frozen: until the target runs again)")
    ap.add_argument("--out", help="write the JSON here (default: stdout)")
    args = ap.parse_args(argv)
    _subreaper()
    cmds = {"ckpt": shlex.split(args.ckpt)}
    if args.ckpt_base:
        cmds["ckpt_base"] = shlex.split(args.ckpt_base)
    if args.criu:
        cmds["criu"] = shlex.split(args.criu)
    doc = {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kernel": os.uname().release,
           "cpus": os.cpu_count(), "criu_version": _version(cmds["criu"]) if "criu" in cmds else None,
           "python": sys.version.split()[0],
           "note": "wall time of each command incl. its start-up; median of rounds, tools alternating; "
                   "ckpt fsyncs its image before commit, criu does not",
           "rows": run(args.memhog, [int(x) for x in args.sizes.split(",")] if args.sizes else [],
                       args.dirs.split(","), args.rounds, cmds, args.leave_running)}
    if args.swarm:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.swarm_cases.split(",") if c]
        doc["swarm_rows"] = run_swarm(args.swarm, cases, args.swarm_dir, args.rounds, cmds)
    doc["loadavg_after"] = os.getloadavg()
    text = json.dumps(doc, indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
