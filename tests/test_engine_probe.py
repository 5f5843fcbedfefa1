"""State a process reads back from inside (tests/targets/prober.c), compared
before a dump and after the restore, after `ckpt check` and in an original
left running: each case is a piece of state the engine must restore exactly
or refuse. The prober says what it set, so each comparison is checked to
prove something (the value before differs from what a fresh process has)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from engine.context import Options
from engine.dump import check, dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import TARGETS, compile_target, lines_of, procs, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def prober_bin(tmp_path_factory) -> str:
    return compile_target(tmp_path_factory, "prober")


def _lines(out: str, prefix: str):
    return lines_of(out, prefix)


def start(procs, exe, out, *words) -> subprocess.Popen:
    err = out + ".err"
    with open(err, "w") as ef:
        p = subprocess.Popen([exe, out, *words], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=ef, close_fds=True, start_new_session=True)
    procs.popens.append(p)
    wait_for(lambda: _lines(out, "ready") or p.poll() is not None, what="the prober to start")
    assert p.poll() is None, open(err).read()
    return p


def report(pid: int, out: str, prefix: str = "report") -> str:
    n = len(_lines(out, prefix))
    os.kill(pid, signal.SIGUSR1)
    return wait_for(lambda: (lambda r: r[n] if len(r) > n else None)(_lines(out, prefix)),
                    what=f"a {prefix} line")


def fields(line: str) -> dict:
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def roundtrip(procs, exe, tmp_path, *words, how: str = "restore") -> tuple:
    """(report before, report after) of a prober started with `words`."""
    out = str(tmp_path / "out.txt")
    p = start(procs, exe, out, *words)
    before = report(p.pid, out)
    if how == "restore":
        dump(p.pid, str(tmp_path / "img"), Options())
        p.wait()
        restore(str(tmp_path / "img"), Options())
        procs.adopt(p.pid)
    elif how == "leave-running":
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    else:
        check(p.pid, Options())
    return before, report(p.pid, out)


HOWS = ["restore", "leave-running", "check"]


@pytest.mark.parametrize("how", HOWS)
def test_fd_owner_and_signal_without_o_async(procs, prober_bin, tmp_path, how):
    """F_SETOWN / F_SETOWN_EX (thread, process, process group) and F_SETSIG
    on a pipe and a socketpair, no O_ASYNC: SIGURG and a later O_ASYNC go
    by them. Before: saved only with O_ASYNC, so they read back 0."""
    before, after = roundtrip(procs, prober_bin, tmp_path, "owner", how=how)
    f = fields(before)
    assert (f["own0"], f["sig0"], f["own1"], f["own2"]) == ("1:1", "36", "0:1", "2:1"), before
    assert after == before


def test_fd_owner_outside_the_dump_is_refused_and_target_unharmed(procs, prober_bin, tmp_path):
    """An owner that is another process (here the test itself): its signals
    could not go there from a restored process."""
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out, "owner")
    import fcntl
    from engine import pidfd
    pfd = pidfd.pidfd_open(p.pid)
    dup = pidfd.pidfd_getfd(pfd, 4, p.pid)      # the pipe's read end (3 is OUT)
    try:
        fcntl.fcntl(dup, fcntl.F_SETOWN, os.getpid())
    finally:
        os.close(dup)
        os.close(pfd)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [(r.reason, r.fd) for r in refusals] == [("unsupported-state", 4)], ei.value
    assert "F_SETOWN names process" in str(ei.value)
    assert p.poll() is None and not os.path.exists(tmp_path / "img")
    assert " own0=1:" in report(p.pid, out)     # F_OWNER_PID; the pid is ours, not the prober's


@pytest.mark.parametrize("how", HOWS)
def test_autogroup_nice_of_a_session_leader(procs, prober_bin, tmp_path, how):
    """The prober is a session leader (its own autogroup) and set its
    autogroup's nice to 7. Before: the restored one had a new autogroup at 0."""
    if not os.path.exists("/proc/self/autogroup"):
        pytest.skip("no CONFIG_SCHED_AUTOGROUP")
    before, after = roundtrip(procs, prober_bin, tmp_path, "autogroup", how=how)
    assert fields(before)["ag_nice"] == "7"
    assert after == before


