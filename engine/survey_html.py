"""`ckpt survey --html FILE`: one self-contained page (inline CSS, inline
SVG bar chart, no scripts, no external assets) so it can be kept as a CI
artifact and opened anywhere."""

from __future__ import annotations

from html import escape
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List

from .survey import ERROR, EXITED, REFUSED, RESTORABLE, TIMEOUT, UNINSPECTABLE

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:80em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176d2c}.no{color:#a31515}.muted{color:#777}
svg text{font-size:12px;font-family:system-ui,sans-serif}
"""

BAR = "#c0392b"
ALONE = "#7b241c"


def bar_chart(causes: List[dict], width: int = 900, bar: int = 18) -> str:
    """Horizontal bars: processes each cause blocks (light), of which it
    blocks alone (dark)."""
    if not causes:
        return '<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="10" height="10"></svg>'
    label_w = 420
    top = max(c["processes"] for c in causes) or 1
    scale = (width - label_w - 110) / top   # room for "N (M alone)"
    h = len(causes) * (bar + 6) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{h}" '
           f'viewBox="0 0 {width} {h}" role="img" aria-label="processes blocked per cause">']
    for i, c in enumerate(causes):
        y = 20 + i * (bar + 6)
        label = c["label"] if len(c["label"]) <= 64 else c["label"][:61] + "..."
        w = max(1.0, c["processes"] * scale)
        wa = c["alone"] * scale
        out.append(f'<text x="{label_w - 6}" y="{y + bar - 5}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect class="blocks" x="{label_w}" y="{y}" width="{w:.1f}" height="{bar}" fill="{BAR}" '
                   f'fill-opacity="0.45"><title>{escape(c["label"])}: blocks {c["processes"]}</title></rect>')
        if c["alone"]:
            out.append(f'<rect class="alone" x="{label_w}" y="{y}" width="{wa:.1f}" height="{bar}" fill="{ALONE}">'
                       f'<title>alone {c["alone"]}</title></rect>')
        out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar - 5}">{c["processes"]}'
                   f'{" (" + str(c["alone"]) + " alone)" if c["alone"] else ""}</text>')
    out.append(f'<text x="{label_w}" y="12" class="muted">processes blocked '
               f'(dark: blocked by this cause alone)</text>')
    out.append("</svg>")
    return "\n".join(out)


def _table(head: List[str], rows: List[List], numeric=()) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = []
    for r in rows:
        body.append("<tr>" + "".join(
            f'<td class="n">{escape(str(c))}</td>' if i in numeric else f"<td>{escape(str(c))}</td>"
            for i, c in enumerate(r)) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


def render_html(res: dict, top: int = 40) -> str:
    s = res["summary"]
    c = s["counts"]
    title = f"ckpt survey: {res.get('host')} {res.get('arch')} {res.get('kernel')}"
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
             f"<p class=\"muted\">{escape(str(res.get('time', '')))}, {s['surveyed']} processes in "
             f"{res.get('elapsed_s', 0)} s</p>"]
    if res.get("interrupted"):
        parts.append(f"<p class=\"no\">Interrupted: {escape(res['interrupted'])} (partial survey)</p>")
    parts.append(_table(["verdict", "processes"], [
        ["restorable", c.get(RESTORABLE, 0)], ["refused", c.get(REFUSED, 0)],
        ["not inspectable (kernel threads, zombies, ckpt and its ancestors, already traced)", c.get(UNINSPECTABLE, 0)],
        ["exited during survey", c.get(EXITED, 0)], ["check failed or timed out", c.get(ERROR, 0) + c.get(TIMEOUT, 0)],
        ["appeared during survey (not inspected)", res.get("appeared_during_survey", 0)]], numeric=(1,)))
    parts.append("<h2>Causes</h2><p>Sorted by how many processes each cause blocks. <b>alone</b>: fix this one "
                 "and that many more processes become restorable; <b>cumulative</b>: restorable after fixing this "
                 "cause and every one above it.</p>")
    parts.append(bar_chart(s["causes"][:top]))
    parts.append(_table(["blocks", "alone", "cumulative", "reason", "cause"],
                        [[x["processes"], x["alone"], x["cumulative"], x["reason"], x["value"]] for x in s["causes"]],
                        numeric=(0, 1, 2)))
    parts.append("<h2>By reason code</h2>")
    parts.append(_table(["reason", "processes", "refusals"],
                        [[k, v["processes"], v["refusals"]] for k, v in s["by_reason"].items()], numeric=(1, 2)))
    for dim, vals in s["facets"].items():
        parts.append(f"<h2>By {escape(dim)}</h2>")
        parts.append(_table([dim, "processes", "refusals"],
                            [[k, v["processes"], v["refusals"]] for k, v in vals.items()], numeric=(1, 2)))
    parts.append("<h2>Processes</h2>")
    rows = []
    for r in res["records"]:
        why = "; ".join(sorted({x["cause"]["label"] for x in r.get("refusals", [])})) or r.get("note", "")
        rows.append([r["pid"], r["comm"], r["status"], why])
    parts.append(_table(["pid", "comm", "verdict", "why"], rows, numeric=(0,)))
    parts.append("</body></html>")
    return "\n".join(parts)
