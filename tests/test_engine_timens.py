"""engine/timens.py: the monotonic clocks carried on across machines (a
time namespace whose offsets continue the image's clocks). The migrate
scenarios restore on a second guest whose clocks are behind the first's
(scenarios/found/gen-s1203-0197.yaml); here the offsets and the namespace
itself, on this kernel."""

from __future__ import annotations

import ast
import os

import pytest

from engine import timens
from engine.errors import Refusal
from engine_core_support import in_child


def test_offsets_only_on_another_boot_and_only_when_behind():
    now = timens.record()
    ahead = {k: v + 50 * 10**9 for k, v in now.items()}
    assert timens.offsets({"clocks": ahead}, same_node=True) == {}
    assert timens.offsets({"clocks": {k: v - 10**9 for k, v in now.items()}}, same_node=False) == {}
    assert timens.offsets({}, same_node=False) == {}           # an image from before clocks were recorded
    offs = timens.offsets({"clocks": ahead}, same_node=False)
    assert set(offs) == {"monotonic", "boottime"}
    assert all(49 * 10**9 < v <= 50 * 10**9 for v in offs.values()), offs
    one = dict(ahead, boottime=now["boottime"] - 10**9)         # one clock behind: both carried, none backwards
    assert timens.offsets({"clocks": one}, same_node=False)["boottime"] == 0
    for bad in ({"monotonic": 1}, {"monotonic": -1, "boottime": 1}, {"monotonic": True, "boottime": 1}, [1, 2]):
        assert not timens.check_record(bad)
    assert timens.check_record(None) and timens.check_record(now)


def test_a_process_born_in_the_namespace_reads_the_image_clocks_on():
    if timens.usable():
        pytest.skip(timens.usable())
    want = {k: v + 3600 * 10**9 for k, v in timens.record().items()}

    def restorer():     # as the restorer: enter, then make a process, which reports its clocks
        timens.enter(timens.offsets({"clocks": want}, same_node=False))
        r, w = os.pipe()
        grand = os.fork()
        if grand == 0:
            os.write(w, repr(timens.record()).encode())
            os._exit(0)
        os.close(w)
        got = os.read(r, 4096)
        os.close(r)
        os.waitpid(grand, 0)
        return ast.literal_eval(got.decode())
    seen = ast.literal_eval(in_child(restorer))
    for k in ("monotonic", "boottime"):
        assert want[k] <= seen[k] < want[k] + 60 * 10**9, (k, want[k], seen[k])
    assert timens.record()["monotonic"] < want["monotonic"]    # this process's clocks are untouched


def test_no_namespace_no_restore(monkeypatch):
    monkeypatch.setattr(timens, "usable", lambda: "this kernel has no time namespaces")
    r = timens.refusal({"monotonic": 5 * 10**9, "boottime": 5 * 10**9})
    assert isinstance(r, Refusal) and r.reason == "unsupported-state" and "behind the image's" in r.message
    assert timens.refusal({}) is None
