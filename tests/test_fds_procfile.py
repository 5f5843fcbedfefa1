"""/proc files a reopen gives back exactly (engine/fds/procfile.py): the
process's own stat/status/... and the system's meminfo/loadavg/...,
opened read-only and not read yet. After the restore the worker reads
them through its old fds: its own files report the restored process (its
PID, its name, its state now), dups still share one open file, flags are
kept. Everything else on /proc stays refused `pseudo-file`, with the
target unharmed."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from engine.context import Options
from engine.dump import check
from engine_core_support import procs  # noqa: F401
from fds_support import ask_verdict, dump_restore, start_worker

WORKER = r'''
import fcntl, json, os, signal, sys, time
mode = sys.argv[1]
pid = os.getpid()
fds = {}
if mode == "good":
    fds["self_stat"] = os.open("/proc/self/stat", os.O_RDONLY)
    fds["status"] = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    fds["comm"] = os.open(f"/proc/{pid}/comm", os.O_RDONLY)
    fds["meminfo"] = os.open("/proc/meminfo", os.O_RDONLY)
    fds["dup"] = os.dup(fds["self_stat"])
    import select
    ep = select.epoll()               # the system's files poll (always ready): watched level-triggered
    ep.register(fds["meminfo"], select.EPOLLIN)
elif mode == "read":
    fds["status"] = os.open(f"/proc/{pid}/status", os.O_RDONLY)
    os.read(fds["status"], 10)
elif mode == "write":
    fds["comm"] = os.open(f"/proc/{pid}/comm", os.O_RDWR)
elif mode == "other":
    fds["other"] = os.open(f"/proc/{sys.argv[2]}/stat", os.O_RDONLY)
elif mode == "unlisted":
    fds["environ"] = os.open(f"/proc/{pid}/environ", os.O_RDONLY)
with open("/proc/self/comm", "w") as f:       # a name of its own, to see it read back
    f.write("pfworker")

def check():
    out = {"pid": os.getpid(), "fds": fds}
    for k, fd in fds.items():
        if k == "dup":
            continue
        out[k] = os.pread(fd, 4096, 0).decode(errors="replace")
        out[k + "_flags"] = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK)
        out[k + "_cloexec"] = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    if mode == "good":
        out["epoll"] = [fd for fd, _ in ep.poll(0)]
    if "dup" in fds:    # one open file description: a move of one moves the other
        os.lseek(fds["self_stat"], 3, os.SEEK_SET)
        out["dup_pos"] = os.lseek(fds["dup"], 0, os.SEEK_CUR)
        os.lseek(fds["self_stat"], 0, os.SEEK_SET)
    return out

def on_usr1(*_):
    with open("verdict.json.tmp", "w") as f:
        json.dump(check(), f)
    os.rename("verdict.json.tmp", "verdict.json")
signal.signal(signal.SIGUSR1, on_usr1)
with open("ready.tmp", "w") as f:
    json.dump(fds, f)
os.rename("ready.tmp", "ready")
while True:
    signal.pause()
'''


def test_own_and_system_files_not_read_yet_are_reopened(procs, tmp_path):
    p, fds = start_worker(procs, tmp_path, ["good"], WORKER)
    before = ask_verdict(p.pid, tmp_path)
    dump_restore(procs, p, str(tmp_path / "img"))
    recs = {r["fd"]: r for r in json.loads((tmp_path / "img" / "fds.json").read_text())}
    assert recs[fds["self_stat"]]["kind"] == "procfile" and recs[fds["meminfo"]]["proc"] == "system"
    v = ask_verdict(p.pid, tmp_path)
    assert v["pid"] == p.pid
    assert v["self_stat"].split()[0] == str(p.pid) and v["self_stat"].split()[1] == "(pfworker)", v["self_stat"]
    assert f"Pid:\t{p.pid}\n" in v["status"] and "Name:\tpfworker" in v["status"]
    assert v["comm"] == "pfworker\n" and v["meminfo"].startswith("MemTotal:")
    for k in ("self_stat", "status", "comm", "meminfo"):
        assert (v[k + "_flags"], v[k + "_cloexec"]) == (before[k + "_flags"], before[k + "_cloexec"]), k
    assert v["status_flags"] & os.O_NONBLOCK and v["status_cloexec"]
    assert v["dup_pos"] == 3        # still one open file description with its dup
    assert v["epoll"] == [fds["meminfo"]] == before["epoll"]


@pytest.mark.parametrize("mode,why", [
    ("read", "read up to offset 10"),
    ("write", "open for writing"),
    ("other", "a file of another process"),
    ("unlisted", "a reopen would give another object"),     # pseudo.py, as before
])
def test_other_proc_files_stay_refused(procs, tmp_path, mode, why):
    other = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, close_fds=True)
    try:
        p, fds = start_worker(procs, tmp_path, [mode, str(other.pid)], WORKER)
        rep = check(p.pid, Options())
        fd = next(iter(fds.values()))
        bad = [r for r in rep["refusals"] if r.get("fd") == fd]
        assert [r["reason"] for r in bad] == ["pseudo-file"], rep["refusals"]
        assert why in bad[0]["message"], bad[0]["message"]
        v = ask_verdict(p.pid, tmp_path)        # unharmed, and its fd still reads
        assert v["pid"] == p.pid and v[next(iter(fds))], v
    finally:
        other.kill()
        other.wait()


TREE = r'''
import os, sys, time
mode = sys.argv[1]
if mode == "inherited":
    os.open("/proc/self/stat", os.O_RDONLY)      # fd 3, one open file in both
if os.fork() == 0:
    if mode == "own":
        os.open("/proc/self/stat", os.O_RDONLY)  # fd 3: the child's own
    while True:
        time.sleep(1)
open("ready.tmp", "w").close(); os.rename("ready.tmp", "ready")
while True:
    time.sleep(1)
'''


def _child_of(pid):
    from engine_core_support import wait_for
    kids = []
    def found():
        kids[:] = open(f"/proc/{pid}/task/{pid}/children").read().split()
        return kids and os.path.exists(f"/proc/{kids[0]}/fd/3")
    wait_for(found, what="the child and its fd 3")
    return int(kids[0])


def test_a_members_own_file_is_reopened_by_that_member(procs, tmp_path):
    p, _ = start_worker(procs, tmp_path, ["own"], TREE, ready_json=False)
    child = _child_of(p.pid)
    procs.adopt(child)
    dump_restore(procs, p, str(tmp_path / "img"))
    assert os.readlink(f"/proc/{child}/fd/3") == f"/proc/{child}/stat"
    with open(f"/proc/{child}/fd/3") as f:
        assert f.read().split()[0] == str(child)


def test_own_file_shared_by_two_members_is_refused(procs, tmp_path):
    p, _ = start_worker(procs, tmp_path, ["inherited"], TREE, ready_json=False)
    child = _child_of(p.pid)
    procs.adopt(child)
    rep = check(p.pid, Options())
    bad = [r for r in rep["refusals"] if r.get("fd") == 3]
    assert bad and {r["reason"] for r in bad} == {"pseudo-file"}, rep["refusals"]
    assert any("one open file description with pid" in r["message"] for r in bad), bad
