"""System V shared memory segments (engine/sysvshm.py): restored with the
same id, key, size, mode, owners and contents at the same addresses,
read-only attaches read-only, a removed (IPC_RMID) segment removed again,
a tree's members attached to one segment; the segment the dump left
behind reused only when provably untouched; outside attachers, split
attaches, a taken id refused; a failed restore leaves no segment it made;
hostile segment records refused as image-invalid before any process.
Target: tests/targets/shmtarget.c (real processes; ptrace as root).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil

import pytest

from engine import sysvshm
from engine.context import Options
from engine.dump import check, dump
from engine.errors import EngineError, Refusal, Refusals
from engine.restore import restore
from engine_core_support import alive, compile_target, procs, wait_for  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="restores as root")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc.shmdt.argtypes = (ctypes.c_void_p,)
_libc.shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
_libc.shmctl.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_KEYS = iter(range(1, 1 << 16))


@pytest.fixture(scope="module")
def shmtarget(tmp_path_factory):
    return compile_target(tmp_path_factory, "shmtarget")


@pytest.fixture
def segs():
    """Ids of the segments a test made (through its target, or itself):
    every one still there at the end removed (a restore remakes them with
    the same ids)."""
    ids = []
    yield ids
    for shmid in ids:
        _libc.shmctl(shmid, sysvshm.IPC_RMID, None)
    for row in sysvshm.read_table().values():     # and any left with a key of ours
        if row["key"] in _USED:
            _libc.shmctl(row["shmid"], sysvshm.IPC_RMID, None)


_USED: set = set()


def _key() -> int:
    k = 0x5e000000 | ((os.getpid() & 0xff) << 16) | next(_KEYS)
    _USED.add(k)
    return k


def _start(procs, shmtarget, segs, d, mode="single"):  # noqa: F811
    key = _key()
    p = procs.start([shmtarget, mode, str(d), f"{key:x}"], cwd=str(d))
    wait_for(lambda: os.path.exists(d / "ready") or p.poll() is not None, what="the target")
    assert p.poll() is None
    info = json.loads((d / "ready").read_text())
    segs += [info["k"], info["p"]]
    info["key"] = key
    return p, info


def _gone(procs, p):  # noqa: F811
    p.wait(timeout=10)
    procs.popens.remove(p)


def _sysv_maps(pid) -> list:
    """(start, range, perms, inode: the id, name, VmFlags) of each SysV
    mapping: a read-write attach mprotect()ed read-only shows the same
    perms as a SHM_RDONLY one, not the same VmFlags (mw, sh)."""
    out, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("VmFlags:"):
                if cur is not None:
                    out.append(cur + (" ".join(sorted(line.split()[1:])),))
                cur = None
            elif "-" in line.split()[0] and not line.split()[0].endswith(":"):
                r = line.split()
                cur = (int(r[0].split("-")[0], 16), r[0], r[1], int(r[4]), r[5]) if "/SYSV" in line else None
    return sorted(out)


def _results(d, pids) -> dict:
    (d / "go").write_text("")
    out = {}
    for pid in pids:
        path = d / f"result.{pid}"
        wait_for(lambda: path.exists(), what=f"result of {pid}")
        out[pid] = json.loads(path.read_text())
    return out


def _proves(res: dict, info: dict, nattch_k: int, nattch_p: int, mode_k: int = 0o640) -> None:
    """What one process sees: the patterns through every attach, the last
    page of K never written (zero), the token seen through the read-only
    attach (one segment), both ids' key, size, mode and owners."""
    assert (res["pat_a"], res["pat_r"], res["pat_b"], res["zero_tail"]) == (-1, -1, -1, -1), res
    assert res["seen"] == 1, res
    assert res["k"] == {"key": info["key"], "size": 3 * 4096 + 100, "mode": mode_k, "uid": 1234, "gid": 5678,
                        "cuid": 4321, "cgid": 4321, "nattch": nattch_k}, res
    assert res["p"]["key"] == 0 and res["p"]["size"] == 8192 and res["p"]["mode"] == 0o1600, res
    assert res["p"]["nattch"] == nattch_p, res


def _rows(*ids) -> dict:
    table = sysvshm.read_table()
    return {i: table.get(i) for i in ids}


