"""restore.check_mm's fast path (every field of a mapping record of the
exact type the JSON scanner makes) refuses exactly what its _need calls
refuse, with their messages: each field missing or of another type, a
bool for an integer among them. cow.check, whose refusal is now made only
when it is raised, refuses each malformed "cow" record as before. No
process is made here."""

from __future__ import annotations

import pytest

from engine import cow, restore
from engine.errors import Refusal


def _vma(**change) -> dict:
    v = {"start": 0x10000, "end": 0x12000, "offset": 0, "inode": 0, "perms": "rw-p", "path": "", "kind": "anon",
         "dev": "00:00", "flags": ["rd", "wr"], "pages": [[0x10000, 2, 0, 0]]}
    v.update(change)
    return {k: x for k, x in v.items() if x is not _GONE}


_GONE = object()
FIELDS = {"start": "integer", "end": "integer", "offset": "integer", "inode": "integer",
          "perms": "str", "path": "str", "kind": "str", "dev": "str", "flags": "list", "pages": "list"}
WRONG = [True, False, 1.0, "1", None, [1], {"a": 1}, 7]


def test_a_good_record_passes():
    assert restore.check_mm({"vmas": [_vma(), _vma(start=0x12000, end=0x13000, pages=[])]}, 1)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_each_field_missing_or_of_another_type_is_refused_as_before(field):
    with pytest.raises(Refusal) as e:
        restore.check_mm({"vmas": [_vma(**{field: _GONE})]}, 1)
    assert e.value.reason == "image-invalid" and e.value.detail == f"mm.json vma: missing {field}"
    for bad in WRONG:
        want_int = FIELDS[field] == "integer"
        if (want_int and type(bad) is int) or (FIELDS[field] == "str" and type(bad) is str) \
                or (FIELDS[field] == "list" and type(bad) is list):
            continue
        with pytest.raises(Refusal) as e:
            restore.check_mm({"vmas": [_vma(), _vma(**dict({"start": 0x20000, "end": 0x21000, "pages": []},
                                                           **{field: bad}))]}, 1)
        shown = "an integer" if want_int else f"a {FIELDS[field]}"
        assert e.value.detail == f"mm.json vma: {field} is not {shown}", (field, bad, e.value.detail)


def test_a_mapping_record_that_is_no_dict_is_refused():
    for bad in ([], "x", None, 1):
        with pytest.raises(Refusal) as e:
            restore.check_mm({"vmas": [bad]}, 1)
        assert e.value.detail == "mm.json vma: missing start"


@pytest.mark.parametrize("runs", [[], [[0x12000, 1]], [[0x11000, 1], [0x10000, 1]], [[0x10000, 0]],
                                  [[0x10000, True]], [[0x10001, 1]], [[0x10000, 1, 0]], "x", [[0x10000, 3]]])
def test_a_malformed_cow_record_is_refused(runs):
    v = _vma(cow=runs)
    with pytest.raises(Refusal) as e:
        cow.check(v)
    assert e.value.reason == "image-invalid" and e.value.detail == f"mm.json: mapping 0x10000 cow {str(runs)[:80]}"


def test_a_cow_page_not_dumped_is_refused():
    v = _vma(pages=[[0x10000, 1, 0, 0]], cow=[[0x11000, 1]])
    with pytest.raises(Refusal) as e:
        cow.check(v)
    assert e.value.detail == "mm.json: mapping 0x10000 cow [[69632, 1]]"


def test_a_good_cow_record_passes():
    cow.check(_vma(cow=[[0x10000, 1], [0x11000, 1]]))
    cow.check(_vma(cow=[[0x10000, 2]]))
