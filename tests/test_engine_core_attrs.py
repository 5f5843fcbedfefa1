"""Process attributes carried over by a dump and restore, each proven from
inside the restored process (tests/targets/attrs.c reports what it sees):
scheduling policy, flags, nice and RT priority, CPU affinity,
oom_score_adj, timer slack and its default, personality, no_new_privs,
POSIX timers (same IDs, clocks, notification, signal values; they keep
firing) and seccomp filters (still acting, in their order, with their
flags). And the refusals where a program could tell the difference."""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import types

import pytest

from engine import posixtimers, sched
from engine import seccomp as seccomp_mod
from engine.context import Options
from engine.dump import dump
from engine.errors import Refusal, Refusals
from engine.restore import restore
from engine_core_support import TARGETS, compile_target, lines_of, procs, wait_for  # noqa: F401

PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def attrs_bin(tmp_path_factory) -> str:
    return compile_target(tmp_path_factory, "attrs")


def _lines(out: str, prefix: str):
    return lines_of(out, prefix)


def start(procs, exe, out, *words, default_slack=77777) -> subprocess.Popen:
    # A child's default timer slack is its parent's slack at fork.
    mine = _libc.prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)
    _libc.prctl(PR_SET_TIMERSLACK, default_slack, 0, 0, 0)
    err = out + ".err"
    try:
        with open(err, "w") as ef:
            p = subprocess.Popen([exe, out, *words], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=ef, close_fds=True, start_new_session=True)
    finally:
        _libc.prctl(PR_SET_TIMERSLACK, mine, 0, 0, 0)
    procs.popens.append(p)
    wait_for(lambda: _lines(out, "ready") or p.poll() is not None, what="the attrs target to start")
    assert p.poll() is None, open(err).read()
    return p


def report(pid: int, out: str):
    """(static part, dynamic fields) of a fresh report from the process."""
    n = len(_lines(out, "report"))
    os.kill(pid, signal.SIGUSR1)
    line = wait_for(lambda: (lambda r: r[n] if len(r) > n else None)(_lines(out, "report")), what="a report")
    static, dyn = line.split(" | dyn ")
    return static, dict(kv.split("=") for kv in dyn.split())


def fires(out: str):
    return [dict(kv.split("=") for kv in line.split()[2:]) | {"n": int(line.split()[1])}
            for line in _lines(out, "fire ")]


def dump_restore(p: subprocess.Popen, image: str, procs) -> None:
    dump(p.pid, image, Options())
    p.wait()
    restore(image, Options())
    procs.adopt(p.pid)


def test_sched_nice_affinity_oom_slack_personality_nnp(procs, attrs_bin, tmp_path):
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "nice5", "batch", "cpu0", "oom321", "slack", "pers", "nnp")
    before, _ = report(p.pid, out)
    # What the process set (so the comparison below proves something).
    for want in ("nice=5", "policy=3", "flags=1", "cpus=1 ", "oom=321", "slack=123456", "slackdef=77777",
                 "pers=0x440000", "nnp=1"):
        assert want in before, (want, before)
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before
    # ckpt's own values were not changed by the restore
    assert os.sched_getaffinity(0) != {0} or os.cpu_count() == 1
    assert _libc.prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0) != 77777


@pytest.mark.parametrize("words, expect", [(("idle", "nice5"), "policy=5"),
                                           (("nice5", "fifo"), "policy=1 flags=0 prio=3")])
def test_sched_idle_and_realtime_keep_their_nice(procs, attrs_bin, tmp_path, words, expect):
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, *words)
    before, _ = report(p.pid, out)
    assert expect in before and "nice=5" in before, before
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before


