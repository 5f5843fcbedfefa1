"""The observable-state diff: what may differ is declared, everything else is named."""

from harness import statediff
from harness.procstate import snapshot


def test_equal_snapshots_have_no_difference():
    s = {"status.SigBlk": "0000000000000200", "fd.3.link": "/w/data", "fd.3.fdinfo.pos": "10"}
    assert statediff.diff(s, dict(s)) == []


def test_an_undeclared_difference_is_named_with_both_values():
    before = {"status.SigBlk": "0000000000000200", "limits.Max open files": "1024 1024 files"}
    after = {"status.SigBlk": "0000000000000000", "limits.Max open files": "1024 1024 files"}
    assert statediff.diff(before, after) == [
        {"field": "status.SigBlk", "before": "0000000000000200", "after": "0000000000000000"}]


def test_a_field_that_appears_or_vanishes_is_a_difference():
    d = statediff.diff({"fd.3.link": "/w/a"}, {"fd.3.link": "/w/a", "fd.4.link": "/w/b"})
    assert d == [{"field": "fd.4.link", "before": "(absent)", "after": "/w/b"}]


def test_new_inode_numbers_of_kernel_objects_are_expected_but_not_a_change_of_kind():
    assert statediff.diff({"fd.3.link": "pipe:[100]"}, {"fd.3.link": "pipe:[200]"}) == []
    assert statediff.diff({"fd.3.link": "pipe:[100]"}, {"fd.3.link": "socket:[200]"})
    assert statediff.diff({"fd.3.link": "anon_inode:[eventfd]"}, {"fd.3.link": "anon_inode:[timerfd]"})
    # a file that still has a name keeps its inode; a recreated ghost or a pipe does not
    assert statediff.diff({"fd.3.link": "/w/a", "fd.3.fdinfo.ino": "12"},
                          {"fd.3.link": "/w/a", "fd.3.fdinfo.ino": "13"})
    assert statediff.diff({"fd.3.link": "/w/a (deleted)", "fd.3.fdinfo.ino": "12"},
                          {"fd.3.link": "/w/a (deleted)", "fd.3.fdinfo.ino": "13"}) == []


def test_conditional_rows_apply_only_under_their_condition():
    before, after = {"fd.3.fdinfo.mnt_id": "20"}, {"fd.3.fdinfo.mnt_id": "21"}
    assert statediff.diff(before, after)
    assert statediff.diff(before, after, {"migrate"}) == []


def test_every_row_gives_a_reason():
    for row in statediff.EXPECTED:
        assert len(row.why) > 20, row.pattern


def test_a_live_snapshot_holds_the_fields_the_diff_relies_on():
    s = snapshot(__import__("os").getpid())
    for key in ("status.SigBlk", "status.SigCgt", "status.Umask", "limits.Max open files", "personality",
                "timerslack_ns", "oom_score_adj", "stat.nice", "stat.policy", "cwd", "exe", "comm", "auxv",
                "status.Cpus_allowed_list", "status.NoNewPrivs", "status.Seccomp", "tids"):
        assert key in s, key
    assert any(k.startswith("maps.") for k in s) and any(k.startswith("fd.") for k in s)


def _maps(*rows):
    out = {}
    for rng, perms, path in rows:
        out.update({f"maps.{rng}.perms": perms, f"maps.{rng}.offset": "00000000", f"maps.{rng}.dev": "00:00",
                    f"maps.{rng}.inode": "0" if not path.startswith("/") else "12", f"maps.{rng}.path": path})
    return out


