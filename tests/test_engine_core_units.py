"""Pure parts of the engine core, fed canned text: /proc parsers, pagemap
decoding, the x86_64 tables, the restart normalisation."""

from __future__ import annotations

import struct

import pytest

from engine import procfs
from engine.arch import for_machine, x86_64
from engine.check import classify_vma, creds_plan
from engine.errors import EngineError, Refusal
from engine.restore import check_core, check_fd_records

STAT = ("4242 (a (b) c) S 1 4242 4242 0 -1 4194560 130 0 0 0 1 2 0 0 20 0 1 0 2222 2666496 300 "
        "18446744073709551615 94000000000000 94000000004000 140720000000000 0 0 0 0 0 0 0 0 0 17 1 "
        "0 0 0 0 0 94000000010000 94000000011000 94000000020000 140720000001000 140720000001100 "
        "140720000001100 140720000002000 0")


def test_stat_parsed_from_the_last_paren():
    st = procfs.parse_stat(STAT)
    assert st["pid"] == 4242 and st["comm"] == "a (b) c"
    assert st["state"] == "S" and st["ppid"] == 1 and st["session"] == 4242
    assert st["start_code"] == 94000000000000 and st["end_code"] == 94000000004000
    assert st["start_stack"] == 140720000000000
    assert st["start_data"] == 94000000010000 and st["start_brk"] == 94000000020000
    assert st["env_end"] == 140720000002000 and st["num_threads"] == 1


def test_maps_with_spaces_and_deleted():
    text = ("55d0c0a00000-55d0c0a01000 r--p 00000000 fe:00 1234  /tmp/with space/prog\n"
            "7f0000000000-7f0000021000 rw-s 00000000 00:01 99  /dev/zero (deleted)\n"
            "7f0000100000-7f0000200000 rw-p 00000000 00:00 0 \n"
            "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n")
    vmas = procfs.parse_maps(text)
    assert vmas[0]["path"] == "/tmp/with space/prog" and vmas[0]["inode"] == 1234
    assert vmas[1]["path"] == "/dev/zero (deleted)" and vmas[1]["perms"] == "rw-s"
    assert vmas[2]["path"] == "" and vmas[2]["end"] - vmas[2]["start"] == 0x100000
    assert [classify_vma(v) for v in vmas] == ["file", "shmem", "anon", "anon"]


def test_vma_kinds_refused_by_name():
    # System V segments: judged by engine/sysvshm.py (tests/test_engine_sysvshm.py)
    assert classify_vma({"path": "/SYSV00000000 (deleted)", "perms": "rw-s", "inode": 5}) == "sysvshm"
    with pytest.raises(Refusal):
        classify_vma({"path": "[uprobes]", "perms": "r-xp", "inode": 0})
    assert classify_vma({"path": "[vdso]", "perms": "r-xp", "inode": 0}) == "special"


def test_smaps_flags_and_fdinfo():
    smaps = ("00400000-00401000 r-xp 00000000 fe:00 1 /bin/x\nSize:  4 kB\nVmFlags: rd ex mr mw me \n"
             "7ffd0000-7ffd1000 rw-p 00000000 00:00 0 [stack]\nRss: 4 kB\nVmFlags: rd wr mr mw me gd ac \n")
    flags = procfs.parse_smaps_flags(smaps)
    assert flags[0x400000] == ["rd", "ex", "mr", "mw", "me"]
    assert "gd" in flags[0x7FFD0000]
    info = procfs.parse_fdinfo("pos:\t4096\nflags:\t02100002\nmnt_id:\t29\nino:\t77\n")
    assert info["pos"] == "4096" and int(info["flags"], 8) & 0o2000000


def test_pagemap_runs():
    P, F = procfs.PM_PRESENT, procfs.PM_FILE_OR_SHARED
    entries = [P, P, 0, procfs.PM_SWAPPED, P | F, P, 0, 0]
    raw = struct.pack("<8Q", *entries)
    assert procfs.pagemap_runs(raw, 0x1000, anon_only=False) == [[0x1000, 2], [0x4000, 3]]
    # private file mapping: only the copy-on-written (bit 61 clear) pages
    assert procfs.pagemap_runs(raw, 0x1000, anon_only=True) == [[0x1000, 2], [0x4000, 1], [0x6000, 1]]


def test_other_arch_is_refused_by_name_not_guessed():
    with pytest.raises(Refusal) as e:
        for_machine("riscv64")
    assert e.value.reason == "unsupported-arch" and "riscv64" in e.value.message


def test_restart_normalisation():
    """Interrupted calls are left for the kernel to restart (or EINTR under a
    handler) at PTRACE_DETACH; a restart block becomes the original call."""
    r = x86_64.Regs()
    # -ERESTARTNOHAND (pause): left as is, orig_rax kept for the kernel's fix-up
    r.orig_rax, r.rax, r.rip = 34, x86_64.u64(-514), 0x1002
    assert x86_64.normalise_restart(r) == "kernel-restart"
    assert (x86_64.s64(r.rax), r.rip, r.orig_rax) == (-514, 0x1002, 34)
    # -ERESTART_RESTARTBLOCK (clock_nanosleep): the original call, re-executed
    # with -ERESTARTNOHAND semantics, never -EINTR
    r.orig_rax, r.rax, r.rip = 230, x86_64.u64(-516), 0x2002
    assert x86_64.normalise_restart(r) == "restart-original"
    assert (x86_64.s64(r.rax), r.rip, r.orig_rax) == (-514, 0x2002, 230)
    # restart_syscall itself cannot be re-executed: image_regs() recovers it first
    r.orig_rax, r.rax = 219, x86_64.u64(-516)
    with pytest.raises(ValueError):
        x86_64.normalise_restart(r)
    # epoll_wait failing with -EINTR because of the freeze: restarted
    r.orig_rax, r.rax = 232, x86_64.u64(-4)
    assert x86_64.normalise_restart(r) == "restart-after-freeze" and x86_64.s64(r.rax) == -514
    # read() that really failed with -EINTR, or finished: left alone
    r.orig_rax, r.rax = 0, x86_64.u64(-4)
    assert x86_64.normalise_restart(r) == "none" and x86_64.s64(r.rax) == -4
    r.orig_rax, r.rax = x86_64.u64(-1), 7
    assert x86_64.normalise_restart(r) == "none" and r.rax == 7


