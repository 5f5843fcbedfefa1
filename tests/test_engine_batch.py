"""engine/batch.py: syscalls run in batches inside a process being restored.

A real child (a clone of this process stopped by PTRACE_TRACEME, as a
restore's is) gets the gadget area and runs batches; every test runs with
the runner (x86_64) and with CKPT_NO_BATCH=1 (one injection per call): the
two paths must give the same results and the same errors. And a real
dump/restore of a process with a mapping where the gadget area would go."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

import pytest

from engine import batch, ptrace, signals
from engine.arch import current
from engine.build import PAGE, Builder, gadget_size, place_gadget
from engine.context import Options
from engine.dump import dump
from engine.libc import SysError, exec_page
from engine.restore import restore
from engine.task import INJECTED, Task
from engine_core_support import procs, proc_facts, start_ready_script  # noqa: F401

ARCH = current()
RUNNER = getattr(ARCH, "BATCH_BLOB", None) is not None
PR_SET_NAME = 15
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
IMAGE_AT = 0x10000000     # where build._free_gap looks first


class _Job:
    def __init__(self, vmas):
        self.vmas = vmas


def _child(flags: int = 0):
    """A stopped, traced clone of this process (no set_tid: no privilege)."""
    tramp = exec_page(ARCH.CLONE3_TRAMPOLINE)
    fn = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t)(tramp)
    args = ARCH.CloneArgs(flags=flags, exit_signal=signal.SIGCHLD)
    pid = fn(ctypes.addressof(args), ctypes.sizeof(args))
    assert pid > 0
    task = Task.adopt(pid)
    task.syscall_ip = tramp + ARCH.TRAMPOLINE_SYSCALL_OFFSET
    return task


@pytest.fixture(params=["runner", "one-by-one"])
def mode(request, monkeypatch):
    if request.param == "runner" and not RUNNER:
        pytest.skip(f"no batch runner on {ARCH.MACHINE}")
    monkeypatch.setenv(batch.ENV_OFF, "1" if request.param == "one-by-one" else "0")
    return request.param


def _builder():
    """A Builder on a fresh child with the gadget area, as build() makes it."""
    acts = signals.own_actions()
    task = _child()
    b = Builder(_Job([]), task)
    b.inherited_actions = acts
    try:
        place_gadget(b, [(IMAGE_AT, IMAGE_AT + 0x3000)])
        yield b
    finally:
        task.kill()


builder = pytest.fixture(_builder, name="builder")


def _trips():
    return dict(INJECTED)


def _free(b, size=PAGE):
    """An address free in the child, away from the gadget area."""
    return b.gadget + b.gadget_size + 16 * PAGE


def test_every_call_runs_in_order_and_gives_its_result(builder, mode):
    b = builder
    addr = _free(b)
    before = _trips()
    q = b.pending.add
    q("getpid")
    q("mmap", addr, 2 * PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    q("prctl", PR_SET_NAME, batch.Data(b"batched\0"), 0, 0, 0)
    q("umask", 0o027)
    q("umask", 0o022)
    q("getppid")
    res = b.flush()
    assert res == [b.pid, addr, 0, res[3], 0o027, os.getpid()]
    after = _trips()
    if mode == "runner":
        assert after["round_trips"] - before["round_trips"] == 1
        assert after["batched_calls"] - before["batched_calls"] == 6
    else:
        assert after["round_trips"] - before["round_trips"] == 6
    with open(f"/proc/{b.pid}/comm") as f:
        assert f.read().strip() == "batched"
    assert f"{addr:08x}-{addr + 2 * PAGE:08x} rw-p" in open(f"/proc/{b.pid}/maps").read()
    assert b.call("umask", 0) == 0o022          # the task goes on after a batch


def test_third_call_fails_and_stops_the_batch(builder, mode):
    b = builder
    q = b.pending.add
    q("umask", 0o077)
    q("getpid")
    q("munmap", 1, PAGE)          # unaligned: EINVAL
    q("umask", 0o007)             # must not run
    with pytest.raises(SysError) as e:
        b.flush()
    assert e.value.call == "munmap (injected)" and e.value.errno == errno.EINVAL
    assert e.value.pid == b.pid
    if mode == "runner":
        assert e.value.batch_index == 2     # the 3rd call, counted from 0
    assert b.call("umask", 0) == 0o077       # the 4th never ran
    assert not b.pending


def test_expected_result_checked_like_a_direct_call(builder, mode):
    b = builder
    b.pending.add("getpid", expect=(b.pid + 1, "pid came back as {got}"))
    with pytest.raises(Exception) as e:
        b.flush()
    assert str(b.pid) in str(e.value) and "pid came back as" in str(e.value)


def test_a_batch_larger_than_the_area_runs_in_chunks(builder, mode):
    b = builder
    n = b.batch_size // batch.ENTRY + 50 if b.batch_size else 300
    for i in range(n):
        b.pending.add("umask", i & 0o777)
    before = _trips()
    res = b.flush()
    assert res[1:] == [(i & 0o777) for i in range(n - 1)]
    if mode == "runner":
        assert _trips()["round_trips"] - before["round_trips"] == 2


def test_sigtrap_mask_and_action_are_left_as_they_were(builder, mode):
    b = builder
    ptrace.set_sigmask(b.pid, signals.ALL_BLOCKED)
    mask = ptrace.get_sigmask(b.pid)      # all but SIGKILL, SIGSTOP
    assert mask >> (signal.SIGTRAP - 1) & 1
    b.pending.add("getpid")
    assert b.flush() == [b.pid]
    assert ptrace.get_sigmask(b.pid) == mask
    act = b.scratch + 512
    b.call("rt_sigaction", signal.SIGTRAP, 0, act, 8)
    assert struct.unpack("<QQQQ", b.task.read_mem(act, 32))[0] == 0     # still SIG_DFL


def test_an_ignored_sigtrap_is_never_met_by_the_breakpoint(builder, mode):
    # force_sig would reset an ignored SIGTRAP to SIG_DFL: one by one instead.
    b = builder
    b.call("rt_sigaction", signal.SIGTRAP, b.put(struct.pack("<QQQQ", 1, 0, 0, 0)), 0, 8)
    b.inherited_actions["5"] = [1, 0, 0, 0]
    before = _trips()
    b.pending.add("getpid")
    b.pending.add("getppid")
    assert b.flush() == [b.pid, os.getpid()]
    assert _trips()["round_trips"] - before["round_trips"] == 2
    act = b.scratch + 512
    b.call("rt_sigaction", signal.SIGTRAP, 0, act, 8)
    assert struct.unpack("<QQQQ", b.task.read_mem(act, 32))[0] == 1


def test_no_batch_once_the_image_signals_are_queued(builder, mode):
    b = builder
    b.signals_queued = True
    before = _trips()
    b.pending.add("getpid")
    b.pending.add("getpid")
    b.flush()
    assert _trips()["round_trips"] - before["round_trips"] == 2


def test_a_foreign_sigtrap_is_held_back_not_taken_for_the_breakpoint(builder, mode):
    b = builder
    ptrace.set_sigmask(b.pid, signals.ALL_BLOCKED)
    mask = ptrace.get_sigmask(b.pid)
    os.kill(b.pid, signal.SIGTRAP)          # pending (blocked) before the batch
    b.pending.add("getpid")
    b.pending.add("umask", 0o022)
    res = b.flush()
    assert res[0] == b.pid
    if mode == "runner":
        assert b.task.deferred_signals == [signal.SIGTRAP]
        assert ptrace.get_sigmask(b.pid) == mask


def _handler(signum, frame):     # pragma: no cover - never delivered
    pass


def test_cleared_actions_are_what_a_clear_sighand_clone_holds():
    """The restore clones with CLONE_CLEAR_SIGHAND and takes
    signals.cleared_actions() for the clone's table instead of reading it
    (build.set_sigactions then skips what it holds): every action read
    back from such a clone by injection must be exactly that, with this
    process holding handlers (SIGINT's is Python's), ignored signals with
    flags and masks, and defaults."""
    from engine.gadget import CLONE_CLEAR_SIGHAND
    old = {s: signal.signal(s, h) for s, h in ((signal.SIGUSR1, _handler), (signal.SIGHUP, signal.SIG_IGN),
                                                (signal.SIGRTMIN + 3, signal.SIG_IGN))}
    try:
        want = signals.cleared_actions()
        task = _child(CLONE_CLEAR_SIGHAND)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    b = Builder(_Job([]), task)
    try:
        place_gadget(b, [(IMAGE_AT, IMAGE_AT + 0x3000)])
        got = {}
        for sig in signals.ACTION_SIGNALS:
            b.call("rt_sigaction", sig, 0, b.scratch + 512, 8)
            got[str(sig)] = list(struct.unpack("<QQQQ", b.task.read_mem(b.scratch + 512, 32)))
    finally:
        task.kill()
    assert got == want
    ignored = {int(s) for s, a in want.items() if a[0] == 1}
    assert {signal.SIGHUP, signal.SIGRTMIN + 3, signal.SIGPIPE} <= ignored and signal.SIGUSR1 not in ignored
    assert signals.own_actions()["2"][0] not in (0, 1)      # this process's SIGINT has a handler, the clone's not


def test_gadget_area_is_placed_clear_of_the_image(builder):
    b = builder
    # The image holds IMAGE_AT..+3 pages: the area goes right after.
    assert b.gadget == IMAGE_AT + 0x3000
    assert b.gadget_size == gadget_size(ARCH)
    if RUNNER:
        assert b.batch_blob == b.gadget + PAGE and b.task.read_mem(b.batch_blob, len(ARCH.BATCH_BLOB)) == ARCH.BATCH_BLOB
        assert b.batch_area + b.batch_size == b.gadget + b.gadget_size
    # The image's mapping can go where it was: nothing of ours is there.
    got = b.call("mmap", IMAGE_AT, 0x3000, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    assert got == IMAGE_AT


@pytest.mark.parametrize("batched", ["0", "1"], ids=["runner", "one-by-one"])
def test_restore_with_a_mapping_where_the_gadget_would_go(procs, tmp_path, monkeypatch, batched):  # noqa: F811
    """A process holding memory at the first address the gadget area would
    take: it is placed elsewhere, the process gets its mapping and bytes
    back, and nothing of the restore is left in its address space."""
    monkeypatch.setenv(batch.ENV_OFF, batched)
    setup = ("import ctypes, mmap\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "libc.mmap.restype = ctypes.c_void_p\n"
             "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
             f"a = libc.mmap({IMAGE_AT}, {5 * PAGE}, 3, 0x22 | 0x100000, -1, 0)\n"
             f"assert a == {IMAGE_AT}, a\n"
             f"ctypes.memmove(a + {PAGE}, b'where the gadget would go', 25)\n")
    p = start_ready_script(procs, tmp_path, setup, imports="os, time")
    maps = open(f"/proc/{p.pid}/maps").read()
    assert f"{IMAGE_AT:08x}-{IMAGE_AT + 5 * PAGE:08x} rw-p" in maps
    before = proc_facts(p.pid)
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    out = restore(str(tmp_path / "img"), Options())
    assert out["pid"] == p.pid
    procs.adopt(p.pid)
    after = proc_facts(p.pid)
    assert after["maps"] == before["maps"]      # no gadget area left, nothing missing
    fd = os.open(f"/proc/{p.pid}/mem", os.O_RDONLY)
    try:
        assert os.pread(fd, 25, IMAGE_AT + PAGE) == b"where the gadget would go"
    finally:
        os.close(fd)
    trips = out["injected"]
    if batched == "0" and RUNNER:
        assert trips["batched_calls"] > trips["round_trips"]
    else:
        assert trips["batched_calls"] == 0


builder2 = pytest.fixture(_builder, name="builder2")     # a second process, for run_each


def test_run_each_runs_every_process_batch_and_raises_the_first_failure(builder, builder2, mode):
    a, b = builder, builder2
    a.pending.add("prctl", PR_SET_NAME, batch.Data(b"first\0"), 0, 0, 0)
    a.pending.add("munmap", 1, PAGE)          # EINVAL
    a.pending.add("umask", 0o077)             # must not run
    b.pending.add("prctl", PR_SET_NAME, batch.Data(b"second\0"), 0, 0, 0)
    b.pending.add("umask", 0o007)
    before = _trips()
    with pytest.raises(SysError) as e:
        batch.run_each([a, b])
    assert e.value.call == "munmap (injected)" and e.value.pid == a.pid
    if mode == "runner":
        assert _trips()["round_trips"] - before["round_trips"] == 2
    # the other process's batch ran to its end all the same
    assert open(f"/proc/{b.pid}/comm").read().strip() == "second"
    assert b.call("umask", 0) == 0o007
    assert open(f"/proc/{a.pid}/comm").read().strip() == "first"
    assert a.call("umask", 0) != 0o077
    assert not a.pending and not b.pending


def test_run_each_checks_expected_results(builder, builder2, mode):
    a, b = builder, builder2
    a.pending.add("getpid", expect=(a.pid, "a: {got}"))
    b.pending.add("getpid", expect=(b.pid + 1, "b's pid came back as {got}"))
    with pytest.raises(Exception) as e:
        batch.run_each([a, b])
    assert f"b's pid came back as {b.pid}" in str(e.value)
