"""engine.fastjson is json.dumps / json.loads to the byte (the image format
depends on it): the same text, the same objects, the same errors."""

from __future__ import annotations

import json
import math
import random

import pytest

from engine import fastjson


def _doc(rng, depth=0):
    r = rng.random()
    if depth > 5 or r < 0.4:
        return rng.choice([0, -1, 1 << 70, -(1 << 64), 3.5, -0.0, 1e300, 1e-7, 2.0 ** 60, True, False, None,
                           "", "plain", "quote\" back\\slash", "nul\0", "tab\t\n\r\x1f", "é ünï", "\u2028 \U0001f600",
                           "\ud800 lone", "/proc/1/maps", "a" * 300])
    if r < 0.65:
        return [_doc(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.7:
        return tuple(_doc(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    return {rng.choice(["k", "path", "z", "A", "é", "", "0", "sha256", "\0"]) + str(rng.randint(0, 3)):
            _doc(rng, depth + 1) for _ in range(rng.randint(0, 5))}


DOCS = [_doc(random.Random(seed)) for seed in range(3000)]


@pytest.mark.parametrize("kw", [{}, {"sort_keys": True}, {"sort_keys": True, "separators": (",", ":")},
                                {"separators": (",", ":")}, {"indent": 1, "sort_keys": True}, {"indent": 1},
                                {"indent": 4}, {"default": str}])
def test_dumps_is_json_dumps(kw):
    for d in DOCS:
        text = fastjson.dumps(d, **kw)
        assert text == json.dumps(d, **kw), d


def test_loads_is_json_loads():
    for d in DOCS:
        for kw in ({}, {"indent": 1}):
            text = json.dumps(d, **kw)
            for s in (text, text.encode(), bytearray(text.encode()), "  \n" + text + " \t\r\n"):
                assert repr(fastjson.loads(s)) == repr(json.loads(s))


@pytest.mark.parametrize("bad", [b"", b" ", b"{", b"[1,]", b"{} x", b"nul", b"[1] [2]", b'"a\x01"', b"\xff\xfe",
                                 b"\xef\xbb\xbf{}", "\ufeff{}", b"[" * 100000, b'{"a":1,"a"', b"1e999999",
                                 "[NaN, Infinity, -Infinity]", b'"\\ud800"', "{}".encode("utf-16"), b"\x00{}\x00",
                                 3, None, memoryview(b"{}")])
def test_loads_takes_and_refuses_what_json_does(bad):
    def outcome(fn):
        try:
            return ("ok", repr(fn(bad)))
        except Exception as e:      # noqa: BLE001 - the type and message are the point
            return (type(e).__name__, str(e))
    assert outcome(fastjson.loads) == outcome(json.loads)


@pytest.mark.parametrize("bad", [{1: 2, "a": 3}, {(1, 2): 3}, [object()], {"x": {1, 2}}, float("nan"),
                                 [math.inf], {"a": b"bytes"}])
def test_dumps_refuses_or_writes_what_json_does(bad):
    for kw in ({}, {"sort_keys": True}, {"indent": 1, "sort_keys": True}, {"separators": (",", ":")}):
        def outcome(fn):
            try:
                return ("ok", fn(bad, **kw))
            except Exception as e:      # noqa: BLE001
                return (type(e).__name__, str(e))
        assert outcome(fastjson.dumps) == outcome(json.dumps), kw


def test_circular_and_deep_structures_as_json():
    a = []
    a.append(a)
    for kw in ({}, {"indent": 1}):
        with pytest.raises(ValueError, match="Circular reference"):
            fastjson.dumps(a, **kw)
    deep = [[[[1]]]]
    for _ in range(300):
        deep = [deep]
    assert fastjson.dumps(deep, indent=1) == json.dumps(deep, indent=1)
