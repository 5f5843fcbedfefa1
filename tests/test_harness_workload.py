"""The workload program and the world steps, on this host with real
processes: the seeded model agrees with the real filesystem, an untouched
workload verifies itself, and a disturbed one says exactly what differed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from harness import seeded, world, workload
from harness.targets import LocalTarget

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "harness")


# -- seeded content and the model -------------------------------------------------

def test_seeded_data_is_position_aligned_and_deterministic():
    assert seeded.data(1, 0, 10000)[5000:5100] == seeded.data(1, 5000, 100)
    assert seeded.data(1, 0, 100) != seeded.data(2, 0, 100)
    assert len(seeded.data(3, 4095, 2)) == 2


def test_content_holes_extents_and_edits():
    c = seeded.Content.seeded(20000, 7, holes=[(4096, 8192)])
    whole = c.read(0, 20000)
    assert whole[4096:12288] == bytes(8192) and whole[:4096] == seeded.data(7, 0, 4096)
    assert whole[12288:] == seeded.data(7, 12288, 20000 - 12288)
    assert c.data_bytes == 20000 - 8192
    e = seeded.Content.seeded(1 << 30, 1, extents=[(0, 10), (1 << 29, 5)])
    assert e.data_bytes == 15 and e.read((1 << 29) - 2, 4) == b"\0\0" + seeded.data(1, 1 << 29, 2)
    c.append(100, 9)
    assert c.size == 20100 and c.read(20000, 100) == seeded.data(9, 0, 100)
    c.truncate(50)
    assert c.read(0, 100) == seeded.data(7, 0, 50)
    c.rewrite(3)
    assert c.read(0, 50) == seeded.data(3, 0, 50)


STEPS = [
    {"file": {"path": "a", "bytes": 9000, "seed": 1}},
    {"file": {"path": "s", "bytes": 1 << 20, "seed": 2, "extents": [[0, 4096], [524288, 4096]]}},
    {"dir": {"path": "d"}},
    {"hardlink": {"from": "a", "to": "d/b"}},
    {"append": {"path": "a", "bytes": 333, "seed": 4}},
    {"rename": {"from": "s", "to": "d/s2"}},
    {"file": {"path": "n", "bytes": 10, "seed": 5}},
    {"rename-over": {"from": "n", "to": "a"}},
    {"rewrite-same-size": {"path": "d/s2", "seed": 6}},
    {"truncate": {"path": "d/b", "size": 5000}},
    {"touch": {"path": "d/b", "seconds": 50}},
    {"chmod": {"path": "d/b", "mode": 0o600}},
]


def test_model_agrees_with_the_real_filesystem(tmp_path):
    model = world.Model()
    for step in STEPS:
        world.apply_op(step, str(tmp_path))
        model.apply(step)
    for path, ino in model.paths.items():
        real = tmp_path / path
        if model.nodes[ino].kind != "file":
            continue
        c = model.content(ino)
        assert real.read_bytes() == c.read(0, c.size), path
        assert os.stat(real).st_nlink == model.nlink(ino), path


def test_sparse_setup_keeps_holes(tmp_path):
    world.apply_op({"file": {"path": "s", "bytes": 1 << 30, "seed": 1, "extents": [[0, 4096]]}}, str(tmp_path))
    st = os.stat(tmp_path / "s")
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < (1 << 20)


def test_steps_refuse_what_cannot_be_done(tmp_path):
    with pytest.raises(world.WorldError):
        world.apply_op({"rename-over": {"from": "x", "to": "y"}}, str(tmp_path))
    with pytest.raises(world.WorldError):
        world.apply_op({"unlink": {"path": "../escape"}}, str(tmp_path))


# -- the workload program -------------------------------------------------------------

RICH_FDS = [
    {"fd": 3, "open": "data", "mode": "r", "seek": 4096},
    {"fd": 4, "open": "data", "mode": "a"},
    {"fd": 5, "fifo": "ff", "end": "r", "data": {"bytes": 3000, "seed": 4}},
    {"fd": 6, "fifo": "ff", "end": "w"},
    {"pipe": {"read": 7, "write": 8}, "data": {"bytes": 1000, "seed": 5}},
    {"fd": 9, "inotify": {"watches": [{"path": "d", "mask": ["IN_CREATE"]}, {"path": "data", "mask": ["IN_ATTRIB"]}]}},
    {"fd": 10, "eventfd": {"initval": 3, "add": 4}},
    {"fd": 11, "timerfd": {"value_ms": 3600000}},
    {"fd": 12, "signalfd": {"signals": ["SIGUSR2"]}},
    {"fd": 13, "epoll": {"targets": [{"fd": 7, "events": ["EPOLLIN"]}, {"fd": 10}]}},
    {"fd": 14, "socket": "unix-pair", "peer_fd": 15, "data": {"bytes": 50, "seed": 3}},
    {"fd": 16, "socket": "tcp-listen"},
    {"fd": 17, "socket": "udp", "data": {"bytes": 60, "seed": 3}},
    {"fd": 18, "memfd": "mem", "bytes": 5000, "seed": 8, "seek": 10},
    {"fd": 19, "dnotify": "d", "mask": ["DN_CREATE"]},
    {"fd": 20, "device": "/dev/zero"},
    {"pipe": {"read": 21}, "data": {"bytes": 10, "seed": 1}},
]
RICH_SETUP = [{"file": {"path": "data", "bytes": 65536, "seed": 1}}, {"fifo": {"path": "ff"}}, {"dir": {"path": "d"}}]


class Workload:
    """One workload started through `workload.py spawn`, killed and reaped at the end."""

    def __init__(self, tmp_path, fds, setup=RICH_SETUP, mmaps=(), before_dump=(), process=None):
        self.t = LocalTarget(base=str(tmp_path))
        root = tmp_path
        self.spec = {"id": "t", "workdir": str(root / "w"), "ctldir": str(root / "c"),
                     "ready": str(root / "c/ready.json"), "verdict": str(root / "c/verdict.json"),
                     "setup": list(setup), "before_dump": list(before_dump), "between": [],
                     "fds": fds, "mmaps": list(mmaps), "process": process or {}, "ready_timeout": 20}
        os.makedirs(root / "c")
        self.spec_path = str(root / "c/spec.json")
        with open(self.spec_path, "w") as f:
            json.dump(self.spec, f)
        self.pids = []
        world.apply_phase(self.spec, "setup")
        r = self.t.run(self.t.script("workload.py") + ["spawn", self.spec_path], timeout=30)
        self.ready = json.loads(r.stdout)
        self.pids = [self.ready["pid"]] + self.ready.get("helpers", [])
        assert r.rc == 0, self.ready.get("error")
        self.pid = self.ready["pid"]

    def verdict(self) -> dict:
        r = self.t.run(self.t.script("workload.py") + ["signal", str(self.pid), self.spec["verdict"], "10"], timeout=30)
        out = json.loads(r.stdout)
        assert out["verdict"] is not None, out
        return out["verdict"]

    def close(self):
        self.t.cleanup(self.pids)


@pytest.fixture
def make_workload(tmp_path):
    made = []

    def make(**kw):
        w = Workload(tmp_path, **kw)
        made.append(w)
        return w
    yield make
    for w in made:
        w.close()
        assert not any(workload.pidstate(p)["exists"] for p in w.pids), "a workload process was left behind"


def failed(verdict):
    return [c for c in verdict["checks"] if not c["ok"]]


def test_untouched_workload_verifies_every_fd(make_workload):
    w = make_workload(fds=RICH_FDS, mmaps=[{"file": "data", "length": 8192, "prot": "rw",
                                            "dirty": {"offset": 100, "bytes": 50, "seed": 3}},
                                           {"anon": True, "length": 10000, "seed": 3}])
    fds = sorted(int(x) for x in os.listdir(f"/proc/{w.pid}/fd"))
    assert fds == sorted({0, 1, 2} | {r["fd"] for r in w.ready["recs"]})
    v = w.verdict()
    assert v["ok"], failed(v)
    assert len(v["checks"]) > 100
    whats = {c["what"] for c in v["checks"]}
    assert {"fifo buffered bytes, in order, nothing more", "eventfd-count", "epoll registrations (tfd, events, data)",
            "SIGIO on a create in the directory", "signal read from signalfd"} <= whats


def test_workload_sees_a_file_rewritten_under_it(make_workload, tmp_path):
    w = make_workload(fds=[{"fd": 3, "open": "data", "mode": "r", "seek": 4096}])
    world.apply_op({"rewrite-same-size": {"path": "data", "seed": 99}}, w.spec["workdir"])
    v = w.verdict()
    bad = failed(v)
    assert not v["ok"] and {c["fd"] for c in bad} == {3}
    assert any(c["what"] == "content" for c in bad) and any(c["what"] == "read at offset" for c in bad)
    assert "first difference at offset 0" in next(c["got"] for c in bad if c["what"] == "content")


def test_workload_sees_fifo_bytes_that_went_missing(make_workload):
    w = make_workload(fds=[{"fd": 3, "fifo": "ff", "end": "r", "data": {"bytes": 3000, "seed": 4}},
                           {"fd": 4, "fifo": "ff", "end": "w"}])
    fd = os.open(os.path.join(w.spec["workdir"], "ff"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert len(os.read(fd, 100)) == 100          # someone else consumed 100 bytes
    finally:
        os.close(fd)
    bad = failed(w.verdict())
    assert [c["fd"] for c in bad] == [3] and "2900 bytes vs 3000 expected" in bad[0]["got"]


def test_workload_sees_a_lost_eventfd_count(make_workload):
    w = make_workload(fds=[{"fd": 3, "eventfd": {"initval": 5}}])
    # another holder of the same eventfd (pidfd_getfd needs ptrace rights: root has them)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, w.pid, 0)            # pidfd_open
    dup = libc.syscall(438, pidfd, 3, 0)           # pidfd_getfd
    assert pidfd >= 0 and dup >= 0, ctypes.get_errno()
    try:
        os.read(dup, 8)
    finally:
        os.close(dup)
        os.close(pidfd)
    bad = failed(w.verdict())
    assert bad and bad[0]["what"] == "eventfd-count" and bad[0]["got"] == 0


def test_pending_inotify_events_must_match_the_scenario(make_workload):
    w = make_workload(fds=[{"fd": 3, "inotify": {"pending": ["IN_ATTRIB"],
                                                 "watches": [{"path": "data", "mask": ["IN_ATTRIB"]}]}}],
                      before_dump=[{"touch": {"path": "data"}}])
    world.apply_phase(w.spec, "before_dump")
    v = w.verdict()
    assert v["ok"], failed(v)


def test_workload_kill_touches_only_workloads():
    p = subprocess.Popen(["sleep", "60"], close_fds=True)
    try:
        assert workload.kill_workloads([p.pid]) == []
        assert workload.pidstate(p.pid) == {"exists": True, "state": "S", "workload": False} or \
            workload.pidstate(p.pid)["exists"]
    finally:
        p.kill()
        p.wait()
    assert not workload.pidstate(p.pid)["exists"]


def test_pidstate_gone_within_waits_for_a_process_on_its_way_out():
    """The look after a --leave-running check: a process that exits a
    moment later is seen gone (not "still runs"), one that keeps running is
    still reported running once the wait is over."""
    leaving = subprocess.Popen(["sleep", "0.5"], close_fds=True)
    staying = subprocess.Popen(["sleep", "60"], close_fds=True)
    try:
        assert workload.pidstate(leaving.pid)["exists"]
        r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "workload.py"), "pidstate", str(leaving.pid),
                            "--gone-within", "20"], capture_output=True, close_fds=True, timeout=60, text=True)
        assert r.returncode == 0 and json.loads(r.stdout)["exists"] is False
        t0 = time.monotonic()
        assert workload.pidstate_after_exit(staying.pid, 0.3)["exists"] is True
        assert time.monotonic() - t0 >= 0.3
    finally:
        for p in (leaving, staying):
            p.kill()
            p.wait()


def test_pidstate_gone_within_unlinks_the_original_verdict_first(tmp_path):
    """--unlink: the original's verdict is gone before the look (the
    restored process writes its own there); a missing one is no error."""
    verdict = tmp_path / "verdict.json"
    verdict.write_text("{}")
    gone = subprocess.Popen(["true"], close_fds=True)
    gone.wait()
    for _ in range(2):
        r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "workload.py"), "pidstate", str(gone.pid),
                            "--gone-within", "5", "--unlink", str(verdict)], capture_output=True, close_fds=True,
                           timeout=60, text=True)
        assert r.returncode == 0 and json.loads(r.stdout)["exists"] is False, r.stderr
        assert not verdict.exists()


def test_world_exists_prints_the_paths_that_are_there(tmp_path):
    """world.py exists: the paths there, one a line (a dangling symlink
    too), as `ls -d` printed them for the refused-dump check; none: empty."""
    (tmp_path / "img").mkdir()
    os.symlink(str(tmp_path / "nowhere"), str(tmp_path / "link"))
    world_py = os.path.join(SCRIPTS, "world.py")
    r = subprocess.run([sys.executable, world_py, "exists", str(tmp_path / "img"), str(tmp_path / "img.partial"),
                        str(tmp_path / "link")], capture_output=True, close_fds=True, timeout=60, text=True)
    assert r.returncode == 0 and r.stdout.splitlines() == [str(tmp_path / "img"), str(tmp_path / "link")]
    r = subprocess.run([sys.executable, world_py, "exists", str(tmp_path / "none")], capture_output=True,
                       close_fds=True, timeout=60, text=True)
    assert r.returncode == 0 and r.stdout == ""


def test_script_usage_error():
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "workload.py"), "bogus"], capture_output=True,
                       close_fds=True, timeout=30)
    assert r.returncode == 2


def test_spawn_reports_a_workload_that_cannot_start(tmp_path):
    t = LocalTarget(base=str(tmp_path))
    spec = {"workdir": str(tmp_path / "w"), "ctldir": str(tmp_path / "c"), "ready": str(tmp_path / "c/r.json"),
            "verdict": str(tmp_path / "c/v.json"), "setup": [],
            "fds": [{"pipe": {"read": 3}}, {"fd": 4, "open": "missing"}], "ready_timeout": 20}
    world.apply_phase(spec, "setup")
    (tmp_path / "c/spec.json").write_text(json.dumps(spec))
    r = t.run(t.script("workload.py") + ["spawn", str(tmp_path / "c/spec.json")], timeout=30)
    out = json.loads(r.stdout)
    # the pipe's outside holder was started before the failure: it is reported, so it can be killed
    assert len(out["helpers"]) == 1 and workload.pidstate(out["helpers"][0])["workload"]
    t.cleanup(out["helpers"] + [out["pid"]])
    assert not workload.pidstate(out["helpers"][0])["exists"]
    assert r.rc == 1 and "FileNotFoundError" in out["error"]
    deadline = time.monotonic() + 5
    while workload.pidstate(out["pid"])["exists"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not workload.pidstate(out["pid"])["exists"]


def test_the_image_digest_sees_every_change_a_refused_restore_could_make(tmp_path):
    """world.digest_tree (the image before a restore; a refused restore must
    leave it as it was): one byte, a file's mode, a file added or renamed,
    each changes it; a byte-for-byte copy does not."""
    img = tmp_path / "img"
    (img / "sub").mkdir(parents=True)
    (img / "pages-000.img").write_bytes(bytes(range(256)) * 4096)
    (img / "sub" / "core.json").write_text('{"pid": 1}')
    base = world.digest_tree(str(img))
    copy = tmp_path / "copy"
    shutil.copytree(img, copy)
    assert world.digest_tree(str(copy)) == base and len(base) == 2

    def changed(edit) -> bool:
        shutil.rmtree(copy)
        shutil.copytree(img, copy)
        edit(copy)
        return world.digest_tree(str(copy)) != base

    def flip(d):
        with open(d / "pages-000.img", "r+b") as f:
            f.seek(700001)
            b = f.read(1)
            f.seek(700001)
            f.write(bytes([b[0] ^ 1]))
    assert changed(flip)
    assert changed(lambda d: os.chmod(d / "sub" / "core.json", 0o600 if os.stat(d / "sub" / "core.json").st_mode & 0o44
                                      else 0o644))
    assert changed(lambda d: (d / "extra").write_bytes(b""))
    assert changed(lambda d: os.rename(d / "sub" / "core.json", d / "sub" / "core2.json"))
    assert changed(lambda d: (d / "pages-000.img").write_bytes((d / "pages-000.img").read_bytes()[:-1]))


def test_the_waiter_wakes_on_a_rename_and_on_an_exit_not_before(tmp_path):
    """spawn and signal wait for the ready/verdict file (renamed into the
    control dir) or the process's exit with a Waiter: it must wake at
    once on either, and sleep its time out when nothing happens."""
    import threading
    p = subprocess.Popen(["sleep", "60"], close_fds=True)
    w = workload.Waiter(str(tmp_path), p.pid)
    try:
        t0 = time.monotonic()
        w.wait(0.3)                  # nothing happens: the whole time
        assert time.monotonic() - t0 >= 0.29

        def land():
            time.sleep(0.2)
            workload.write_json(str(tmp_path / "ready.json"), {"pid": 1})
        th = threading.Thread(target=land)
        th.start()
        t0 = time.monotonic()
        while not (tmp_path / "ready.json").exists() and time.monotonic() - t0 < 5:
            w.wait(20)       # any event in the dir wakes it (the temporary file's too): look again
        th.join()
        assert (tmp_path / "ready.json").exists() and time.monotonic() - t0 < 5

        threading.Timer(0.2, p.kill).start()
        t0 = time.monotonic()
        while w.pidfd is not None and time.monotonic() - t0 < 5:
            w.wait(20)
        assert time.monotonic() - t0 < 5 and w.pidfd is None      # the exit woke it, and it stops watching
    finally:
        w.close()
        p.kill()
        p.wait()
