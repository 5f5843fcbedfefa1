"""Control group membership carried over (engine/cgroups.py): a process
in cgroups of its own (a v1 controller hierarchy, the v2 hierarchy, a
named v1 hierarchy as zdtm's cgroup00 mounts) comes back in them; before,
it came back in ckpt's, silently. A cgroup ckpt cannot reach is refused
at dump (the target unharmed), and one gone at restore is refused before
any process exists (`cgroup`)."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from engine import cgroups
from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import procs, start_ready_script, wait_for  # noqa: F401


def _mounted(fstype: str, opt: str = ""):
    for kind, root, point, opts in cgroups.mounts():
        if kind == fstype and root == "/" and (not opt or opt in opts):
            return point
    return None


class Groups:
    """Cgroups the test makes (removed at the end, their processes gone)."""

    def __init__(self) -> None:
        self.dirs = []
        self.mounts = []

    def make(self, base: str) -> str:
        d = os.path.join(base, f"ckpt-test-{uuid.uuid4().hex[:8]}")
        os.mkdir(d)
        self.dirs.append(d)
        return d

    def cleanup(self) -> None:
        for d in reversed(self.dirs):
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:         # the killed processes leave it a moment later
                    wait_for(lambda: True, timeout=0.05)
        for m in reversed(self.mounts):
            subprocess.run(["umount", m], capture_output=True)


@pytest.fixture
def groups():
    g = Groups()
    yield g
    g.cleanup()


def _move(pid: int, d: str) -> None:
    with open(os.path.join(d, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def _named(groups, tmp_path) -> str:
    point = str(tmp_path / "named")
    os.mkdir(point)
    r = subprocess.run(["mount", "-t", "cgroup", "-o", "none,name=ckpttest", "none", point], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a named v1 hierarchy: {r.stderr!r}")
    groups.mounts.append(point)
    return point


def _targets(groups, tmp_path):
    """Where a process can be moved here: [(what, directory)]."""
    out = []
    v1 = _mounted("cgroup", "pids")
    if v1:
        out.append(("v1 pids", groups.make(v1)))
    v2 = _mounted("cgroup2")
    if v2:
        try:
            out.append(("v2", groups.make(v2)))
        except OSError:
            pass
    out.append(("named v1", groups.make(_named(groups, tmp_path))))
    return out


def test_process_comes_back_in_its_cgroups(procs, groups, tmp_path):  # noqa: F811
    where = _targets(groups, tmp_path)
    p = start_ready_script(procs, tmp_path, "")
    for _, d in where:
        _move(p.pid, d)
    before = cgroups.read(p.pid)
    assert before != cgroups.read("self")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert cgroups.read(p.pid) == before, [w for w, _ in where]
    procs.kill(p.pid)


def test_cgroup_gone_at_restore_is_refused_before_any_process(procs, groups, tmp_path):  # noqa: F811
    d = groups.make(_named(groups, tmp_path))
    p = start_ready_script(procs, tmp_path, "")
    _move(p.pid, d)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    wait_for(lambda: not open(os.path.join(d, "cgroup.procs")).read(), what="the cgroup empty")
    os.rmdir(d)
    with pytest.raises((Refusal, Refusals)) as e:
        restore(str(tmp_path / "img"), Options())
    assert "cgroup" in str(e.value) and "not reachable" in str(e.value)
    assert not os.path.exists(f"/proc/{p.pid}")


def test_unreachable_cgroup_refused_at_dump(procs, groups, tmp_path):  # noqa: F811
    """A named hierarchy mounted nowhere any more (it lives on while a
    cgroup in it holds a process): ckpt could not put the process back."""
    point = _named(groups, tmp_path)
    d = groups.make(point)
    p = start_ready_script(procs, tmp_path, "")
    _move(p.pid, d)
    subprocess.run(["umount", point], check=True)
    try:
        with pytest.raises((Refusal, Refusals)) as e:
            dump(p.pid, str(tmp_path / "img"), Options())
        assert "cgroup" in str(e.value), e.value
        assert p.poll() is None and not (tmp_path / "img").exists()
    finally:
        procs.kill(p.pid) if p.poll() is None else None
        p.wait()
        subprocess.run(["mount", "-t", "cgroup", "-o", "none,name=ckpttest", "none", point], check=True)


def test_a_hierarchy_made_after_ckpts_first_operation_is_seen_by_the_next(procs, groups, tmp_path):  # noqa: F811
    """The engine keeps ckpt's own cgroups per operation, not per process:
    a process that runs several (this pytest worker, a warm engine) sees a
    hierarchy made between them. Before: one kept from the first refused
    every later dump in the worker once a test had made a named hierarchy
    on a fresh machine ("no such hierarchy here")."""
    (tmp_path / "a").mkdir()
    first = start_ready_script(procs, tmp_path / "a", "")
    from engine.dump import check
    assert check(first.pid, Options())["ok"]            # ckpt's own cgroups read: no such hierarchy yet
    point = str(tmp_path / "fresh")
    os.mkdir(point)
    name = f"ckpt-fresh-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["mount", "-t", "cgroup", "-o", f"none,name={name}", "none", point], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a named v1 hierarchy: {r.stderr!r}")
    groups.mounts.append(point)
    p = start_ready_script(procs, tmp_path, "")
    assert [f"name={name}", "/"] in cgroups.read(p.pid)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    restore(str(tmp_path / "img"), Options())
    procs.adopt(p.pid)
    assert [f"name={name}", "/"] in cgroups.read(p.pid)
    procs.kill(p.pid)


def test_the_root_of_a_hierarchy_gone_since_the_dump_is_nothing_to_restore():
    """A process at the root of a v1 hierarchy unmounted (and so destroyed)
    since the dump is restored like every other process here: in no such
    hierarchy. Before, its restore was refused "no such hierarchy here" - a
    test mounting a short-lived named hierarchy made any dump another
    worker took meanwhile unrestorable. A cgroup below the root of a gone
    hierarchy still is refused."""
    here = [["cpu", "/a"], ["", "/x"]]
    assert cgroups._moves([["cpu", "/a"], ["", "/x"], ["name=gone", "/"]], here) == []
    assert cgroups._moves([["cpu", "/a"], ["", "/x"], ["name=gone", "/sub"]], here) == [("name=gone", "/sub")]
    assert cgroups._moves([["cpu", "/b"], ["", "/x"]], here) == [("cpu", "/b")]
    assert cgroups._moves([["", "/x"]], here) == [("cpu", "/")]     # made since the dump: its root
