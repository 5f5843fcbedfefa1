"""harness/jsonio.py: the exec'd workload's JSON without the json package
must read and write exactly what json does (its files are read back by
json, on the host and by the workload after a restore)."""

from __future__ import annotations

import io
import json

import pytest

from harness import jsonio

DOCS = [
    {"pid": 7, "recs": [{"fd": 3, "obs": {"pos": None, "cloexec": False, "link": "/w/d\u00e9ja (deleted)"}}],
     "fds": [0, 1, 2], "mmaps": [], "helpers": [], "process": {"sigactions": {}, "itimers": {"real": [1.5, 0.0]},
                                                            "at": 1796045095.5662594},
     "proof": {"secret_sha256": "ab" * 32, "witness": None}, "start": "exec"},
    {"floats": [0.1, -0.0, 1e300, 5e-324, float("inf"), float("-inf")], "big": 2 ** 80, "neg": -3,
     "s": "\"\\\n\t\u2028\x00\U0001f600", "t": (1, (2, [])), "e": {}, "l": [[], [{}]], "b": [True, False, None]},
    {2: "int key", 2.5: "float key", True: "true key", False: "false key", None: "null key", "k": "v"},
    {"bytes": b"\x00ab", "set": {1}, "type": int},       # default=str
    [], {}, "", "x", 0, 3.25, None, True,
]


@pytest.mark.parametrize("doc", DOCS, ids=range(len(DOCS)))
def test_writes_what_json_dump_with_indent_1_writes(doc):
    f = io.StringIO()
    jsonio.dump_indented(doc, f)
    assert f.getvalue() == json.dumps(doc, indent=1, default=str)


@pytest.mark.parametrize("doc", DOCS, ids=range(len(DOCS)))
def test_reads_what_json_reads(doc):
    compact = json.dumps(doc, default=str)
    for text in (json.dumps(doc, indent=1, default=str), compact, f" \n\t{compact}\r\n"):
        assert repr(jsonio.loads(text)) == repr(json.loads(text))
        assert repr(jsonio.load(io.StringIO(text))) == repr(json.loads(text))


def test_nan_and_constants():
    assert jsonio.dumps_indented([float("nan")]) == json.dumps([float("nan")], indent=1)
    got = jsonio.loads("[NaN, Infinity, -Infinity]")
    assert got[0] != got[0] and got[1:] == [float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", ["", " ", "[1,]", '{"a" 1}', "[1] x", "\ufeff[1]", '{"a": 1}}', "nul", '"\x01"',
                                 "[1", '{"a": 1,}', "01"])
def test_refuses_what_json_refuses(bad):
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        jsonio.loads(bad)


def test_a_key_json_cannot_write_is_refused():
    with pytest.raises(TypeError):
        json.dumps({(1, 2): 0}, indent=1, default=str)
    with pytest.raises(TypeError):
        jsonio.dumps_indented({(1, 2): 0})
