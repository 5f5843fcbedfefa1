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
from engine.errors import Refusal
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


# -- read to the end: a monitor's fds (top, vmstat, free) ---------------------------
# Each fd holds its snapshot's end: the next read returns 0, the file
# position is where the last read left it, a rewind makes a new snapshot.

ENDED = r'''
import json, os, signal, sys
pid = os.getpid()
fds, pos = {}, {}
names = [("meminfo", "/proc/meminfo"), ("vmstat", "/proc/vmstat"), ("stat", "/proc/stat"),
         ("own_cmdline", f"/proc/{pid}/cmdline")]
if sys.argv[1] == "own":
    names.append(("own_status", f"/proc/{pid}/status"))
for key, path in names:
    fds[key] = os.open(path, os.O_RDONLY)
    if key == "own_cmdline":
        os.read(fds[key], 5)                     # part-way: no snapshot, any offset is exact
    else:
        while os.read(fds[key], 1 << 16):        # to the end, as procps reads
            pass
    pos[key] = os.lseek(fds[key], 0, os.SEEK_CUR)
if sys.argv[1] == "partway":
    fds["partway"] = os.open("/proc/meminfo", os.O_RDONLY)
    os.read(fds["partway"], 100)                 # the rest of this snapshot is buffered

def on_usr1(*_):
    out = {"pid": os.getpid(), "fds": fds, "pos_before": pos, "pos": {}, "next": {}, "fresh": {}}
    for k, fd in fds.items():
        if k == "partway":
            continue
        out["pos"][k] = os.lseek(fd, 0, os.SEEK_CUR)
        out["next"][k] = os.read(fd, 1 << 16).decode(errors="replace")   # no rewind: the end
        os.lseek(fd, 0, os.SEEK_SET)
        out["fresh"][k] = os.read(fd, 1 << 16).decode(errors="replace")
        os.lseek(fd, pos[k], os.SEEK_SET)        # back where it was, for a second look
        while k != "own_cmdline" and os.read(fd, 1 << 16):
            pass
    with open("verdict.json.tmp", "w") as f:
        json.dump(out, f)
    os.rename("verdict.json.tmp", "verdict.json")
signal.signal(signal.SIGUSR1, on_usr1)
with open("ready.tmp", "w") as f:
    json.dump({"fds": fds, "pos": pos}, f)
os.rename("ready.tmp", "ready")
while True:
    signal.pause()
'''


def test_files_read_to_their_end_are_reopened_at_their_offset(procs, tmp_path):
    """On the old code each was refused `pseudo-file` ("read up to offset N")."""
    p, ready = start_worker(procs, tmp_path, ["ended"], ENDED)
    rep = check(p.pid, Options())
    assert rep["refusals"] == [], rep["refusals"]
    dump_restore(procs, p, str(tmp_path / "img"))
    recs = {r["fd"]: r for r in json.loads((tmp_path / "img" / "fds.json").read_text())}
    for k, fd in ready["fds"].items():
        assert recs[fd]["kind"] == "procfile" and recs[fd]["pos"] == ready["pos"][k] > 0, (k, recs[fd])
    v = ask_verdict(p.pid, tmp_path)
    assert v["pid"] == p.pid
    assert v["pos"] == ready["pos"], (v["pos"], ready["pos"])
    for k in ("meminfo", "vmstat", "stat"):
        assert v["next"][k] == "", (k, v["next"][k][:80])      # still at its end: no tail of a new snapshot
    assert v["fresh"]["meminfo"].startswith("MemTotal:") and v["fresh"]["vmstat"].startswith("nr_free_pages")
    cmdline = open(f"/proc/{p.pid}/cmdline", "rb").read().decode()
    assert v["next"]["own_cmdline"] == cmdline[5:] and v["fresh"]["own_cmdline"] == cmdline


def test_a_file_read_part_way_stays_refused_and_is_not_consumed(procs, tmp_path):
    """The probe asks the open file whether anything is buffered without
    taking it: the worker still reads the rest of its old snapshot."""
    p, ready = start_worker(procs, tmp_path, ["partway"], ENDED)
    rep = check(p.pid, Options())
    fd = ready["fds"]["partway"]
    assert [(r["fd"], r["reason"]) for r in rep["refusals"]] == [(fd, "pseudo-file")], rep["refusals"]
    assert "not to its end" in rep["refusals"][0]["message"]
    rest = b""
    from engine.pidfd import target_fd
    with target_fd(p.pid, fd) as dup:        # the worker's own open file: its buffered rest
        assert os.lseek(dup, 0, os.SEEK_CUR) == 100
        while True:
            b = os.read(dup, 1 << 16)
            if not b:
                break
            rest += b
    assert rest and rest.endswith(b" kB\n") and b"MemTotal" not in rest, rest[:80]


