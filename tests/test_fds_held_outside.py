"""An eventfd, timerfd, epoll or inotify instance that a process outside the
dump holds too (one open file description: inherited, passed, pidfd_getfd)
is refused, naming that process (engine/fds/_util.py check_held_outside):
a restore makes a new object, and the outside holder would go on with the
old one, no longer sharing the counter, expirations, interest list or event
queue. Held by the dump alone, or by another member of the dumped tree, it
is not refused. Before this, only an eventfd on Linux < 6.6 was (its probe
needed it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import pidfd
from engine.context import Options
from engine.dump import check
from engine_core_support import procs, start_ready_script, wait_for  # noqa: F401

FD = 100
_NEW = {
    "eventfd": "os.eventfd(3)",
    "timerfd": "__import__('ctypes').CDLL(None).timerfd_create(1, 0)",
    "epoll": "__import__('ctypes').CDLL(None).epoll_create1(0)",
    "inotify": "__import__('ctypes').CDLL(None).inotify_init1(0)",
}
# the object at FD alone (its first fd closed): the only fd of its kind
MAKE = {k: f"made = {v}\nos.dup2(made, {FD})\nos.close(made)" for k, v in _NEW.items()}
CHILD = "\nif os.fork() == 0:\n    while True: time.sleep(1)\n"


def _refusals_at(res: dict, fd: int) -> list:
    return [r for r in res.get("refusals") or [] if r.get("fd") == fd]


def _refused_only_at_fd(pid: int, reason: str, names: str) -> None:
    """check() refuses FD alone, with `reason`, its detail naming `names`."""
    res = check(pid, Options())
    assert not res["ok"]
    refused = _refusals_at(res, FD)
    assert len(refused) == 1 and refused[0]["reason"] == reason, res["refusals"]
    assert names in refused[0]["detail"], refused[0]
    assert not [r for r in res["refusals"] if r.get("fd") != FD], res["refusals"]


def _outsider_with_dup_of(procs, pid: int, fd: int):  # noqa: F811
    """A process outside `pid`'s tree holding a duplicate of its `fd` (the
    same open file): (the process, its fd number)."""
    with pidfd.target_fd(pid, fd) as dup:
        outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=(dup,),
                                    close_fds=True, stdin=subprocess.DEVNULL)
        procs.popens.append(outsider)
    wait_for(lambda: os.path.exists(f"/proc/{outsider.pid}/fd/{dup}"), what="the outsider")
    return outsider, dup


@pytest.mark.parametrize("kind", sorted(MAKE))
def test_held_by_an_outside_process_refused_naming_it(procs, tmp_path, kind):  # noqa: F811
    p = start_ready_script(procs, tmp_path, MAKE[kind])
    assert check(p.pid, Options())["ok"], f"{kind} held by the target alone must pass"
    outsider, dup = _outsider_with_dup_of(procs, p.pid, FD)
    _refused_only_at_fd(p.pid, "unsupported-fd", f"pid {outsider.pid} (fd {dup})")


@pytest.mark.parametrize("kind", sorted(MAKE))
def test_another_object_of_the_kind_outside_is_not_the_same(procs, tmp_path, kind):  # noqa: F811
    """The same kind held outside, but its own open file: not refused (all
    anon inodes are one inode; kcmp tells them apart)."""
    p = start_ready_script(procs, tmp_path, MAKE[kind])
    other = tmp_path / "other"
    other.mkdir()
    q = start_ready_script(procs, other, MAKE[kind])
    assert q.pid != p.pid
    assert check(p.pid, Options())["ok"]


@pytest.mark.parametrize("kind", sorted(MAKE))
def test_shared_with_a_member_of_the_dumped_tree_is_not_outside(procs, tmp_path, kind):  # noqa: F811
    p = start_ready_script(procs, tmp_path, MAKE[kind] + CHILD)
    wait_for(lambda: open(f"/proc/{p.pid}/task/{p.pid}/children").read().split(), what="the child")
    kid = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
    procs.adopt(kid)
    res = check(p.pid, Options())
    assert not _refusals_at(res, FD), res.get("refusals")


# -- memfds and deleted files: shared by inode (two opens share the data) ------------------------

GHOST = {
    "memfd": "made = os.memfd_create('shared')\nos.write(made, b'data')",
    "deleted": "made = os.open('gone', os.O_RDWR | os.O_CREAT, 0o600)\nos.write(made, b'data')\nos.unlink('gone')",
}


def _ghost(kind: str) -> str:
    return GHOST[kind] + f"\nos.dup2(made, {FD})\nos.close(made)"


# mmap(2) by ctypes: Python's mmap.mmap keeps a dup of the fd, and this outsider must hold none
_OUTSIDER_MAPS = ("import ctypes, os, sys, time\nfd = int(sys.argv[1])\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                  "libc.mmap.restype = ctypes.c_void_p\n"
                  "libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, "
                  "ctypes.c_long)\n"
                  "assert libc.mmap(None, 4096, 3, 1, fd, 0) not in (None, ctypes.c_void_p(-1).value)\n"
                  "os.close(fd)\nopen(sys.argv[2], 'w').close()\ntime.sleep(600)\n")


@pytest.mark.parametrize("kind", sorted(GHOST))
@pytest.mark.parametrize("how", ["open", "reopened", "mapped"])
def test_a_memfd_or_deleted_file_an_outside_process_has_is_refused(procs, tmp_path, kind, how):  # noqa: F811
    """Held by a dup, by its own open of /proc/PID/fd/N (another open file,
    the same data) or only mapped (its fd closed): memory-peer-outside."""
    p = start_ready_script(procs, tmp_path, _ghost(kind))
    assert check(p.pid, Options())["ok"], f"a {kind} held by the target alone must pass"
    ready = tmp_path / "outsider-ready"
    if how == "reopened":
        own = os.open(f"/proc/{p.pid}/fd/{FD}", os.O_RDWR)
        argv = [sys.executable, "-c", f"import time; open({str(ready)!r}, 'w').close(); time.sleep(600)"]
    else:
        pfd = pidfd.pidfd_open(p.pid)
        try:
            own = pidfd.pidfd_getfd(pfd, FD)       # closed below, once the outsider has it
        finally:
            os.close(pfd)
        argv = [sys.executable, "-c", _OUTSIDER_MAPS, str(own), str(ready)] if how == "mapped" else \
            [sys.executable, "-c", f"import time; open({str(ready)!r}, 'w').close(); time.sleep(600)"]
    try:
        outsider = subprocess.Popen(argv, pass_fds=(own,), close_fds=True, stdin=subprocess.DEVNULL)
        procs.popens.append(outsider)
        wait_for(lambda: ready.exists(), what="the outsider")
    finally:
        os.close(own)
    if how == "mapped":     # it holds no fd on the file: only its mapping says it has it
        st = os.stat(f"/proc/{p.pid}/fd/{FD}")
        held = [os.stat(f"/proc/{outsider.pid}/fd/{f}") for f in os.listdir(f"/proc/{outsider.pid}/fd")]
        assert (st.st_dev, st.st_ino) not in {(h.st_dev, h.st_ino) for h in held}
    _refused_only_at_fd(p.pid, "memory-peer-outside", f"pid {outsider.pid}")


@pytest.mark.parametrize("kind", sorted(GHOST))
def test_a_memfd_or_deleted_file_shared_in_the_tree_is_not_outside(procs, tmp_path, kind):  # noqa: F811
    p = start_ready_script(procs, tmp_path, _ghost(kind) + CHILD)
    wait_for(lambda: open(f"/proc/{p.pid}/task/{p.pid}/children").read().split(), what="the child")
    procs.adopt(int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0]))
    res = check(p.pid, Options())
    assert not _refusals_at(res, FD), res.get("refusals")
