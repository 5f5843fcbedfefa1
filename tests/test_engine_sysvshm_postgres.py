"""PostgreSQL, the real program System V shared memory was refused for:
its postmaster and every child attach one small keyed segment (the
postmaster reads its shm_nattch at start to tell whether an old
postmaster still lives). The tree is dumped, the segment it leaves behind
(keyed, not removed: the kill only detaches) is reused by the restore, the
database answers and takes writes, and shuts down cleanly (removing the
segment itself). Skipped where Debian's postgresql is not installed.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from engine import sysvshm
from engine.context import Options
from engine.dump import check, dump
from engine.restore import restore
from engine_core_support import alive, procs, wait_for  # noqa: F401

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))

pytestmark = [pytest.mark.skipif(not BIN, reason="postgresql is not installed"),
              pytest.mark.skipif(os.geteuid() != 0, reason="restores as root")]


def _user():
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user")


def _as(pw):
    def pre():
        os.setgid(pw.pw_gid)
        os.setgroups([])
        os.setuid(pw.pw_uid)
    return pre


@pytest.fixture
def cluster(procs):  # noqa: F811
    """A fresh cluster in a directory the postgres user can reach (pytest's
    are root's, 0700), unix socket only; the postmaster and its children
    killed by pid at the end, a segment left behind removed."""
    pw = _user()
    bindir = os.path.dirname(BIN[-1])
    top = tempfile.mkdtemp(prefix="ckpt-pg-")      # root's (the image goes in it: engine/imagecheck.py)
    os.chmod(top, 0o755)
    data, sock = os.path.join(top, "data"), os.path.join(top, "sock")
    for d in (data, sock):
        os.mkdir(d, 0o700)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                   preexec_fn=_as(pw), check=True, capture_output=True, close_fds=True, timeout=120)
    log = open(os.path.join(top, "log"), "ab")
    p = subprocess.Popen([os.path.join(bindir, "postgres"), "-D", data, "-k", sock, "-c", "listen_addresses=",
                          "-c", "shared_buffers=16MB", "-c", "fsync=off",
                          "-c", "autovacuum=off"],     # no worker forked while the tree is dumped
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True,
                         start_new_session=True, preexec_fn=_as(pw))
    log.close()
    info = {"top": top, "data": data, "sock": sock, "pm": p, "bindir": bindir, "pids": [p.pid]}
    try:
        wait_for(lambda: _ready(data) or p.poll() is not None, timeout=60, what="postgres ready")
        assert p.poll() is None, open(os.path.join(top, "log")).read()[-2000:]
        yield info
    finally:
        for pid in info["pids"]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in info["pids"]:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        shmid = info.get("shmid")
        if shmid is not None and sysvshm.read_table().get(shmid, {}).get("cuid") == pw.pw_uid:
            sysvshm._libc().shmctl(shmid, sysvshm.IPC_RMID, None)
        shutil.rmtree(top, ignore_errors=True)


def _ready(data: str) -> bool:
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


def _children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _sql(c: dict, query: str) -> str:
    r = subprocess.run([os.path.join(c["bindir"], "psql"), "-h", c["sock"], "-U", "postgres", "-Atc", query],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_postgres_dumped_and_restored_with_its_segment(cluster, procs):  # noqa: F811
    c = cluster
    pm = c["pm"].pid
    with open(os.path.join(c["data"], "postmaster.pid")) as f:
        key, shmid = (int(x) for x in f.read().splitlines()[6].split())
    c["shmid"] = shmid
    _sql(c, "create table t (x int); insert into t values (42)")
    # its backend exits after psql did ("[local]" in a backend's title):
    # its connected socket's peer would be outside the dump
    wait_for(lambda: not any("[local]" in _title(k) for k in _children(pm)), what="the backend gone")
    c["pids"] += _children(pm)
    assert sysvshm.read_table()[shmid]["key"] == key
    res = check(pm, Options())
    assert res["ok"], res["refusals"]
    dump(pm, os.path.join(c["top"], "img"), Options())
    c["pm"].wait(timeout=30)
    with open(os.path.join(c["top"], "img", "tree.json")) as f:
        kids = [m["pid"] for m in json.load(f)["members"][1:]]     # as dumped (a backend may come and go)
    c["pids"] += kids
    procs.popens[:] = [p for p in procs.popens if p.pid != pm]
    wait_for(lambda: not any(alive(k) for k in kids), what="the children gone")
    for k in kids:      # reparented to this test (a subreaper): reaped, their pids free for the restore
        try:
            os.waitpid(k, 0)
        except ChildProcessError:
            pass
    left = sysvshm.read_table()[shmid]
    assert left["nattch"] == 0 and left["cpid"] == pm          # left behind by the kill
    out = restore(os.path.join(c["top"], "img"), Options())
    assert out["pid"] == pm and out["members"] == 1 + len(kids)
    after = sysvshm.read_table()[shmid]
    assert after["cpid"] == pm and after["nattch"] == 1 + len(kids)     # the same segment, attached by all
    assert sorted(_children(pm)) == sorted(kids)
    assert _sql(c, "select x from t") == "42"
    assert _sql(c, "insert into t values (43); select count(*) from t").splitlines()[-1] == "2"
    # a clean shutdown: postgres removes its segment itself
    os.kill(pm, signal.SIGINT)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pm}") and time.monotonic() < deadline:
        try:
            os.waitpid(pm, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pm}")
    assert shmid not in sysvshm.read_table()
    with open(os.path.join(c["top"], "log")) as f:
        log = f.read()
    assert "database system is shut down" in log.rsplit("received fast shutdown request", 1)[-1], log[-2000:]
