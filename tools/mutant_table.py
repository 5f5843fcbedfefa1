#!/usr/bin/env python3
"""The mutant table: which scenarios killed which mutant engine.

Reads the harness report of one run of the corpus against ckpt and every
mutant (``reports/.../scenarios.json``, rows carrying ``engine_notes``, the
mutant's own "mutant NAME: applied: ..." / "no target in image" lines) and
writes ``mutants.json`` and ``mutants.md`` into --out, prints the table, and
exits 1 naming the survivors (0 when every mutant was killed).

A scenario *kills* a mutant when the judge failed it (``passed`` false:
corrupted, crashed, hung, another outcome than expected), the mutant said it
applied its break there, and ckpt passed that scenario in the same run (a
scenario ckpt fails proves nothing about a mutant). A mutant never killed
is a *survivor*: "survived" when it applied somewhere, "not applicable" when
no scenario had what it breaks. A failed row where the mutant did not apply
is listed as suspect (flaky), never as a kill; so is a failure at the dump
step of a mutant whose break only acts at restore.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from harness import mutants  # noqa: E402

PREFIX = "mutant:"
# Mutants whose break acts only at restore (image edits made after a
# successful dump, a restore-time check switched off): a row that failed at
# the dump step failed for another reason (a flaky host), not because of them.
RESTORE_ONLY = set(mutants.EDITS) | {"reopen-replaced-file", "default-mss"}


def merge_reports(paths: List[str]) -> dict:
    """One report from several runs: each scenario's engines united."""
    out: dict = {"scenarios": {}}
    for p in paths:
        try:
            with open(p) as f:
                if p.endswith(".jsonl"):     # rows as they came (a run cut short)
                    from harness import report as report_mod
                    r = {"scenarios": report_mod.merge([json.loads(ln) for ln in f if ln.strip()])}
                else:
                    r = json.load(f)
        except (OSError, ValueError) as e:
            raise type(e)(f"{p}: {e}") from None
        for k in ("target", "kernel", "arch"):
            out.setdefault(k, r.get(k))
        for s, m in (r.get("scenarios") or {}).items():
            entry = out["scenarios"].setdefault(s, {"expected": m.get("expected"), "engines": {}})
            entry["engines"].update(m.get("engines") or {})
    return out


def build(report: dict) -> dict:
    scen = report.get("scenarios") or {}
    ckpt_ok = {s for s, m in scen.items() if (m["engines"].get("ckpt") or {}).get("passed")}
    ckpt_ran = any("ckpt" in m["engines"] for m in scen.values())
    out: Dict[str, dict] = {}
    for name in mutants.names():
        e = PREFIX + name
        row = {"mutant": name, "breaks": mutants.describe(name), "caught_by": mutants.CAUGHT_BY[name],
               "ran": 0, "applied_in": [], "killed_by": [], "survived_in": [], "suspect": [], "errors": []}
        for s, m in sorted(scen.items()):
            r = m["engines"].get(e)
            if r is None:
                continue
            row["ran"] += 1
            notes = r.get("engine_notes") or []
            applied = any(f"mutant {name}: applied" in n for n in notes)
            err = [n for n in notes if f"mutant {name}: error" in n]
            if err or r.get("outcome") == "error":
                row["errors"].append({"scenario": s, "why": (err or [r.get("note", "")])[0]})
                continue
            if applied:
                row["applied_in"].append(s)
            if r.get("passed"):
                if applied:
                    row["survived_in"].append(s)
                continue
            kill = {"scenario": s, "got": r.get("got", r.get("outcome")), "why": (r.get("note") or "")[:300]}
            before = (" at dump" in kill["got"] or kill["why"].startswith("crashed at dump")) and name in RESTORE_ONLY
            # another process took the dumped PID before the restore: a busy
            # host, whatever the image says
            taken = "pid-in-use" in kill["got"] and name in RESTORE_ONLY
            if applied and not before and not taken and (s in ckpt_ok or not ckpt_ran):
                row["killed_by"].append(kill)
            else:
                kill["suspect"] = ("mutant did not apply here" if not applied else
                                   "failed at the dump, before the mutant's break acts" if before else
                                   "the dumped PID was taken by another process (a busy host)" if taken else
                                   "ckpt fails this scenario too")
                row["suspect"].append(kill)
        row["status"] = ("killed" if row["killed_by"] else "not run" if not row["ran"]
                         else "error" if row["errors"] and not row["applied_in"]
                         else "survived" if row["applied_in"] else "not applicable")
        out[name] = row
    ckpt_failed = sorted(s for s, m in scen.items() if "ckpt" in m["engines"] and not m["engines"]["ckpt"].get("passed"))
    return {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": report.get("target"), "kernel": report.get("kernel"), "arch": report.get("arch"),
            "scenarios": len(scen), "ckpt_failed": ckpt_failed, "mutants": out,
            "survivors": sorted(n for n, r in out.items() if r["status"] != "killed")}


