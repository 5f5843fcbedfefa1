"""Shrinking a failing generated scenario to a minimal one.

Greedy, one change at a time: drop an fd entry (with what refers to it),
drop a world step, drop a mapping, the process section or a dump option,
reduce a size or a count. Every candidate gets its expectation derived
again from the rules (generate.complete: dropping the perturbed fd changes
what must happen) and is skipped if the rules cannot decide it or it is not
a legal scenario. A candidate is kept when it still fails with the same
*signature* (outcome and reasons, harness/runner.Result) as the original,
so the shrinker does not wander off to another failure; it starts over from
the kept one until no change keeps failing or the run budget is spent.

The minimal case is written by :func:`write_found` to
``scenarios/found/<id>.yaml`` with a comment header naming the seed, the
original case and the failure.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

from . import generate, kinds, schema, world

# run(scenario, attempt number) -> (failed, signature, note)
Runner = Callable[[dict, int], Tuple[bool, str, str]]


@dataclass
class Shrunk:
    scenario: dict
    signature: str
    note: str
    runs: int = 0
    steps: List[str] = field(default_factory=list)     # what each kept change was
    reproduced: Optional[bool] = None                  # the case failed again when re-run


def _drop_fd(sc: dict, i: int) -> dict:
    """Without fd entry ``i`` and the dups and epoll targets that refer to it."""
    sc = copy.deepcopy(sc)
    fds = sc["workload"]["fds"]
    gone = set(kinds.fd_numbers(fds.pop(i)))
    fds[:] = [e for e in fds if e.get("dup") not in gone]
    for e in fds:
        if "epoll" in e:
            e["epoll"]["targets"] = [t for t in e["epoll"]["targets"] if t["fd"] not in gone]
    fds[:] = [e for e in fds if "epoll" not in e or e["epoll"]["targets"]]
    return sc


def _halve(v: int, floor: int = 1) -> int:
    return max(floor, v // 2)


def candidates(sc: dict) -> Iterator[Tuple[str, dict]]:
    """Smaller variants of ``sc``, biggest cuts first (raw: not yet completed)."""
    wl = sc["workload"]
    fds = wl.get("fds") or []
    for i in range(len(fds)):
        yield f"drop workload.fds[{i}] ({generate.variant_of(fds[i])})", _drop_fd(sc, i)
    for i in range(len(wl.get("mmaps") or [])):
        c = copy.deepcopy(sc)
        del c["workload"]["mmaps"][i]
        yield f"drop workload.mmaps[{i}]", c
    for phase in ("between", "before_dump", "setup"):
        for i in range(len(sc.get(phase) or [])):
            c = copy.deepcopy(sc)
            step = c[phase].pop(i)
            yield f"drop {phase}[{i}] ({world.split_op(step)[0]})", c
    if wl.get("process"):
        c = copy.deepcopy(sc)
        del c["workload"]["process"]
        yield "drop workload.process", c
        for key in sorted(wl["process"]):
            if len(wl["process"]) > 1:
                c = copy.deepcopy(sc)
                del c["workload"]["process"][key]
                yield f"drop workload.process.{key}", c
        for i in range(len(wl["process"].get("threads") or [])):
            if len(wl["process"]["threads"]) > 1:
                c = copy.deepcopy(sc)
                del c["workload"]["process"]["threads"][i]
                yield f"drop workload.process.threads[{i}]", c
    for key in ("leave_running", "ghost_limit", "file_validation"):
        if key in (sc.get("dump") or {}):
            c = copy.deepcopy(sc)
            del c["dump"][key]
            yield f"drop dump.{key}", c
    if sc.get("restore_on") == "other":
        c = copy.deepcopy(sc)
        c["restore_on"] = "same"
        yield "restore on the same target", c
    # smaller sizes and counts
    for i, step in enumerate(sc.get("setup") or []):
        if "file" in step and step["file"]["bytes"] > 1 and not step["file"].get("holes") \
                and not step["file"].get("extents"):
            c = copy.deepcopy(sc)
            size = _halve(step["file"]["bytes"])
            c["setup"][i]["file"]["bytes"] = size
            _clamp(c, step["file"]["path"], size)
            yield f"setup[{i}] file of {size} bytes", c
    for i, e in enumerate(fds):
        for key in ("count",):
            if e.get(key, 1) > 1:
                c = copy.deepcopy(sc)
                c["workload"]["fds"][i][key] = e[key] - 1
                yield f"workload.fds[{i}].{key} {e[key] - 1}", c
        for key in ("seek", "bytes"):
            if e.get(key, 0) > 0:
                c = copy.deepcopy(sc)
                c["workload"]["fds"][i][key] = e[key] // 2
                yield f"workload.fds[{i}].{key} {e[key] // 2}", c
        for key in ("data", "peer_data"):
            if (e.get(key) or {}).get("bytes", 0) > 1:
                c = copy.deepcopy(sc)
                c["workload"]["fds"][i][key]["bytes"] = _halve(e[key]["bytes"])
                yield f"workload.fds[{i}].{key} {_halve(e[key]['bytes'])} bytes", c
        for key in ("flags",):
            if e.get(key):
                c = copy.deepcopy(sc)
                del c["workload"]["fds"][i][key]
                yield f"drop workload.fds[{i}].{key}", c


def _clamp(sc: dict, path: str, size: int) -> None:
    """Keep offsets and mappings on a shrunk file inside it."""
    for e in sc["workload"].get("fds") or []:
        if e.get("open") == path and e.get("seek", 0) > size:
            e["seek"] = size
    for m in sc["workload"].get("mmaps") or []:
        if m.get("file") == path:
            m["length"] = min(m["length"], size)       # no page beyond the end (SIGBUS)
            m.pop("offset", None)
            if m.get("dirty") and m["dirty"].get("offset", 0) + m["dirty"]["bytes"] > size:
                del m["dirty"]
    for phase in ("before_dump", "between"):
        for step in sc.get(phase) or []:
            op, a = world.split_op(step)
            if op == "truncate" and a["path"] == path:
                a["size"] = size // 2
            if op == "file" and a["path"] == path + "-new":
                a["bytes"] = size


def legal(sc: dict) -> Optional[dict]:
    """The completed candidate (expectation derived again), or None."""
    try:
        return generate.complete(sc)
    except (generate.NotDerivable, schema.SchemaError, world.WorldError, KeyError, ValueError):
        return None


def shrink(sc: dict, signature: str, run: Runner, budget: int = 40, note: str = "",
           seconds: Optional[float] = None) -> Shrunk:
    """The smallest variant of ``sc`` that ``run`` still fails with
    ``signature``, in at most ``budget`` runs (and ``seconds``)."""
    stop = time.monotonic() + seconds if seconds else None
    best = Shrunk(copy.deepcopy(sc), signature, note)
    seen = {generate.to_yaml(best.scenario)}
    # first the case itself again: a failure that does not come back is
    # flaky, said so, and not worth the shrinking runs
    best.runs = 1
    failed, sig, _ = run(best.scenario, best.runs)
    if not (failed and sig == signature):
        best.reproduced = False
        return best
    progress = True
    while progress and best.runs < budget:
        progress = False
        for what, raw in candidates(best.scenario):
            cand = legal(raw)
            if cand is None:
                continue
            key = generate.to_yaml(cand)
            if key in seen:
                continue
            seen.add(key)
            best.runs += 1
            failed, sig, why = run(cand, best.runs)
            if failed and sig == signature:
                best.scenario, best.note = cand, why
                best.steps.append(what)
                progress = True
                break
            if best.runs >= budget or (stop and time.monotonic() > stop):
                progress = False
                break
    best.reproduced = True      # the original failed twice; each kept step failed again
    return best


def _index(case_id: str) -> int:
    """``gen-s7-0012`` -> 12 (0 for another name)."""
    tail = case_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def write_found(directory: str, case_id: str, seed: int, original: dict, shrunk: Shrunk) -> str:
    """``<directory>/<case_id>.yaml``: the minimal case, its header saying
    where it came from and how it failed."""
    os.makedirs(directory, exist_ok=True)
    note = " ".join(shrunk.note.split())[:400]
    header = "\n".join([
        f"# Found by the scenario generator (harness/generate.py): seed {seed}, case {case_id}",
        f"#   rerun the original: pytest scenarios/ --generate {_index(case_id) + 1} --seed {seed} -k {case_id}",
        f"# original case: {original.get('name', case_id)}",
        f"# failure: {shrunk.signature}",
        f"#   {note}",
        f"# shrunk in {shrunk.runs} runs: " + ("; ".join(shrunk.steps) or "nothing smaller fails"),
        "# reproduced: " + {True: "yes, the case failed again when re-run",
                            False: "NO - it passed when re-run: a flaky failure (not shrunk)",
                            None: "not re-run"}[shrunk.reproduced],
        "# The expectation is derived from the rules (generate.RULES); commit this file as a",
        "# regression under scenarios/ once the engine passes it.",
        ""])
    sc = dict(shrunk.scenario, name=f"found {case_id}: {generate._describe(shrunk.scenario)}")
    path = os.path.join(directory, f"{case_id}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(generate.to_yaml(sc, header=header))
    return path


def claim(directory: str, classes, case_id: str) -> Tuple[List[str], List[str]]:
    """Claim the failure classes (pytest_plugin.failure_classes) that no
    case of this run claimed before, for `case_id` to be shrunk for, and
    return (the ones claimed now, the cases that had claimed the others).
    One file per class under `directory` (the run's reports: shared by the
    xdist workers, emptied when a run starts), created exclusively: a class
    is shrunk once per run, not once per case that shows it (one engine
    that gets one thing wrong in every case, as criu loses every
    MADV_WIPEONFORK, would spend the run shrinking that one thing)."""
    import hashlib
    os.makedirs(directory, exist_ok=True)
    fresh, others = [], []
    for c in sorted(classes):
        path = os.path.join(directory, hashlib.sha1(c.encode()).hexdigest()[:16])
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    others.append(f.read().split("\n", 1)[0] or "?")
            except OSError:
                others.append("?")
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{case_id}\n{c}\n")
        fresh.append(c)
    return fresh, sorted(set(others))
