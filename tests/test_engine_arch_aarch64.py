"""Pure tests of engine/arch/aarch64.py: tables, instruction encodings,
register records and the extra-regset blob. (The real thing, on an arm64
kernel, is tests/test_engine_aarch64_guest.py.)"""

from __future__ import annotations

import ctypes
import struct

import pytest

from engine.arch import aarch64 as a64
from engine.arch import for_machine, x86_64
from engine.errors import Refusal

# The per-arch interface engine/task.py, dump.py and build.py call.
INTERFACE = ("MACHINE", "PAGE", "TASK_SIZE", "RED_ZONE", "SYSCALL_INSN", "GADGET", "NT_PRSTATUS",
             "SYS", "Regs", "CloneArgs", "CLONE3_TRAMPOLINE", "TRAMPOLINE_SYSCALL_OFFSET",
             "get_regs", "set_regs", "stack_pointer", "pc", "find_syscall", "set_syscall", "retval",
             "normalise_restart", "get_xstate", "set_xstate", "xstate_features", "xstate_mismatch",
             "describe_cpu_state", "s64", "u64",
             "BATCH_BLOB", "BATCH_TRAP_PC", "BATCH_SI_CODE", "set_batch", "batch_state")


def test_for_machine_selects_aarch64_and_still_refuses_others():
    assert for_machine("aarch64") is a64 and for_machine("x86_64") is x86_64
    with pytest.raises(Refusal) as e:
        for_machine("riscv64")
    assert e.value.reason == "unsupported-arch"


@pytest.mark.parametrize("mod", [a64, x86_64], ids=["aarch64", "x86_64"])
def test_both_arches_offer_the_same_interface(mod):
    missing = [n for n in INTERFACE if not hasattr(mod, n)]
    assert not missing


def test_syscall_table_is_asm_generic_and_covers_x86s_names():
    # include/uapi/asm-generic/unistd.h, checked by hand.
    known = {"openat": 56, "close": 57, "lseek": 62, "mmap": 222, "munmap": 215, "mremap": 216,
             "mprotect": 226, "brk": 214, "rt_sigaction": 134, "rt_sigprocmask": 135,
             "sigaltstack": 132, "prctl": 167, "dup3": 24, "set_tid_address": 96,
             "set_robust_list": 99, "get_robust_list": 100, "rseq": 293, "clone3": 435,
             "getpid": 172, "kill": 129, "madvise": 233, "ptrace": 117, "exit_group": 94,
             "getitimer": 102, "setitimer": 103, "fchdir": 50, "umask": 166, "personality": 92,
             "setsid": 157, "setpgid": 154, "setgroups": 159, "setresuid": 147, "setresgid": 149,
             "close_range": 436, "prlimit64": 261, "timer_create": 107, "timer_gettime": 108,
             "timer_getoverrun": 109, "timer_settime": 110, "timer_delete": 111, "sched_setaffinity": 122,
             "sched_getaffinity": 123, "sched_setattr": 274, "sched_getattr": 275, "seccomp": 277,
             "mbind": 235, "get_mempolicy": 236, "set_mempolicy": 237, "membarrier": 283,
             "capset": 91, "setfsuid": 151, "setfsgid": 152, "chroot": 51}
    assert {k: a64.SYS[k] for k in known} == known
    # Every name the engine injects on x86_64 exists here too, but for
    # arch_prctl (x86 only: engine/procattrs.py reads CPUID faulting where
    # the table has it)...
    assert set(x86_64.SYS) - {"arch_prctl"} <= set(a64.SYS)
    # ...and no legacy x86-only call sneaks in.
    assert not {"open", "dup2", "arch_prctl", "fork", "pipe"} & set(a64.SYS)
    assert len(set(a64.SYS.values())) == len(a64.SYS)


def test_instruction_encodings():
    assert a64.SYSCALL_INSN == bytes.fromhex("010000d4")             # svc #0
    assert a64.GADGET == bytes.fromhex("010000d4" "000020d4")       # svc #0; brk #0
    assert a64.movz(8, 435) == 0xD2803668                           # mov x8, #435 (as objdump shows)
    assert a64.movz(0, 0) == 0xD2800000
    assert a64.cbnz(0, 8) == 0xB5000040


