"""vm.paths' JSON file helpers, shared by the accel-probe cache and the
bench results file."""

from __future__ import annotations

from pathlib import Path

from vm.paths import read_json_object, replace_text


def test_read_json_object_takes_only_an_object(tmp_path: Path):
    f = tmp_path / "t.json"
    assert read_json_object(f) == {}                      # missing
    f.write_text("{not json")
    assert read_json_object(f) == {}                      # corrupt
    f.write_text("[1, 2]")
    assert read_json_object(f) == {}                      # JSON, not an object
    f.write_text('{"a": {"b": 1}}')
    assert read_json_object(f) == {"a": {"b": 1}}


def test_replace_text_replaces_whole_file_and_leaves_no_temporary(tmp_path: Path):
    f = tmp_path / "r.json"
    f.write_text("old contents, longer than the new ones")
    replace_text(f, "new\n")
    assert f.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
