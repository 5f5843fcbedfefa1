"""imagecheck._any_bad, the strings-and-paths walk every record of an
image goes through before anything is created, refuses exactly what the
walk before its flat-record memo (engine/imagecheck.py _dict_bad) refused:
hostile items one by one, each after a good twin was judged (the memo
warm), and seeded random records against the old walk kept here as the
reference."""

from __future__ import annotations

import copy
import random

import pytest

from engine import imagecheck
from engine.errors import Refusal


def _reference(obj, depth: int = 0) -> bool:
    """imagecheck._any_bad as it was before the memo (commit 504fd61)."""
    if isinstance(obj, list):
        if depth + 1 > 32:
            return bool(obj)
        for v in obj:
            c = v.__class__
            if c is int or c is bool or c is float or v is None:
                continue
            if c is str:
                if "\0" in v:
                    return True
                continue
            if c is list:
                if _reference(v, depth + 1):
                    return True
                continue
            if imagecheck._item_bad(0, v) or (isinstance(v, (dict, list)) and _reference(v, depth + 1)):
                return True
        return False
    if not isinstance(obj, dict):
        return False
    if depth + 1 > 32:
        return bool(obj)
    for k, v in obj.items():
        if isinstance(k, str) and "\0" in k:
            return True
        c = v.__class__
        if c is int or c is bool or c is float or v is None:
            continue
        if c is str:
            if "\0" in v or (k == "path" and v.startswith("/") and not imagecheck._abs_path_ok(v)):
                return True
            continue
        if c is list:
            if _reference(v, depth + 1):
                return True
            continue
        if imagecheck._item_bad(k, v):
            return True
        if isinstance(v, (dict, list)) and _reference(v, depth + 1):
            return True
    return False


def _ident(**change) -> dict:
    d = {"dev": 65024, "generation": 517712663, "gid": 0, "ino": 2146545, "mode": 33261,
         "mtime_ns": 1796225568517761777, "path": "/usr/lib/x86_64-linux-gnu/libc.so.6",
         "sha256": "05" * 32, "size": 17144, "uid": 0}
    d.update(change)
    return d


def _vma(ident: dict) -> dict:
    return {"dev": "fe:00", "end": 0x7000, "file": {"file": ident}, "flags": ["rd", "mr", "mw", "me"],
            "inode": 2146545, "kind": "file", "offset": 0, "pages": [[0x5000, 1, 0, 0]], "pages_bytes": 4096,
            "path": ident["path"] if isinstance(ident.get("path"), str) else "/x", "perms": "r--p", "start": 0x5000}


HOSTILE = {
    "nul-in-identity-path": _ident(path="/usr/lib/libc\0.so.6"),
    "dotdot-identity-path": _ident(path="/usr/lib/../../etc/shadow"),
    "dot-identity-path": _ident(path="/usr/./lib/libc.so.6"),
    "empty-component": _ident(path="/usr//lib/libc.so.6"),
    "relative-identity-path": _ident(path="usr/lib/libc.so.6"),
    "negative-inode": _ident(ino=-2146545),
    "bool-inode": _ident(ino=True),
    "float-size": _ident(size=17144.0),
    "string-uid": _ident(uid="0"),
    "null-mode": _ident(mode=None),
    "nul-in-key": dict(_ident(), **{"sha\x00256": "x"}),
    "nul-in-digest": _ident(sha256="05" * 31 + "\0"),
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_a_hostile_file_identity_is_refused_after_its_good_twin_was_judged(what):
    good = [_vma(_ident()) for _ in range(3)]
    assert not imagecheck._any_bad(good)        # the memo holds the good identity now
    bad = good + [_vma(HOSTILE[what])]
    assert _reference(bad)
    assert imagecheck._any_bad(bad) and imagecheck._any_bad(bad)      # and stays refused once remembered
    with pytest.raises(Refusal) as e:
        imagecheck._check_strings_and_paths(bad, "mm.json")
    assert e.value.reason == "image-invalid"


def test_one_and_true_and_one_point_oh_are_not_one_record():
    assert not imagecheck._any_bad({"file": _ident(ino=1)})
    assert imagecheck._any_bad({"file": _ident(ino=True)})
    assert not imagecheck._any_bad({"file": _ident(size=0)})
    assert imagecheck._any_bad({"file": _ident(size=0.0)}) and imagecheck._any_bad({"file": _ident(size=False)})


@pytest.mark.parametrize("where", ["nested-string", "key", "list-string", "deep-key"])
def test_a_nul_anywhere_is_refused(where):
    rec = {"regs": {"rip": 1}, "cwd": {"path": "/tmp", "dev": 1, "ino": 2}, "flags": ["rd", "wr"],
           "deep": {"a": {"b": {"c": "ok"}}}}
    hostile = copy.deepcopy(rec)
    if where == "nested-string":
        hostile["deep"]["a"]["b"]["c"] = "o\0k"
    elif where == "key":
        hostile["regs"]["ri\0p"] = 2
    elif where == "list-string":
        hostile["flags"].append("w\0r")
    else:
        hostile["deep"]["a"]["b"]["\0"] = 1
    assert not imagecheck._any_bad(rec) and not imagecheck._any_bad(rec)
    assert imagecheck._any_bad(hostile) and _reference(hostile)


def test_nesting_too_deep_is_refused_with_or_without_a_flat_record_at_the_bottom():
    for leaf in ({"path": "/ok"}, {"a": 1}, {}, [1], "x"):
        assert not imagecheck._any_bad({"k": leaf})     # remembered where it may be
        for n in range(28, 36):
            obj = leaf
            for i in range(n):
                obj = {"k": obj} if i % 2 == 0 else [obj]
            assert imagecheck._any_bad(obj) == _reference(obj), (leaf, n)
            obj = {"top": obj}
            assert imagecheck._any_bad(obj) == _reference(obj), (leaf, n)


def _random_value(rng: random.Random, depth: int):
    r = rng.random()
    if depth > 3 or r < 0.45:
        return rng.choice([0, 1, -1, True, False, 1.0, -0.0, None, "", "x", "a\0b", "/ok/path", "/a/../b",
                           "/a//b", "/.", "/", "rel", 1 << 70])
    if r < 0.7:
        keys = rng.sample(["path", "dev", "ino", "size", "mode", "uid", "gid", "ghost", "name", "memfd", "x",
                           "k\0"], rng.randint(0, 5))
        return {k: _random_value(rng, depth + 1) for k in keys}
    return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def test_random_records_get_the_reference_verdict():
    rng = random.Random(15)
    made = []
    for _ in range(3000):
        obj = _random_value(rng, 0)
        made.append(obj)
        assert imagecheck._any_bad(obj) == _reference(obj), obj
    for obj in made:        # again, every flat record remembered by now
        assert imagecheck._any_bad(obj) == _reference(obj), obj
