#!/usr/bin/env python3
"""The outcome matrix as one self-contained HTML page.

The same matrix as tools/merge_reports.py's Markdown (a row per scenario, a
column per cell: arch x distro x kernel x engine), for people: inline CSS
only (no script, no external file: it opens from an artifact zip), a
coloured cell per outcome, and each failure's detail (what was expected,
what happened, the harness's note and the failed checks) one click away in
a ``<details>`` element. A legend and per-column totals on top.

    python3 tools/report_html.py outcomes/* --out outcome-matrix.html

or ``merge_reports.py ... --html outcome-matrix.html``. Stdlib only.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_reports as M  # noqa: E402

# class -> (background, meaning); the legend lists them in this order
COLOURS: Dict[str, Tuple[str, str]] = {
    "restored": ("#c8f0c8", "restored, as expected"),
    "refused": ("#cfe3ff", "refused with the expected reason"),
    "differs": ("#fff1b3", "another outcome, allowed for this engine (not ckpt)"),
    "fail": ("#ffc9c9", "did not meet the expectation"),
    "corrupted": ("#e03131", "silent corruption"),
    "crashed": ("#ffa94d", "crashed or hung"),
    "missing": ("#eeeeee", "not run in this cell"),
}

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}
th,td{border:1px solid #bbb;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f4f4f4;position:sticky;top:0}
td.sc{font-family:monospace;white-space:nowrap}
details>summary{cursor:pointer}
details pre{white-space:pre-wrap;max-width:60em;font-size:12px;margin:.3em 0}
.legend span{display:inline-block;padding:2px 8px;margin-right:6px;border:1px solid #bbb}
""" + "".join(f"td.{k},span.{k}{{background:{c}}}" for k, (c, _) in COLOURS.items()) + \
    "td.corrupted,span.corrupted{color:#fff}"


def cell_class(rec: Optional[M.Record]) -> str:
    """The colour class of one cell."""
    if rec is None:
        return "missing"
    outcome = str(rec.get("outcome"))
    if outcome == "corrupted":
        return "corrupted"
    if outcome in ("crashed", "hung"):
        return "crashed" if not M.passed(rec) or rec.get("engine") == "ckpt" else "differs"
    if not M.passed(rec):
        return "fail"
    if rec.get("note"):
        return "differs"
    return "refused" if outcome == "refused" else "restored" if outcome == "restored" else "differs"


def _detail(rec: M.Record) -> str:
    lines = [f"expected: {rec.get('expected')}", f"got:      {rec.get('got') or rec.get('outcome')}"]
    for key in ("note", "detail"):
        if rec.get(key):
            lines += [f"--- {key} ---", str(rec[key]).strip()]
    checks = rec.get("failed_checks") or []
    if checks:
        lines.append("--- failed checks ---")
        lines += [f"fd {c.get('fd')}: {c.get('what')}: expected {c.get('expected')!r}, got {c.get('got')!r}"
                  for c in checks if isinstance(c, dict)]
    if rec.get("found"):
        lines.append(f"shrunk to: {rec['found']}")
    lines.append(f"source: {rec.get('source', '?')}")
    return "\n".join(lines)


def _td(rec: Optional[M.Record]) -> str:
    cls = cell_class(rec)
    if rec is None:
        return f'<td class="{cls}">—</td>'
    text = html.escape(str(rec.get("got") or rec.get("outcome")))
    if cls in ("fail", "corrupted", "crashed", "differs"):
        return (f'<td class="{cls}"><details><summary>{text}</summary>'
                f"<pre>{html.escape(_detail(rec))}</pre></details></td>")
    return f'<td class="{cls}">{text}</td>'


def _label(cell: Sequence[str]) -> str:
    """``arch<br>distro kernel<br>engine`` (the Markdown table's header)."""
    arch, distro, kernel, engine = cell
    return "<br>".join(html.escape(str(x)) for x in (arch, f"{distro} {kernel}", engine))


def render(records: List[M.Record], problems: Optional[List[str]] = None,
           title: str = "Crucible nightly: outcome matrix") -> str:
    """The whole page."""
    cells, rows, table = M.matrix(records)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", '<p class="legend">']
    out += [f'<span class="{k}">{html.escape(k)}</span>{html.escape(m)}<br>' for k, (_, m) in COLOURS.items()]
    out.append("</p>")
    if not records:
        out.append("<p>No outcome reports were found.</p>")
    else:
        out.append('<table id="matrix"><thead><tr><th>scenario</th><th>expected</th>'
                   + "".join(f"<th>{_label(c)}</th>" for c in cells) + "</tr></thead><tbody>")
        for scen in rows:
            expected = next((str(table[(scen, c)].get("expected") or "") for c in cells if (scen, c) in table), "")
            out.append(f'<tr><td class="sc">{html.escape(scen)}</td><td>{html.escape(expected)}</td>'
                       + "".join(_td(table.get((scen, c))) for c in cells) + "</tr>")
        totals = []
        for c in cells:
            recs = [table[(s, c)] for s in rows if (s, c) in table]
            totals.append(f"<td>{sum(M.passed(r) for r in recs)}/{len(recs)} pass</td>")
        out.append("</tbody><tfoot><tr><th>total</th><th></th>" + "".join(totals) + "</tr></tfoot></table>")
    if problems:
        out.append("<h2>Inputs that could not be read</h2><ul>"
                   + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write(path: str, records: List[M.Record], problems: Optional[List[str]] = None) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(render(records, problems), encoding="utf-8")
    tmp.replace(path)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", help="report files or per-job report directories")
    ap.add_argument("--out", required=True, help="the HTML file to write")
    args = ap.parse_args(argv)
    records, problems = M.load(args.inputs)
    write(args.out, records, problems)
    return 0 if records else 2


if __name__ == "__main__":
    sys.exit(main())