def test_autogroup_nice_of_a_non_leader_differing_from_ckpts_is_refused(procs, prober_bin, tmp_path):
    """A process not its session leader shares its session's autogroup; a
    restore puts it in ckpt's: refused when the nice values differ."""
    if not os.path.exists("/proc/self/autogroup"):
        pytest.skip("no CONFIG_SCHED_AUTOGROUP")
    from engine import autogroup
    mine = autogroup.read("self")
    r = autogroup.refusal(mine + 1, sid=10, pid=11, leader_restored=False)
    assert r is not None and r.reason == "unsupported-state" and "autogroup" in r.detail
    assert autogroup.refusal(mine, sid=10, pid=11, leader_restored=False) is None
    assert autogroup.refusal(mine + 1, sid=11, pid=11, leader_restored=False) is None
    assert autogroup.refusal(mine + 1, sid=10, pid=11, leader_restored=True) is None
    assert autogroup.refusal(None, sid=10, pid=11, leader_restored=False) is None


def test_autogroup_file_of_the_root_group_is_empty_and_reads_as_nice_0(monkeypatch):
    """A process no setsid ever made an autogroup for (this machine's CI runs
    under such a service) reads an empty /proc/PID/autogroup. Before: every
    dump and check from there failed with an internal IndexError."""
    from engine import autogroup
    from engine.errors import EngineError
    assert autogroup.parse("") == 0 and autogroup.parse("\n") == 0
    assert autogroup.parse("/autogroup-246295 nice 0\n") == 0
    assert autogroup.parse("/autogroup-12 nice -5\n") == -5
    with pytest.raises(EngineError):
        autogroup.parse("garbage\n")
    real = autogroup.read
    monkeypatch.setattr(autogroup, "read", lambda pid: 0 if pid == "self" else real(pid))
    assert autogroup.refusal(0, sid=10, pid=11, leader_restored=False) is None
    r = autogroup.refusal(3, sid=10, pid=11, leader_restored=False)
    assert r is not None and r.reason == "unsupported-state" and "has 0" in r.detail


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("word", ["sud", "sudblock"])
def test_syscall_user_dispatch(procs, prober_bin, tmp_path, word, how):
    """PR_SET_SYSCALL_USER_DISPATCH (per thread, seen only through ptrace):
    with the selector on BLOCK a system call from outside the allowed range
    raises SIGSYS (si_code 2, SYS_USER_DISPATCH). Before: a restored
    process had no dispatch at all (the call just ran); and with BLOCK
    at the freeze (sudblock, the prober waiting in libc's pause inside the
    allowed range) the dump's own injected calls were dispatched."""
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (6, 4):
        pytest.skip("no PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG (Linux < 6.4)")
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out, word)
    before = report(p.pid, out)
    assert fields(before)["sud_sigsys"] == "2", before
    if how == "restore":
        dump(p.pid, str(tmp_path / "img"), Options())
        p.wait()
        restore(str(tmp_path / "img"), Options())
        procs.adopt(p.pid)
    elif how == "leave-running":
        dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    else:
        check(p.pid, Options())
    assert report(p.pid, out) == before
    assert report(p.pid, out) == before     # and again: the handler put the selector back


def test_the_freeze_turns_dispatch_off_and_release_puts_it_back(procs, prober_bin, tmp_path):
    from engine import sud
    from engine.task import Task
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (6, 4):
        pytest.skip("no PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG (Linux < 6.4)")
    p = start(procs, prober_bin, str(tmp_path / "out.txt"), "sudblock")
    t = Task.seize(p.pid)
    try:
        assert t.sud is not None and t.sud["mode"] == 1 and t.sud["len"] > 0
        assert sud.read(p.pid) is None
    finally:
        t.release()
    t = Task.seize(p.pid)
    try:
        assert t.sud is not None and t.sud["len"] > 0
    finally:
        t.release()


