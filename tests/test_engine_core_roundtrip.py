"""Dump and restore real processes; each proves by its own output that it
continued exactly where it was (no gap, no repeat, right input byte, right
memory), and /proc shows the same layout and state."""

from __future__ import annotations

import os
import resource
import signal
import time

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal
from engine.restore import restore
from engine_core_support import (check_counter, check_pyworker, count_lines, counter_bin, proc_facts,  # noqa: F401
                                 procs, ptrace_facts, python_exe, shmem_inode_masked, start_counter, TARGETS,
                                 wait_for, world)


def _dump_restore(pid, image, procs, waiter=None):
    before = proc_facts(pid)
    res = dump(pid, image, Options())
    assert res["pid"] == pid and not res["left_running"]
    if waiter is not None:
        waiter()          # our own child: reap it so its PID is free
    else:
        procs.reap(pid)
    assert not os.path.exists(f"/proc/{pid}")
    out = restore(image, Options())
    assert out["pid"] == pid
    procs.adopt(pid)
    after = proc_facts(pid)
    return before, after, res


def _assert_same(before, after):
    assert after["maps"] == before["maps"]
    for key in ("status", "limits", "cwd", "exe", "auxv", "cmdline", "environ", "mm", "session", "fds"):
        assert after[key] == before[key], key


def _not_traced_not_child_of_restorer(pid):
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    assert status["TracerPid"].strip() == "0"
    assert status["State"].split()[0] in ("R", "S")
    # The restorer exited: the process was reparented to us, the subreaper.
    assert int(status["PPid"]) == os.getpid()


def test_c_target_restored_exactly_twice(procs, counter_bin, world, tmp_path):
    p = start_counter(procs, counter_bin, world, umask=0o027)
    resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    resource.prlimit(p.pid, resource.RLIMIT_CORE, (4096, 8192))
    pt = ptrace_facts(p.pid)
    assert pt["rseq"]["pointer"] and pt["sigmask"] == 1 << (signal.SIGUSR2 - 1)
    before, after, res = _dump_restore(p.pid, str(tmp_path / "img1"), procs, p.wait)
    _assert_same(before, after)
    assert ptrace_facts(p.pid) == pt
    assert res["pages_bytes"] >= 4 << 20
    _not_traced_not_child_of_restorer(p.pid)
    n0 = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) >= n0 + 20, what="the restored counter to go on")
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: check_counter(world["out"], world["in_data"])["usr1"], what="the SIGUSR1 line")
    # restore -> dump -> restore again
    before2, after2, _ = _dump_restore(p.pid, str(tmp_path / "img2"), procs)
    _assert_same(before2, after2)
    n1 = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) >= n1 + 20, what="the twice-restored counter to go on")
    got = check_counter(world["out"], world["in_data"])
    assert got["last"] >= n1 + 20


def test_python_target_restored_exactly(procs, world, tmp_path):
    p = procs.start([python_exe(), os.path.join(TARGETS, "pyworker.py"), world["out"], world["in"]],
                    cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 10, what="the python worker")
    before, after, _ = _dump_restore(p.pid, str(tmp_path / "img"), procs, p.wait)
    _assert_same(before, after)
    n0 = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) >= n0 + 20, what="the restored python worker to go on")
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: check_pyworker(world["out"], world["in_data"])["usr1"], what="the SIGUSR1 line")
    # and once more, from the restored process
    before2, after2, _ = _dump_restore(p.pid, str(tmp_path / "img2"), procs)
    _assert_same(before2, after2)
    n1 = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) >= n1 + 10, what="the twice-restored worker")
    assert check_pyworker(world["out"], world["in_data"])["last"] >= n1 + 10