def _words(code: bytes):
    return list(struct.unpack(f"<{len(code) // 4}I", code))


def test_clone3_trampoline_structure():
    w = _words(a64.CLONE3_TRAMPOLINE)
    assert len(a64.CLONE3_TRAMPOLINE) % 4 == 0
    assert w[0] == a64.movz(8, 435) and w[1] == a64.SVC0
    assert a64.CLONE3_TRAMPOLINE[a64.TRAMPOLINE_SYSCALL_OFFSET:][:4] == a64.SYSCALL_INSN
    # cbnz x0 jumps (parent / error) exactly onto the final `ret`.
    assert w[2] & 0xFF00001F == 0xB5000000
    imm19 = (w[2] >> 5) & 0x7FFFF
    assert 2 + imm19 == len(w) - 1 and w[-1] == a64.RET
    # The child's syscalls, in order: ptrace(TRACEME), getpid, kill(SIGSTOP), exit_group(127).
    nrs = [(x >> 5) & 0xFFFF for x in w[3:] if x & 0xFFE0001F == 0xD2800008]
    assert nrs == [117, 172, 129, 94]
    assert a64.movz(1, 19) in w and a64.movz(0, 127) in w
    # Every movz in the child is followed eventually by an svc; the child never reaches `ret`.
    assert w[-2] == a64.BRK0


def test_find_syscall_only_at_instruction_boundaries():
    svc = a64.SYSCALL_INSN
    assert a64.find_syscall(b"\x00" + svc + b"\x00\x00\x00") == -1
    assert a64.find_syscall(b"\x1f\x20\x03\xd5" + svc) == 4
    assert a64.find_syscall(b"\x00" + svc + b"\x00\x00\x00" + svc) == 8


def test_regs_layout_and_round_trip():
    assert ctypes.sizeof(a64.UserPtRegs) == 272
    r = a64.Regs()
    for i in range(31):
        r.set(f"x{i}", 0x1000 + i)
    r.set("sp", 0xFFFFF000)
    r.set("pc", 0xAAAA0004)
    r.set("pstate", 0x80001000)
    d = r.to_dict()
    assert d["x30"] == 0x1000 + 30 and d["syscallno"] == -1 and len(d) == 35
    back = a64.Regs.from_dict(d)
    assert back.to_dict() == d and a64.stack_pointer(back) == 0xFFFFF000 and a64.pc(back) == 0xAAAA0004
    c = back.copy()
    c.set("x0", 7)
    assert back.x0 == 0x1000 and c.x0 == 7


@pytest.mark.parametrize("bad", [{"x3": -1}, {"pc": 1 << 64}, {"sp": "0"}, {"syscallno": 1 << 40},
                                 {"pstate": True}])
def test_regs_from_dict_rejects_malformed(bad):
    d = a64.Regs().to_dict()
    d.update(bad)
    with pytest.raises(TypeError):
        a64.Regs.from_dict(d)
    d = a64.Regs().to_dict()
    del d["x17"]
    with pytest.raises(KeyError):
        a64.Regs.from_dict(d)


def test_set_syscall_uses_x8_x0_x5_and_forgets_the_syscall():
    r = a64.Regs()
    r.syscallno = 115
    r.set("x6", 66)
    a64.set_syscall(r, 0x4000, a64.SYS["mmap"], [0x10000, 4096, 3, 0x22, -1, 0])
    assert (r.pc, r.x8, r.x0, r.x1, r.x2, r.x3, r.x4, r.x5) == (0x4000, 222, 0x10000, 4096, 3, 0x22,
                                                               (1 << 64) - 1, 0)
    assert r.syscallno == -1 and r.x6 == 66
    r.set("x0", a64.u64(-22))
    assert a64.retval(r) == -22


