"""tools/report_html.py: the outcome matrix as a self-contained HTML page,
parsed back with the stdlib HTML parser (structure, colours, details)."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from test_workflow_merge import harness_doc, job_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import merge_reports as M  # noqa: E402
import report_html as H  # noqa: E402


class Page(HTMLParser):
    """The parts a reader sees: header cells, rows of (class, text, detail),
    and whatever would load something from outside."""

    def __init__(self):
        super().__init__()
        self.stack, self.heads, self.rows, self.external = [], [], [], []
        self.row = None
        self.cell = None
        self.in_th = False
        self.in_pre = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("br", "meta"):          # void elements have no end tag
            self.stack.append(tag)
        if tag in ("script", "link", "img", "iframe") or a.get("src") or (tag == "link" and a.get("href")):
            self.external.append(tag)
        if tag == "tr" and "tbody" in self.stack:
            self.row = []
        elif tag == "td" and self.row is not None:
            self.cell = {"class": a.get("class", ""), "text": "", "detail": None}
        elif tag == "th" and "thead" in self.stack:
            self.in_th = True
            self.heads.append("")
        elif tag == "pre" and self.cell is not None:
            self.in_pre = True
            self.cell["detail"] = ""
        elif tag == "br" and self.in_th:
            self.heads[-1] += "/"

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()
        if tag == "td" and self.cell is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.rows.append(self.row)
            self.row = None
        elif tag == "th":
            self.in_th = False
        elif tag == "pre":
            self.in_pre = False

    def handle_data(self, data):
        if self.in_th:
            self.heads[-1] += data
        elif self.cell is not None:
            if self.in_pre:
                self.cell["detail"] += data
            elif not self.cell["text"] or "summary" in self.stack:
                self.cell["text"] += data.strip()


def _outcomes(root: Path) -> Path:
    doc = harness_doc("x86_64", {"ckpt": {"scenarios/pipe/empty.yaml": ("restored", "restored", True),
                                          "scenarios/files/x.yaml": ("refused file-changed fd 3 at restore",
                                                                     "refused", True)}})
    job_dir(root, "x86_64", "6.1", "ckpt", doc)
    doc = harness_doc("x86_64", {"criu": {"scenarios/pipe/empty.yaml": ("restored", "restored", True),
                                          "scenarios/files/x.yaml": ("refused file-changed fd 3 at restore",
                                                                     "corrupted", False)}})
    row = doc["scenarios"]["scenarios/files/x.yaml"]["engines"]["criu"]
    row.update(note="silent corruption: fd 3: offset <4096>", detail="fd 3: offset: expected 4096, got 0",
               failed_checks=[{"fd": 3, "what": "offset", "expected": 4096, "got": 0}])
    job_dir(root, "x86_64", "6.1", "criu", doc)
    job_dir(root, "aarch64", "6.1", "ckpt", harness_doc("aarch64", {"ckpt": {
        "scenarios/pipe/empty.yaml": ("restored", "crashed", False)}}))
    return root


def test_page_is_the_matrix_with_coloured_cells_and_details(tmp_path):
    records, problems = M.load(sorted(str(p) for p in _outcomes(tmp_path / "o").iterdir()))
    page = Page()
    page.feed(H.render(records, problems))
    assert page.heads == ["scenario", "expected", "aarch64/bookworm 6.1/ckpt", "x86_64/bookworm 6.1/ckpt",
                          "x86_64/bookworm 6.1/criu"]
    rows = {r[0]["text"]: r for r in page.rows}
    assert set(rows) == {"scenarios/files/x.yaml", "scenarios/pipe/empty.yaml"}
    empty, x = rows["scenarios/pipe/empty.yaml"], rows["scenarios/files/x.yaml"]
    assert [c["class"] for c in empty[2:]] == ["crashed", "restored", "restored"]
    assert [c["class"] for c in x[2:]] == ["missing", "refused", "corrupted"]
    # the failure's detail is in the page, one click away, escaped
    corrupt = x[4]
    assert corrupt["text"] == "corrupted"
    assert "fd 3: offset: expected 4096, got 0" in corrupt["detail"]
    assert "silent corruption: fd 3: offset <4096>" in corrupt["detail"]
    assert "expected: refused file-changed fd 3 at restore" in corrupt["detail"]
    assert empty[2]["detail"] is not None and x[3]["detail"] is None      # passes have no details
    assert not page.external                       # self-contained: nothing loaded from elsewhere


def test_every_colour_class_has_css_and_a_legend_entry():
    page = H.render([], [])
    for cls in H.COLOURS:
        assert f"td.{cls}," in page and f'<span class="{cls}">' in page
    assert "No outcome reports were found." in page


def test_merge_reports_writes_markdown_and_html_side_by_side(tmp_path):
    root = _outcomes(tmp_path / "o")
    md, page, js = tmp_path / "m.md", tmp_path / "m.html", tmp_path / "m.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "merge_reports.py"), *sorted(map(str, root.iterdir())),
                        "--markdown", str(md), "--html", str(page), "--json", str(js)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert md.read_text() == r.stdout and "scenarios/files/x.yaml" in md.read_text()
    p = Page()
    p.feed(page.read_text())
    assert len(p.rows) == 2 and any(c["class"] == "corrupted" for row in p.rows for c in row)
    rec = next(x for x in json.loads(js.read_text())["records"] if x["outcome"] == "corrupted")
    assert rec["failed_checks"][0]["what"] == "offset" and rec["note"].startswith("silent corruption")


def test_cli(tmp_path):
    root = _outcomes(tmp_path / "o")
    out = tmp_path / "page.html"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "report_html.py"), *map(str, root.iterdir()),
                        "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("<!DOCTYPE html>")