def _short(s: str) -> str:
    return s[len("scenarios/"):] if s.startswith("scenarios/") else s


def markdown(doc: dict) -> str:
    ms = doc["mutants"]
    killed = sum(1 for r in ms.values() if r["status"] == "killed")
    lines = [f"# Mutant table ({doc['generated']}, target {doc['target']}, kernel {doc['kernel']})", "",
             f"{killed} of {len(ms)} mutants killed by the {doc['scenarios']}-scenario corpus; "
             f"ckpt failed {len(doc['ckpt_failed'])} scenario(s){': ' + ', '.join(doc['ckpt_failed']) if doc['ckpt_failed'] else ''}.",
             "", "| mutant | breaks | status | applied in | killed by | missing check (survivors) |",
             "|---|---|---|---|---|---|"]
    for name, r in ms.items():
        kills = ", ".join(f"{_short(k['scenario'])} ({k['got']})" for k in r["killed_by"][:6])
        if len(r["killed_by"]) > 6:
            kills += f", +{len(r['killed_by']) - 6} more"
        lines.append(f"| {name} | {r['breaks']} | {r['status']} | {len(r['applied_in'])}/{r['ran']} | "
                     f"{kills or '-'} | {'' if r['status'] == 'killed' else r['caught_by']} |")
    sus = [(n, k) for n, r in ms.items() for k in r["suspect"]]
    if sus:
        lines += ["", "Suspect failures (not counted as kills):", ""]
        lines += [f"- {n}: {_short(k['scenario'])} ({k['got']}): {k['suspect']}" for n, k in sus]
    errs = [(n, e) for n, r in ms.items() for e in r["errors"]]
    if errs:
        lines += ["", "Mutant or harness errors:", ""] + [f"- {n}: {_short(e['scenario'])}: {e['why']}" for n, e in errs]
    return "\n".join(lines) + "\n"


def text(doc: dict) -> str:
    ms = doc["mutants"]
    w = max(len(n) for n in ms)
    out = []
    for name, r in ms.items():
        kills = ", ".join(_short(k["scenario"]) for k in r["killed_by"][:4])
        if len(r["killed_by"]) > 4:
            kills += f" +{len(r['killed_by']) - 4}"
        tail = kills if r["status"] == "killed" else f"needs: {r['caught_by']}"
        out.append(f"{name:<{w}}  {r['status']:<14}  applied {len(r['applied_in']):>2}/{r['ran']:<2}  {tail}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", nargs="+",
                    help="scenarios.json of a run with --engine ckpt --engine mutant:all (or of several runs, "
                         "e.g. one per group of mutants: their rows are merged)")
    ap.add_argument("--out", default="reports", help="directory for mutants.json and mutants.md")
    a = ap.parse_args(argv)
    try:
        report = merge_reports(a.report)
    except (OSError, ValueError) as e:
        print(f"mutant_table: cannot read {e}", file=sys.stderr)
        return 2
    doc = build(report)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "mutants.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    with open(os.path.join(a.out, "mutants.md"), "w") as f:
        f.write(markdown(doc))
    print(text(doc))
    print(f"written: {os.path.join(a.out, 'mutants.md')} and mutants.json")
    if doc["ckpt_failed"]:
        print(f"ckpt itself failed: {', '.join(doc['ckpt_failed'])}")
    if doc["survivors"]:
        print(f"mutants: {len(doc['survivors'])} survivor(s): {', '.join(doc['survivors'])}")
        return 1
    print("mutants: every mutant was killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