def test_own_seq_file_read_to_its_end_stays_refused(procs, tmp_path):
    """Its own status, reopened under the restorer's trace, would be made
    with a TracerPid and a tracing-stop state: another snapshot length."""
    p, ready = start_worker(procs, tmp_path, ["own"], ENDED)
    rep = check(p.pid, Options())
    fd = ready["fds"]["own_status"]
    assert [(r["fd"], r["reason"]) for r in rep["refusals"]] == [(fd, "pseudo-file")], rep["refusals"]
    assert "while the restore traces it" in rep["refusals"][0]["message"]


def test_restore_refuses_a_snapshot_that_grew_past_the_offset(tmp_path):
    """At restore the file is sought to its offset in a new snapshot; one
    that now runs past it would hand out a tail the original never would:
    refused after a few tries, no fd left open."""
    from engine.fds import procfile
    from engine.errors import Refusal
    from types import SimpleNamespace
    ctx = SimpleNamespace(pid=1, records=[])
    rec = {"fd": 5, "kind": "procfile", "proc": "system", "name": "meminfo", "pos": 1, "at_end": True,
           "flags": os.O_RDONLY, "link": "/proc/meminfo"}
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(Refusal) as e:
        procfile.restore(rec, ctx)
    assert e.value.reason == "pseudo-file" and "run past that offset" in e.value.detail
    assert set(os.listdir("/proc/self/fd")) <= before
    ok = dict(rec, pos=1 << 20)                 # a snapshot shorter than the offset: at its end
    fd = procfile.restore(ok, ctx)
    try:
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1 << 20 and os.read(fd, 100) == b""
    finally:
        os.close(fd)
    with pytest.raises(Refusal):                # a part-way record is no procfile record
        procfile.validate(dict(rec, at_end=False), ctx)


def test_real_vmstat_is_restored_and_goes_on_sampling(procs, tmp_path):
    """vmstat(8) keeps /proc/meminfo, /proc/stat and /proc/vmstat open,
    rewinding them before each sample; refused before (`pseudo-file`).

    Its fds stand at the end of what it last read: where a counter of the
    machine gained a digit since (a busy machine: CI), the file now runs
    past that end and the restore is refused, rightly. The dump is taken
    right after a sample, and a refusal for that reason alone is tried
    again with a new vmstat; any other outcome fails."""
    import shutil
    from restorable import machine_file_grew
    if not shutil.which("vmstat"):
        pytest.skip("no vmstat (procps)")
    from engine_core_support import wait_for
    grew = []
    for attempt in range(4):
        out = tmp_path / f"vmstat{attempt}.out"
        with open(out, "w") as f:
            p = subprocess.Popen(["vmstat", "-n", "1"], stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, close_fds=True, cwd=str(tmp_path))
        procs.adopt(p.pid)
        wait_for(lambda: out.read_text().count("\n") >= 4, what="three vmstat samples")
        links = {os.readlink(f"/proc/{p.pid}/fd/{n}") for n in os.listdir(f"/proc/{p.pid}/fd")}
        assert {"/proc/meminfo", "/proc/stat", "/proc/vmstat"} <= links, links
        rep = check(p.pid, Options())
        assert rep["refusals"] == [], rep["refusals"]
        n = out.read_text().count("\n")
        wait_for(lambda: out.read_text().count("\n") > n, what="a fresh sample")
        try:
            dump_restore(procs, p, str(tmp_path / f"img{attempt}"))
            break
        except Refusal as e:
            if not machine_file_grew(e):
                raise
            grew.append(str(e))
    else:
        pytest.fail(f"refused {len(grew)} times, each for a machine file that grew: {grew}")
    n = out.read_text().count("\n")
    wait_for(lambda: out.read_text().count("\n") >= n + 3, what="three more samples after the restore")
    for line in out.read_text().splitlines()[2:]:
        cols = line.split()
        assert len(cols) == 17 and all(c.isdigit() for c in cols), line
        assert int(cols[3]) > 0           # free memory, from the restored fd on /proc/meminfo