@pytest.mark.parametrize("nobody", [False, True])
def test_a_process_in_a_landlock_domain_is_refused_and_target_unharmed(procs, prober_bin, tmp_path, nobody):
    """landlock_restrict_self: no /proc file shows it and a restore cannot
    make it again. Before: the restored process could read what its sandbox
    forbade (open /etc/hostname: EACCES before, success after). Also for a
    process of another uid than ckpt's (the probe's helper takes its ids)."""
    from engine import landlock
    if not landlock.enabled():
        pytest.skip("Landlock is not running on this kernel")
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out, "landlock", *(["nobody"] if nobody else []))
    before = report(p.pid, out)
    assert fields(before)["ll_open"] == "13"    # EACCES
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    assert [r.reason for r in getattr(ei.value, "refusals", [ei.value])] == ["unsupported-state"]
    assert "Landlock" in str(ei.value)
    assert p.poll() is None and not os.path.exists(tmp_path / "img")
    assert report(p.pid, out) == before
    assert "Landlock" in json.dumps(check(p.pid, Options()))


@pytest.mark.parametrize("words", [(), ("nobody",)])
def test_a_process_outside_any_landlock_domain_is_not_refused(procs, prober_bin, tmp_path, words):
    """The probe's other half: the same kcmp from a process with no domain
    (root, or another uid than ckpt's) passes."""
    before, after = roundtrip(procs, prober_bin, tmp_path, "owner", *words)
    assert after == before


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("words", [("regs",), ("misc",), ("layout",), ("madv", "growsdown"), ("altstack",),
                                   ("fileflags", "DIR")])
def test_state_read_back_the_same(procs, prober_bin, tmp_path, words, how):
    """What the probe found carried exactly (kept as a guard): zmm0-31,
    k0-7, MXCSR, the x87 control word and stack of a thread waiting in a
    call; interval timers with their intervals, alarm, timer slack, tid
    address, robust list, gs base, personality, rlimit, umask, pipe size,
    groups, fsgid, ambient and bounding capabilities, a thread's name; the
    vdso, vvar, stack, brk and mm fields, auxv; madvise flags and a
    MAP_GROWSDOWN mapping (VmFlags); an SS_AUTODISARM alternate stack;
    O_SYNC, O_DSYNC, O_NOATIME, O_DIRECT status flags."""
    words = tuple(str(tmp_path) if w == "DIR" else w for w in words)
    before, after = roundtrip(procs, prober_bin, tmp_path, *words, how=how)
    assert after == before
    if "regs" in words:
        regs = _lines(str(tmp_path / "out.txt"), "regs")
        assert regs[-1] == regs[0] and "regs_bad=0" in regs[-1] and "mxcsr=0xdfc0 fcw=0xb7f" in regs[-1], regs


@pytest.mark.parametrize("word, reason, what", [("secret", "unsupported-mapping", "secretmem"),
                                                ("aio", "unsupported-mapping", "[aio]"),
                                                ("mseal", "unsupported-mapping", "sealed")])
def test_mappings_that_cannot_be_made_again_are_refused(procs, prober_bin, tmp_path, word, reason, what):
    out = str(tmp_path / "out.txt")
    try:
        p = start(procs, prober_bin, out, word)
    except AssertionError as e:
        pytest.skip(f"{word} not available here: {e}")
    before = report(p.pid, out)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    assert reason in [r.reason for r in getattr(ei.value, "refusals", [ei.value])] and what in str(ei.value)
    assert p.poll() is None and report(p.pid, out) == before