def test_single_process_restored_exactly(procs, shmtarget, segs, tmp_path):  # noqa: F811
    """The keyed segment outlived the dump (not removed, nattch 0): reused,
    the very segment (its creator pid is the target's); the removed one
    went with the kill: made again with its id, removed again."""
    p, info = _start(procs, shmtarget, segs, tmp_path)
    maps = _sysv_maps(p.pid)
    assert sorted(m[3] for m in maps) == sorted([info["p"], info["k"], info["k"]])     # the inode: the id
    before = _rows(info["k"], info["p"])
    res = check(p.pid, Options())
    assert res["ok"], res["refusals"]
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    left = _rows(info["k"], info["p"])
    assert left[info["p"]] is None and left[info["k"]]["nattch"] == 0
    out = restore(str(tmp_path / "img"), Options())
    procs.adopt(out["pid"])
    assert out["pid"] == p.pid
    assert _sysv_maps(p.pid) == maps           # addresses, permissions, ids, keys
    after = _rows(info["k"], info["p"])
    assert after[info["k"]]["cpid"] == before[info["k"]]["cpid"] == p.pid     # reused, not remade
    assert after[info["p"]]["mode"] & sysvshm.SHM_DEST and after[info["p"]]["nattch"] == 1
    for k in ("key", "size", "mode", "uid", "gid", "cuid", "cgid", "nattch"):
        assert after[info["k"]][k] == before[info["k"]][k], k
    _proves(_results(tmp_path, [p.pid])[p.pid], info, 2, 1)


def test_a_removed_leftover_is_made_again_with_its_id_and_creator(procs, shmtarget, segs, tmp_path):  # noqa: F811
    """The keyed segment removed between dump and restore: made again with
    its id and key, created as its creator (cuid/cgid 4321), owned by
    1234:5678, its contents the image's."""
    p, info = _start(procs, shmtarget, segs, tmp_path)
    maps = _sysv_maps(p.pid)
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    assert _libc.shmctl(info["k"], sysvshm.IPC_RMID, None) == 0
    assert _rows(info["k"])[info["k"]] is None
    out = restore(str(tmp_path / "img"), Options())
    procs.adopt(out["pid"])
    assert _sysv_maps(p.pid) == maps
    row = _rows(info["k"])[info["k"]]
    assert row["cpid"] == os.getpid() and row["key"] == info["key"]     # made by ckpt (a known limit)
    _proves(_results(tmp_path, [p.pid])[p.pid], info, 2, 1)


def test_a_locked_segment_is_locked_again(procs, shmtarget, segs, tmp_path):  # noqa: F811
    """SHM_LOCK (mode SHM_LOCKED): a segment made again is locked again."""
    p, info = _start(procs, shmtarget, segs, tmp_path)
    assert _libc.shmctl(info["k"], sysvshm.SHM_LOCK, None) == 0
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    assert _libc.shmctl(info["k"], sysvshm.IPC_RMID, None) == 0
    out = restore(str(tmp_path / "img"), Options())
    procs.adopt(out["pid"])
    assert _rows(info["k"])[info["k"]]["mode"] == sysvshm.SHM_LOCKED | 0o640
    _proves(_results(tmp_path, [p.pid])[p.pid], info, 2, 1, sysvshm.SHM_LOCKED | 0o640)


def test_a_tree_shares_its_segments(procs, shmtarget, segs, tmp_path):  # noqa: F811
    """Parent and child (postgres' shape: attached by fork) restored
    attached to the same two segments: a byte the child writes is read by
    the parent; each segment's nattch counts every member's attaches."""
    p, info = _start(procs, shmtarget, segs, tmp_path, "tree")
    child = info["child"]
    maps = {pid: _sysv_maps(pid) for pid in (p.pid, child)}
    res = check(p.pid, Options())
    assert res["ok"], res["refusals"]
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    wait_for(lambda: not alive(child), what="the child gone")
    try:
        os.waitpid(child, 0)        # reparented to this test (a subreaper): its pid free for the restore
    except ChildProcessError:
        pass
    assert _rows(info["p"])[info["p"]] is None
    out = restore(str(tmp_path / "img"), Options())
    procs.adopt(out["pid"])
    procs.adopt(child)
    assert {pid: _sysv_maps(pid) for pid in (p.pid, child)} == maps
    got = _results(tmp_path, [child, p.pid])
    for pid in (p.pid, child):
        _proves(got[pid], info, 4, 2)