@pytest.mark.parametrize("mode", ["pause", "pipe"])
def test_sleeping_syscall_restarts(procs, counter_bin, world, tmp_path, mode):
    """Dumped inside pause() (-ERESTARTNOHAND) or a pipe read()
    (-ERESTARTSYS): the restored process is still waiting there, and one
    SIGUSR1 makes exactly one more step."""
    if mode == "pipe":
        from engine.fds import handler
        if handler("pipe") is None:
            pytest.skip("no pipe handler yet")
    p = start_counter(procs, counter_bin, world, mode=mode, lines=1)
    time.sleep(0.1)
    with open(f"/proc/{p.pid}/syscall") as f:
        nr = int(f.read().split()[0])
    assert nr in (0, 34), "the target should be blocked in read() or pause()"
    _dump_restore(p.pid, str(tmp_path / "img"), procs, p.wait)
    time.sleep(0.2)
    assert count_lines(world["out"]) == 1, "a restarted syscall must keep waiting"
    with open(f"/proc/{p.pid}/syscall") as f:
        assert int(f.read().split()[0]) == nr, "blocked in the same syscall again"
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: count_lines(world["out"]) == 2, what="one step after SIGUSR1")
    got = check_counter(world["out"], world["in_data"])
    assert got["last"] == 2 and [n for n, _ in got["usr1"]] == [2]


def test_sigaltstack_restored(procs, counter_bin, world, tmp_path):
    p = start_counter(procs, counter_bin, world, mode="altstack")
    _dump_restore(p.pid, str(tmp_path / "img"), procs, p.wait)
    os.kill(p.pid, signal.SIGUSR1)
    got = wait_for(lambda: check_counter(world["out"], world["in_data"])["usr1"], what="SIGUSR1 line")
    assert got[0][1] == ["alt=1"], "the handler must run on the restored alternate stack"


def test_leave_running_then_pid_in_use_then_restore(procs, counter_bin, world, tmp_path):
    p = start_counter(procs, counter_bin, world)
    image = str(tmp_path / "img")
    res = dump(p.pid, image, Options(leave_running=True))
    assert res["left_running"]
    n0 = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) >= n0 + 20, what="the original to carry on")
    check_counter(world["out"], world["in_data"])
    # The original went on writing its output file after the dump, so only
    # --file-validation none accepts that file (regular.py would say
    # file-changed, rightly); what is left to refuse is the PID.
    lax = Options(file_validation="none")
    with pytest.raises(Refusal) as e:
        restore(image, lax)
    assert e.value.reason == "pid-in-use"
    assert p.poll() is None
    p.kill()
    p.wait()
    n1 = count_lines(world["out"])
    out = restore(image, lax)
    procs.adopt(out["pid"])
    # The restored process goes back to the dump point and rewrites the same
    # (deterministic) lines, then carries on past where the original stopped.
    wait_for(lambda: count_lines(world["out"]) >= n1 + 10, what="the restored process to pass the original")
    check_counter(world["out"], world["in_data"])


def test_check_is_a_dry_run(procs, counter_bin, world, tmp_path):
    p = start_counter(procs, counter_bin, world)
    facts = proc_facts(p.pid)
    r = check(p.pid, Options())
    assert r["ok"] and r["refusals"] == []
    whats = {i["what"] for i in r["items"]}
    assert any(w.startswith("fd 3 ") for w in whats) and any(w.startswith("fd 4 ") for w in whats)
    assert {"threads", "children", "registers", "signals", "exe"} <= whats
    assert all(i["verdict"] == "ok" for i in r["items"])
    assert proc_facts(p.pid)["maps"] == facts["maps"]
    n0 = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) >= n0 + 10, what="the target to carry on")
    check_counter(world["out"], world["in_data"])
    assert os.listdir(tmp_path) == [os.path.basename(world["dir"])] or not any(
        n.startswith("img") for n in os.listdir(tmp_path))


def test_memory_kinds_restored(procs, counter_bin, world, tmp_path):
    """MAP_SHARED anonymous memory, a PROT_NONE region holding data, a named
    anonymous region: same layout, same bytes (the target reads them back)."""
    p = start_counter(procs, counter_bin, world, mode="mem")
    before = open(f"/proc/{p.pid}/maps").read()
    # (the name shows only with CONFIG_ANON_VMA_NAME; this kernel may lack it)
    assert "/dev/zero (deleted)" in before and " ---p " in before
    _dump_restore(p.pid, str(tmp_path / "img"), procs, p.wait)
    after = open(f"/proc/{p.pid}/maps").read()
    assert shmem_inode_masked(after) == shmem_inode_masked(before)
    os.kill(p.pid, signal.SIGUSR1)
    got = wait_for(lambda: check_counter(world["out"], world["in_data"])["usr1"], what="SIGUSR1 line")
    assert got[0][1] == ["alt=-1", "shm=32768", "none=114688", "named=32768"]


