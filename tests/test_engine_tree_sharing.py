"""Processes of a tree sharing an fd table (CLONE_FILES) or fs: cwd, root,
umask (CLONE_FS) without being threads (engine/tree.py
shared_kernel_objects, engine/tree_restore.py): restored shared - one
table, one fs - never duplicated; what a restore could not share again is
refused (tree-sharing). Target: tests/targets/sharer.c.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.pidfd import kcmp
from engine.restore import restore
from engine_core_support import TARGETS, procs, wait_for  # noqa: F401
from test_engine_tree import _descendants, _ready, _stat, _untouched, _wait_killed, session_killer  # noqa: F401

KINDS = {"files": 2, "fs": 3, "sighand": 4, "vm": 1}


@pytest.fixture(scope="module")
def sharer(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("sharer") / "sharer")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "sharer.c")], check=True,
                   capture_output=True, timeout=60)
    return exe


def _start(procs, session_killer, sharer, mode, d):  # noqa: F811
    p = procs.start([sharer, mode, str(d)], cwd=str(d))
    session_killer.append(p.pid)
    info = _ready(d, p)
    return p, info["kids"]


def _relations(pids) -> dict:
    """{(kind, a, b): shared} for every pair of pids."""
    out = {}
    for kind, n in KINDS.items():
        for i, a in enumerate(pids):
            for b in pids[i + 1:]:
                out[(kind, a, b)] = kcmp(a, b, n, 0, 0) == 0
    return out


def _fd_table(pid) -> dict:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def test_shared_fd_tables_and_fs_restored_shared(procs, session_killer, sharer, tmp_path):  # noqa: F811
    """P, A and G hold one fd table, P and B one fs, A and G another, D
    nothing: after the restore kcmp sees the same sharing, no file the
    restorer opened is left in the shared table, and the processes prove
    it: a file A or G opens is open in P at the same number (one D opens is
    not), B's chdir and umask are P's, G's chdir is A's."""
    p, kids = _start(procs, session_killer, sharer, "share", tmp_path)
    pids = [p.pid, kids["A"], kids["B"], kids["D"], kids["G"]]
    before = _relations(pids)
    assert before[("files", p.pid, kids["A"])] and before[("files", p.pid, kids["G"])]
    assert before[("fs", p.pid, kids["B"])] and before[("fs", kids["A"], kids["G"])]
    assert not before[("files", p.pid, kids["D"])] and not before[("fs", p.pid, kids["A"])]
    table = _fd_table(p.pid)
    res = check(p.pid, Options())
    assert res["ok"], res["refusals"]
    shares = {m["pid"]: m.get("share") for m in res["members"]}
    assert shares == {p.pid: None, kids["A"]: ["files"], kids["B"]: ["fs"], kids["D"]: None,
                      kids["G"]: ["files", "fs"]}, shares
    said = [i["detail"] for i in res["items"] if i["what"] == f"pid {kids['G']}: sharing"]
    assert said == ["holds its parent's fd table; holds its parent's fs (cwd, root, umask) (restored so)"], said
    _untouched(pids)

    img = tmp_path / "img"
    res = dump(p.pid, str(img), Options())
    assert res["members"] == 5
    tree = json.loads((img / "tree.json").read_text())
    assert {m["pid"]: m.get("share") for m in tree["members"]} == shares
    for k in ("A", "G"):     # the shared table is dumped once, by P
        assert json.loads((img / f"tree/{kids[k]}/fds.json").read_text()) == []
    from engine.show import render, show
    text = render(show(str(img)))
    assert f"{kids['G']} sharer" in text and "its parent's fd table, its parent's fs" in text, text
    _wait_killed(p.pid, img, procs)
    out = restore(str(img), Options())
    procs.adopt(p.pid)
    assert out["pid"] == p.pid and out["members"] == 5
    for pid in pids[1:]:
        assert _stat(pid)["ppid"] == (kids["A"] if pid == kids["G"] else p.pid)
    assert _relations(pids) == before
    assert _fd_table(p.pid) == table, "the shared table is not the dumped one"

    (tmp_path / "go").write_text("")
    wait_for(lambda: (tmp_path / "result").exists(), timeout=30, what="the result")
    got = json.loads((tmp_path / "result").read_text())
    assert got["a_fd"] != got["g_fd"]
    assert got["p_holds_a"] == 1 and got["p_holds_g"] == 1, got
    assert got["p_holds_d"] == 0, got
    assert got["p_cwd_sub"] == 1 and got["p_umask"] == 0o077, got
    assert got["a_cwd_gsub"] == 1, got
    assert os.readlink(f"/proc/{p.pid}/cwd") == str(tmp_path / "sub")
    assert os.readlink(f"/proc/{kids['D']}/cwd") == str(tmp_path)
    assert os.readlink(f"/proc/{kids['A']}/cwd") == str(tmp_path / "gsub")


@pytest.mark.parametrize("mode,opener,holders,not_holders", [
    # A and B share a table their parent P left (unshare): P hands it on, then leaves it
    ("siblings", "A", ["B"], ["P"]),
    # G shares P's table past its parent A, which left it after making G
    ("skip", "G", ["P"], ["A"]),
])
def test_table_handed_on_by_a_member_that_left_it(procs, session_killer, sharer, tmp_path, mode, opener,
                                                  holders, not_holders):  # noqa: F811
    """The restore makes the member in between hold the table while it
    creates its children, then leave it (unshare): kcmp sees the dumped
    sharing again, and a file the opener opens is open at that number in
    the processes sharing its table, not in the one that left it."""
    p, kids = _start(procs, session_killer, sharer, mode, tmp_path)
    kids["P"] = p.pid
    pids = sorted(kids.values())
    before = _relations(pids)
    tables = {pid: _fd_table(pid) for pid in pids}
    res = check(p.pid, Options())
    assert res["ok"], res["refusals"]
    img = tmp_path / "img"
    dump(p.pid, str(img), Options())
    tree = json.loads((img / "tree.json").read_text())
    assert any("leave" in m for m in tree["members"]), tree
    _wait_killed(p.pid, img, procs)
    restore(str(img), Options())
    procs.adopt(p.pid)
    assert _relations(pids) == before
    assert {pid: _fd_table(pid) for pid in pids} == tables, "a table is not the dumped one"
    (tmp_path / "go").write_text("")
    for k in holders + not_holders:
        f = tmp_path / f"{k.lower()}.result"
        wait_for(f.exists, timeout=30, what=f"{k}'s result")
        assert f.read_text().strip() == ("1" if k in holders else "0"), (k, opener)


@pytest.mark.parametrize("mode,detail", [
    ("twophase", "no restore could rebuild"),   # P hands on the table it left and its own
    ("vm-siblings", "memory"),                  # A and B share memory and handlers, P exec'd
])
def test_refused_sharing_a_restore_cannot_rebuild(procs, session_killer, sharer, tmp_path, mode, detail):  # noqa: F811
    p, kids = _start(procs, session_killer, sharer, mode, tmp_path)
    if mode == "vm-siblings":
        wait_for(lambda: _stat(p.pid) and open(f"/proc/{p.pid}/comm").read().strip() == "sleep",
                 what="the parent's exec")
    res = check(p.pid, Options())
    refs = res["refusals"]
    assert any(r["reason"] == "tree-sharing" and detail in r["detail"] for r in refs), refs
    if mode == "vm-siblings":
        assert any("signal handlers" in r["detail"] for r in refs), refs
    with pytest.raises((Refusal, Refusals)):
        dump(p.pid, str(tmp_path / "img"), Options())
    assert not (tmp_path / "img").exists() and not (tmp_path / "img.partial").exists()
    _untouched([p.pid] + _descendants(p.pid))


def _edit_tree(img, edit):
    from harness import imagefuzz
    T = json.loads((img / "tree.json").read_text())
    by = {m["pid"]: m for m in T["members"]}
    edit(T, by)
    (img / "tree.json").write_text(json.dumps(T))
    imagefuzz.reseal(str(img), json.loads((img / imagefuzz.MANIFEST).read_text()), ["tree.json"])


def _edit_core(img, pid, edit):
    from harness import imagefuzz
    name = f"tree/{pid}/core.json"
    core = json.loads((img / name).read_text())
    edit(core)
    (img / name).write_text(json.dumps(core))
    imagefuzz.reseal(str(img), json.loads((img / imagefuzz.MANIFEST).read_text()), [name])


def test_image_cannot_make_a_restore_share_what_was_not(procs, session_killer, sharer, tmp_path):  # noqa: F811
    """Edited (and re-hashed) images: "share" where no dump would write it
    is refused (image-invalid) before any process exists."""
    d = tmp_path / "t"
    d.mkdir()
    p, kids = _start(procs, session_killer, sharer, "share", d)
    img = tmp_path / "img"
    dump(p.pid, str(img), Options())
    _wait_killed(p.pid, img, procs)
    A, B, D, G, P = kids["A"], kids["B"], kids["D"], kids["G"], p.pid
    cases = {
        "root": (lambda i: _edit_tree(i, lambda T, by: by[P].update(share=["files"])), "share"),
        "unknown kind": (lambda i: _edit_tree(i, lambda T, by: by[A].update(share=["vm"])), "share"),
        "a string": (lambda i: _edit_tree(i, lambda T, by: by[A].update(share="files")), "share"),
        "empty": (lambda i: _edit_tree(i, lambda T, by: by[A].update(share=[])), "share"),
        "unhashable": (lambda i: _edit_tree(i, lambda T, by: by[A].update(share=[["files"]])), "share"),
        "a zombie's": (lambda i: _edit_tree(i, lambda T, by: by[A].update(zombie={"status": 0}, share=["files"])),
                       "share"),
        "twice": (lambda i: _edit_tree(i, lambda T, by: by[G].update(share=["files", "files"])), "share"),
        "unsorted": (lambda i: _edit_tree(i, lambda T, by: by[G].update(share=["fs", "files"])), "share"),
        "files with fds": (lambda i: _edit_tree(i, lambda T, by: by[D].update(share=["files"])), "fds of its own"),
        "leave, no child takes it": (lambda i: _edit_tree(i, lambda T, by: by[D].update(leave=["files"])),
                                     "no child of it takes"),
        "leave, unknown kind": (lambda i: _edit_tree(i, lambda T, by: by[P].update(leave=["sighand"])), "leave"),
        "fs, other umask": (lambda i: _edit_core(i, B, lambda c: c.update(umask=0o077)), "cwd or umask"),
        "fs, other cwd": (lambda i: _edit_core(i, G, lambda c: c["cwd"].update(path="/")), "cwd or umask"),
    }
    for name, (edit, detail) in cases.items():
        case = tmp_path / "case"
        shutil.copytree(img, case)
        edit(case)
        with pytest.raises(Refusal) as e:
            restore(str(case), Options())
        assert e.value.reason == "image-invalid" and detail in e.value.detail, (name, e.value.as_dict())
        for pid in (P, A, B, D, G):
            assert not os.path.exists(f"/proc/{pid}"), (name, "a process was created")
        shutil.rmtree(case)
    out = restore(str(img), Options())       # the unedited image restores
    procs.adopt(P)
    assert out["members"] == 5


def _reasons(pid):
    try:
        res = check(pid, Options())
        return res["refusals"], res
    except (Refusal, Refusals) as e:
        return [r.as_dict() for r in (e.refusals if isinstance(e, Refusals) else [e])], None


def test_refused_sharing_with_a_process_outside(procs, session_killer, sharer, tmp_path):  # noqa: F811
    """Dumped without the process it shares with, a process would come back
    with a table or fs of its own: refused, naming that process, alone (B
    shares P's fs) or as a tree (A and G share P's fd table); D, which
    shares nothing, is not refused for it."""
    p, kids = _start(procs, session_killer, sharer, "share", tmp_path)
    refs, _ = _reasons(kids["B"])
    assert any(r["reason"] == "sharing-peer-outside" and "fs" in r["detail"] and f"pid {p.pid} " in r["detail"]
               for r in refs), refs
    refs, _ = _reasons(kids["A"])
    assert any(r["reason"] == "sharing-peer-outside" and "fd table" in r["detail"] and f"pid {p.pid} " in r["detail"]
               for r in refs), refs
    assert not any(r["reason"] == "tree-sharing" for r in refs), refs     # A and G: shared, restorable
    refs, res = _reasons(kids["D"])         # (refused: not its own session leader)
    assert not any(r["reason"] == "sharing-peer-outside" for r in refs), refs
    assert any(i["what"] == "sharing" and i["verdict"] == "ok" for i in res["items"]), res["items"]
    with pytest.raises((Refusal, Refusals)):
        dump(kids["B"], str(tmp_path / "img"), Options())
    assert not (tmp_path / "img").exists()
    _untouched([p.pid] + list(kids.values()))


def _vfork_child(procs, session_killer, tmp_path):
    """tests/targets/vforker.c started: (its Popen, the vfork child's pid)."""
    exe = str(tmp_path / "vforker")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(TARGETS, "vforker.c")], check=True,
                   capture_output=True, timeout=60)
    p = procs.start([exe, str(tmp_path / "ready")], cwd=str(tmp_path))
    session_killer.append(p.pid)
    wait_for(lambda: (tmp_path / "ready").exists(), what="the vfork child")
    return p, _descendants(p.pid)[0]


