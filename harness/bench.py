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
        GuestTarget(g).install()
        t1 = time.monotonic()
        g.snapshot("golden")
        snap = time.monotonic() - t1
        resets: List[float] = []
        for i in range(rounds):
            g.run(["touch", "/srv/crucible/dirty"], timeout=60, check=True)
            t2 = time.monotonic()
            g.revert("golden")
            resets.append(time.monotonic() - t2)
            if g.run(["test", "-e", "/srv/crucible/dirty"], timeout=60).rc == 0:
                raise RuntimeError("revert did not reset the guest")
        return {"accel": getattr(g, "accel", None), "boot_to_ready_s": round(boot, 2),
                "snapshot_s": round(snap, 3), "reset_s": {"rounds": rounds, "median": round(statistics.median(resets), 3),
                                                          "max": round(max(resets), 3)}}


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
    ap.add_argument("--skip-corpus", action="store_true", help="only boot and reset times")
    args = ap.parse_args(argv)
    result: Dict = {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result.update(measure_reset(args.arch, args.accel, args.reset_rounds, args.kernel))
    if not args.skip_corpus:
        extra = ["--arch", args.arch, "--accel", args.accel] + (["--kernel", args.kernel] if args.kernel else [])
        result["corpus"] = measure_corpus(args.workers, extra)
    result["arch"] = args.arch
    result["kernel"] = args.kernel or "6.1"
    cell = args.arch if result["kernel"] == "6.1" else f"{args.arch}+{result['kernel']}"
    merge_into(Path(args.out), "scenarios", cell, result)
    print(json.dumps(result, indent=2))
    return 0
