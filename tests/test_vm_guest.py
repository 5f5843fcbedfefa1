"""Real QEMU guests (TCG here): boot, commands, files, snapshots, failures.

All marked ``guest``; they share one image (built once, cached) and, where a
test does not need a fresh guest, one booted guest per module.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from vm_support import no_qemu_left_behind  # noqa: F401
from vm import Guest, VmError, ensure_image
from vm.recipe import CKPT_WRAPPER_FAST

pytestmark = pytest.mark.guest

ENGINE_DIR = Path(__file__).resolve().parent.parent / "engine"


@pytest.fixture(scope="session")
def vm_image():
    """The shared guest image (built once, then reused from the cache)."""
    return ensure_image("x86_64")


@pytest.fixture(scope="module")
def guest(vm_image, tmp_path_factory):
    with Guest(accel="auto", name="t-main", image=vm_image, engine_dir=ENGINE_DIR,
               log_dir=tmp_path_factory.mktemp("guests")) as g:
        yield g


def test_boot_and_run_a_command(guest: Guest):
    assert guest.alive() and guest.accel in ("kvm", "tcg")
    res = guest.run("uname -s; cat /proc/1/comm; id -u", timeout=30)
    assert res.rc == 0 and res.stdout.split() == ["Linux", "init", "0"]
    assert res.duration > 0
    assert guest.timings["ready"] < guest.timings["first_command"]


def test_exit_codes_stderr_and_quoting(guest: Guest):
    res = guest.run("echo out; echo err >&2; exit 3", timeout=30)
    assert (res.rc, res.stdout, res.stderr) == (3, "out\n", "err\n")
    assert guest.run(["printf", "%s|", "a b", "c;d", "$HOME"], timeout=30).stdout == "a b|c;d|$HOME|"
    with pytest.raises(VmError) as e:
        guest.run("echo bad >&2; false", timeout=30, check=True)
    assert e.value.kind == "command" and e.value.rc == 1 and "bad" in str(e.value)


def test_background_child_does_not_hold_run(guest: Guest):
    # `cmd &` keeps the channel's stdout open; run() returns on the exit status.
    t0 = time.monotonic()
    res = guest.run("sleep 20 & echo $!", timeout=10)
    assert res.rc == 0 and res.stdout.strip().isdigit() and time.monotonic() - t0 < 5
    guest.run(["kill", res.stdout.strip()], timeout=30, check=True)


def test_command_timeout_raises(guest: Guest):
    t0 = time.monotonic()
    with pytest.raises(VmError) as e:
        guest.run("sleep 10", timeout=1.0)
    assert e.value.kind == "timeout" and time.monotonic() - t0 < 5
    assert guest.run("echo still-here", timeout=30).stdout == "still-here\n"


def test_engine_is_installed_and_reinstall_replaces_it(guest: Guest, tmp_path: Path):
    host = (ENGINE_DIR / "__init__.py").read_bytes()
    assert guest.get_bytes("/opt/crucible/engine/__init__.py") == host
    res = guest.run(["sh", "-c", "PYTHONPATH=/opt/crucible python3 -c 'import engine; print(engine.__file__)'"],
                    timeout=60)
    assert res.stdout.strip() == "/opt/crucible/engine/__init__.py", res.stderr
    # No ckpt run compiles the engine: its bytecode came with the install.
    assert guest.run("ls /opt/crucible/engine/__pycache__ | grep -c '^dump\\.'", timeout=30).stdout.strip() == "1"
    # the wrapper install_engine puts in place: no `site`, no runpy (vm/recipe.py CKPT_WRAPPER_FAST)
    assert guest.run("cat /usr/local/bin/ckpt", timeout=30).stdout == CKPT_WRAPPER_FAST
    assert guest.run("ckpt --version", timeout=60).stdout.startswith("ckpt ")
    fake = tmp_path / "engine"
    fake.mkdir()
    (fake / "__init__.py").write_text("MARK = 42\n")
    guest.install_engine(fake)
    try:
        # (__pycache__: install_engine compiles the bytecode before any snapshot)
        assert guest.run("ls /opt/crucible/engine", timeout=30).stdout.split() == ["__init__.py", "__pycache__"]
        assert guest.run("cd /opt/crucible && python3 -c 'import engine; print(engine.MARK)'",
                         timeout=60).stdout == "42\n"
    finally:
        guest.install_engine(ENGINE_DIR)


def test_init_reaps_orphans(guest: Guest):
    # The subshell's child is orphaned when the subshell exits: PID 1 must
    # reap it once it dies, or its PID stays taken by a zombie.
    guest.run("(sleep 0.3 &) ; echo started", timeout=30, check=True)
    time.sleep(1.0)
    res = guest.run("ps -eo stat=,pid=,ppid=,comm= | awk '$1 ~ /^Z/'", timeout=30)
    assert res.rc == 0 and res.stdout == "", f"zombies: {res.stdout}"


def test_put_and_get_both_ways(guest: Guest, tmp_path: Path):
    data = os.urandom(1 << 20)
    src = tmp_path / "blob"
    src.write_bytes(data)
    os.chmod(src, 0o640)
    guest.put(src, "/srv/in/blob")
    res = guest.run("sha256sum /srv/in/blob; stat -c %a /srv/in/blob", timeout=30, check=True)
    assert res.stdout.split() == [hashlib.sha256(data).hexdigest(), "/srv/in/blob", "640"]
    guest.run("head -c 300000 /dev/urandom > /srv/out.bin", timeout=30, check=True)
    remote_sum = guest.run("sha256sum /srv/out.bin", timeout=30).stdout.split()[0]
    guest.get("/srv/out.bin", tmp_path / "out.bin")
    assert hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest() == remote_sum
    guest.put_bytes(b"\x00\xffbinary\n", "/tmp/b")
    assert guest.get_bytes("/tmp/b") == b"\x00\xffbinary\n"
    with pytest.raises(VmError) as e:
        guest.get_bytes("/does/not/exist")
    assert e.value.kind == "command" and "No such file" in str(e.value)


def test_snapshot_revert_removes_later_file(guest: Guest):
    guest.run("echo before > /root/before", timeout=30, check=True)
    guest.snapshot("t-golden")
    guest.run("echo after > /root/after; echo changed > /root/before", timeout=30, check=True)
    took = guest.revert("t-golden")
    assert guest.run("test -e /root/after", timeout=30).rc == 1
    assert guest.get_bytes("/root/before") == b"before\n"
    assert took < 10
    # the clock was set after the loadvm rewound it
    guest_now = float(guest.run("date +%s.%N", timeout=30).stdout)
    assert abs(guest_now - time.time()) < 5
    with pytest.raises(VmError) as e:
        guest.revert("no-such-snapshot")
    assert e.value.kind == "qmp"
    assert guest.run("test -e /root/before", timeout=30).rc == 0  # still running, unchanged


def test_new_guest_from_golden_overlay(guest: Guest, vm_image, tmp_path: Path):
    guest.run("echo golden > /root/golden-mark", timeout=30, check=True)
    guest.snapshot("golden2")
    guest.export_overlay(tmp_path / "golden.qcow2")
    with Guest(name="t-fromgolden", image=vm_image, log_dir=tmp_path,
               from_snapshot=(tmp_path / "golden.qcow2", "golden2")) as g2:
        assert g2.get_bytes("/root/golden-mark") == b"golden\n"
        assert g2.ssh_port != guest.ssh_port
        assert "ready" not in g2.timings  # no boot: the snapshot was loaded
    assert guest.run("true", timeout=30).rc == 0  # the source guest runs on


def test_two_guests_at_once(vm_image, tmp_path: Path):
    with Guest(name="t-a", image=vm_image, log_dir=tmp_path) as a, \
            Guest(name="t-b", image=vm_image, log_dir=tmp_path) as b:
        assert a.ssh_port != b.ssh_port and a.overlay != b.overlay
        a.run("echo a-only > /root/mark", timeout=30, check=True)
        assert b.run("test -e /root/mark", timeout=30).rc == 1  # separate overlays
        assert a.run("cat /root/mark", timeout=30).stdout == "a-only\n"
        assert a.alive() and b.alive()
    assert not a.alive() and not b.alive()


def test_guest_killed_from_outside_is_reported_and_cleaned_up(vm_image, tmp_path: Path):
    g = Guest(name="t-victim", image=vm_image, log_dir=tmp_path)
    g.launch()
    try:
        pid = g._proc.pid
        tmpdir = g._tmp
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while g.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not g.alive()
        with pytest.raises(VmError) as e:
            g.run("true", timeout=30)
        assert e.value.kind == "died" and "died" in str(e.value) and "signal 9" in str(e.value)
        assert not psutil.pid_exists(pid)  # reaped, not a zombie
        assert not tmpdir.exists()
        with pytest.raises(VmError):
            g.run("true", timeout=30)
    finally:
        g.shutdown()
        g.shutdown()  # idempotent


def test_guest_never_ready_times_out_with_serial_tail(vm_image, tmp_path: Path):
    g = Guest(name="t-slow", image=vm_image, log_dir=tmp_path, ready_timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(VmError) as e:
        g.launch()
    assert time.monotonic() - t0 < 10
    assert e.value.kind == "timeout" and "1.5 s" in str(e.value)
    assert e.value.serial_tail and "serial console (tail)" in str(e.value)
    assert not g.alive()


def test_bogus_init_ends_the_boot_with_serial_tail(vm_image, tmp_path: Path):
    g = Guest(name="t-badinit", image=vm_image, log_dir=tmp_path, extra_append=["cinit=/no/such/init"])
    with pytest.raises(VmError) as e:
        g.launch()
    msg = str(e.value)
    assert e.value.kind == "launch" and e.value.exit_code is not None
    assert "/no/such/init" in (e.value.serial_tail or "") and "command: qemu-system-x86_64" in msg
    assert not g.alive()


def test_qemu_that_exits_early_shows_stderr_and_command(vm_image, tmp_path: Path):
    g = Guest(name="t-nomem", image=vm_image, log_dir=tmp_path, memory_mb=64 * 1024 * 1024)
    with pytest.raises(VmError) as e:
        g.launch()
    assert e.value.kind == "launch" and e.value.exit_code not in (None, 0)
    assert e.value.stderr and "qemu-system-x86_64" in e.value.stderr
    assert "-m 67108864" in str(e.value)


CHILD = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
from vm import Guest, ensure_image
g = Guest(name="t-child", image=ensure_image("x86_64"), log_dir={logs!r}, wait_ssh=False)
g.launch()
print(g._proc.pid, g._tmp, flush=True)
time.sleep(120)
"""