@pytest.mark.parametrize("kernel", ["restore-ids", "placeholders"])
def test_posix_timers_same_ids_and_keep_firing(procs, attrs_bin, tmp_path, monkeypatch, kernel):
    """With PR_TIMER_CREATE_RESTORE_IDS (this kernel), and as on a kernel
    without it (6.1, 6.12: placeholder timers fill the gap at ID 1). The
    report includes PR_TIMER_CREATE_RESTORE_IDS_GET: the mode is off again."""
    if kernel == "placeholders":
        monkeypatch.setattr(posixtimers, "restore_ids_supported", lambda task: False)
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "timers")
    before, _ = report(p.pid, out)
    with open(f"/proc/{p.pid}/timers") as f:
        proc_before = f.read()
    # IDs 0, 2, 3, 4 exist, 1 was deleted (a gap); 2 is stopped, 3 is SIGEV_NONE
    assert [t["id"] for t in posixtimers.parse(proc_before)] == [0, 2, 3, 4]
    assert "t0=ok:0.500000000:armed" in before and "t2=ok:0.000000000:disarmed" in before
    assert "t3=ok:7.000000000:armed" in before and "t1=Invalid argument" in before
    n = len(fires(out))
    # Dump right after an expiry: the next is ~500 ms away, the freeze is short.
    wait_for(lambda: len(fires(out)) > n, what="timer A firing")
    n_dumped = fires(out)[-1]["n"]
    dump_restore(p, str(tmp_path / "img"), procs)
    with open(f"/proc/{p.pid}/timers") as f:
        assert f.read() == proc_before
    after, _ = report(p.pid, out)
    assert after == before
    # It keeps firing: same timer ID, same signal value, si_code SI_TIMER.
    wait_for(lambda: fires(out)[-1]["n"] >= n_dumped + 2, timeout=5, what="two more expiries after restore")
    for f in fires(out):
        assert (f["id"], f["val"], f["code"]) == ("0", "0xabc", "-2"), f
    # The SIGEV_NONE timer kept its remaining time (less than 1000 s, armed).
    dyn_spec = _timer_spec(p.pid, 3)
    assert dyn_spec[0] == 7 and 0 < dyn_spec[2] <= 1000000 // 1000


def _timer_spec(pid: int, tid: int):
    from engine.task import Task
    from engine.dump import _scratch, _syscall_in_vdso
    from engine import procfs
    t = Task.seize(pid)
    try:
        vmas = procfs.Proc(pid).maps()
        t.syscall_ip = _syscall_in_vdso(t, vmas)
        scr = _scratch(t, vmas)
        saved = t.read_mem(scr, 32)
        t.call("timer_gettime", tid, scr)
        spec = list(posixtimers.ITIMERSPEC.unpack(t.read_mem(scr, 32)))
        t.write_mem(scr, saved)
        return spec
    finally:
        t.release()


def test_seccomp_filters_reinstalled_in_order_with_flags(procs, attrs_bin, tmp_path):
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "seccomp", "seccomp2")
    before, _ = report(p.pid, out)
    # The newer filter (EACCES, 13) wins over the older (EPERM): order shows.
    assert "seccomp=2" in before and "getppid_errno=13" in before and "nnp=0" in before
    filters_before = _filters(p.pid)
    assert len(filters_before["filters"]) == 2 and filters_before["filters"][1]["flags"] == 2
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before
    assert _filters(p.pid) == filters_before
    with open(f"/proc/{p.pid}/status") as f:
        assert re.search(r"Seccomp_filters:\s+2\n", f.read())


def test_seccomp_restore_needs_suspend_rights():
    assert seccomp_mod.validate({"mode": 0, "filters": []}) == []
    assert seccomp_mod.validate({"mode": 1, "filters": []}) == []     # ckpt runs as root, unfiltered here


def _filters(pid: int) -> dict:
    from engine.task import Task
    t = Task.seize(pid)
    try:
        return seccomp_mod.dump(pid, 2)
    finally:
        t.release()


def test_everything_at_once_and_twice(procs, attrs_bin, tmp_path):
    """All of it in one process, dumped and restored twice (a restored
    process carries the attributes into its next image)."""
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "nice5", "batch", "cpu0", "oom321", "slack", "pers", "nnp", "timers",
              "seccomp", "seccomp2")
    before, _ = report(p.pid, out)
    assert "getppid_errno=13" in before and "nnp=1" in before
    n = len(fires(out))
    wait_for(lambda: len(fires(out)) > n, what="timer A firing")
    dump_restore(p, str(tmp_path / "img1"), procs)
    assert report(p.pid, out)[0] == before
    pid = p.pid
    n = len(fires(out))
    wait_for(lambda: len(fires(out)) > n, what="timer A firing after the first restore")
    dump(pid, str(tmp_path / "img2"), Options())
    procs.reap(pid)
    procs.pids.remove(pid)
    restore(str(tmp_path / "img2"), Options())
    procs.adopt(pid)
    assert report(pid, out)[0] == before
    n = fires(out)[-1]["n"]
    wait_for(lambda: fires(out)[-1]["n"] >= n + 2, timeout=5, what="expiries after the second restore")
    with open(tmp_path / "img2" / "core.json") as f:
        core = json.load(f)
    assert [t["id"] for t in core["posix_timers"]] == [0, 2, 3, 4]


