#!/usr/bin/env python3
"""Merge per-job scenario outcome reports into one outcome matrix.

The nightly workflow runs one job per matrix cell (arch x guest distro x
guest kernel x engine); each uploads its ``reports/`` directory. This script reads them all
and writes one Markdown table, a row per scenario and a column per cell, to
stdout and optionally to ``$GITHUB_STEP_SUMMARY`` (``--summary``), plus the
merged records as JSON (``--json``).

Inputs, each a file or a directory (a directory is searched for
``scenarios.json``, and ``cell.json`` labels it):

* the harness report (``reports/scenarios.json``):
  ``{"arch": ..., "distro"?: ..., "kernel"?: ..., "scenarios": {path:
  {"expected": ..., "engines": {engine: {"outcome": ..., "passed": bool,
  ...}}}}}``. A report without ``distro``/``kernel`` takes them from
  ``cell.json`` beside it (``{"arch", "distro", "kernel", "engine"}``,
  written by the workflow), else "bookworm"/"6.1" (reports from before the
  distro axis);
* a plain list of records ``[{"scenario", "engine", "arch", "distro"?,
  "kernel"?, "outcome", "expected"?, "passed"?}]``.

Stdlib only (runs on the runner's own python3). Exit 0; 1 with ``--strict``
when any cell failed; 2 when no input could be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

DEFAULT_KERNEL = "6.1"
DEFAULT_DISTRO = "bookworm"
#: The closed outcome set of DESIGN.md; anything else is shown as-is.
OUTCOMES = ("restored", "refused", "corrupted", "crashed", "hung")

Record = Dict[str, object]
Cell = Tuple[str, str, str, str]  # (arch, distro, kernel, engine)
CELL_KEYS = ("arch", "distro", "kernel", "engine")


class ReportError(Exception):
    """An input that is not a report this script understands."""

    def __init__(self, path: str, why: str):
        self.path = path
        self.why = why
        super().__init__(f"{path}: {why}")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(str(path), f"not readable JSON ({exc})") from exc


def records_from_harness(doc: Dict[str, object], cell: Dict[str, str], source: str) -> List[Record]:
    """Flatten one harness report into records.

    Raises:
        ReportError: no ``scenarios`` mapping.
    """
    scenarios = doc.get("scenarios")
    if not isinstance(scenarios, dict):
        raise ReportError(source, "no 'scenarios' object (not a harness report)")
    arch = str(doc.get("arch") or cell.get("arch") or "?")
    kernel = str(doc.get("kernel") or cell.get("kernel") or DEFAULT_KERNEL)
    distro = str(doc.get("distro") or cell.get("distro") or DEFAULT_DISTRO)
    out: List[Record] = []
    for scenario, entry in sorted(scenarios.items()):
        if not isinstance(entry, dict):
            continue
        engines = entry.get("engines") or {}
        for engine, res in sorted(engines.items()):  # type: ignore[union-attr]
            if not isinstance(res, dict):
                continue
            out.append({"scenario": scenario, "engine": engine, "arch": arch, "distro": distro,
                        "kernel": kernel, "outcome": res.get("outcome", "?"),
                        "expected": res.get("expected", entry.get("expected")),
                        "passed": res.get("passed"), "source": source,
                        # what the HTML page shows behind a failure (tools/report_html.py)
                        **{k: res[k] for k in ("got", "note", "found") if res.get(k)},
                        **({"detail": str(res["detail"])[:4000]} if res.get("detail") else {}),
                        **({"failed_checks": res["failed_checks"][:20]} if res.get("failed_checks") else {})})
    return out


def records_from_list(doc: List[object], source: str) -> List[Record]:
    """Validate a plain record list.

    Raises:
        ReportError: an entry lacks scenario/engine/arch/outcome.
    """
    out: List[Record] = []
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict) or not all(k in rec for k in ("scenario", "engine", "arch", "outcome")):
            raise ReportError(source, f"record {i} needs scenario, engine, arch, outcome")
        r = dict(rec)
        r.setdefault("kernel", DEFAULT_KERNEL)
        r.setdefault("distro", DEFAULT_DISTRO)
        r["source"] = source
        out.append(r)
    return out


def load(inputs: Iterable[str]) -> Tuple[List[Record], List[str]]:
    """All records from ``inputs`` and a list of problems (unreadable inputs)."""
    records: List[Record] = []
    problems: List[str] = []
    for name in inputs:
        path = Path(name)
        cell: Dict[str, str] = {}
        if path.is_dir():
            if (path / "cell.json").is_file():
                try:
                    c = _read_json(path / "cell.json")
                    cell = {k: str(v) for k, v in c.items()} if isinstance(c, dict) else {}
                except ReportError as exc:
                    problems.append(str(exc))
            found = path / "scenarios.json"
            if not found.is_file():
                problems.append(f"{path}: no scenarios.json (the job may have failed before the corpus ran)")
                continue
            path = found
        try:
            doc = _read_json(path)
            if isinstance(doc, list):
                records += records_from_list(doc, str(path))
            elif isinstance(doc, dict):
                records += records_from_harness(doc, cell, str(path))
            else:
                raise ReportError(str(path), "neither a harness report nor a record list")
        except ReportError as exc:
            problems.append(str(exc))
    return records, problems


def passed(rec: Record) -> bool:
    """A record passes when the harness said so, else when the outcome is
    the expected one (``corrupted``/``crashed``/``hung`` never pass)."""
    if isinstance(rec.get("passed"), bool):
        return bool(rec["passed"])
    outcome = rec.get("outcome")
    if outcome in ("corrupted", "crashed", "hung"):
        return False
    return rec.get("expected") in (None, outcome)


def cell_of(rec: Record) -> Cell:
    return (str(rec["arch"]), str(rec.get("distro") or DEFAULT_DISTRO), str(rec["kernel"]), str(rec["engine"]))


def matrix(records: List[Record]) -> Tuple[List[Cell], List[str], Dict[Tuple[str, Cell], Record]]:
    """Columns (cells, sorted), rows (scenarios, sorted) and the lookup."""
    table: Dict[Tuple[str, Cell], Record] = {}
    for rec in records:
        table[(str(rec["scenario"]), cell_of(rec))] = rec
    cells = sorted({c for _, c in table})
    rows = sorted({s for s, _ in table})
    return cells, rows, table


def markdown(records: List[Record], problems: Optional[List[str]] = None) -> str:
    """The outcome matrix as GitHub-flavoured Markdown."""
    cells, rows, table = matrix(records)
    lines = ["## Crucible nightly: outcome matrix", ""]
    if not records:
        lines.append("No outcome reports were found.")
    else:
        lines.append("| scenario | expected | " + " | ".join(f"{a}<br>{d} {k}<br>{e}" for a, d, k, e in cells) + " |")
        lines.append("|---|---|" + "---|" * len(cells))
        for scen in rows:
            expected = next((str(table[(scen, c)].get("expected") or "")
                             for c in cells if (scen, c) in table), "")
            tds = []
            for c in cells:
                rec = table.get((scen, c))
                if rec is None:
                    tds.append("—")
                else:
                    mark = "✅" if passed(rec) else "❌"
                    tds.append(f"{mark} {rec['outcome']}")
            lines.append(f"| `{scen}` | {expected} | " + " | ".join(tds) + " |")
        totals = []
        for c in cells:
            recs = [table[(s, c)] for s in rows if (s, c) in table]
            totals.append(f"{sum(passed(r) for r in recs)}/{len(recs)} pass")
        lines.append("| **total** | | " + " | ".join(totals) + " |")
    if problems:
        lines += ["", "Inputs that could not be read:", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", help="report files or per-job report directories")
    ap.add_argument("--summary", help="append the Markdown table to this file ($GITHUB_STEP_SUMMARY)")
    ap.add_argument("--json", dest="json_out", help="write the merged records here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any cell did not pass")
    ap.add_argument("--markdown", help="also write the Markdown table to this file")
    ap.add_argument("--html", help="also write the matrix as a self-contained HTML page (tools/report_html.py)")
    args = ap.parse_args(argv)
    records, problems = load(args.inputs)
    text = markdown(records, problems)
    sys.stdout.write(text)
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.html:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import report_html
        report_html.write(args.html, records, problems)
    if args.json_out:
        cells, rows, table = matrix(records)
        doc = {"cells": [dict(zip(CELL_KEYS, c)) for c in cells],
               "records": records, "problems": problems}
        tmp = f"{args.json_out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, args.json_out)
    if not records:
        return 2
    if args.strict and not all(passed(r) for r in records):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
