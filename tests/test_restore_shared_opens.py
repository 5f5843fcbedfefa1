"""A tree's members mapping the same file get one open of it, checked
once (engine/restore.py MAP_OPENED, record_key): each member its own fd
number on that open file. Only the very same record shares: a record
that differs in any value or type (an ino of true for 1, another digest)
is judged and opened, so checked, on its own, and a deleted file's
(ghost) record never takes another's open. No process is made here:
prepare() runs on records, files.map_open counted."""

from __future__ import annotations

import os

import pytest

from engine import files, restore
from engine.context import Options, RestoreContext


def _ident(at: str, **change) -> dict:
    path = at
    st = os.stat(path)
    ident = {"dev": st.st_dev, "generation": None, "gid": st.st_gid, "ino": st.st_ino, "mode": st.st_mode,
             "mtime_ns": st.st_mtime_ns, "path": path, "sha256": "0" * 64, "size": st.st_size, "uid": st.st_uid}
    ident.update(change)
    return {"file": ident}


def _vma(start: int, rec: dict) -> dict:
    return {"kind": "file", "start": start, "end": start + 4096, "perms": "r--p", "flags": ["rd"], "file": rec}


@pytest.fixture
def opens(monkeypatch, tmp_path):
    """files.map_open counted: each call opens the record's path read-only."""
    calls = []

    def map_open(rec, ctx, writable):
        calls.append(rec)
        path = rec["file"]["path"] if "file" in rec else str(tmp_path / "ghost")
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    monkeypatch.setattr(files, "map_open", map_open)
    (tmp_path / "ghost").write_bytes(b"g")
    return calls


def _prepare_members(members, shared):
    """prepare() for each member (vmas, exe) with one ctx.shared, as
    tree_restore does; the Prepared of each, left open."""
    out = []
    for pid, (vmas, exe) in members.items():
        ctx = RestoreContext(options=Options(), image=None, same_node=True, shared=shared, records=[], pid=pid)
        core = {"exe": exe, "cwd": {"path": "/"}}
        out.append(restore.prepare(core, vmas, [], ctx, avoid=()))
    return out


def _same_open(a: int, b: int) -> bool:
    # one open file description: an offset moved on one shows on the other
    os.lseek(a, 1, os.SEEK_SET)
    try:
        return os.lseek(b, 0, os.SEEK_CUR) == 1
    finally:
        os.lseek(a, 0, os.SEEK_SET)


def test_members_with_the_same_record_share_one_open_each_on_its_own_number(opens):
    lib, exe = _ident("/bin/sh"), _ident("/bin/true")
    members = {pid: ([_vma(0x10000, lib), _vma(0x11000, dict(lib))], dict(exe)) for pid in (100, 101, 102)}
    got = _prepare_members(members, {})
    try:
        assert [r["file"]["path"] for r in opens] == ["/bin/sh", "/bin/true"]     # once each, for the tree
        fds = [p.map_fd[restore.map_key(lib, False)] for p in got]
        assert len(set(fds)) == 3 and _same_open(fds[0], fds[2])
        assert _same_open(got[0].exe_fd, got[1].exe_fd) and got[0].exe_fd != got[1].exe_fd
    finally:
        for p in got:
            p.close()


@pytest.mark.parametrize("change", [{"ino": True}, {"size": 1.0}, {"sha256": "1" * 64}, {"path": "/bin/../bin/sh"}])
def test_a_record_differing_in_any_value_or_type_is_opened_and_checked_on_its_own(opens, change):
    lib = _ident("/bin/sh")
    other = _ident("/bin/sh", **change)
    assert restore.record_key(other) != restore.record_key(lib)
    exe = _ident("/bin/true")
    got = _prepare_members({100: ([_vma(0x10000, lib)], exe), 101: ([_vma(0x10000, other)], dict(exe))}, {})
    try:
        assert [r for r in opens if r["file"]["path"] != "/bin/true"] == [lib, other]
    finally:
        for p in got:
            p.close()


def test_record_keys_tell_json_types_apart():
    keys = {restore.record_key({"file": {"ino": v}}) for v in (1, True, 1.0, "1", None, [1])}
    assert len(keys) == 6


def test_a_ghost_record_never_shares_an_open(opens):
    ghost = {"ghost": "g1", "name": "/tmp/x (deleted)", "size": 1, "data_bytes": 1, "mode": 0o100600,
             "extents": [[0, 1]]}
    exe = _ident("/bin/true")
    got = _prepare_members({pid: ([_vma(0x10000, dict(ghost))], dict(exe)) for pid in (100, 101)}, {})
    try:
        assert sum("ghost" in r for r in opens) == 2
    finally:
        for p in got:
            p.close()