def test_affinity_this_machine_cannot_honour_is_refused(procs, attrs_bin, tmp_path, monkeypatch):
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "cpu0")
    dump(p.pid, str(tmp_path / "img"), Options())
    p.wait()
    monkeypatch.setattr(sched, "allowed_cpus", lambda: [1, 2, 3])   # "another machine" without CPU 0
    with pytest.raises((Refusal, Refusals)) as e:
        restore(str(tmp_path / "img"), Options())
    rs = e.value.refusals if isinstance(e.value, Refusals) else [e.value]
    assert [r.reason for r in rs] == ["sched"] and "CPUs 0 are not available" in rs[0].message
    assert not os.path.exists(f"/proc/{p.pid}")     # refused before any process existed


def test_nonzero_timer_overrun_is_refused_and_target_unharmed(procs, attrs_bin, tmp_path):
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "overrun")
    static, _ = report(p.pid, out)
    assert re.search(r"t0=ok:0\.001000000:armed:ovr[1-9]", static), static
    # the timer's own signal may be pending too (refused beside it): one or several refusals
    with pytest.raises((Refusal, Refusals)) as e:
        dump(p.pid, str(tmp_path / "img"), Options())
    refusals = getattr(e.value, "refusals", [e.value])
    assert any(r.reason == "unsupported-state" and "overrun count of" in r.message for r in refusals), refusals
    # unharmed: the same report, but for the overrun of the latest expiry, which
    # changes on its own with each delivery of the (1 ms, always late) timer
    same = lambda text: re.sub(r"ovr\d+", "ovr*", text)  # noqa: E731
    assert same(report(p.pid, out)[0]) == same(static)
    assert not os.path.exists(tmp_path / "img")


def test_timers_of_unknown_clocks_or_other_targets_are_refused():
    text = ("ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.42\nClockID: -46\n"
            "ID: 1\nsignal: 14/0000000000000abc\nnotify: signal/tid.43\nClockID: 1\n"
            "ID: 2\nsignal: 35/00000000000000ff\nnotify: none/pid.42\nClockID: 7\n")
    ts = posixtimers.parse(text)
    assert [(t["id"], t["clock"], t["notify"], t["tid"], t["value"]) for t in ts] == [
        (0, -46, "signal", False, 0), (1, 1, "signal", True, 0xabc), (2, 7, "none", False, 0xff)]
    rs = posixtimers.check(42, ts)
    assert [r.reason for r in rs] == ["unsupported-state", "unsupported-state"]
    assert "timer 0: clock -46" in rs[0].message and "timer 1: notifies signal to tid 43" in rs[1].message
    ts[2]["spec"] = [0, 0, 5, 0]
    assert posixtimers.sigevent(ts[2], 42) == bytes.fromhex("ff00000000000000" "23000000" "01000000") + bytes(48)
    assert posixtimers.validate([{"id": 3}, {"id": 1}]) == []


def test_cpu_lists(monkeypatch):
    assert sched.cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert sched.parse_cpu_list("0-2,5,7-8\n") == [0, 1, 2, 5, 7, 8]
    rec = {"attr": {"policy": 1, "flags": 0, "priority": 3}, "nice": 5, "affinity": [0, 4096],
           "oom_score_adj": 1000, "timerslack_ns": 0}
    assert [r.reason for r in sched.validate(rec)] == ["sched"]
    monkeypatch.setattr(sched, "_my_caps", lambda: 0)     # no CAP_SYS_NICE, no CAP_SYS_RESOURCE
    rs = sched.validate(dict(rec, oom_score_adj=-1000))
    assert [r.reason for r in rs] == ["sched", "capability", "capability"]
    assert "CAP_SYS_NICE" in rs[1].message and "CAP_SYS_RESOURCE" in rs[2].message


