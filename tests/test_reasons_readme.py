"""The README's reason table is engine/reasons.py: the same codes, in the
same order, with the same meanings (markdown backticks aside); and every
code is raised somewhere in the engine (no documented refusal that cannot
happen)."""

from __future__ import annotations

import os
import re

from engine.reasons import REASONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_table():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("\n## Reason codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z][a-z-]*)` \| (.*) \|$", section, re.M)
    return [(code, meaning.replace("`", "")) for code, meaning in rows]


def test_readme_reason_table_is_reasons_py_in_order_with_meanings():
    table = readme_table()
    assert [c for c, _ in table] == list(REASONS), "codes or their order differ"
    for code, meaning in table:
        assert meaning == REASONS[code], code


def test_every_reason_code_is_raised_somewhere():
    sources = []
    for root, _, names in os.walk(os.path.join(ROOT, "engine")):
        for n in names:
            if n.endswith(".py") and n != "reasons.py":
                with open(os.path.join(root, n)) as f:
                    sources.append(f.read())
    text = "\n".join(sources)
    raised = r'(?:Refusal|refuse|refuse_rec)\([^")]*"%s"'
    never = [c for c in REASONS if not re.search(raised % re.escape(c), text)]
    assert not never, f"documented but never raised: {never}"