def test_python_target_left_running(procs, world, tmp_path):
    """--leave-running from inside time.sleep(): the process must go on as
    if nothing happened (a mishandled syscall restart raises OSError 516
    in CPython and kills the worker)."""
    p = procs.start([python_exe(), os.path.join(TARGETS, "pyworker.py"), world["out"], world["in"]],
                    cwd=str(world["dir"]))
    wait_for(lambda: count_lines(world["out"]) >= 10, what="the python worker")
    for i in range(3):
        res = dump(p.pid, str(tmp_path / f"img{i}"), Options(leave_running=True))
        assert res["left_running"]
    n0 = count_lines(world["out"])
    wait_for(lambda: count_lines(world["out"]) >= n0 + 20, what="the worker to carry on")
    assert p.poll() is None
    check_pyworker(world["out"], world["in_data"])


def test_interval_timer_rearmed(procs, counter_bin, world, tmp_path):
    p = start_counter(procs, counter_bin, world, mode="itimer")
    _dump_restore(p.pid, str(tmp_path / "img"), procs, p.wait)
    os.kill(p.pid, signal.SIGUSR1)
    first = wait_for(lambda: check_counter(world["out"], world["in_data"])["usr1"], what="SIGUSR1 line")[0]
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGUSR1)
    both = wait_for(lambda: (lambda u: u if len(u) >= 2 else None)(
        check_counter(world["out"], world["in_data"])["usr1"]), what="second SIGUSR1 line")
    k1 = int(first[1][1].split("=")[1])
    k2 = int(both[1][1][1].split("=")[1])
    assert k2 >= k1 + 5, f"SIGALRM must keep firing after restore ({k1} -> {k2})"


def test_unprivileged_target_keeps_its_credentials(procs, counter_bin, tmp_path):
    """A target running as nobody comes back as nobody, not as ckpt's root."""
    import shutil
    import subprocess
    import tempfile
    d = tempfile.mkdtemp(prefix="ckpt-nobody-")   # pytest's tmp dirs are 0700 root
    try:
        os.chmod(d, 0o777)
        data = os.urandom(1 << 16)
        inp = os.path.join(d, "in.bin")
        with open(inp, "wb") as f:
            f.write(data)
        os.chmod(inp, 0o644)
        out = os.path.join(d, "out.txt")
        exe = os.path.join(d, "counter")
        shutil.copy(counter_bin, exe)
        os.chmod(exe, 0o755)

        def drop():
            os.setgroups([65534])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)

        p = subprocess.Popen([exe, out, inp], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd=d,
                             preexec_fn=drop)
        procs.popens.append(p)
        wait_for(lambda: count_lines(out) >= 5, what="the unprivileged counter")
        before, after, _ = _dump_restore(p.pid, str(tmp_path / "img"), procs, p.wait)
        _assert_same(before, after)
        with open(f"/proc/{p.pid}/status") as f:
            status = f.read()
        assert "Uid:\t65534\t65534\t65534\t65534" in status and "CapEff:\t0000000000000000" in status
        assert "Groups:\t65534" in status
        n0 = count_lines(out)
        wait_for(lambda: count_lines(out) >= n0 + 10, what="the restored unprivileged counter")
        check_counter(out, data)
    finally:
        procs.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def test_fd_kinds_through_the_core(procs, tmp_path):
    """The core with the fd handlers: a CPython target with an O_APPEND log
    and a dup of it, a file at an offset, a pipe with bytes in it, an
    eventfd, an epoll, /dev/null, checks them itself after the restore."""
    import json
    from engine.fds import handler
    missing = [k for k in ("regular", "pipe", "eventfd", "epoll", "device") if handler(k) is None]
    if missing:
        pytest.skip(f"fd handlers not there yet: {missing}")
    d = tmp_path / "w"
    d.mkdir()
    (d / "data").write_bytes(os.urandom(8192))
    p = procs.start([python_exe(), os.path.join(TARGETS, "pyfds.py"), str(d)], cwd=str(d))
    wait_for(lambda: (d / "ready").exists(), what="the fd target")
    before, after, _ = _dump_restore(p.pid, str(tmp_path / "img"), procs, p.wait)
    _assert_same(before, after)
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: (d / "verdict.json").exists(), what="the verdict")
    verdict = json.loads((d / "verdict.json").read_text())
    assert verdict == {"ok": True, "errors": []}