def test_threads_with_their_own_keepcaps_and_mce_policy_are_refused(procs, prober_bin, tmp_path):
    """keep-caps, the MCE kill policy and rdtsc faulting are per thread; the
    restore set the leader's for every thread. Before: read from the leader
    only, so two threads with keep-caps and the early MCE policy of their
    own came back with neither. Keep-caps is refused; a thread's own MCE
    policy is restored now (test_engine_threads.py), so not named."""
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out, "threadattrs")
    before = report(p.pid, out)
    with pytest.raises((Refusal, Refusals)) as ei:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(ei.value, "refusals", [ei.value])
    assert [r.reason for r in refusals] == ["threads", "threads"], ei.value
    assert all("keep-caps" in r.detail and "machine-check" not in r.detail for r in refusals)
    assert p.poll() is None and report(p.pid, out) == before


def test_xstate_permission_requested_again_or_refused(monkeypatch):
    """ARCH_REQ_XCOMP_PERM (AMX tile data, bit 18; oneDNN and PyTorch ask at
    start) is per process and invisible in /proc: a restored process had
    the restorer's, and its first tile instruction would be a SIGILL. No AMX
    on this host, so the plan is checked with the kernel's answers given:
    a permitted feature ckpt lacks is requested before the xstate is set,
    one this machine does not support is refused (cpu-mismatch)."""
    from engine import procattrs
    base = 0xe7
    answers = {procattrs.ARCH_GET_XCOMP_PERM: base, procattrs.ARCH_GET_XCOMP_SUPP: base | 1 << 18 | 1 << 17}
    monkeypatch.setattr(procattrs, "_xcomp", lambda code: answers[code])

    class Pending:
        def __init__(self):
            self.calls = []

        def add(self, *call):
            self.calls.append(call)

    class B:
        pending = Pending()
    rec = {"thp_disable": 0, "child_subreaper": 0, "mce_kill": procattrs.PR_MCE_KILL_DEFAULT,
           "tsc": procattrs.PR_TSC_ENABLE, "memory_merge": 0, "dumpable": 1, "xcomp_perm": base | 1 << 18}
    procattrs.queue(B, rec)
    assert B.pending.calls == [("arch_prctl", procattrs.ARCH_REQ_XCOMP_PERM, 18)]
    assert procattrs.validate(rec, "") == []
    B.pending.calls = []
    procattrs.queue(B, dict(rec, xcomp_perm=base))      # what every process here has: nothing asked
    assert B.pending.calls == []
    answers[procattrs.ARCH_GET_XCOMP_SUPP] = base
    [r] = procattrs.validate(rec, "")
    assert r.reason == "cpu-mismatch" and "[18]" in r.detail


def test_xstate_permission_recorded(procs, prober_bin, tmp_path):
    """The dump records it (this host: the static features only) and an
    older image without it reads as 0 (nothing asked)."""
    from engine import procattrs
    if "xcomp_perm" not in [r[0] for r in procattrs.reads()]:
        pytest.skip("no ARCH_GET_XCOMP_PERM here")
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out)
    dump(p.pid, str(tmp_path / "img"), Options(leave_running=True))
    with open(tmp_path / "img" / "core.json") as f:
        attrs = json.load(f)["attrs"]
    assert attrs["xcomp_perm"] == procattrs._xcomp(procattrs.ARCH_GET_XCOMP_PERM) != 0
    old = {k: v for k, v in attrs.items() if k != "xcomp_perm"}
    procattrs.older(old)
    assert old["xcomp_perm"] == 0 and procattrs.check_record(old)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("word, flags", [("mlockfuture", "lo,"), ("onfault", "lo,lf,")])
def test_mlockall_future_without_locked_mappings(procs, prober_bin, tmp_path, word, flags, how):
    """mlockall(MCL_FUTURE [| MCL_ONFAULT]) with nothing mapped since: no
    mapping shows it, the next one is locked. Before: the restored process
    mapped its next page unlocked."""
    before, after = roundtrip(procs, prober_bin, tmp_path, word, how=how)
    assert fields(before)["newmap"].endswith(flags), before
    assert after == before