@pytest.mark.parametrize("arch, header", [("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
                                          ("aarch64", "/usr/include/asm-generic/unistd.h")])
def test_syscall_numbers_match_the_kernel_headers(arch, header):
    import importlib
    if not os.path.exists(header):
        pytest.skip(f"no {header}")
    table = importlib.import_module(f"engine.arch.{arch}").SYS
    with open(header) as f:
        nums = dict(re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b", f.read()))
    for name, nr in table.items():
        assert name in nums and int(nums[name]) == nr, (arch, name, nr, nums.get(name))


def test_filters_that_kill_injected_calls_do_not_kill_the_dump_or_restore(procs, attrs_bin, tmp_path):
    """getitimer, sigaltstack, rseq and munmap are injected by the dump or
    the restore after the filters are in: PTRACE_O_SUSPEND_SECCOMP keeps
    them from the filter, which acts again once the process runs."""
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "seccomp", "seccompkill", "timers")
    before, _ = report(p.pid, out)
    filters_before = _filters(p.pid)
    assert len(filters_before["filters"]) == 5
    n = len(fires(out))
    wait_for(lambda: len(fires(out)) > n, what="timer A firing")
    dump_restore(p, str(tmp_path / "img"), procs)
    assert report(p.pid, out)[0] == before
    assert _filters(p.pid) == filters_before


def test_strict_mode_restored(procs, attrs_bin, tmp_path):
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "strict")
    with open(f"/proc/{p.pid}/status") as f:
        assert re.search(r"Seccomp:\s+1\n", f.read())
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: _lines(out, "strict alive"), what="the strict target's line")
    dump_restore(p, str(tmp_path / "img"), procs)
    with open(f"/proc/{p.pid}/status") as f:
        assert re.search(r"Seccomp:\s+1\n", f.read())
    os.kill(p.pid, signal.SIGUSR1)
    wait_for(lambda: len(_lines(out, "strict alive")) == 2, what="a line from the restored strict target")
    # A forbidden call still kills it: strict mode acts.
    os.kill(p.pid, signal.SIGUSR2)
    wpid, status = os.waitpid(p.pid, 0)       # reparented to us, the subreaper
    procs.pids.remove(p.pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_io_priority_dump_filter_thp_subreaper_keepcaps_mce_dumpable(procs, attrs_bin, tmp_path):
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "ioidle", "cdf", "nothp", "subreaper", "keepcaps", "mceearly", "undumpable")
    before, _ = report(p.pid, out)
    for want in ("ioprio=24576 ", "cdf=00000007 ", "thp_off=1 ", "subreaper=1 ", "keepcaps=1 ", "mce=1 ",
                 "dumpable=0 "):
        assert want in before, (want, before)
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before


def test_a_process_that_dropped_to_nobody_comes_back_dumpable(procs, attrs_bin, tmp_path):
    # The restore's own change of credentials (root -> nobody) resets
    # dumpable to fs.suid_dumpable: the process's /proc files would become
    # root's and its own user could no longer ptrace it.
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "nobody")
    before, _ = report(p.pid, out)
    assert "uid=65534 " in before and "dumpable=1 " in before, before
    assert os.stat(f"/proc/{p.pid}/environ").st_uid == 65534
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before
    assert os.stat(f"/proc/{p.pid}/environ").st_uid == 65534


def test_dumpable_2_only_where_a_change_of_credentials_gives_it(monkeypatch):
    from engine import procattrs
    rec = {"dumpable": 2, "child_subreaper": 0, "keep_caps": 0, "thp_disable": 0, "mce_kill": 2,
           "coredump_filter": 0x33, "tsc": 1, "mdwe": 0, "memory_merge": 0}
    assert procattrs.check_record(rec)
    monkeypatch.setattr(procattrs, "suid_dumpable", lambda: 2)
    assert procattrs.validate(rec, "setid") == []
    (r,) = procattrs.validate(rec, "same")
    assert r.reason == "unsupported-state" and "do not change" in str(r)
    monkeypatch.setattr(procattrs, "suid_dumpable", lambda: 0)
    (r,) = procattrs.validate(rec, "setid")
    assert "fs.suid_dumpable=0" in str(r)
    assert procattrs.validate(dict(rec, dumpable=0), "same") == []
    assert not procattrs.check_record(dict(rec, dumpable=3))
    assert not procattrs.check_record(dict(rec, coredump_filter=True))


