"""``python3 -m harness bench``: reset time and corpus throughput, merged
into bench/results.json under ``scenarios`` / <arch> (other keys untouched).

Measured: one guest's boot to ready, ``revert("golden")`` (the reset between
scenarios) over several rounds, and the whole corpus with ``pytest -n N
--dist worksteal`` (scenarios per minute, outcome totals).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .targets import REPO, GuestTarget


def measure_reset(arch: str, accel: str, rounds: int, kernel: Optional[str] = None) -> Dict:
    """Boot one guest, snapshot it, revert ``rounds`` times (and prove the
    revert really reset: a file written after the snapshot must be gone)."""
    from vm import Guest, ensure_image
    img = ensure_image(arch, **({"kernel": kernel} if kernel else {}))
    t0 = time.monotonic()
    with Guest(arch=arch, accel=accel, name="bench-reset", log_dir=str(REPO / "reports" / "guests"),
               image=img, memory_mb=512, engine_dir=str(REPO / "engine")) as g:
        boot = time.monotonic() - t0
        t = GuestTarget(g, time_scale=1.0 if getattr(g, "accel", "tcg") == "kvm" else 2.0)
        t.install()
        t.start_agent()
        t1 = time.monotonic()
        g.snapshot("golden")
        snap = time.monotonic() - t1
        out = {"accel": getattr(g, "accel", None), "boot_to_ready_s": round(boot, 2), "snapshot_s": round(snap, 3)}
        # over SSH (loadvm, a new SSH connection, the clock), then through the
        # agent (loadvm, the clock over the port that stayed connected)
        for key, revert in (("reset_s", lambda: g.revert("golden")), ("reset_agent_s", t.reset)):
            if key == "reset_agent_s" and t.agent is None:
                out[key] = {"skipped": t.agent_note}
                continue
            resets: List[float] = []
            for i in range(rounds):
                t.run(["touch", "/srv/crucible/dirty"], timeout=60)
                t2 = time.monotonic()
                revert()
                resets.append(time.monotonic() - t2)
                if t.run(["test", "-e", "/srv/crucible/dirty"], timeout=60).rc == 0:
                    raise RuntimeError("revert did not reset the guest")
            out[key] = {"rounds": rounds, "median": round(statistics.median(resets), 3), "max": round(max(resets), 3)}
        return out


#: A sample of the corpus for the per-scenario figures (one of each family).
SAMPLE = ["scenarios/anon/eventfd.yaml", "scenarios/files/offsets.yaml", "scenarios/pipe/both-ends-with-data.yaml",
          "scenarios/fifo/empty-read-end.yaml", "scenarios/locks/flock.yaml", "scenarios/changed/chmod-after-dump.yaml",
          "scenarios/mmap/anon-memory.yaml", "scenarios/inotify/file-watch.yaml"]


def measure_per_scenario(extra: List[str], agent: bool, sample: Optional[List[str]] = None) -> Dict:
    """Run ``sample`` in one guest, steps through the resident agent or (agent
    off) over SSH as before it; the median of the per-scenario wall times
    (the reset before each included; the first, which boots, left out)."""
    reports = REPO / "reports" / "bench" / ("agent" if agent else "ssh")
    rows = reports / "rows.jsonl"
    env = dict(os.environ, CRUCIBLE_REPORTS=str(reports), CRUCIBLE_AGENT="1" if agent else "0")
    argv = [sys.executable, "-m", "pytest", *(sample or SAMPLE), "-q", "-p", "no:cacheprovider",
            "-p", "no:benchmark"] + extra
    p = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, close_fds=True)
    return dict(summarize_rows(rows, agent), pytest_exit=p.returncode)


def summarize_rows(rows: Path, agent: bool) -> Dict:
    """The per-scenario figures of one run's rows.jsonl: median wall time per
    scenario (its reset included; the first row, which boots, left out) and
    the median of each step, ``engine`` being the engine's own processes."""
    got = [json.loads(x) for x in rows.read_text().splitlines()] if rows.exists() else []
    durs = [r["duration"] for r in got[1:] if isinstance(r.get("duration"), (int, float))]
    steps: Dict[str, List[float]] = {}
    for r in got[1:]:
        for k, v in (r.get("timings") or {}).items():
            steps.setdefault(k, []).append(v)
    return {"agent": agent, "scenarios": len(got),
            "median_s": round(statistics.median(durs), 2) if durs else None,
            "max_s": round(max(durs), 2) if durs else None,
            "step_median_s": {k: round(statistics.median(v), 3) for k, v in sorted(steps.items())},
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def measure_corpus(workers: int, extra: List[str]) -> Dict:
    """Run ``pytest scenarios/`` with ``workers`` xdist workers; time it."""
    reports = REPO / "reports" / "bench"
    env = dict(os.environ, CRUCIBLE_REPORTS=str(reports))
    argv = [sys.executable, "-m", "pytest", "scenarios/", "-n", str(workers), "--dist", "worksteal", "-q",
            "-p", "no:cacheprovider"] + extra
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, close_fds=True)
    wall = time.monotonic() - t0
    try:
        doc = json.loads((reports / "scenarios.json").read_text())
    except (OSError, ValueError):
        doc = {}
    n = sum(len(v["engines"]) for v in doc.get("scenarios", {}).values())
    return {"workers": workers, "wall_s": round(wall, 1), "scenario_runs": n,
            "scenarios_per_minute": round(n / wall * 60, 2) if n else 0.0,
            "pytest_exit": p.returncode, "totals": doc.get("totals", {}),
            "summary": (p.stdout.strip().splitlines() or [""])[-1]}


def merge_into(path: Path, key: str, cell: str, value: Dict) -> None:
    """Replace ``doc[key][cell]`` in the JSON file at ``path`` (one entry per
    arch/kernel, next to each other), keeping everything else."""
    doc = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            doc = {}
    section = doc.get(key)
    if not isinstance(section, dict) or "corpus" in section or "reset_s" in section:
        section = {}          # absent, or the older single-arch layout
    section[cell] = value
    doc[key] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m harness bench", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    ap.add_argument("--arch", default=os.environ.get("ARCH", "x86_64"))
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--kernel", default=None, help="guest kernel (vm.recipe.KERNELS key)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reset-rounds", type=int, default=5)
    ap.add_argument("--skip-corpus", action="store_true", help="only boot, reset and per-scenario times")
    ap.add_argument("--skip-per-scenario", action="store_true", help="no agent/SSH per-scenario comparison")
    args = ap.parse_args(argv)
    result: Dict = {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result.update(measure_reset(args.arch, args.accel, args.reset_rounds, args.kernel))
    extra = ["--arch", args.arch, "--accel", args.accel] + (["--kernel", args.kernel] if args.kernel else [])
    if not args.skip_per_scenario:
        # SSH first, then the agent, under as alike a load as the machine allows
        result["per_scenario"] = {"ssh": measure_per_scenario(extra, agent=False),
                                  "agent": measure_per_scenario(extra, agent=True)}
    if not args.skip_corpus:
        result["corpus"] = measure_corpus(args.workers, extra)
    result["arch"] = args.arch
    result["kernel"] = args.kernel or "6.1"
    cell = args.arch if result["kernel"] == "6.1" else f"{args.arch}+{result['kernel']}"
    merge_into(Path(args.out), "scenarios", cell, result)
    print(json.dumps(result, indent=2))
    return 0
