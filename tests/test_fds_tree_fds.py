"""engine/fds/_util.tree_fds: the other members' fds, read from /proc once
a dump (the members are frozen) however many fds of the kinds that ask
(pidfds, /proc files) the tree holds; each caller sees every member but
the one it asks for."""

from __future__ import annotations

import os
import subprocess
import types

from engine.fds import _util


def test_the_members_fds_are_read_once_and_each_caller_sees_the_others(monkeypatch):
    kid = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL, close_fds=True)
    try:
        me = os.getpid()
        ctx = types.SimpleNamespace(tree_pids=frozenset({me, kid.pid}), shared={})
        listed = []
        real = os.listdir
        monkeypatch.setattr(_util.os, "listdir", lambda p: listed.append(p) or real(p))
        mine = list(_util.tree_fds(ctx, kid.pid))
        theirs = list(_util.tree_fds(ctx, me))
        again = list(_util.tree_fds(ctx, kid.pid))
        assert sorted(listed) == sorted([f"/proc/{me}/fd", f"/proc/{kid.pid}/fd"]), listed
        assert mine == again and {p for p, _, _ in mine} == {me} and {p for p, _, _ in theirs} == {kid.pid}
        assert (kid.pid, 0, "/dev/null") in theirs
        # one process, no tree: nothing to read
        assert list(_util.tree_fds(types.SimpleNamespace(tree_pids=frozenset(), shared={}), me)) == []
        assert len(listed) == 2
    finally:
        kid.kill()
        kid.wait()
