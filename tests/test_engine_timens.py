"""engine/timens.py: the monotonic clocks carried on across machines (a
time namespace whose offsets continue the image's clocks), and a process
in a time namespace of its own dumped and restored in one with its
offsets. The migrate scenarios restore on a second guest whose clocks are
behind the first's (scenarios/found/gen-s1203-0197.yaml); here the
offsets and the namespace itself, on this kernel."""

from __future__ import annotations

import ast
import os

import pytest

from engine import timens
from engine.errors import Refusal
from engine_core_support import in_child, procs  # noqa: F401


def test_offsets_only_on_another_boot_and_only_when_behind():
    now = timens.record()
    ahead = {k: v + 50 * 10**9 for k, v in now.items()}
    assert timens.offsets({"clocks": ahead}, same_node=True) == {}
    own = {"monotonic": 7, "boottime": -3}       # the same boot: the namespace's own offsets, as they were
    assert timens.offsets({"clocks": ahead, "timens": own}, same_node=True) == own
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
    for bad in ({"monotonic": 1}, {"monotonic": 1 << 62, "boottime": 0}, {"monotonic": 1.5, "boottime": 0}, 3):
        assert not timens.check_offsets(bad)
    assert timens.check_offsets(None) and timens.check_offsets({"monotonic": -5, "boottime": 10**12})


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
    assert isinstance(r, Refusal) and r.reason == "unsupported-state" and "needs a time namespace" in r.message or "that needs a time namespace" in r.message
    assert timens.refusal({}) is None


# A process put in a time namespace of its own (as a restore on another
# machine, or a container runtime, does) before it runs the worker.
LAUNCH = r"""
import ctypes, os, sys
c = ctypes.CDLL(None, use_errno=True)
assert c.unshare(0x80) == 0, os.strerror(ctypes.get_errno())      # CLONE_NEWTIME
with open("/proc/self/timens_offsets", "w") as f:
    f.write("monotonic 1000 0\nboottime 2000 500\n")
os.execv(sys.executable, [sys.executable] + sys.argv[1:])        # exec enters it (Linux 5.11)
"""

CLOCKS = r"""
import json, os, signal, sys, time
def on_usr1(*_):
    out = {"mono": time.clock_gettime_ns(time.CLOCK_MONOTONIC), "boot": time.clock_gettime_ns(time.CLOCK_BOOTTIME),
           "ns": os.readlink("/proc/self/ns/time"), "offsets": open("/proc/self/timens_offsets").read().split()}
    with open("verdict.json.tmp", "w") as f:
        json.dump(out, f)
    os.rename("verdict.json.tmp", "verdict.json")
signal.signal(signal.SIGUSR1, on_usr1)
if sys.argv[1:] == ["tree"] and os.fork() == 0:      # a child in the namespace too: a tree
    while True:
        time.sleep(0.05)
open("ready", "w").close()
while True:
    signal.pause()
"""


@pytest.mark.parametrize("again,tree", [(False, False), (True, False), (False, True)])
def test_a_process_in_its_own_time_namespace_is_restored_in_one_with_its_offsets(procs, tmp_path, again, tree):
    from engine_core_support import python_exe
    from fds_support import NotOurChild, ask_verdict, dump_restore, start_worker
    if timens.usable():
        pytest.skip(timens.usable())
    (tmp_path / "launch.py").write_text(LAUNCH)
    (tmp_path / "clocks.py").write_text(CLOCKS)
    p, _ = start_worker(procs, tmp_path, [python_exe(), str(tmp_path / "launch.py"), str(tmp_path / "clocks.py")] +
                        (["tree"] if tree else []),
                        ready_json=False)
    before = ask_verdict(p.pid, tmp_path)
    assert before["ns"] != os.readlink("/proc/self/ns/time")
    rounds = 2 if again else 1      # the restored process dumped and restored once more
    for i in range(rounds):
        dump_restore(procs, p, str(tmp_path / f"img{i}"))
        p = NotOurChild(p.pid)
        assert (tmp_path / f"img{i}" / "tree.json").exists() == tree
    host = timens.record()
    after = ask_verdict(p.pid, tmp_path)
    assert after["ns"] != os.readlink("/proc/self/ns/time")
    assert after["offsets"] == before["offsets"] == ["monotonic", "1000", "0", "boottime", "2000", "500"]
    # its clocks read the host's plus its offsets: time passed, as over a freeze
    assert 0 <= after["mono"] - (host["monotonic"] + 1000 * 10**9) < 30 * 10**9
    assert 0 <= after["boot"] - (host["boottime"] + 2000 * 10**9 + 500) < 30 * 10**9
    assert after["mono"] > before["mono"]