def test_normalise_restart_leaves_the_kernel_fixed_up_registers_alone():
    # As read at a PTRACE_INTERRUPT stop inside read(): pc already on the svc,
    # x0 already orig_x0 (signal.c do_signal runs the fix-up before get_signal).
    r = a64.Regs()
    r.set("pc", 0x1000)
    r.set("x0", 3)
    r.set("x8", 63)
    assert a64.normalise_restart(r) == "none"
    assert (r.pc, r.x0, r.x8, r.syscallno) == (0x1000, 3, 63, -1)
    r.syscallno = 63
    assert a64.normalise_restart(r) == "forget-syscall" and r.syscallno == -1 and r.pc == 0x1000


# -- the extra-regset blob -----------------------------------------------------

def _rec(nt: int, status: int, data: bytes) -> bytes:
    return struct.pack("<IiI", nt, status, len(data)) + data


def _vec(size: int, vl: int, flags: int) -> bytes:
    return struct.pack("<IIHHHH", size, size, vl, vl, flags, 0)


def blob(sve_flags: int = 0, sve_vl: int = 64, za_size: int = 16, tls: bytes = b"\x11" * 16,
         pac: bool = True) -> bytes:
    return b"".join([
        _rec(a64.NT_PRFPREG, 0, bytes(range(256)) * 2 + b"\x01" * 16),
        _rec(a64.NT_ARM_TLS, 0, tls),
        _rec(a64.NT_ARM_PACA_KEYS, 0, b"\xaa" * 64) if pac else _rec(a64.NT_ARM_PACA_KEYS, 19, b""),
        _rec(a64.NT_ARM_PACG_KEYS, 0, b"\xbb" * 16) if pac else _rec(a64.NT_ARM_PACG_KEYS, 19, b""),
        _rec(a64.NT_ARM_PAC_ENABLED_KEYS, 0, struct.pack("<Q", 15)),
        _rec(a64.NT_ARM_TAGGED_ADDR_CTRL, 0, struct.pack("<Q", 0)),
        _rec(a64.NT_ARM_SVE, 0, _vec(16 + 528, sve_vl, sve_flags)),
        _rec(a64.NT_ARM_SSVE, 22, b""),
        _rec(a64.NT_ARM_ZA, 0, _vec(za_size, 32, 0)),
    ])


def test_blob_parses_and_describes_features():
    sets = a64.parse_xstate(blob())
    assert sets["fpsimd"][0] == 0 and len(sets["fpsimd"][1]) == 528
    assert sets["ssve"] == (22, b"")
    f = a64.xstate_features(blob())
    assert f["regsets"]["paca_keys"] == 64 and f["regsets"]["ssve"] == "absent"
    assert f["sve"] == {"vl": 64, "flags": 0}
    assert a64.xstate_features(b"\x01\x02") == {}
    line = a64.describe_cpu_state(a64.Regs(), blob())
    assert "paca_keys" in line and "fpsimd" in line


@pytest.mark.parametrize("bad", [b"\x01\x00\x00", _rec(0x999, 0, b""),
                                 struct.pack("<IiI", a64.NT_ARM_TLS, 0, 100) + b"\0" * 8],
                         ids=["truncated-header", "unknown-note", "truncated-data"])
def test_malformed_blob_is_an_error(bad):
    with pytest.raises(ValueError):
        a64.parse_xstate(bad)


def test_empty_record_is_well_formed():
    assert a64.parse_xstate(_rec(a64.NT_ARM_TLS, 0, b"")) == {"tls": (0, b"")}


def test_live_sve_or_za_state_is_refused_not_dropped():
    assert a64.live_state_problem(blob()) is None
    why = a64.live_state_problem(blob(sve_flags=a64.SVE_PT_REGS_SVE))
    assert why and "SVE" in why
    with pytest.raises(Refusal) as e:
        a64.describe_cpu_state(a64.Regs(), blob(sve_flags=a64.SVE_PT_REGS_SVE))
    assert e.value.reason == "unsupported-state"
    with pytest.raises(Refusal):
        a64.set_xstate(1, blob(za_size=16 + 32 * 32))      # refused before any ptrace call
    # The liveness bit is not a "setting": it does not make a mismatch.
    assert a64.xstate_features(blob(sve_flags=1))["sve"] == a64.xstate_features(blob())["sve"]


