"""The resident agent (harness/agent.py) and its host end
(harness/agent_client.py), on this host: the agent serves a socket instead
of a virtio-serial port. Host tier, fast."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import workload
from harness.agent_client import AgentError, AgentLink

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "harness" / "agent.py"


@pytest.fixture
def agent(tmp_path):
    """An AgentLink to an agent running as a subprocess on the accepted end."""
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    proc_box = {}
    link = AgentLink(path, alive=lambda: proc_box["p"].poll() is None if "p" in proc_box else True, guest="host")
    link.connect(time.monotonic() + 5)
    conn, _ = srv.accept()
    proc_box["p"] = subprocess.Popen([sys.executable, str(AGENT), "--stdin"], stdin=conn, stdout=subprocess.DEVNULL,
                                     close_fds=True)
    conn.close()
    srv.close()
    yield link, proc_box["p"]
    link.close()
    proc_box["p"].kill()
    proc_box["p"].wait()


def test_run_put_get_and_ping(agent, tmp_path):
    link, proc = agent
    assert link.ping(timeout=10) == proc.pid
    r = link.run(["sh", "-c", "cat; echo err >&2; exit 3"], timeout=10, stdin=b"in\n")
    assert (r["rc"], r["stdout"], r["stderr"], r["timeout"]) == (3, b"in\n", b"err\n", False)
    link.put(b"\x00\xffdata", str(tmp_path / "d" / "f"), mode=0o640)
    assert (tmp_path / "d" / "f").read_bytes() == b"\x00\xffdata"
    assert (tmp_path / "d" / "f").stat().st_mode & 0o777 == 0o640
    assert link.get(str(tmp_path / "d" / "f")) == b"\x00\xffdata"
    with pytest.raises(AgentError) as e:
        link.get(str(tmp_path / "missing"))
    assert e.value.kind == "agent"


def test_a_script_runs_in_a_fork_of_the_agent_with_the_scripts_output(agent, tmp_path):
    """workload.py / world.py as the agent runs them (a fork that calls
    their main): the same output as python3 running the script."""
    link, proc = agent
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"x" * 5000)
    r = link.run([sys.executable, str(REPO / "harness" / "workload.py"), "pidstate", str(proc.pid)], timeout=30,
                 script=True)
    assert r["rc"] == 0 and b'"exists": true' in r["stdout"], r
    child = link.run([sys.executable, str(REPO / "harness" / "world.py"), "digest", str(tree)], timeout=30,
                     script=True)
    assert child["rc"] == 0, child
    # the same script exec'd by a new interpreter agrees
    ref = subprocess.run([sys.executable, str(REPO / "harness" / "world.py"), "digest", str(tree)],
                         capture_output=True, close_fds=True)
    assert child["stdout"] == ref.stdout and b"sub/f" in ref.stdout


def test_a_command_past_its_timeout_is_killed_with_its_session(agent, tmp_path):
    link, _ = agent
    mark = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    r = link.run(["sh", "-c", f"sleep 60 & echo $! > {mark}; wait"], timeout=1)
    assert r["timeout"] and time.monotonic() - t0 < 10
    pid = int(mark.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and \
            open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z":
        time.sleep(0.05)
    state = open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] if os.path.exists(f"/proc/{pid}") else "gone"
    assert state in ("Z", "gone")


def test_no_reply_is_a_timeout_and_a_closed_agent_is_broken(agent):
    link, proc = agent
    proc.send_signal(19)                     # SIGSTOP: it cannot answer
    try:
        with pytest.raises(AgentError) as e:
            link.request("ping", timeout=0.2, grace=0.3)
        assert e.value.kind == "timeout"
    finally:
        proc.send_signal(18)                 # SIGCONT
    # the late reply to the timed-out ping is dropped: the next request gets its own
    assert link.ping(timeout=10) == proc.pid
    proc.kill()
    proc.wait()
    with pytest.raises(AgentError) as e:
        link.ping(timeout=5)
    assert e.value.kind in ("broken", "died")


def test_a_file_of_megabytes_crosses_whole_both_ways(agent, tmp_path):
    """A migrated image is one put and one get of megabytes (one JSON line
    each way, read in pieces): every byte arrives, and the link goes on."""
    link, proc = agent
    data = os.urandom(6 << 20) + b"\n\n" + os.urandom(1000)
    link.put(data, str(tmp_path / "big"))
    assert (tmp_path / "big").read_bytes() == data
    assert link.get(str(tmp_path / "big")) == data
    assert link.ping(timeout=10) == proc.pid


def test_large_puts_in_a_row_each_arrive_whole(agent, tmp_path):
    """Request bytes go into the agent's one receive area (harness/agent.py
    _receive): a put larger than it, then a smaller one, then one that
    arrives with the request line: each file is its own bytes, nothing of
    the one before, and the link goes on."""
    from harness import agent as agent_mod
    link, proc = agent
    big = os.urandom(agent_mod.RECV_SIZE + 12345)
    small = os.urandom(1 << 20)
    link.put(big, str(tmp_path / "big"))
    link.put(small, str(tmp_path / "small"))
    link.put(b"tiny", str(tmp_path / "tiny"))
    assert (tmp_path / "big").read_bytes() == big
    assert (tmp_path / "small").read_bytes() == small
    assert (tmp_path / "tiny").read_bytes() == b"tiny"
    assert link.ping(timeout=10) == proc.pid


def test_a_late_reply_with_a_file_is_skipped_whole(agent, tmp_path):
    """A get that timed out is answered later, its raw bytes after its line:
    the next request must skip them whole, though they hold newlines and
    lines that look like replies."""
    link, proc = agent
    from harness import agent_client
    now = next(agent_client._IDS)           # the ids the next requests get: a fake reply for each
    fake = b"".join(b'{"id": %d, "bulk": 0, "pid": 1}\n' % i for i in range(now, now + 20))
    path = tmp_path / "fake"
    path.write_bytes(b"\n" + fake + os.urandom(200000))
    proc.send_signal(19)                     # SIGSTOP
    try:
        with pytest.raises(AgentError) as e:
            link.request("get", timeout=0.2, grace=0.3, path=str(path))
        assert e.value.kind == "timeout"
    finally:
        proc.send_signal(18)                 # SIGCONT
    link.put(b"", str(tmp_path / "empty"))
    assert link.get(str(tmp_path / "empty")) == b""
    assert link.get(str(path)) == path.read_bytes()
    assert link.ping(timeout=10) == proc.pid


def test_put_fresh_removes_the_tree_first_and_refuses_shallow_paths(agent, tmp_path):
    link, _ = agent
    root = tmp_path / "sc"
    (root / "w").mkdir(parents=True)
    (root / "w" / "stale").write_bytes(b"old")
    link.put(b"{}", str(root / "c" / "spec.json"), fresh=str(root))
    assert (root / "c" / "spec.json").read_bytes() == b"{}"
    assert not (root / "w").exists()        # the whole tree went, not just the file's dir
    for shallow in ("/", "/srv", "relative/dir"):
        with pytest.raises(AgentError) as e:
            link.put(b"x", str(tmp_path / "f"), fresh=shallow)
        assert e.value.kind == "agent" and "will not remove" in e.value.message
    assert not (tmp_path / "f").exists()


def test_gone_waits_for_a_pid_to_leave_proc_and_reports_what_stays(agent):
    link, _ = agent
    quick = subprocess.Popen(["sleep", "0.3"], close_fds=True)
    stays = subprocess.Popen(["sleep", "30"], close_fds=True)
    try:
        # a zombie keeps its /proc entry: reaped by a thread of this test after 0.3 s
        import threading
        t = threading.Thread(target=quick.wait)
        t.start()
        t0 = time.monotonic()
        assert link.gone([quick.pid], 20, timeout=30) == []
        assert time.monotonic() - t0 < 10
        t.join()
        t0 = time.monotonic()
        assert link.gone([stays.pid, quick.pid], 0.5, timeout=30) == [stays.pid]
        assert time.monotonic() - t0 >= 0.5
    finally:
        stays.kill()
        stays.wait()


def test_the_agent_imports_what_its_scripts_import_on_first_use():
    """workload.py and world.py import some modules only where used (the
    exec'd workload's start stays light, tests/test_harness_kinds.py); the
    agent imports them once, so its forked script runs (spawn, signal
    --snap, snap, digests) do not import them each time."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import agent; agent.preload(); import workload, world; "
            "print(' '.join(m for m in workload.PRELOAD + world.PRELOAD if m not in sys.modules) or 'none')")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO / "harness")], capture_output=True, text=True,
                       timeout=60, close_fds=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"procstate", "warmfork"} <= set(workload.PRELOAD)
    assert r.stdout.split() == ["none"]


def _mapped(addr: int, maps: str) -> bool:
    for line in maps.splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return True
    return False


def test_the_receive_area_is_left_out_of_the_agents_forks():
    """Every step and every warm ckpt is a fork of the agent: its 16 MiB
    receive area (harness/agent.py recv_area) is the agent's alone
    (MADV_DONTFORK), so no fork copies and drops its page tables; the
    agent itself has it, touched, zeros."""
    import ctypes
    from harness import agent as agent_mod
    area = agent_mod.recv_area(1 << 20)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    assert _mapped(addr, Path("/proc/self/maps").read_text())
    assert area[:4096] == bytes(4096) and area[-1:] == b"\0"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        os.write(w, b"1" if _mapped(addr, Path("/proc/self/maps").read_text()) else b"0")
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"0", "the receive area was inherited by a fork of the agent"