def _spawn_child(tmp_path: Path):
    import subprocess
    import sys
    code = CHILD.format(repo=str(ENGINE_DIR.parent), logs=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert len(line) == 2 and line[0].isdigit(), f"child did not start a guest: {line!r}"
    return proc, int(line[0]), Path(line[1])


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True  # dead; its parent (the child harness) reaps or dies
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_qemu_outlives_an_interrupted_or_killed_harness(tmp_path: Path, sig):
    """SIGINT: KeyboardInterrupt -> atexit kills QEMU. SIGKILL: PR_SET_PDEATHSIG does."""
    proc, qemu_pid, guest_tmp = _spawn_child(tmp_path)
    try:
        assert psutil.pid_exists(qemu_pid)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert _gone_within(qemu_pid, 10), f"QEMU {qemu_pid} outlived its harness ({sig.name})"
        if sig == signal.SIGINT:
            assert not guest_tmp.exists()  # atexit cleaned up
        else:
            from vm.guest import sweep_stale_dirs
            assert guest_tmp.exists()  # nothing could run in the killed harness...
            sweep_stale_dirs()
            assert not guest_tmp.exists()  # ...so the next launch sweeps it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if psutil.pid_exists(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)


def test_a_dead_workers_segment_sockets_are_swept(tmp_path):
    """A worker killed mid-run leaves its segment socket: the next launch's
    sweep removes it, and leaves a live worker's alone."""
    import socket as socketmod
    import tempfile
    from vm.guest import sweep_stale_dirs
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)          # a pid nobody has now
    dead = Path(tempfile.gettempdir()) / f"crucible-seg-{pid}-gw9a"
    live = Path(tempfile.gettempdir()) / f"crucible-seg-{os.getpid()}-gw9a"
    made = []
    try:
        for path in (dead, live):
            s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
            s.bind(str(path))
            s.close()
            made.append(path)
        sweep_stale_dirs()
        assert not dead.exists() and live.exists()
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def test_a_guests_segment_socket_is_removed_when_it_stops(tmp_path):
    """QEMU binds the guest's end of the L2 segment (-netdev dgram) and
    never unlinks it: every scenario worker left two sockets in /tmp
    (586 on this machine after a day of runs)."""
    import socket as socketmod
    path = str(tmp_path / "seg-a")
    s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    s.bind(path)
    s.close()
    g = Guest(segment=(path, str(tmp_path / "seg-b"), "52:54:00:12:34:57"))
    g._post_shutdown()
    assert not os.path.exists(path)
    g._post_shutdown()          # a second stop finds nothing to remove
