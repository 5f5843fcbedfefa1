"""The end-of-run summary: outcome per scenario per engine, as a table and
as JSON under reports/ (merged from every xdist worker by the controller)."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List

# one row per (scenario file, engine):
#   {"scenario", "engine", "expected", "outcome", "got", "passed", "note", "duration", ...}


def merge(rows: List[Dict]) -> Dict[str, Dict]:
    """``{scenario: {"expected": ..., "engines": {engine: row}}}`` (last row wins)."""
    out: Dict[str, Dict] = {}
    for r in rows:
        entry = out.setdefault(r["scenario"], {"expected": r["expected"], "engines": {}})
        entry["engines"][r["engine"]] = r
    return dict(sorted(out.items()))


def totals(rows: List[Dict]) -> Dict[str, Dict[str, int]]:
    t: Dict[str, Dict[str, int]] = {}
    for r in rows:
        e = t.setdefault(r["engine"], {})
        e[r["outcome"]] = e.get(r["outcome"], 0) + 1
        key = "passed" if r["passed"] else "failed"
        e[key] = e.get(key, 0) + 1
    return t


def _cell(r: Dict) -> str:
    if r is None:
        return "-"
    mark = "" if r["passed"] else " FAIL"
    if r["passed"] and r.get("note"):
        mark = " (differs)"
    return f"{r['got']}{mark}"


def table(rows: List[Dict]) -> str:
    """A fixed-width table a person reads at the end of a run."""
    if not rows:
        return "no scenarios ran"
    merged = merge(rows)
    engines = sorted({r["engine"] for r in rows}, key=lambda e: (e != "ckpt", e))
    head = ["scenario", "expected"] + engines
    body = [[name, m["expected"]] + [_cell(m["engines"].get(e)) for e in engines] for name, m in merged.items()]
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    line = lambda cols: "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    for e, counts in totals(rows).items():
        out.append(f"{e}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(out)


def write_json(rows: List[Dict], directory: str, meta: Dict) -> str:
    """Write reports/scenarios-<stamp>.json and reports/scenarios.json (latest)."""
    os.makedirs(directory, exist_ok=True)
    doc = {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta,
           "totals": totals(rows), "scenarios": merge(rows)}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = os.path.join(directory, f"scenarios-{stamp}.json")
    for p in (path, os.path.join(directory, "scenarios.json")):
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, p)
    return path


def generated_summary(rows: List[Dict], seed: int) -> str:
    """A --generate run in a few lines: per engine the cases, their outcomes,
    how many met the derived expectation, and the shrunk findings."""
    out = []
    for engine in sorted({r["engine"] for r in rows}, key=lambda e: (e != "ckpt", e)):
        mine = [r for r in rows if r["engine"] == engine]
        outcomes: Dict[str, int] = {}
        for r in mine:
            outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        passed = sum(1 for r in mine if r["passed"])
        out.append(f"{engine}: seed {seed}, {len(mine)} cases; outcomes: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
                   + f"; met the derived expectation: {passed}, failed: {len(mine) - passed}")
        failed = [r for r in mine if not r["passed"]]
        for r in failed:
            if not r.get("not_shrunk"):
                out.append(f"  {r['scenario']}: expected {r['expected']}, got {r['got']}"
                           + (f" -> shrunk: {r['found']}" if r.get("found") else ""))
        same = [r for r in failed if r.get("not_shrunk")]
        if same:
            out.append(f"  and {len(same)} more failing only in ways a case above was shrunk for "
                       f"(e.g. {', '.join(r['scenario'] for r in same[:3])})")
        classes: Dict[str, List[str]] = {}
        for r in failed:
            for c in r.get("failure_classes") or [r["got"]]:
                classes.setdefault(c, []).append(r["scenario"])
        if classes:
            out.append("  failure classes (cases showing each):")
            for c, where in sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                out.append(f"    {len(where):4d}  {c}")
    return "\n".join(out)