def test_an_outside_attacher_is_refused(procs, shmtarget, segs, tmp_path):  # noqa: F811
    p, info = _start(procs, shmtarget, segs, tmp_path)
    addr = _libc.shmat(info["k"], None, sysvshm.SHM_RDONLY)
    assert addr and addr != ctypes.c_void_p(-1).value
    try:
        res = check(p.pid, Options())
        assert not res["ok"]
        reasons = {r["reason"] for r in res["refusals"]}
        assert reasons == {"memory-peer-outside"}, res["refusals"]
        assert f"System V segment {info['k']}" in res["refusals"][0]["detail"]
        with pytest.raises((Refusal, Refusals)):
            dump(p.pid, str(tmp_path / "img"), Options())
        assert alive(p.pid) and not os.path.exists(tmp_path / "img")
    finally:
        _libc.shmdt(ctypes.c_void_p(addr))
    res = check(p.pid, Options())
    assert res["ok"], res["refusals"]


def test_a_split_attach_is_refused(procs, shmtarget, segs, tmp_path):  # noqa: F811
    p, info = _start(procs, shmtarget, segs, tmp_path, "split")
    res = check(p.pid, Options())
    assert not res["ok"]
    assert {r["reason"] for r in res["refusals"]} == {"unsupported-mapping"}, res["refusals"]
    assert any("part of System V segment" in r["detail"] for r in res["refusals"])


