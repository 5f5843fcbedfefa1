"""Refusals and failures: the target is never harmed by a refused dump, a
refused or failed restore leaves no process and the image untouched."""

from __future__ import annotations

import json
import hashlib
import os
import shutil
import subprocess
import time

import pytest

from engine.context import Options
from engine.dump import dump
from engine.errors import EngineError, Refusal, Refusals, UsageError
from engine.restore import restore
from engine.task import Task
from engine_core_support import (alive, check_counter, count_lines, counter_bin, procs,  # noqa: F401
                                 start_counter, tree_digest, wait_for, world)


def reasons(exc) -> set:
    if isinstance(exc, Refusals):
        return {r.reason for r in exc.refusals}
    return {exc.reason}


def _still_fine(world, n_before=None):
    n0 = count_lines(world["out"]) if n_before is None else n_before
    wait_for(lambda: count_lines(world["out"]) >= n0 + 10, what="the target to carry on")
    check_counter(world["out"], world["in_data"])


# A refused thread: tests/test_engine_threads.py.
# A process with a child: a tree now (tests/test_engine_tree.py).
@pytest.mark.parametrize("mode,reason", [("sysv", "unsupported-mapping")])
def test_refused_dump_leaves_target_running(procs, counter_bin, world, tmp_path, mode, reason):
    p = start_counter(procs, counter_bin, world, mode=mode)
    if mode == "child":
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            for kid in f.read().split():
                procs.adopt(int(kid))
    maps = open(f"/proc/{p.pid}/maps").read()
    image = tmp_path / "img"
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(image), Options())
    assert reason in reasons(e.value)
    assert not image.exists() and not (tmp_path / "img.partial").exists()
    with open(f"/proc/{p.pid}/status") as f:
        assert "TracerPid:\t0" in f.read()
    assert open(f"/proc/{p.pid}/maps").read() == maps
    _still_fine(world)


def test_bad_targets(procs, counter_bin, world, tmp_path):
    img = str(tmp_path / "img")
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(UsageError):
        dump(gone.pid, img, Options())
    with pytest.raises(Refusal) as e:
        dump(2, img, Options())
    assert e.value.reason == "kernel-thread"
    for pid in (os.getpid(), os.getppid()):
        with pytest.raises(Refusal) as e:
            dump(pid, img, Options())
        assert e.value.reason == "self"
    z = subprocess.Popen(["true"])
    wait_for(lambda: not alive(z.pid), what="a zombie")
    try:
        with pytest.raises(Refusal) as e:
            dump(z.pid, img, Options())
        assert e.value.reason == "zombie"
    finally:
        z.wait()
    assert not os.path.exists(img)


def test_ptraced_and_existing_dir(procs, counter_bin, world, tmp_path):
    p = start_counter(procs, counter_bin, world)
    t = Task.seize(p.pid)
    try:
        with pytest.raises(Refusal) as e:
            dump(p.pid, str(tmp_path / "img"), Options())
        assert e.value.reason == "ptraced"
    finally:
        t.release()
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError):
        dump(p.pid, str(tmp_path / "taken"), Options())
    with pytest.raises(UsageError):
        dump(p.pid, str(tmp_path / "no" / "such" / "dir"), Options())
    _still_fine(world)


@pytest.fixture
def dumped(procs, counter_bin, world, tmp_path):
    """A counter dumped (and killed) into tmp_path/img."""
    p = start_counter(procs, counter_bin, world)
    image = str(tmp_path / "img")
    dump(p.pid, image, Options())
    p.wait()
    return {"pid": p.pid, "image": image}


def _rewrite_manifest(image: str, name: str) -> None:
    mpath = os.path.join(image, "manifest.json")
    man = json.load(open(mpath))
    data = open(os.path.join(image, name), "rb").read()
    man["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with open(mpath, "w") as f:
        json.dump(man, f)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(4096 + 17)
        b = f.read(1)
        f.seek(4096 + 17)
        f.write(bytes([b[0] ^ 0x40]))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) - 4096)


def _edit_json(image, name, fn):
    p = os.path.join(image, name)
    obj = json.load(open(p))
    fn(obj)
    with open(p, "w") as f:
        json.dump(obj, f)
    _rewrite_manifest(image, name)


TAMPER = {
    "flipped-page-byte": lambda img: _flip(os.path.join(img, "pages-000.img")),
    "truncated-pages": lambda img: _truncate(os.path.join(img, "pages-000.img")),
    "edited-core-unhashed": lambda img: open(os.path.join(img, "core.json"), "a").write(" "),
    "extra-file": lambda img: open(os.path.join(img, "extra"), "w").write("x"),
    "core-without-regs": lambda img: _edit_json(img, "core.json", lambda c: c.pop("regs")),
    "core-regs-wrong-type": lambda img: _edit_json(img, "core.json", lambda c: c["regs"].update(rip="x")),
    "core-without-signals": lambda img: _edit_json(img, "core.json", lambda c: c.pop("signals")),
    "core-signal-no-siginfo": lambda img: _edit_json(
        img, "core.json", lambda c: c["signals"].update(thread=[{"raw": "0a000000"}])),
    "mm-run-outside-file": lambda img: _edit_json(
        img, "mm.json", lambda m: [v for v in m["vmas"] if v["pages"]][0]["pages"][0].__setitem__(3, 1 << 40)),
    "fds-not-a-list": lambda img: _edit_json(img, "fds.json", lambda f: None) or _write_json(img, "fds.json", {}),
}


def _write_json(img, name, obj):
    with open(os.path.join(img, name), "w") as f:
        json.dump(obj, f)
    _rewrite_manifest(img, name)


