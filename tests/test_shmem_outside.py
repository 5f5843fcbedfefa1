"""Shared memory a restore makes anew (MAP_SHARED anonymous memory, a
memfd or deleted file mapped shared with no fd left) that a process
outside the dump still maps is refused for a single process too, naming
that process (engine/shmem.py outside): `memory-peer-outside`.

The class: a child dumped alone shares its parent's MAP_SHARED|MAP_ANONYMOUS
memory (fork gave it the same object). Only a tree's dump looked for
outside holders, so the child was dumped, and restored with an object of
its own: the parent's writes no longer reached it, and nothing said so."""

from __future__ import annotations

import os

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine_core_support import procs, start_ready_script, wait_for  # noqa: F401

# The object, mapped shared; its fd (if any) closed: only the mapping holds it.
MAKE = {
    "anon": "m = mmap.mmap(-1, 8192, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)",
    "memfd": "fd = os.memfd_create('shm')\nos.ftruncate(fd, 8192)\nm = mmap.mmap(fd, 8192)\nos.close(fd)",
    "deleted": ("fd = os.open('gone', os.O_RDWR | os.O_CREAT, 0o600)\nos.ftruncate(fd, 8192)\n"
                "m = mmap.mmap(fd, 8192)\nos.close(fd)\nos.unlink('gone')"),
}

# The target is the child: it leads a session of its own (a restore puts
# it back there) and holds nothing but the mapping and /dev/null.
FORK = """
m[:5] = b'hello'
kid = os.fork()
if kid == 0:
    os.setsid()
    null = os.open('/dev/null', os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    os.closerange(3, 4096)
    while True:
        time.sleep(1)
open('kid.tmp', 'w').write(str(kid)); os.rename('kid.tmp', 'kid')
"""


def _target(procs, tmp_path, kind: str, parent_keeps: bool) -> int:  # noqa: F811
    setup = MAKE[kind] + FORK + ("" if parent_keeps else "m.close()\n")
    start_ready_script(procs, tmp_path, setup, imports="mmap, os, time")
    kid = int((tmp_path / "kid").read_text())
    procs.adopt(kid)
    wait_for(lambda: os.getsid(kid) == kid, what="the child's own session")
    return kid


def _refusals(pid: int) -> list:
    res = check(pid, Options())
    return [] if res["ok"] else res["refusals"]


@pytest.mark.parametrize("kind", sorted(MAKE))
def test_parent_outside_the_dump_still_maps_it(procs, tmp_path, kind):  # noqa: F811
    kid = _target(procs, tmp_path, kind, parent_keeps=True)
    parent = procs.popens[-1].pid
    refs = _refusals(kid)
    assert [r["reason"] for r in refs] == ["memory-peer-outside"], refs
    assert f"mapped by pid {parent} outside the dump" in refs[0]["detail"], refs[0]
    with pytest.raises((Refusal, Refusals)):
        dump(kid, str(tmp_path / "img"), Options())
    assert not (tmp_path / "img").exists()
    with open(f"/proc/{kid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    assert status["TracerPid"].strip() == "0" and status["State"].split()[0] in "SR", status


@pytest.mark.parametrize("kind", sorted(MAKE))
def test_sole_holder_is_not_refused(procs, tmp_path, kind):  # noqa: F811
    """The parent unmapped it: the child is its only holder."""
    kid = _target(procs, tmp_path, kind, parent_keeps=False)
    assert _refusals(kid) == []