def test_refused_vfork_child_dumped_alone(procs, session_killer, tmp_path):  # noqa: F811
    """A vfork child that has not exec'd shares its parent's memory: dumped
    alone, it is refused naming the parent."""
    p, kid = _vfork_child(procs, session_killer, tmp_path)
    refs, _ = _reasons(kid)
    assert any(r["reason"] == "sharing-peer-outside" and "memory" in r["detail"] and f"pid {p.pid} " in r["detail"]
               for r in refs), refs
    _untouched([kid])


def test_same_memory_picks_the_processes_sharing_it(procs, session_killer, tmp_path):  # noqa: F811
    """sharing.same_memory (what kernel_threads keeps of kthreadd's
    children): the vfork child holding its parent's memory, not ckpt."""
    from engine.sharing import same_memory
    p, kid = _vfork_child(procs, session_killer, tmp_path)
    assert same_memory(p.pid, [kid, os.getpid(), 999999999]) == {kid}


def _kthreadd_kernel_children() -> set:
    out = set()
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if int(fields[1]) == 2 and int(fields[6]) & 0x00200000:      # ppid kthreadd, PF_KTHREAD
            out.add(int(name))
    return out


def test_kernel_threads_are_kthreadds_kernel_children():
    """sharing.outside passes over kernel_threads(): exactly the children
    of kthreadd flagged PF_KTHREAD (read one by one here; a kernel thread
    made or gone meanwhile may be in one reading only)."""
    from engine.sharing import kernel_threads
    before = _kthreadd_kernel_children()
    got = kernel_threads()
    after = _kthreadd_kernel_children()
    if not before:
        pytest.skip("no kthreadd children here (a PID namespace)")
    assert before & after <= got <= before | after
    assert 2 not in got and 1 not in got