def test_trampoline_layout():
    code = x86_64.CLONE3_TRAMPOLINE
    off = x86_64.TRAMPOLINE_SYSCALL_OFFSET
    assert code[off:off + 2] == x86_64.SYSCALL_INSN
    # jnz over the child's code lands on the final `ret`
    jnz = code.index(b"\x75")
    assert code[jnz + 2 + code[jnz + 1]] == 0xC3 and code[-1] == 0xC3


def test_creds_plan():
    caps0 = {"CapInh": "0" * 16, "CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "000001ffffffffff",
             "CapAmb": "0" * 16}
    root = {"uid": [0] * 4, "gid": [0] * 4, "groups": [],
            "caps": dict(caps0, CapPrm="000001ffffffffff", CapEff="000001ffffffffff")}
    assert creds_plan(root, root) == "same"
    user = {"uid": [1000] * 4, "gid": [1000] * 4, "groups": [1000], "caps": caps0}
    assert creds_plan(user, root) == "setid"
    odd = dict(user, caps=dict(caps0, CapAmb="0000000000000400"))
    with pytest.raises(Refusal):
        creds_plan(odd, root)


def test_structure_checks_refuse_not_crash():
    for bad in ({}, {"pid": "1"}, [], None):
        with pytest.raises(Refusal) as e:
            check_core(bad)
        assert e.value.reason == "image-invalid"
    for bad in ({}, [{"fd": 1}], [{"fd": 1, "kind": "x", "cloexec": False}, {"fd": 1, "kind": "x", "cloexec": 0}],
                [{"fd": 3, "kind": "x", "cloexec": True, "dup_of": 9}]):
        with pytest.raises(Refusal):
            check_fd_records(bad)


def test_limits_parsed_in_rlimit_order():
    text = ("Limit                     Soft Limit           Hard Limit           Units     \n"
            "Max cpu time              unlimited            unlimited            seconds   \n"
            "Max file size             unlimited            unlimited            bytes     \n"
            "Max data size             unlimited            unlimited            bytes     \n"
            "Max stack size            8388608              unlimited            bytes     \n"
            "Max core file size        0                    unlimited            bytes     \n"
            "Max resident set          unlimited            unlimited            bytes     \n"
            "Max processes             95706                95706                processes \n"
            "Max open files            1024                 524288               files     \n")
    lim = procfs.parse_limits(text)
    inf = procfs.RLIM_INFINITY
    assert lim[0] == [inf, inf] and lim[3] == [8388608, inf] and lim[4] == [0, inf]
    assert lim[7] == [1024, 524288] and len(lim) == 8


def test_kernel_version_parse():
    from engine.check import kernel_version
    assert kernel_version("6.18.44-fc-v669") == (6, 18)
    assert kernel_version("5.4.0-150-generic") < (5, 13) <= kernel_version("5.13.0")


def test_own_special_block_from_the_special_lines_only():
    """vdsoblock.own parses only ckpt's vdso/vvar lines of
    /proc/self/maps: the same pieces, in the same order, as the whole
    file parsed."""
    from engine import procfs, vdsoblock
    vdsoblock._OWN.clear()
    got = vdsoblock.own()
    with open("/proc/self/maps") as f:
        want = vdsoblock.block(procfs.parse_maps(f.read()))
    assert got == want and any(v["path"] == "[vdso]" for v in got)


def test_vdso_block_fit():
    """vdsoblock.misfit: pieces of ckpt's block at ckpt's distances fit,
    wherever the block is; anything else is named."""
    from engine.vdsoblock import misfit
    P = 4096

    def blk(*pieces):
        return [{"path": n, "start": s, "end": s + z} for n, s, z in pieces]
    mine = blk(("[vvar]", 0x1000 * P, 4 * P), ("[vvar_vclock]", 0x1004 * P, 2 * P), ("[vdso]", 0x1006 * P, 2 * P))
    assert misfit([], mine) is None
    assert misfit(blk(("[vvar]", 0x50 * P, 4 * P), ("[vvar_vclock]", 0x54 * P, 2 * P), ("[vdso]", 0x56 * P, 2 * P)),
                  mine) is None
    assert misfit(blk(("[vvar]", 0x50 * P, 4 * P), ("[vvar_vclock]", 0x54 * P, 2 * P)), mine) is None  # valgrind
    assert misfit(blk(("[vdso]", 0x9 * P, 2 * P)), mine) is None
    assert "apart" in misfit(blk(("[vvar]", 0x50 * P, 4 * P), ("[vdso]", 0x90 * P, 2 * P)), mine)
    assert "gets" in misfit(blk(("[vdso]", 0x9 * P, 3 * P)), mine)
    assert "gets" in misfit(blk(("[vdso]", 0x9 * P, 2 * P)), mine[:2])
    assert "split" in misfit(blk(("[vvar]", 0x50 * P, 2 * P), ("[vvar]", 0x52 * P, 2 * P)), mine)