@pytest.mark.parametrize("word, want", [("interleave", "mpol=0x8003:1 "), ("preferred", "mpol=0x4001:1 ")])
def test_numa_memory_policy_restored_with_its_flags(procs, attrs_bin, tmp_path, word, want):
    """`numactl --interleave`/`--preferred`: the process's own policy, mode
    flags (static, relative nodes) and nodes; the original that carried on
    after --leave-running keeps its own too (the read is the process's)."""
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, word)
    before, _ = report(p.pid, out)
    assert want in before, before
    dump(p.pid, str(tmp_path / "lr"), Options(leave_running=True))
    assert report(p.pid, out)[0] == before
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before


def test_a_mapping_with_its_own_numa_policy_is_refused_and_target_unharmed(procs, attrs_bin, tmp_path):
    # mbind's policy lives in the mapping; with a process policy too
    # (interleave), numa_maps shows it on every mapping and only the
    # process itself can tell them apart.
    for words in (("mbind",), ("interleave", "mbind")):
        out = str(tmp_path / f"out{len(words)}.txt")
        p = start(procs, attrs_bin, out, *words)
        before, _ = report(p.pid, out)
        img = str(tmp_path / f"img{len(words)}")
        with pytest.raises(Refusal) as e:
            dump(p.pid, img, Options())
        assert e.value.reason == "numa-policy" and "policy of its own (mbind: bind" in e.value.message, e.value
        assert report(p.pid, out)[0] == before
        assert not os.path.exists(img)


def test_numa_policy_on_nodes_not_allowed_here_is_refused(monkeypatch):
    from engine import mempolicy
    monkeypatch.setattr(mempolicy, "allowed_nodes", lambda: 0b1)
    assert mempolicy.validate([3, 0b1]) == [] and mempolicy.validate([3 | 1 << 15, 0b110]) == []
    (r,) = mempolicy.validate([2, 0b101])
    assert r.reason == "numa-policy" and "nodes 2 that are not allowed" in r.message
    assert not mempolicy.check_record([9, 1]) and not mempolicy.check_record([3, -1]) and mempolicy.check_record([0, 0])


def test_tsc_faulting_ksm_merge_any_and_mdwe_restored(procs, attrs_bin, tmp_path):
    """rdtsc faulting (PR_SET_TSC, rr and sandboxes), KSM merge-any
    (PR_SET_MEMORY_MERGE, 6.4) and memory-deny-write-execute (PR_SET_MDWE,
    6.3: set last by the restore, which itself maps; the dump's batch falls
    back to one read at a time under it): each came back off. The original
    after --leave-running keeps them."""
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "tscsegv", "ksm", "mdwe")
    before, _ = report(p.pid, out)
    for want in ("tsc=2 ", "mdwe=1 ", "ksm=1 "):
        assert want in before, (want, before)
    dump(p.pid, str(tmp_path / "lr"), Options(leave_running=True))
    assert report(p.pid, out)[0] == before
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before


def test_cpuid_faulting_is_refused_and_older_records_read_as_defaults(tmp_path):
    from engine import procattrs
    got = {"dumpable": 1, "child_subreaper": 0, "securebits": 0, "thp_disable": 0, "mce_kill": 2, "cpuid": 0}
    with pytest.raises(Refusal) as e:
        procattrs.dump(os.getpid(), dict(got))
    assert e.value.reason == "unsupported-state" and "CPUID faulting" in e.value.message
    rec = procattrs.dump(os.getpid(), dict(got, cpuid=1))
    assert (rec["tsc"], rec["mdwe"], rec["memory_merge"]) == (1, 0, 0)   # reads this kernel lacks: the defaults
    old = {k: v for k, v in rec.items() if k not in ("tsc", "mdwe", "memory_merge")}
    assert not procattrs.check_record(old)
    procattrs.older(old)
    assert procattrs.check_record(old) and old == rec