def test_another_ipc_namespace_is_refused(procs, shmtarget, segs, tmp_path):  # noqa: F811
    """Its segments are another namespace's ids (freed with it)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1)")
    key = _key()
    p = procs.start([unshare, "--ipc", shmtarget, "single", str(tmp_path), f"{key:x}"], cwd=str(tmp_path))
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, what="the target")
    assert p.poll() is None
    res = check(p.pid, Options())
    assert not res["ok"]
    assert any(r["reason"] == "unsupported-state" and "ipc" in r["detail"] for r in res["refusals"]), res["refusals"]
    assert {r["reason"] for r in res["refusals"]} <= {"unsupported-state", "unsupported-mapping"}


def _refused(e, reason: str) -> list:
    got = e.refusals if isinstance(e, Refusals) else [e]
    assert {r.reason for r in got} == {reason}, [r.message for r in got]
    return [r.detail for r in got]


def test_a_leftover_attached_since_is_refused_and_nothing_made(procs, shmtarget, segs, tmp_path):  # noqa: F811
    p, info = _start(procs, shmtarget, segs, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    addr = _libc.shmat(info["k"], None, 0)
    _libc.shmdt(ctypes.c_void_p(addr))
    with pytest.raises((Refusal, Refusals)) as e:
        restore(str(tmp_path / "img"), Options())
    assert "not reused" in _refused(e.value, "sysv-shm")[0]
    assert not os.path.exists(f"/proc/{p.pid}")
    assert _rows(info["p"])[info["p"]] is None          # nothing made


def test_a_leftover_with_other_contents_is_refused(procs, shmtarget, segs, tmp_path, monkeypatch):  # noqa: F811
    """The contents are compared too: with the table's checks blinded, a
    byte written since the dump is found."""
    p, info = _start(procs, shmtarget, segs, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    addr = _libc.shmat(info["k"], None, 0)
    ctypes.memset(addr + 4096 * 3 + 5, 1, 1)         # in the page never written: zero in the image
    _libc.shmdt(ctypes.c_void_p(addr))
    monkeypatch.setattr(sysvshm, "same_segment", lambda rec, row, pids: None)
    with pytest.raises((Refusal, Refusals)) as e:
        restore(str(tmp_path / "img"), Options())
    assert "contents differ" in _refused(e.value, "sysv-shm")[0]
    assert not os.path.exists(f"/proc/{p.pid}")
    assert _rows(info["p"])[info["p"]] is None          # nothing made, the removed one neither


def test_a_taken_id_is_refused(procs, shmtarget, segs, tmp_path):  # noqa: F811
    p, info = _start(procs, shmtarget, segs, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    with open(sysvshm.NEXT_ID, "w") as f:
        f.write(f"{info['p']}\n")
    squatter = _libc.shmget(0, 4096, sysvshm.IPC_CREAT | 0o600)
    segs.append(squatter)
    assert squatter == info["p"]
    with pytest.raises((Refusal, Refusals)) as e:
        restore(str(tmp_path / "img"), Options())
    assert "is taken" in _refused(e.value, "sysv-shm")[0]
    assert _rows(squatter)[squatter]["size"] == 4096     # left alone
    assert not os.path.exists(f"/proc/{p.pid}")


def test_a_taken_index_is_refused(procs, shmtarget, segs, tmp_path):  # noqa: F811
    """Another segment on the id's index (the same id but for its sequence
    number): shm_next_id could not give the id; refused, not attempted."""
    p, info = _start(procs, shmtarget, segs, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    with open(sysvshm.NEXT_ID, "w") as f:
        f.write(f"{info['p'] + sysvshm.IPCMNI}\n")
    squatter = _libc.shmget(0, 4096, sysvshm.IPC_CREAT | 0o600)
    segs.append(squatter)
    assert squatter == info["p"] + sysvshm.IPCMNI
    with pytest.raises((Refusal, Refusals)) as e:
        restore(str(tmp_path / "img"), Options())
    assert "holds its index" in _refused(e.value, "sysv-shm")[0]
    assert not os.path.exists(f"/proc/{p.pid}")


def test_a_failed_restore_removes_what_it_made(procs, shmtarget, segs, tmp_path, monkeypatch):  # noqa: F811
    """A failure after the process attached (and the removed segment was
    removed again): the segment made is gone, the reused one stays."""
    p, info = _start(procs, shmtarget, segs, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    monkeypatch.setenv("CKPT_TEST_FAIL_AT", "final")
    with pytest.raises(EngineError):
        restore(str(tmp_path / "img"), Options())
    wait_for(lambda: not os.path.exists(f"/proc/{p.pid}"), what="the failed restore's process gone")
    rows = _rows(info["k"], info["p"])
    assert rows[info["p"]] is None and rows[info["k"]]["nattch"] == 0


def test_a_failure_before_the_attach_removes_what_it_made(procs, shmtarget, segs, tmp_path, monkeypatch):  # noqa: F811
    """A failure before the process attached (nothing removed it yet): the
    restore's undo removes the segment it made."""
    p, info = _start(procs, shmtarget, segs, tmp_path)
    dump(p.pid, str(tmp_path / "img"), Options())
    _gone(procs, p)
    monkeypatch.setenv("CKPT_TEST_FAIL_AT", "clone")
    with pytest.raises(EngineError):
        restore(str(tmp_path / "img"), Options())
    wait_for(lambda: not os.path.exists(f"/proc/{p.pid}"), what="the failed restore's process gone")
    assert _rows(info["p"])[info["p"]] is None


# -- hostile records -------------------------------------------------------------

def _edit(img, fn) -> None:
    from harness.imagefuzz_edits import reseal
    path = os.path.join(img, "mm.json")
    with open(path) as f:
        mm = json.load(f)
    fn([v for v in mm["vmas"] if v["kind"] == "sysvshm"])
    with open(path, "w") as f:
        json.dump(mm, f)
    with open(os.path.join(img, "manifest.json")) as f:
        reseal(img, json.load(f), ["mm.json"])


def _carrier(vs, keyed=True):
    return next(v for v in vs if v["sysv"]["data"] and (v["sysv"]["key"] != 0) == keyed)


def _others(vs):
    return [v for v in vs if not v["sysv"]["data"]]