def test_adjacent_anonymous_mappings_compare_as_one():
    apart = _maps(("7f0000000000-7f0000001000", "rw-p", ""), ("7f0000001000-7f0000003000", "rw-p", ""))
    merged = _maps(("7f0000000000-7f0000003000", "rw-p", ""))
    # a restore may split what was one mapping; the memory is the same
    assert statediff.diff(merged, apart) == []
    assert statediff.diff(apart, apart) == []
    # but not with other permissions, a gap, a name, or a missing piece
    assert statediff.diff(_maps(("7f0000000000-7f0000001000", "rw-p", ""),
                                ("7f0000001000-7f0000003000", "r--p", "")), merged)
    assert statediff.diff(_maps(("7f0000000000-7f0000001000", "rw-p", ""),
                                ("7f0000002000-7f0000003000", "rw-p", "")), merged)
    assert statediff.diff(_maps(("7f0000000000-7f0000001000", "rw-p", "[heap]"),
                                ("7f0000001000-7f0000003000", "rw-p", "")), merged)
    assert statediff.diff(_maps(("7f0000000000-7f0000001000", "rw-p", "")), merged)


def test_neighbours_the_original_kept_apart_must_stay_apart():
    """Two mappings alike in all maps shows, side by side, were two VMAs for
    a reason (their anon_vmas: an mremap across them fails EFAULT): merged
    by a restore, the seam is named; kept, nothing differs. Only the seams
    the original had: a third piece split off after is not judged."""
    two = _maps(("7f0000000000-7f0000001000", "rw-p", ""), ("7f0000001000-7f0000003000", "rw-p", ""))
    one = _maps(("7f0000000000-7f0000003000", "rw-p", ""))
    assert statediff.diff(two, one) == [{"field": "maps.7f0000000000-7f0000003000.apart",
                                         "before": "7f0000001000", "after": "none: merged into one mapping"}]
    three = _maps(("7f0000000000-7f0000001000", "rw-p", ""), ("7f0000001000-7f0000002000", "rw-p", ""),
                  ("7f0000002000-7f0000003000", "rw-p", ""))
    assert statediff.diff(two, three) == []
    assert statediff.diff(three, two) == [{"field": "maps.7f0000000000-7f0000003000.apart",
                                           "before": "7f0000001000 7f0000002000", "after": "7f0000001000"}]
    # a real pair: written apart, moved side by side (different anon_vmas)
    import ctypes
    import os
    from harness import procstate, sysapi
    lo, n = sysapi.mmap_apart(8 * 4096)
    try:
        snap = procstate.snapshot(os.getpid())
        seams = statediff.kept_apart(snap)
        assert any(lo + n // 2 in at for at in seams.values()), (hex(lo), seams)
        assert sysapi.mremap_errno(lo, n, n + 4096) == 14          # EFAULT: two VMAs
    finally:
        ctypes.CDLL(None).munmap(ctypes.c_void_p(lo - 4096), ctypes.c_size_t(n + 2 * 4096))


def test_madvise_advice_is_compared_per_mapping_and_keeps_neighbours_apart():
    import mmap
    import os
    from harness import procstate, sysapi
    m = mmap.mmap(-1, 8 * 4096)
    addr = __import__("ctypes").addressof(__import__("ctypes").c_char.from_buffer(m))
    try:
        sysapi.madvise(addr, 4 * 4096, sysapi.MADVISE["dontdump"])
        snap = procstate.snapshot(os.getpid())
        lo = f"{addr:x}"
        hit = [k for k in snap if k.startswith(f"maps.{lo}-") and k.endswith(".advice")]
        assert hit and snap[hit[0]] == "dd", hit
    finally:
        m.close()
    half = _maps(("7f0000000000-7f0000001000", "rw-p", ""), ("7f0000001000-7f0000003000", "rw-p", ""))
    half["maps.7f0000000000-7f0000001000.advice"] = "dd"
    merged = _maps(("7f0000000000-7f0000003000", "rw-p", ""))
    # advice lost: named; neighbours under other advice are not one mapping
    fields = {d["field"] for d in statediff.diff(half, merged)}
    assert "maps.7f0000000000-7f0000001000.advice" in fields and "maps.7f0000000000-7f0000003000.perms" in fields
    both = dict(merged, **{"maps.7f0000000000-7f0000003000.advice": "dd"})
    split = dict(half, **{"maps.7f0000001000-7f0000003000.advice": "dd"})
    assert statediff.diff(both, split) == []
    assert [d["field"] for d in statediff.diff(split, both)] == ["maps.7f0000000000-7f0000003000.apart"]


def test_each_thread_is_in_the_snapshot_and_a_changed_thread_is_named(tmp_path):
    """thread.TID.*: a thread's own mask, state and tracer are compared, so
    a thread restored with another mask (or left stopped) is corruption."""
    import os
    import subprocess
    import sys
    import time
    code = ("import signal, threading, time\n"
            "def f():\n"
            "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})\n"
            "    time.sleep(60)\n"
            "threading.Thread(target=f, daemon=True).start()\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], close_fds=True)
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{p.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        snap = snapshot(p.pid)
        tids = snap["tids"].split()
        assert len(tids) == 2
        other = [t for t in tids if t != str(p.pid)][0]
        assert int(snap[f"thread.{other}.SigBlk"], 16) & (1 << 11)           # SIGUSR2 in that thread only
        assert not int(snap[f"thread.{p.pid}.SigBlk"], 16) & (1 << 11)
        assert snap[f"thread.{other}.state"] == "running" and snap[f"thread.{other}.TracerPid"] == "0"
        after = dict(snap, **{f"thread.{other}.SigBlk": "0000000000000000", f"thread.{other}.state": "stopped"})
        assert {d["field"] for d in statediff.diff(snap, after)} == {f"thread.{other}.SigBlk", f"thread.{other}.state"}
    finally:
        p.kill()
        p.wait()


def test_adjacent_pieces_of_one_file_at_contiguous_offsets_compare_as_one():
    def m(rng, off, path="/lib/x.so", perms="r--p"):
        return {f"maps.{rng}.perms": perms, f"maps.{rng}.offset": off, f"maps.{rng}.dev": "fe:00",
                f"maps.{rng}.inode": "42", f"maps.{rng}.path": path}
    apart = {**m("7f0000000000-7f0000001000", "00021000"), **m("7f0000001000-7f0000002000", "00022000")}
    merged = m("7f0000000000-7f0000002000", "00021000")
    assert statediff.diff(merged, apart) == []
    assert [d["field"] for d in statediff.diff(apart, merged)] == ["maps.7f0000000000-7f0000002000.apart"]
    # not at a gap in the file, nor two files, nor a named mapping next to anonymous memory
    assert statediff.diff({**m("7f0000000000-7f0000001000", "00021000"),
                           **m("7f0000001000-7f0000002000", "00030000")}, merged)
    assert statediff.diff({**m("7f0000000000-7f0000001000", "00021000"),
                           **m("7f0000001000-7f0000002000", "00022000", path="/lib/y.so")}, merged)
    heap = _maps(("7f0000000000-7f0000001000", "rw-p", "[heap]"), ("7f0000001000-7f0000002000", "rw-p", ""))
    assert statediff.diff(heap, _maps(("7f0000000000-7f0000002000", "rw-p", "[heap]")))


def test_o_largefile_added_by_a_restore_is_allowed_and_nothing_else():
    before = {"arch": "x86_64", "fd.4.fdinfo.flags": "02"}
    assert statediff.diff(before, dict(before, **{"fd.4.fdinfo.flags": "0100002"})) == []
    got = statediff.diff(before, dict(before, **{"fd.4.fdinfo.flags": "02000002"}))    # O_CLOEXEC
    assert [d["field"] for d in got] == ["fd.4.fdinfo.flags"]
    arm = {"arch": "aarch64", "fd.4.fdinfo.flags": "02"}
    assert statediff.diff(arm, dict(arm, **{"fd.4.fdinfo.flags": "0400002"})) == []
    assert statediff.diff(arm, dict(arm, **{"fd.4.fdinfo.flags": "0100002"})) != []    # O_NOFOLLOW there


def test_a_programs_view_keeps_what_it_does_not_change_by_itself():
    before = {"arch": "x86_64", "auxv": "aa", "limits.Max open files": "1024 4096", "status.SigBlk": "0",
              "status.Umask": "0022", "fd.3.link": "/x", "fd.3.fdinfo.pos": "10", "fd.3.fdinfo.flags": "02",
              "fd.5.link": "socket:[1]", "thread.7.Name": "w", "thread.7.SigBlk": "0",
              "maps.1000-2000.perms": "r-xp", "maps.1000-2000.path": "/lib/x.so",
              "maps.1000-2000.offset": "0", "maps.1000-2000.dev": "fe:00", "maps.1000-2000.inode": "5",
              "maps.5000-6000.perms": "rw-p", "maps.5000-6000.path": "", "maps.5000-6000.offset": "0",
              "maps.5000-6000.dev": "00:00", "maps.5000-6000.inode": "0"}
    after = dict(before, **{"status.SigBlk": "4", "fd.3.fdinfo.pos": "99", "thread.7.SigBlk": "4",
                            "maps.5000-6000.perms": "r--p", "fd.9.link": "socket:[2]"})
    del after["fd.5.link"]
    b, a = statediff.program_view(before, after)
    assert statediff.diff(b, a) == []         # what a running program changes, and fds only one side has
    for field, value in (("auxv", "bb"), ("limits.Max open files", "1 1"), ("status.Umask", "0077"),
                         ("fd.3.fdinfo.flags", "04002"), ("thread.7.Name", "python3"),
                         ("maps.1000-2000.perms", "rwxp")):
        b, a = statediff.program_view(before, dict(after, **{field: value}))
        assert [d["field"] for d in statediff.diff(b, a)] == [field], field


def test_a_sysv_segment_with_another_id_is_a_difference():
    """A System V mapping's inode number is its shmid, which a restore keeps
    (engine/sysvshm.py): unlike a recreated deleted file, always named
    "(deleted)", another id is a difference the judge names."""
    def seg(shmid):
        return {"maps.7f00-7f10.perms": "rw-s", "maps.7f00-7f10.offset": "00000000",
                "maps.7f00-7f10.dev": "00:01", "maps.7f00-7f10.inode": shmid,
                "maps.7f00-7f10.path": "/SYSV00000000 (deleted)"}
    assert statediff.diff(seg("5"), seg("5")) == []
    assert statediff.diff(seg("5"), seg("6")) == [{"field": "maps.7f00-7f10.inode", "before": "5", "after": "6"}]
    deleted = {k: v.replace("/SYSV00000000", "/w/a") for k, v in seg("5").items()}
    assert statediff.diff(deleted, dict(deleted, **{"maps.7f00-7f10.inode": "6"})) == []


def test_fds_sharing_an_open_file_are_seen_from_outside(tmp_path):
    """Every fd, not a scenario's only: stdout and stderr on one open file
    (kcmp), and the two opens of one file kept apart."""
    import os
    import subprocess
    with open(tmp_path / "out", "a") as out:
        p = subprocess.Popen(["sh", "-c", "exec 5<out 6<out; exec sleep 60"], cwd=str(tmp_path),
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, close_fds=True)
    try:
        import time
        for _ in range(200):
            if os.path.exists(f"/proc/{p.pid}/fd/6") and os.readlink(f"/proc/{p.pid}/exe").endswith("sleep"):
                break
            time.sleep(0.01)
        assert snapshot(p.pid)["fd_sharing"] == "1=2"
    finally:
        p.kill()
        p.wait()


def test_a_programs_fd_sharing_is_judged_on_the_fds_both_looks_hold():
    before = {"fd.1.link": "/o", "fd.2.link": "/o", "fd.5.link": "/x", "fd_sharing": "1=2 5=7"}
    after = {"fd.1.link": "/o", "fd.2.link": "/o", "fd.5.link": "/x", "fd_sharing": "1=2"}
    assert statediff.diff(*statediff.program_view(before, after)) == []
    split = dict(after, fd_sharing="")
    assert statediff.diff(*statediff.program_view(before, split)) == \
        [{"field": "fd_sharing", "before": "1=2", "after": ""}]