def test_sysv_semaphore_with_a_possible_undo_is_refused_and_target_unharmed(procs, attrs_bin, tmp_path):
    """Its SEM_UNDO adjustment cannot be seen or restored, and the dump's
    kill would apply it: the restored process would find the semaphore
    back at 0 while it believes it raised it."""
    from engine import sysvsem
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "semundo")
    sems = sysvsem.last_operated_by(p.pid)
    assert len(sems) == 1, sems
    try:
        before, _ = report(p.pid, out)
        for opts in (Options(), Options(leave_running=True)):
            img = str(tmp_path / f"img{opts.leave_running}")
            with pytest.raises(Refusal) as e:
                dump(p.pid, img, opts)
            assert e.value.reason == "unsupported-state" and f"SysV semaphore {sems[0][0]}#0" in e.value.message
            assert not os.path.exists(img)
        assert report(p.pid, out)[0] == before
        assert _libc.semctl(sems[0][0], 0, 12) == 1      # GETVAL: still raised (the process was not killed)
    finally:
        _libc.semctl(sems[0][0], 0, 0)                   # IPC_RMID


@pytest.mark.parametrize("threads", [1, 2], ids=["one-by-one", "prefetched"])
def test_a_threads_own_numa_policy_restored(procs, attrs_bin, tmp_path, threads):
    """set_mempolicy is per thread: a thread's own policy (bind) beside the
    leader's (interleave); it would come back as the leader's. Two such
    threads are read side by side (threads.prefetch), one alone one by one."""
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "interleave", *["threadpol"] * threads)
    before, _ = report(p.pid, out)
    assert "thread_mpol=0x201 " in before and "mpol=0x8003:1 " in before, before
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before


def test_a_security_label_other_than_ckpts_is_refused(monkeypatch):
    """No LSM on this host (attr/current: EINVAL) - the labels a kernel
    with AppArmor or SELinux would show, and what ckpt makes of them."""
    from engine import lsm
    labels = {"/proc/self/attr/current": "unconfined", "/proc/7/attr/current": "unconfined"}
    monkeypatch.setattr(lsm, "_read", labels.get)
    lsm.check(7)
    labels["/proc/7/attr/current"] = "/usr/sbin/cupsd (enforce)"
    with pytest.raises(Refusal) as e:
        lsm.check(7)
    assert e.value.reason == "unsupported-state" and "cupsd (enforce)" in e.value.message
    labels["/proc/7/attr/current"] = "unconfined"
    labels["/proc/7/attr/exec"] = "sandboxed"
    with pytest.raises(Refusal, match="attr/exec"):
        lsm.check(7)
    labels["/proc/7/attr/exec"] = ""
    lsm.check(7)
    # and the real files of this kernel: unreadable (no LSM) or equal for ckpt itself
    monkeypatch.undo()
    lsm.check(os.getpid())


@pytest.mark.parametrize("kernel", ["get-registrations", "probed"])
def test_membarrier_registrations_restored(procs, attrs_bin, tmp_path, monkeypatch, kernel):
    """Without them the restored process's next expedited membarrier fails
    with EPERM. Read with GET_REGISTRATIONS (6.3+), and as on an older
    kernel: each private command issued from inside (0 or EPERM)."""
    from engine import membarrier
    if kernel == "probed":
        monkeypatch.setattr(membarrier, "_HERE", [(False, membarrier._here()[1])])
    out = str(tmp_path / "out.txt")
    p = start(procs, attrs_bin, out, "membarrier")
    before, _ = report(p.pid, out)
    assert "mb=0:0 " in before, before
    dump(p.pid, str(tmp_path / "lr"), Options(leave_running=True))
    assert report(p.pid, out)[0] == before
    with open(tmp_path / "lr" / "core.json") as f:
        assert json.load(f)["membarrier"] == 16 | 64
    dump_restore(p, str(tmp_path / "img"), procs)
    after, _ = report(p.pid, out)
    assert after == before
    # and a process that registered nothing: EPERM before and after
    out2 = str(tmp_path / "out2.txt")
    q = start(procs, attrs_bin, out2)
    assert "mb=-1:-1 " in report(q.pid, out2)[0]
    dump_restore(q, str(tmp_path / "img2"), procs)
    assert "mb=-1:-1 " in report(q.pid, out2)[0]