EDITS = {
    "no record": lambda vs: vs[0].pop("sysv"),
    "id not the inode": lambda vs: vs[0]["sysv"].update(shmid=vs[0]["sysv"]["shmid"] + 1),
    "size not the mapping's": lambda vs: [v["sysv"].update(size=v["sysv"]["size"] + 8192) for v in vs],
    "mode bit": lambda vs: [v["sysv"].update(mode=v["sysv"]["mode"] | 0o10000) for v in vs],
    "two carriers": lambda vs: [v["sysv"].update(data=True) for v in vs],
    "no carrier": lambda vs: [v["sysv"].update(data=False) for v in vs if v["sysv"]["key"]],
    "nattch": lambda vs: [v["sysv"].update(nattch=5) for v in vs if v["sysv"]["key"]],
    "removed with a key": lambda vs: [v["sysv"].update(key=7) for v in vs if not v["sysv"]["key"]],
    "read-only attach writable": lambda vs: [v.update(perms="rw-s") for v in vs if "mw" not in v["flags"]],
    "pages off the carrier": lambda vs: [v.update(pages=_carrier(vs)["pages"]) for v in _others(vs)],
    "owner": lambda vs: [v["sysv"].update(uid=-1) for v in vs],
    "data not a boolean": lambda vs: vs[0]["sysv"].update(data=1),
    "records disagree": lambda vs: _others(vs)[0]["sysv"].update(ctime=1),
    "offset": lambda vs: vs[0].update(offset=4096),
    "private": lambda vs: vs[0].update(perms=vs[0]["perms"][:3] + "p"),
}


@pytest.fixture(scope="module")
def base_image(tmp_path_factory, shmtarget):
    """One image of the single target (its process gone, its segments
    removed: a restore would make them)."""
    from engine_core_support import Procs, become_subreaper, wait_for as wf
    become_subreaper()
    d = tmp_path_factory.mktemp("shmimg")
    procs_, ids = Procs(), []
    try:
        p, info = _start(procs_, shmtarget, ids, d)
        info["pid"] = p.pid
        dump(p.pid, str(d / "img"), Options())
        p.wait(timeout=10)
        procs_.popens.clear()
        wf(lambda: not os.path.exists(f"/proc/{p.pid}"), what="gone")
    finally:
        procs_.cleanup()
        for shmid in ids:
            _libc.shmctl(shmid, sysvshm.IPC_RMID, None)
    return str(d / "img"), info


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_hostile_segment_records_are_image_invalid(base_image, tmp_path, edit):
    img, info = base_image
    mine = str(tmp_path / "img")
    shutil.copytree(img, mine)
    _edit(mine, EDITS[edit])
    with pytest.raises((Refusal, Refusals)) as e:
        restore(mine, Options())
    _refused(e.value, "image-invalid")
    assert _rows(info["k"], info["p"]) == {info["k"]: None, info["p"]: None}      # no segment made
    assert not os.path.exists(f"/proc/{info['pid']}")     # no process made


def test_the_unedited_image_restores(base_image, tmp_path, procs, segs):  # noqa: F811
    """The control of the hostile cases: the same image, copied, restores."""
    img, info = base_image
    mine = str(tmp_path / "img")
    shutil.copytree(img, mine)
    _edit(mine, lambda vs: None)
    out = restore(mine, Options())
    procs.adopt(out["pid"])
    segs += [info["k"], info["p"]]
    assert _rows(info["k"])[info["k"]]["nattch"] == 2


def test_a_removed_segment_where_shm_next_id_is_read_only_is_refused_by_the_dump(procs, shmtarget, segs, tmp_path,  # noqa: F811
                                                                                  monkeypatch):
    """A removed segment dies with the dump's kill, so the restore must make
    it again with its id: where shm_next_id cannot be written (a container's
    read-only /proc/sys) that is known at the dump, which refuses it with
    the target unharmed. Before, only the restore refused, after the kill.
    The keyed segment (it outlives the kill, reused) is not refused."""
    p, info = _start(procs, shmtarget, segs, tmp_path)
    real = os.access
    monkeypatch.setattr(sysvshm.os, "access", lambda path, mode: False if path == sysvshm.NEXT_ID
                        else real(path, mode))
    res = check(p.pid, Options())
    bad = [r for r in res["refusals"]]
    assert [r["reason"] for r in bad] == ["sysv-shm"], bad
    assert "cannot be written" in bad[0]["detail"], bad
    with pytest.raises((Refusal, Refusals)):
        dump(p.pid, str(tmp_path / "img"), Options())
    assert alive(p.pid) and not (tmp_path / "img").exists()
