"""``python3 -m harness bench``: reset time, per-scenario time and corpus
throughput, merged into bench/results.json under ``scenarios`` / <arch>
(other keys untouched).

Measured: one guest's boot to ready, ``revert("golden")`` (the reset between
scenarios) over several rounds; a sample of the corpus (one scenario of each
family) in one guest three ways - steps over SSH, through the agent with
ckpt exec'd, through the agent with ckpt forked from its warm engine
(harness/zygote.py) - as per-scenario medians with the engine's own part;
the restore_on: other scenarios (two guests; the image crosses between
them); and the whole corpus with ``pytest scenarios/ -n N --dist worksteal``
(wall time, scenarios per minute, per-scenario median, outcome totals).

``--only corpus`` runs just the corpus (the one full run of a session).
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
               image=img, memory_mb=512) as g:
        boot = time.monotonic() - t0
        t = GuestTarget(g, time_scale=1.0 if getattr(g, "accel", "tcg") == "kvm" else 2.0)
        t.install(REPO / "engine")
        t.start_agent()
        t.zero_free_memory()       # as the pytest plugin does before its golden snapshot
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


#: The scenarios that restore on a second guest (the image crosses guests).
MIGRATE_SAMPLE = ["scenarios/migrate", "scenarios/tree/migrate.yaml"]

#: per-scenario modes: (agent on, ckpt warm)
MODES = {"ssh": (False, False), "agent_exec": (True, False), "agent_warm": (True, True)}


def measure_per_scenario(extra: List[str], mode: str, sample: Optional[List[str]] = None) -> Dict:
    """Run ``sample`` in one guest (two for restore_on: other), steps over
    SSH or through the resident agent, ckpt exec'd or warm; the median of
    the per-scenario wall times (the reset before each included; the
    first, which boots, left out)."""
    agent, warm = MODES[mode]
    reports = REPO / "reports" / "bench" / mode
    rows = reports / "rows.jsonl"
    try:
        rows.unlink()
    except OSError:
        pass
    env = dict(os.environ, CRUCIBLE_REPORTS=str(reports), CRUCIBLE_AGENT="1" if agent else "0",
               CRUCIBLE_WARM_CKPT="1" if warm else "0")
    argv = [sys.executable, "-m", "pytest", *(sample or SAMPLE), "-q", "-p", "no:cacheprovider",
            "-p", "no:benchmark"] + extra
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, close_fds=True)
    return dict(summarize_rows(rows, agent), mode=mode, wall_s=round(time.monotonic() - t0, 1),
                pytest_exit=p.returncode)


def summarize_rows(rows: Path, agent: Optional[bool] = None, skip_first: bool = True) -> Dict:
    """The per-scenario figures of one run's rows.jsonl: median wall time per
    scenario (its reset included; with ``skip_first`` the first row, which
    boots, left out), the median of each step (``engine`` being the engine's
    own processes), and how the ckpt commands and the workloads started
    (warm / exec)."""
    got = [json.loads(x) for x in rows.read_text().splitlines()] if rows.exists() else []
    use = got[1:] if skip_first else got
    durs = [r["duration"] for r in use if isinstance(r.get("duration"), (int, float))]
    steps: Dict[str, List[float]] = {}
    starts: Dict[str, int] = {}
    workload_starts: Dict[str, int] = {}
    cpu: Dict[str, List[float]] = {}
    for r in use:
        for k, v in (r.get("cpu") or {}).items():
            if isinstance(v, (int, float)):
                cpu.setdefault(k, []).append(v)
        ws = str(r.get("workload_start") or "")
        if ws:
            key = "exec" if ws.startswith("exec") else ws
            workload_starts[key] = workload_starts.get(key, 0) + 1
        for k, v in (r.get("timings") or {}).items():
            steps.setdefault(k, []).append(v)
        for st in r.get("engine_start") or []:
            key = "exec" if st.startswith("exec") else st
            starts[key] = starts.get(key, 0) + 1
    out = {"scenarios": len(got),
           "median_s": round(statistics.median(durs), 2) if durs else None,
           "max_s": round(max(durs), 2) if durs else None,
           "step_median_s": {k: round(statistics.median(v), 3) for k, v in sorted(steps.items())},
           "engine_start": starts,
           "workload_start": workload_starts,
           # where the time went on the host (harness/cpuclock.py): per
           # scenario, its QEMUs on a CPU and waiting for one, the harness,
           # how busy the host was (other jobs too); the QEMU CPU total is
           # the figure least moved by the machine's load
           "cpu_median_s": {k: round(statistics.median(v), 3) for k, v in sorted(cpu.items())},
           "qemu_cpu_total_s": round(sum(cpu.get("qemu", [])), 1) if cpu else None,
           "outcomes": {o: sum(1 for r in got if r.get("outcome") == o) for o in sorted({r.get("outcome") for r in got})},
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    if agent is not None:
        out["agent"] = agent
    return out


def measure_corpus(workers: int, extra: List[str]) -> Dict:
    """Run ``pytest scenarios/`` with ``workers`` xdist workers; time it."""
    reports = REPO / "reports" / "bench"
    env = dict(os.environ, CRUCIBLE_REPORTS=str(reports))
    try:
        (reports / "rows.jsonl").unlink()
    except OSError:
        pass
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
    # every row counts here (each worker's first boots; that is part of a corpus run)
    rows = summarize_rows(reports / "rows.jsonl", skip_first=False)
    return {"workers": workers, "wall_s": round(wall, 1), "scenario_runs": n,
            "scenarios_per_minute": round(n / wall * 60, 2) if n else 0.0,
            "median_s": rows["median_s"], "max_s": rows["max_s"], "step_median_s": rows["step_median_s"],
            "cpu_median_s": rows["cpu_median_s"], "qemu_cpu_total_s": rows["qemu_cpu_total_s"],
            "load_avg_1m_end": rows["load_avg_1m"],
            "engine_start": rows["engine_start"], "workload_start": rows["workload_start"], "warm_ckpt": os.environ.get("CRUCIBLE_WARM_CKPT", "1") != "0",
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
    ap.add_argument("--skip-per-scenario", action="store_true", help="no SSH/agent/warm per-scenario comparison")
    ap.add_argument("--only", choices=("reset", "per-scenario", "migrate", "corpus"), action="append",
                    help="measure only these (repeatable); the other figures of the cell are kept")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"per-scenario modes, of {','.join(MODES)} (default all)")
    args = ap.parse_args(argv)
    want = set(args.only or ["reset", "per-scenario", "migrate", "corpus"])
    if args.skip_corpus:
        want.discard("corpus")
    if args.skip_per_scenario:
        want.discard("per-scenario")
    kernel = args.kernel or "6.1"
    cell = args.arch if kernel == "6.1" else f"{args.arch}+{kernel}"
    result: Dict = previous_cell(Path(args.out), "scenarios", cell)
    result["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if "reset" in want:
        result.update(measure_reset(args.arch, args.accel, args.reset_rounds, args.kernel))
    extra = ["--arch", args.arch, "--accel", args.accel] + (["--kernel", args.kernel] if args.kernel else [])
    if "per-scenario" in want:
        # one mode after the other, under as alike a load as the machine allows
        per = result.get("per_scenario") if isinstance(result.get("per_scenario"), dict) else {}
        per.pop("agent", None)          # the layout before warm/exec
        for mode in [m for m in args.modes.split(",") if m]:
            per[mode] = measure_per_scenario(extra, mode)
        result["per_scenario"] = per
    if "migrate" in want:
        result["migrate"] = measure_per_scenario(extra, "agent_warm", MIGRATE_SAMPLE)
    if "corpus" in want:
        result["corpus"] = measure_corpus(args.workers, extra)
    result["arch"] = args.arch
    result["kernel"] = kernel
    merge_into(Path(args.out), "scenarios", cell, result)
    print(json.dumps(result, indent=2))
    return 0


def previous_cell(path: Path, key: str, cell: str) -> Dict:
    """What ``path`` holds for this cell (a partial run keeps the rest)."""
    try:
        got = json.loads(path.read_text()).get(key, {}).get(cell)
    except (OSError, ValueError, AttributeError):
        return {}
    return dict(got) if isinstance(got, dict) else {}