def test_io_flusher_read_per_thread_refused_when_mixed_and_queued_before_the_threads(monkeypatch):
    """PR_SET_IO_FLUSHER is each thread's task flags (this host's root cannot
    set it: no CAP_SYS_RESOURCE; scenarios/process/io-flusher.yaml restores
    one in the guests): read from every thread's stat, a thread unlike the
    leader refused, set in the process before its threads are cloned, and
    refused before anything is made where ckpt could not set it."""
    from engine import procattrs
    pid, other = os.getpid(), os.getpid() + 1
    both, noio = procattrs.PF_IO_FLUSHER, procattrs.PF_MEMALLOC_NOIO
    for flags, want in (({pid: both | 0x40, other: both}, 1), ({pid: 0x40, other: noio}, 0)):
        assert procattrs.io_flusher(pid, flags) == want
    with pytest.raises(Refusal) as e:
        procattrs.io_flusher(pid, {pid: both, other: noio})
    assert e.value.reason == "threads" and f"thread {other} is not an I/O flusher" in e.value.message

    monkeypatch.setattr(procattrs, "own_io_flusher", lambda: 0)
    rec = {"thp_disable": 0, "child_subreaper": 0, "mce_kill": 2, "tsc": 1, "memory_merge": 0, "dumpable": 1,
           "io_flusher": 1}
    monkeypatch.setattr(procattrs, "_own", lambda key: rec[key])
    calls = []
    procattrs.queue(types.SimpleNamespace(pending=types.SimpleNamespace(add=lambda *a: calls.append(a))), rec)
    assert calls == [("prctl", procattrs.PR_SET_IO_FLUSHER, 1, 0, 0, 0)]
    calls.clear()
    procattrs.queue(types.SimpleNamespace(pending=types.SimpleNamespace(add=lambda *a: calls.append(a))),
                    dict(rec, io_flusher=0))
    assert calls == []
    for can, refused in ((True, False), (False, True)):
        monkeypatch.setattr(procattrs, "can_set_io_flusher", lambda c=can: c)
        got = [r for r in procattrs.validate(rec, "") if "I/O flusher" in r.message]
        assert bool(got) == refused and all(r.reason == "capability" for r in got)
    assert not procattrs.validate(dict(rec, io_flusher=0), "")


def test_io_flusher_refused_at_the_dump_where_the_restore_could_not_set_it(monkeypatch):
    """The dump's pre-flight refuses it while the target is unharmed when
    ckpt lacks CAP_SYS_RESOURCE (a restore by this ckpt would refuse)."""
    from engine import check, procattrs, procfs
    got = []
    s = types.SimpleNamespace(stat={"flags": procattrs.PF_IO_FLUSHER, "session": None}, memo={}, pid=os.getpid(),
                              proc=procfs.Proc(os.getpid()), refuse=lambda what, area, r: got.append(r))
    for eff, refused in (("0", True), (f"{1 << 24:x}", False)):
        monkeypatch.setattr(procfs, "self_status", lambda e=eff: {"CapEff": e})
        got.clear()
        check._check_restore_env(s)
        assert [r.reason for r in got if "I/O flusher" in r.message] == (["capability"] if refused else [])
    s.stat["flags"] = procattrs.PF_MEMALLOC_NOIO       # memalloc_noio_save alone is not the flag
    monkeypatch.setattr(procfs, "self_status", lambda: {"CapEff": "0"})
    got.clear()
    check._check_restore_env(s)
    assert not [r for r in got if "I/O flusher" in r.message]


def test_a_core_scheduling_cookie_is_refused(monkeypatch):
    """No kernel here has core scheduling on SMT (PR_SCHED_CORE_GET fails:
    no task can have a cookie); where one does, a thread with a cookie is
    refused rather than restored sharing cores with anything."""
    from engine import libc, procattrs
    got = {"dumpable": 1, "child_subreaper": 0, "securebits": 0, "thp_disable": 0, "mce_kill": 2, "cpuid": 1}
    assert procattrs.core_sched_cookie([os.getpid()]) == 0
    procattrs.dump(os.getpid(), dict(got))
    calls = []

    def fake(nr, option, cmd, tid, typ, addr):
        calls.append((option, cmd, tid, typ))
        ctypes.c_uint64.from_address(addr).value = 0x5eed if tid == os.getpid() else 0
        return 0
    monkeypatch.setattr(libc, "syscall", fake)
    with pytest.raises(Refusal) as e:
        procattrs.dump(os.getpid(), dict(got))
    assert e.value.reason == "unsupported-state" and f"thread {os.getpid()} has a core scheduling cookie" \
        in e.value.message
    assert (procattrs.PR_SCHED_CORE, 0, os.getpid(), 0) in calls