def test_xstate_mismatch():
    here = a64.xstate_features(blob())
    assert a64.xstate_mismatch(here, here) is None
    assert a64.xstate_mismatch(here, {}) is None
    assert "sve" in a64.xstate_mismatch(here, a64.xstate_features(blob(sve_vl=32)))
    assert "tls" in a64.xstate_mismatch(here, a64.xstate_features(blob(tls=b"\x11" * 8)))
    # Keys saved, but this CPU has no pointer authentication: refuse.
    assert "paca_keys" in a64.xstate_mismatch(a64.xstate_features(blob(pac=False)), here)
    # No keys saved (CPU without PAC), restoring on one with: fine.
    assert a64.xstate_mismatch(here, a64.xstate_features(blob(pac=False))) is None
    assert a64.xstate_mismatch({}, here)


def test_x86_64_interface_keeps_its_behaviour():
    r = x86_64.Regs()
    r.rsp, r.rip = 0x7FFF0000, 0x401000
    assert x86_64.stack_pointer(r) == 0x7FFF0000 and x86_64.pc(r) == 0x401000
    assert x86_64.find_syscall(b"\x90\x0f\x05") == 1
    mine = {"xfeatures": 0x7, "size": 832}
    assert x86_64.xstate_mismatch(mine, {"xfeatures": 0x7, "size": 832}) is None
    assert x86_64.xstate_mismatch(mine, {"xfeatures": 0xE7, "size": 2432})


# -- interrupted calls: restart_syscall recovery, pending handlers ---------------

class _FakeTask:
    def __init__(self, regs, at_svc, pre):
        self.orig_regs, self.at_svc, self.pre_freeze = regs, at_svc, pre


def _in_restart(x8=a64.NR_RESTART_SYSCALL):
    r = a64.Regs()
    for i, v in enumerate((0xFFFFFFFA, 0, 0xFFFFC000, 0)):
        r.set(f"x{i}", v)
    r.set("x8", x8)
    r.set("sp", 0xFFFFC000)
    r.set("pc", 0x400100)       # on the svc (rewound by the kernel)
    return r


def _snap(regs, frames):
    return {"nr": a64.NR_RESTART_SYSCALL, "args": [regs.raw.regs[i] for i in range(6)], "sp": regs.raw.sp,
            "pc": regs.raw.pc + 4, "frames": frames}


@pytest.mark.parametrize("frames,call", [
    (["do_cpu_nanosleep", "posix_cpu_nsleep_restart", "invoke_syscall", "el0_svc_common", "el0_svc"],
     "clock_nanosleep"),
    (["futex_do_wait", "futex_wait", "futex_wait_restart", "invoke_syscall", "el0_svc"], "futex"),
    (["invoke_syscall", "el0_svc_common", "do_el0_svc", "el0_svc"], "clock_nanosleep"),   # x0 = clock id
])
def test_image_regs_give_restart_syscall_its_original_call(frames, call):
    r = _in_restart()
    if call == "clock_nanosleep" and "posix" not in frames[1]:
        r.set("x0", 1)          # CLOCK_MONOTONIC: a hrtimer nanosleep restart
    got = a64.image_regs(_FakeTask(r, True, _snap(r, frames)))
    assert got.x8 == a64.SYS[call] and got.x0 == r.x0 and got.pc == r.pc
    assert r.x8 == a64.NR_RESTART_SYSCALL, "the seized registers are not modified"


def test_image_regs_refuse_what_cannot_be_known():
    r = _in_restart()
    with pytest.raises(ValueError):                     # not seen before the freeze
        a64.image_regs(_FakeTask(r, True, None))
    moved = _snap(r, ["futex_wait_restart"])
    moved["pc"] += 8
    with pytest.raises(ValueError):                     # another call site
        a64.image_regs(_FakeTask(r, True, moved))
    with pytest.raises(ValueError):                     # poll has no arm64 syscall
        a64.image_regs(_FakeTask(r, True, _snap(r, ["do_sys_poll", "do_restart_poll"])))
    with pytest.raises(ValueError):                     # unknown kernel function
        a64.image_regs(_FakeTask(r, True, _snap(r, ["mystery_restart", "el0_svc"])))