def test_mlockall_future_check_leaves_no_mapping_behind(procs, prober_bin, tmp_path):
    out = str(tmp_path / "out.txt")
    p = start(procs, prober_bin, out, "onfault")
    with open(f"/proc/{p.pid}/maps") as f:
        maps = f.read()
    check(p.pid, Options())
    with open(f"/proc/{p.pid}/maps") as f:
        assert f.read() == maps


def test_speculation_control_set_again_where_it_differs(monkeypatch):
    """PR_SET_SPECULATION_CTRL (speculative store bypass, indirect branch,
    L1D flush): per task, inherited, invisible in /proc. Where the host's
    mitigation is in prctl mode a process may disable them for itself; a
    restored process had ckpt's. This host's mitigations are not in prctl
    mode (PR_SET fails), so the plan is checked with the answers given."""
    from engine import procattrs
    own = {0: 1 | 2, 1: 1 | 2, 2: 8}     # ckpt: prctl mode, enabled; L1D flush not controllable
    monkeypatch.setattr(procattrs, "_own_spec", lambda which: own[which])
    rec = {"spec_store_bypass": 1 | 4, "spec_indirect_branch": 1 | 2, "spec_l1d_flush": 8}
    assert procattrs._spec_changes(rec) == [(0, 4)]
    assert procattrs._spec_changes(dict(rec, spec_indirect_branch=1 | 16)) == [(0, 4), (1, 16)]
    assert procattrs._spec_changes({k: 0 for k in procattrs.SPEC_KEYS}) == []     # older images
    # a thread of its own differs from the leader: refused
    t = {"thread_spec_store_bypass": 1 | 2}
    with pytest.raises(Refusal) as ei:
        procattrs.same_as_leader(t, dict(rec, keep_caps=0, mce_kill=2, tsc=1), 77)
    assert ei.value.reason == "threads" and "speculative store bypass" in ei.value.detail


def test_a_mapping_with_a_protection_key_is_refused(monkeypatch):
    """pkey_mprotect gives a mapping a protection key that smaps shows as
    ProtectionKey (x86 with PKU) and no VmFlags letter does; a mapping made
    again by the restore would have key 0, so the PKRU rights the process
    set for its key would no longer guard it. No PKU on this host: judged
    from smaps text of such a machine."""
    from engine import check as check_mod
    from engine import procfs
    smaps = ("7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \nSize:                  4 kB\n"
             "ProtectionKey:         3\nVmFlags: rd wr mr mw me ac \n"
             "7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \nProtectionKey:         0\n"
             "VmFlags: rd wr mr mw me ac \n")
    flags = procfs.parse_smaps_flags(smaps)
    assert flags == {0x7f0000000000: ["rd", "wr", "mr", "mw", "me", "ac", "pkey3"],
                     0x7f0000002000: ["rd", "wr", "mr", "mw", "me", "ac"]}
    maps = [{"start": 0x7f0000000000, "end": 0x7f0000001000, "perms": "rw-p", "offset": 0, "dev": "00:00",
             "inode": 0, "path": ""},
            {"start": 0x7f0000002000, "end": 0x7f0000003000, "perms": "rw-p", "offset": 0, "dev": "00:00",
             "inode": 0, "path": ""}]

    class P:
        def vmflags(self):
            return flags

        def path(self, rel):
            return "/nonexistent/" + rel
    s = check_mod.Survey(pid=1, proc=P())
    s.maps = maps
    check_mod._check_vmas(s)
    assert [r.reason for r in s.refusals] == ["unsupported-mapping"]
    assert "protection key 3 (pkey_mprotect)" in s.refusals[0].detail
    assert [v["start"] for v in s.vmas] == [0x7f0000002000]