def test_outside_search_agrees_with_every_pair(procs, session_killer, sharer, tmp_path):  # noqa: F811
    """engine/sharing.outside (a binary search in kcmp order) finds what
    comparing every pair finds: B's fs is P's, G's fd table P's and A's,
    G's fs A's; D shares nothing."""
    from engine import sharing
    p, kids = _start(procs, session_killer, sharer, "share", tmp_path)
    mine = [kids["B"], kids["D"], kids["G"]]
    got = {(pid, kind) for pid, kind, _ in sharing.outside(mine)}
    want = set()
    for n in os.listdir("/proc"):
        if not n.isdigit() or int(n) in mine or int(n) == os.getpid():
            continue
        for pid in mine:
            for kind in sharing.OUTSIDE_KINDS:
                try:
                    if kcmp(pid, int(n), kind, 0, 0) == 0:
                        want.add((pid, kind))
                except Exception:   # noqa: BLE001 - gone meanwhile
                    pass
    assert got == want == {(kids["B"], sharing.KCMP_FS), (kids["G"], sharing.KCMP_FILES),
                           (kids["G"], sharing.KCMP_FS)}, (got, want)


def test_failure_after_tables_are_handed_on_leaves_no_member(procs, session_killer, sharer, tmp_path,
                                                              monkeypatch):  # noqa: F811
    """A failure once the tables are shared and left kills every member
    (none left holding a table), and the image still restores."""
    from engine.errors import EngineError
    from test_engine_tree import _gone
    p, kids = _start(procs, session_killer, sharer, "skip", tmp_path)
    pids = [p.pid] + list(kids.values())
    before = _relations(pids)
    img = tmp_path / "img"
    dump(p.pid, str(img), Options())
    _wait_killed(p.pid, img, procs)
    monkeypatch.setenv("CKPT_TEST_FAIL_AT", "threads")
    with pytest.raises(EngineError):
        restore(str(img), Options())
    wait_for(lambda: _gone(pids), what="every member gone")
    monkeypatch.delenv("CKPT_TEST_FAIL_AT")
    restore(str(img), Options())
    procs.adopt(p.pid)
    assert _relations(pids) == before