def test_image_regs_leave_other_registers_alone():
    r = _in_restart()
    assert a64.image_regs(_FakeTask(r, False, None)).x8 == 128     # x8 just a register: not at an svc
    r2 = _in_restart(x8=a64.SYS["clock_nanosleep"])
    assert a64.image_regs(_FakeTask(r2, True, None)).x8 == a64.SYS["clock_nanosleep"]
    assert a64.rewound_call(_FakeTask(r, True, None)) and not a64.rewound_call(_FakeTask(r, False, None))


def test_x86_64_image_regs_give_restart_syscall_its_original_call():
    r = x86_64.Regs()
    r.orig_rax, r.rax, r.rip, r.rsp = 219, x86_64.u64(-516), 0x401002, 0x7FFF0000
    r.rdi, r.rsi, r.rdx = 0x7FFF1000, 1, x86_64.u64(-1)
    snap = {"nr": 219, "args": [r.rdi, r.rsi, r.rdx, 0, 0, 0], "sp": r.rsp, "pc": r.rip,
            "frames": ["poll_schedule_timeout.constprop.0", "do_sys_poll", "do_restart_poll", "do_syscall_64"]}
    got = x86_64.image_regs(_FakeTask(r, False, snap))
    assert got.orig_rax == x86_64.RESTARTED["poll"] == 7 and x86_64.normalise_restart(got) == "restart-original"
    assert x86_64.s64(got.rax) == -514 and got.rip == 0x401002
    snap["frames"] = ["do_syscall_64", "entry_SYSCALL_64_after_hwframe"]     # hrtimer restart, rdi a pointer
    assert x86_64.image_regs(_FakeTask(r, False, snap)).orig_rax == x86_64.SYS["nanosleep"]
    assert not hasattr(x86_64, "rewound_call"), "x86_64 leaves the EINTR-or-restart choice to the kernel"


def test_image_regs_rewind_a_call_the_freeze_made_fail_with_eintr():
    # epoll_pwait(epfd=5, events, 1, -1, NULL, 8) returned -EINTR: pc after the svc, x0 overwritten.
    r = a64.Regs()
    for i, v in enumerate((a64.u64(-4), 0xFFFFB000, 1, a64.u64(-1), 0, 8)):
        r.set(f"x{i}", v)
    r.set("x8", 22)
    r.set("sp", 0xFFFFC000)
    r.set("pc", 0x400104)
    snap = {"nr": 22, "args": [5, 0xFFFFB000, 1, a64.u64(-1), 0, 8], "sp": 0xFFFFC000, "pc": 0x400104,
            "frames": ["ep_poll", "do_epoll_pwait", "invoke_syscall"]}
    t = _FakeTask(r, False, snap)
    t.after_svc = True
    got = a64.image_regs(t)
    assert (got.x0, got.pc, got.x8) == (5, 0x400100, 22) and a64.rewound_call(t)
    # Not seen sleeping there before the freeze (or another call): the EINTR stays.
    for other in (None, dict(snap, args=[5, 0xFFFFB000, 2, a64.u64(-1), 0, 8]), dict(snap, pc=0x400204)):
        t = _FakeTask(r, False, other)
        t.after_svc = True
        got = a64.image_regs(t)
        assert (a64.s64(got.x0), got.pc) == (-4, 0x400104) and not a64.rewound_call(t)


def test_batch_runner_words():
    # engine/batch.py runner, assembled with llvm-mc -triple=aarch64 (see the
    # arch module); the words the protocol rests on, checked by hand.
    words = struct.unpack(f"<{len(a64.BATCH_BLOB) // 4}I", a64.BATCH_BLOB)
    assert words[4] == a64.SVC0 and words[a64.BATCH_TRAP_PC // 4] == a64.BRK0
    assert words[0] == 0xA9400268            # ldp x8, x0, [x19]: nr in x8, arg0 in x0
    assert words[5] == 0xF9001E60            # str x0, [x19, #56]: the result slot
    assert words[-1] == 0x17FFFFFF           # b . - 4: back to the brk
    regs = a64.Regs()
    a64.set_batch(regs, 0x1000, 0x2000, 7)
    assert (regs.raw.pc, a64.batch_state(regs), regs.syscallno) == (0x1000, (0x2000, 7), a64.NO_SYSCALL)
