"""inotify (same watches, same wds, same masks), fanotify (refused)."""

from __future__ import annotations

import os

import pytest

from engine.errors import Refusal
from engine.fds import _sys
from engine.fds.inotify import parse_watches

from fds_support import Target, classify, dump, restore

IN_CREATE, IN_DELETE, IN_MODIFY, IN_ONESHOT, IN_EXCL_UNLINK = 0x100, 0x200, 0x2, 0x80000000, 0x04000000


def watches(pid, fd):
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return sorted((w["wd"], w["ino"], w["mask"]) for w in parse_watches(f.read()))


def setup_for(d, f):
    return f"""
fd = libc.inotify_init1(os.O_NONBLOCK); os.dup2(fd, 500); os.close(fd)
def add(p, m):
    wd = libc.inotify_add_watch(500, p.encode(), ctypes.c_uint32(m))
    assert wd > 0
    return wd
assert add({d!r}, {IN_CREATE | IN_DELETE}) == 1
for _ in range(3):                          # burn wds 2..4: the next is 5
    libc.inotify_rm_watch(500, add("/", 1))
assert add({f!r}, {IN_MODIFY | IN_ONESHOT | IN_EXCL_UNLINK}) == 5
while True:                                 # consume the IN_IGNORED events
    try: os.read(500, 4096)
    except BlockingIOError: break
"""


def make(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    f = d / "file"
    f.write_text("x")
    return str(d), str(f)


def test_inotify_same_wds_masks_and_events(tmp_path):
    d, f = make(tmp_path)
    with Target(tmp_path, setup_for(d, f)) as t:
        want = watches(t.pid, 500)
        assert [w[0] for w in want] == [1, 5]
        desc = classify(t.pid, 500)
        assert f"wd 1 {d} " in desc and f"wd 5 {f} " in desc
        img = dump(t.pid, [500], str(tmp_path / "img"))
    with restore(img):
        assert watches(os.getpid(), 500) == want
        assert _sys.fionread(500) == 0             # the burned wds' IN_IGNORED were drained
        open(os.path.join(d, "new"), "w").close()
        with open(f, "a") as fh:
            fh.write("y")
        events = _sys.inotify_events(os.read(500, 4096))
        assert (1, IN_CREATE, 0, b"new") in events
        assert (5, IN_MODIFY, 0, b"") in events


def test_inotify_pending_events_refused_and_kept(tmp_path):
    d, f = make(tmp_path)
    check = "report['n'] = len(os.read(500, 4096))"
    with Target(tmp_path, setup_for(d, f), check) as t:
        open(os.path.join(d, "new"), "w").close()
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "inotify-pending"
        assert t.check()["n"] > 0                 # the event is still there for the target


def test_inotify_watched_file_gone_or_replaced_at_restore(tmp_path):
    d, f = make(tmp_path)
    with Target(tmp_path, setup_for(d, f)) as t:
        img = dump(t.pid, [500], str(tmp_path / "img"))
    os.unlink(f)
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "inotify-unresolvable" and "watch 5 " in ei.value.detail
    open(f, "w").close()                          # same path, another inode
    with pytest.raises(Refusal) as ei:
        restore(img)
    assert ei.value.reason == "inotify-unresolvable"
    with restore(img, same_node=False):           # another node: a file of the same type will do
        assert [w[0] for w in watches(os.getpid(), 500)] == [1, 5]


def test_inotify_unlinked_watched_file_unresolvable_at_dump(tmp_path):
    d, f = make(tmp_path)
    setup = setup_for(d, f).replace(str(IN_MODIFY | IN_ONESHOT | IN_EXCL_UNLINK), str(IN_MODIFY))
    # Kept alive by a mapping, no fd: nothing the restore recreates it by
    # (a deleted file the process holds open is restored, test_engine_inotify_ghost.py).
    setup += (f"\nkeep = os.open({f!r}, os.O_RDONLY)\nlibc.mmap.restype = ctypes.c_void_p\n"
              "assert libc.mmap(None, 1, 1, 1, keep, ctypes.c_long(0)) not in (None, 2**64 - 1)\n"
              f"os.close(keep)\nos.unlink({f!r})\n")   # MAP_SHARED, PROT_READ: no fd kept
    setup += "while True:\n    try: os.read(500, 4096)\n    except BlockingIOError: break\n"
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "inotify-unresolvable"
        assert "is no file the process holds open" in ei.value.detail


def test_fanotify_refused(tmp_path):
    setup = "fd = libc.fanotify_init(0, os.O_RDONLY); assert fd >= 0; os.dup2(fd, 500); os.close(fd)"
    with Target(tmp_path, setup) as t:
        with pytest.raises(Refusal) as ei:
            classify(t.pid, 500)
        assert ei.value.reason == "fanotify" and ei.value.fd == 500