def test_tampered_images_refused_before_any_process(dumped, procs, tmp_path):
    for name, spoil in TAMPER.items():
        copy = str(tmp_path / f"copy-{name}")
        shutil.copytree(dumped["image"], copy)
        spoil(copy)
        with pytest.raises(Refusal) as e:
            restore(copy, Options())
        assert e.value.reason == "image-invalid", (name, e.value.message)
        assert not os.path.exists(f"/proc/{dumped['pid']}"), name
    # The untouched image restores: the refusals above were not spurious.
    out = restore(dumped["image"], Options())
    procs.adopt(out["pid"])
    assert alive(out["pid"])


@pytest.mark.parametrize("stage", ["clone", "mapped", "final"])
def test_late_failure_leaves_no_process(dumped, procs, world, monkeypatch, stage):
    before = tree_digest(dumped["image"])
    monkeypatch.setenv("CKPT_TEST_FAIL_AT", stage)
    with pytest.raises(EngineError) as e:
        restore(dumped["image"], Options())
    assert stage in e.value.message
    assert not os.path.exists(f"/proc/{dumped['pid']}")
    assert tree_digest(dumped["image"]) == before
    monkeypatch.delenv("CKPT_TEST_FAIL_AT")
    n0 = count_lines(world["out"])
    out = restore(dumped["image"], Options())
    procs.adopt(out["pid"])
    _still_fine(world, n0)


def test_changed_file_refused(dumped, world):
    before = tree_digest(dumped["image"])
    data = bytearray(world["in_data"])
    data[100] ^= 1
    with open(world["in"], "r+b") as f:     # same inode, same size, other content
        f.write(data)
    with pytest.raises((Refusal, Refusals)) as e:
        restore(dumped["image"], Options())
    assert "file-changed" in reasons(e.value)
    assert not os.path.exists(f"/proc/{dumped['pid']}")
    assert tree_digest(dumped["image"]) == before


def test_changed_mapped_executable_refused(procs, counter_bin, world, tmp_path):
    exe = str(tmp_path / "counter-copy")
    shutil.copy(counter_bin, exe)
    p = procs.start([exe, world["out"], world["in"], "4"], cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 3, what="the counter")
    image = str(tmp_path / "img")
    dump(p.pid, image, Options())
    p.wait()
    data = bytearray(open(exe, "rb").read())
    data[-1] ^= 0xFF
    with open(exe, "r+b") as f:
        f.write(data)
    with pytest.raises((Refusal, Refusals)) as e:
        restore(image, Options())
    assert "file-changed" in reasons(e.value)
    assert not os.path.exists(f"/proc/{p.pid}")
    time.sleep(0)


def test_check_reports_every_refusal_and_writes_nothing(procs, counter_bin, world, tmp_path):
    from engine.dump import check
    p = start_counter(procs, counter_bin, world, mode="sysv")
    before = sorted(os.listdir(tmp_path))
    r = check(p.pid, Options())
    assert r["ok"] is False
    assert {x["reason"] for x in r["refusals"]} == {"unsupported-mapping"}
    refused = [i for i in r["items"] if i["verdict"] == "refused"]
    assert len(refused) == 1 and refused[0]["kind"] == "mapping"
    assert any(i["what"].startswith("fd 3 ") and i["verdict"] == "ok" for i in r["items"])
    assert sorted(os.listdir(tmp_path)) == before
    _still_fine(world)


_PARENT = """
import subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
print(p.pid, flush=True)
sys.stdin.readline()     # reap only when told to
p.wait()
"""


def test_restore_waits_briefly_for_the_dumped_zombie(procs, counter_bin, world, tmp_path):
    """The dumped process is killed, but its parent (here not ckpt) reaps it
    when it gets round to it: restore waits a little, then says who holds the
    PID."""
    import sys
    import threading
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, counter_bin, world["out"], world["in"]],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(world["dir"]))
    procs.popens.append(parent)
    pid = int(parent.stdout.readline())
    wait_for(lambda: count_lines(world["out"]) >= 5, what="the counter")
    image = str(tmp_path / "img")
    dump(pid, image, Options())
    from engine import restore as restore_mod
    old = restore_mod.ZOMBIE_WAIT
    restore_mod.ZOMBIE_WAIT = 0.2
    try:
        with pytest.raises(Refusal) as e:
            restore(image, Options())
        assert e.value.reason == "pid-in-use" and "zombie" in e.value.detail
    finally:
        restore_mod.ZOMBIE_WAIT = old

    def reap():
        parent.stdin.write(b"go\n")
        parent.stdin.flush()
    t = threading.Timer(0.5, reap)
    t.start()
    out = restore(image, Options())
    t.join()
    procs.adopt(out["pid"])
    _still_fine(world, count_lines(world["out"]))


def test_job_control_stopped_target_refused_and_left_stopped(procs, counter_bin, world, tmp_path):
    """Stopped in a group of this test's session, whose restore would orphan
    it (the kernel would then SIGHUP it): refused (engine/jobstop.py)."""
    import signal
    import subprocess
    p = subprocess.Popen([counter_bin, world["out"], world["in"], "4", "sleep"], cwd=str(world["dir"]),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         close_fds=True, preexec_fn=lambda: os.setpgid(0, 0))
    procs.adopt(p.pid)
    wait_for(lambda: count_lines(world["out"]) >= 5, what="5 lines from the counter")
    os.kill(p.pid, signal.SIGSTOP)
    wait_for(lambda: open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", what="stopped")
    with pytest.raises(Refusal) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    assert e.value.reason == "unsupported-state" and "job control" in e.value.detail
    assert "orphaned once restored" in e.value.detail
    time.sleep(0.1)
    assert open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
    n0 = count_lines(world["out"])
    os.kill(p.pid, signal.SIGCONT)
    _still_fine(world, n0)
