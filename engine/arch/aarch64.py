"""aarch64 (arm64): user_pt_regs, asm-generic syscall numbers, A64
instructions, and the extra register sets (FP/SIMD, TLS, pointer
authentication keys, tagged-address control, SVE/SME liveness).

Kernel facts this module relies on (arch/arm64/kernel/ptrace.c, signal.c):

- NT_PRSTATUS is struct user_pt_regs {u64 regs[31], sp, pc, pstate}; the
  syscall number the kernel will act on lives apart from it, in
  NT_ARM_SYSTEM_CALL (regs->syscallno; -1 = NO_SYSCALL). :class:`Regs`
  carries both, so saving/restoring "the registers" includes it.
- do_signal() applies the syscall-restart fix-up BEFORE get_signal(), where
  a PTRACE_INTERRUPT stop happens: at that stop x0 is already orig_x0, pc
  already points back at the `svc`, and syscallno is NO_SYSCALL
  (forget_syscall). The registers as dumped therefore re-execute an
  interrupted syscall when resumed in a new process, with no fix-up left to
  do. -ERESTART_RESTARTBLOCK calls are re-executed as the ORIGINAL call (the
  restart_block died with the old process): an absolute clock_nanosleep
  (what CPython's time.sleep uses) ends at the same instant, a *relative*
  nanosleep sleeps its full duration again.
- What do_signal() does NOT leave anywhere ptrace can read is the restart
  code itself (-ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND/
  -ERESTART_RESTARTBLOCK: a local variable, `retval`), which decides, once
  get_signal() returns a signal with a handler, whether the handler sees
  EINTR (pc back after the svc, x0 = -EINTR) or the call restarts after it.
  A new process cannot take that decision again, so a pending handled
  signal is not carried over such a call: at the end of the freeze, still
  at the same stop inside the same do_signal(), the task is let on to that
  signal's delivery stop, the signal passed on with a PTRACE_INTERRUPT
  queued, and the kernel sets up the handler frame with its own decision
  and stops the task before the handler's first instruction
  (engine/task.py Task.settle; :func:`interrupted_call` says when). The
  registers then dumped are at the handler's entry, the frame (with the
  call's outcome and the mask sigsuspend/ppoll saved) in the memory. This
  must happen before the first injected syscall or after_seize() probe:
  both move pc off the restart address, after which the kernel itself no
  longer applies the decision. A handled signal arriving after that point
  (during the survey) over a rewound call is still refused
  (engine/dump.py _handler_problem).
- Releasing the ORIGINAL process (check, --leave-running, a refused dump)
  after injected syscalls needs two repairs, both in :func:`after_seize` /
  :func:`before_release`: the -ERESTART_RESTARTBLOCK decision the kernel
  takes after the stop (x8 = restart_syscall), and live SVE/SME register
  contents, which every syscall entry discards (el0_svc fp_user_discard).
- Extended state is several regsets; :func:`get_xstate` packs them into one
  blob (see there). Live SVE/SME register state is refused
  (`unsupported-state`): only FP/SIMD, TLS and the PAC/tagged-address
  settings are restored. Pointer-authentication keys are random per exec: a
  restored process must get the dumped ones or its first authenticated
  return (Debian builds with -mbranch-protection) faults.
"""

from __future__ import annotations

import ctypes
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

from .. import ptrace
from ..errors import Refusal
from ..libc import SysError

MACHINE = "aarch64"
PAGE = 4096
# VA_BITS=48 (Debian arm64's CONFIG_ARM64_VA_BITS_48; with 52-bit VAs a
# process only gets more than 48 bits when it asks with a high hint).
TASK_SIZE = 1 << 48
# AAPCS64 has no red zone; keep x86_64's 128 bytes of margin anyway (cheap).
RED_ZONE = 128

SVC0 = 0xD4000001      # svc #0
BRK0 = 0xD4200000      # brk #0
RET = 0xD65F03C0       # ret (x30)
SYSCALL_INSN = struct.pack("<I", SVC0)
# The gadget written into a page of the process being restored: `svc #0;
# brk #0` (brk is a tripwire should execution ever fall through).
GADGET = struct.pack("<II", SVC0, BRK0)

# -- batched syscalls (engine/batch.py) ----------------------------------------
# The runner, entered with x19 = the first table entry, x20 = the number of
# entries (> 0); an entry is nr, six args, result (8 u64). It makes each call
# (x8 = nr, x0..x5) and stores x0 in the entry's result slot; at the first
# result in -4095..-1 (cmn x0, #4095 carries) it stops with x19 on that
# entry and x20 not yet counted down; else x19 goes one past the last, x20
# to 0. It ends on `brk #0` (a SIGTRAP reported with pc ON the brk, si_code
# TRAP_BRKPT: arch/arm64/kernel/debug-monitors.c send_user_sigtrap) and a
# branch back to it. Assembled with llvm-mc -triple=aarch64 and checked
# with llvm-objdump; only x0-x8, x19, x20 and the flags are used, no stack.
BATCH_BLOB = bytes.fromhex(
    "680240a9"      # 0x00 loop: ldp x8, x0, [x19]
    "610a41a9"      # 0x04 ldp x1, x2, [x19, #16]
    "631242a9"      # 0x08 ldp x3, x4, [x19, #32]
    "651a40f9"      # 0x0c ldr x5, [x19, #48]
    "010000d4"      # 0x10 svc #0
    "601e00f9"      # 0x14 str x0, [x19, #56]
    "1ffc3fb1"      # 0x18 cmn x0, #4095
    "82000054"      # 0x1c b.hs trap (0x2c)
    "73020191"      # 0x20 add x19, x19, #64
    "940600f1"      # 0x24 subs x20, x20, #1
    "c1feff54"      # 0x28 b.ne loop (0x00)
    "000020d4"      # 0x2c trap: brk #0
    "ffffff17")     # 0x30 b trap
BATCH_TRAP_PC = 0x2c    # pc at the brk's SIGTRAP (it is not stepped over)
BATCH_SI_CODE = 1       # TRAP_BRKPT


def set_batch(regs: "Regs", blob: int, table: int, n: int) -> None:
    """Registers that enter the runner at `blob` on an `n`-entry table;
    syscallno NO_SYSCALL as in set_syscall (no restart fix-up)."""
    regs.raw.pc = blob
    regs.raw.regs[19], regs.raw.regs[20] = table, n
    regs.syscallno = NO_SYSCALL


def batch_state(regs: "Regs"):
    """(the entry the runner stopped on or one past the last, entries not run)."""
    return regs.raw.regs[19], regs.raw.regs[20]

NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_ARM_TLS = 0x401
NT_ARM_SYSTEM_CALL = 0x404
NT_ARM_SVE = 0x405
NT_ARM_PACA_KEYS = 0x407
NT_ARM_PACG_KEYS = 0x408
NT_ARM_TAGGED_ADDR_CTRL = 0x409
NT_ARM_PAC_ENABLED_KEYS = 0x40A
NT_ARM_SSVE = 0x40B
NT_ARM_ZA = 0x40C

# include/uapi/asm-generic/unistd.h
SYS: Dict[str, int] = {
    "dup3": 24, "fcntl": 25, "ioctl": 29, "fchdir": 50, "openat": 56, "close": 57, "lseek": 62,
    "read": 63, "write": 64, "personality": 92, "exit": 93, "exit_group": 94, "set_tid_address": 96,
    "set_robust_list": 99, "get_robust_list": 100, "getitimer": 102, "setitimer": 103,
    "ptrace": 117, "kill": 129, "sigaltstack": 132, "rt_sigaction": 134,
    "rt_sigprocmask": 135, "setresuid": 147, "setresgid": 149, "setpgid": 154,
    "getpgid": 155, "getsid": 156, "setsid": 157, "setgroups": 159, "umask": 166,
    "prctl": 167, "getpid": 172, "getppid": 173, "gettid": 178, "brk": 214,
    "munmap": 215, "mremap": 216, "mlockall": 230, "mmap": 222, "mprotect": 226, "madvise": 233,
    "membarrier": 283,   # engine/membarrier.py
    "capset": 91, "setfsuid": 151, "setfsgid": 152,   # engine/creds.py
    "chroot": 51,   # engine/fsroot.py
    "mbind": 235, "get_mempolicy": 236, "set_mempolicy": 237,   # engine/mempolicy.py
    "prlimit64": 261, "rseq": 293, "clone3": 435, "close_range": 436, "userfaultfd": 282,
    "timer_create": 107, "timer_gettime": 108, "timer_getoverrun": 109, "timer_settime": 110,
    "timer_delete": 111, "sched_setaffinity": 122, "sched_getaffinity": 123,
    "ioprio_set": 30, "ioprio_get": 31, "sched_setattr": 274, "sched_getattr": 275, "seccomp": 277,
    # interrupted-call recovery and pending signals (engine/restart.py, engine/signals.py)
    "futex": 98, "nanosleep": 101, "clock_nanosleep": 115, "restart_syscall": 128,
    "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240,
    "kcmp": 272,   # engine/threads.py: what threads share
}
NR_RESTART_SYSCALL = 128
EINTR = 4
# Calls a freeze makes fail with -EINTR, handler or not (see x86_64.py):
# epoll_pwait, epoll_pwait2, rt_sigtimedwait, semop, semtimedop.
FREEZE_EINTR = (22, 441, 137, 193, 192)

NO_SYSCALL = -1
REG_NAMES = tuple(f"x{i}" for i in range(31)) + ("sp", "pc", "pstate")


class UserPtRegs(ctypes.Structure):
    """struct user_pt_regs (arch/arm64/include/uapi/asm/ptrace.h), 272 bytes."""
    _fields_ = [("regs", ctypes.c_uint64 * 31), ("sp", ctypes.c_uint64),
                ("pc", ctypes.c_uint64), ("pstate", ctypes.c_uint64)]


class Regs:
    """The general registers plus the syscall number (NT_ARM_SYSTEM_CALL),
    which on arm64 is not part of NT_PRSTATUS but decides whether the kernel
    applies a syscall-restart fix-up on the way back to user space."""

    def __init__(self) -> None:
        self.raw = UserPtRegs()
        self.syscallno = NO_SYSCALL

    def __getattr__(self, name: str) -> int:
        if name.startswith("x") and name[1:].isdigit():
            return self.raw.regs[int(name[1:])]
        raise AttributeError(name)

    def set(self, name: str, value: int) -> None:
        if name == "syscallno":
            self.syscallno = value
        elif name.startswith("x"):
            self.raw.regs[int(name[1:])] = u64(value)
        else:
            setattr(self.raw, name, u64(value))

    @property
    def sp(self) -> int:
        return self.raw.sp

    @property
    def pc(self) -> int:
        return self.raw.pc

    def copy(self) -> "Regs":
        r = Regs()
        ctypes.memmove(ctypes.addressof(r.raw), ctypes.addressof(self.raw), ctypes.sizeof(self.raw))
        r.syscallno = self.syscallno
        return r

    def to_dict(self) -> dict:
        d = {f"x{i}": self.raw.regs[i] for i in range(31)}
        d.update(sp=self.raw.sp, pc=self.raw.pc, pstate=self.raw.pstate, syscallno=self.syscallno)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Regs":
        """Raises KeyError/TypeError on a malformed record (callers turn that
        into image-invalid)."""
        r = cls()
        for n in REG_NAMES:
            v = d[n]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
                raise TypeError(f"register {n} is not a u64")
            r.set(n, v)
        no = d["syscallno"]
        if not isinstance(no, int) or isinstance(no, bool) or not -(1 << 31) <= no < 1 << 31:
            raise TypeError("syscallno is not an int")
        r.syscallno = no
        return r


def s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def u64(v: int) -> int:
    return v & ((1 << 64) - 1)


def get_regs(pid: int) -> Regs:
    """NT_PRSTATUS + NT_ARM_SYSTEM_CALL. Raises SysError."""
    r = Regs()
    ptrace.get_regset(pid, NT_PRSTATUS, r.raw)
    no = ctypes.c_int()
    ptrace.get_regset(pid, NT_ARM_SYSTEM_CALL, no)
    r.syscallno = no.value
    return r


def set_regs(pid: int, regs: Regs) -> None:
    """Write both; the syscall number last (system_call_set just stores it
    in regs->syscallno). Raises SysError."""
    ptrace.set_regset(pid, NT_PRSTATUS, regs.raw)
    ptrace.set_regset(pid, NT_ARM_SYSTEM_CALL, ctypes.c_int(regs.syscallno))


def stack_pointer(regs: Regs) -> int:
    return regs.raw.sp


def pc(regs: Regs) -> int:
    return regs.raw.pc


def set_pc(regs: Regs, v: int) -> None:
    regs.raw.pc = u64(v)


def in_call(regs: Regs) -> bool:
    """Stopped in a system call (a restart fix-up may follow), not in user code."""
    return regs.syscallno >= 0


def find_syscall(code: bytes) -> int:
    """Offset of an `svc #0` in `code` (4-byte aligned, A64 instructions are
    aligned), -1 if none."""
    i = code.find(SYSCALL_INSN)
    while i >= 0 and i % 4:
        i = code.find(SYSCALL_INSN, i + 1)
    return i


def set_syscall(regs: Regs, ip: int, nr: int, args) -> None:
    """Point `regs` at an `svc #0` with nr/args (arm64 ABI: x8 = number,
    x0..x5 = arguments, result in x0). syscallno = -1 (NO_SYSCALL) so that
    when the task leaves the stop we resume it from, do_signal() does not
    treat it as returning from an interrupted syscall and rewind pc/x0
    (arch/arm64/kernel/signal.c do_signal, in_syscall)."""
    regs.raw.pc = ip
    regs.raw.regs[8] = nr
    a = [u64(x) for x in args] + [0] * (6 - len(args))
    for i in range(6):
        regs.raw.regs[i] = a[i]
    regs.syscallno = NO_SYSCALL


def retval(regs: Regs) -> int:
    return s64(regs.raw.regs[0])


def normalise_restart(regs: Regs) -> str:
    """Nothing to do by hand on arm64: the kernel already rewound pc and
    restored x0 = orig_x0 before the ptrace stop the registers were read at
    (see the module docstring). Only make sure no second fix-up happens in
    the new process: syscallno = NO_SYSCALL. Returns what was done."""
    done = "none" if regs.syscallno == NO_SYSCALL else "forget-syscall"
    regs.syscallno = NO_SYSCALL
    return done


def syscall_site(regs: Regs) -> dict:
    """The call registers rewound onto an `svc` will re-execute, as
    /proc/PID/syscall showed it while the task slept in it (pc after the
    svc; x0 is orig_x0 again after the kernel's rewind)."""
    return {"nr": regs.x8, "args": [regs.raw.regs[i] for i in range(6)], "sp": regs.raw.sp,
            "pc": regs.raw.pc + 4}


def rewound_call(task) -> bool:
    """True when the registers were rewound onto an `svc` (an interrupted
    call re-executes when the process resumes). The kernel rewinds before
    the stop (do_signal) and keeps the -ERESTARTxxx code only in a local
    variable, so a new process cannot tell a handler's EINTR from a
    restart: a handled signal pending at the freeze was taken then
    (Task.settle); one that arrived later is refused (engine/dump.py)."""
    return bool(getattr(task, "at_svc", False))


def interrupted_call(task) -> bool:
    """At a freeze stop, before anything is injected: pc on an `svc` (a
    call the kernel rewound for a restart), or right after one that failed
    with -EINTR. Then a pending signal with a handler is taken at once
    (Task.settle): only the kernel, still inside this do_signal(), knows
    whether the handler must see EINTR."""
    regs = task.orig_regs
    try:
        if task.read_mem(regs.raw.pc, 4) == SYSCALL_INSN:
            return True
        return (s64(regs.x0) == -EINTR and regs.raw.pc >= 4
                and task.read_mem(regs.raw.pc - 4, 4) == SYSCALL_INSN)
    except (OSError, SysError):
        return False


def image_regs(task) -> Regs:
    """The registers to save in an image. Rewound onto an `svc` with x8 =
    __NR_restart_syscall (the task was already sleeping in a restarted
    call), they would run restart_syscall in the new process, which has no
    restart_block and returns -EINTR: x8 gets the original call back (see
    engine/restart.py; the arguments are still in x0..x5). Raises
    ValueError when it cannot be known."""
    from .. import restart
    regs = task.orig_regs.copy()
    if getattr(task, "at_svc", False) and regs.x8 == NR_RESTART_SYSCALL:
        name = restart.original_call(getattr(task, "pre_freeze", None), syscall_site(regs), NR_RESTART_SYSCALL)
        if name not in SYS:
            raise ValueError(f"{name} is not an arm64 syscall")
        regs.set("x8", SYS[name])
    elif getattr(task, "after_svc", False) and regs.x8 in FREEZE_EINTR and s64(regs.x0) == -EINTR:
        # Failed with -EINTR, x0 (the first argument) overwritten: it is in
        # the pre-freeze /proc/PID/syscall when the task was seen sleeping
        # at this very svc with the same other arguments. Then rewind onto
        # the svc like the kernel does for a restart; else leave the EINTR.
        snap = getattr(task, "pre_freeze", None)
        if (snap and snap["nr"] == regs.x8 and snap["sp"] == regs.raw.sp and snap["pc"] == regs.raw.pc
                and snap["args"][1:] == [regs.raw.regs[i] for i in range(1, 6)]):
            regs.set("x0", snap["args"][0])
            regs.set("pc", regs.raw.pc - 4)
            task.at_svc = True      # a rewound call now (rewound_call)
    return regs


def after_seize(task) -> None:
    """Make releasing the ORIGINAL process (ckpt check, dump
    --leave-running, a refused dump) exact for -ERESTART_RESTARTBLOCK.

    At the PTRACE_INTERRUPT stop the kernel has rewound pc and x0 but not yet
    decided the syscall number: only after get_signal() returns does
    do_signal() set x8 = __NR_restart_syscall for -ERESTART_RESTARTBLOCK (a
    relative nanosleep, a futex wait with timeout), and it does so only
    while pc is still the restart address. The first injected syscall moves
    pc, so that decision would be lost and the original call re-run in full.
    So when pc is on an `svc #0` (no user instruction runs before it), the
    task is first resumed untouched to that syscall's entry stop, x8 read
    there (what the kernel decided), and the syscall skipped (syscallno =
    -1 at the entry stop: el0_svc_common goes straight to trace_exit).
    release() then puts the registers back with that x8. The image keeps
    the dumped x8 (the original call): a restart_block dies with the old
    process. Raises SysError/EngineError if the task dies meanwhile.

    First of all, before any syscall runs in the task, the SVE/SME vector
    state is captured (see :func:`capture_vector_state`)."""
    capture_vector_state(task)
    regs = task.orig_regs
    try:
        if task.read_mem(regs.raw.pc, 4) != SYSCALL_INSN:
            # Right after an svc: a call that returned (a freeze-EINTR
            # candidate for image_regs).
            task.after_svc = regs.raw.pc >= 4 and task.read_mem(regs.raw.pc - 4, 4) == SYSCALL_INSN
            return
    except (OSError, SysError):
        return
    task.at_svc = True
    task._resume_to_syscall_stop()      # entry of the svc at pc
    entry = get_regs(task.pid)
    if entry.raw.pc != regs.raw.pc + 4:
        # Not the syscall at pc (should not happen): put everything back.
        raise SysError("restart probe", 22, task.pid, f"entry stop at pc {entry.raw.pc:#x}")
    ptrace.set_regset(task.pid, NT_ARM_SYSTEM_CALL, ctypes.c_int(NO_SYSCALL))
    task._resume_to_syscall_stop()      # its (skipped) exit
    resume = regs.copy()
    resume.raw.regs[8] = entry.raw.regs[8]
    task.resume_regs = resume


VEC_MAX = 1 << 20     # > SVE_PT_SIZE(SVE_VQ_MAX) and ZA_PT_SIZE for any vector length


def capture_vector_state(task) -> None:
    """Read NT_ARM_SVE/SSVE/ZA while the task is exactly as frozen.

    Every syscall *entry* discards live SVE state (el0_svc: fp_user_discard,
    arch/arm64/kernel/syscall.c), and injected syscalls are syscalls: read
    after them, the state would look FPSIMD-only and a dump would silently
    drop the Z/P registers. So the headers are recorded here (what the
    image's blob and the refusal go by, see :func:`get_xstate`), and any
    live register contents are kept in full so :func:`before_release` can
    put them back into the ORIGINAL process (check, --leave-running, a
    refused dump): leaving it running without them would corrupt it."""
    heads: Dict[int, Tuple[int, bytes]] = {}
    live: List[Tuple[int, bytes]] = []
    for name in HEADER_ONLY:
        nt = {n: t for n, t, _ in EXTRA_REGSETS}[name]
        st, head = _read_regset(task.pid, nt, 16)
        heads[nt] = (st, head)
        h = _vec_header(head) if st == 0 else None
        if h and (h["flags"] & SVE_PT_REGS_SVE or (name == "za" and h["size"] > 16)):
            st2, full = _read_regset(task.pid, nt, VEC_MAX)
            if st2 == 0:
                live.append((nt, full))
    task.vec_heads = heads
    task.vec_live = live


def before_release(task) -> None:
    """Put live SVE/SME register contents captured at seize back (ZA first:
    writing the streaming-SVE regset may change PSTATE.SM/ZA). Raises
    SysError if the kernel refuses them."""
    for nt, data in sorted(getattr(task, "vec_live", []), key=lambda x: x[0] != NT_ARM_ZA):
        buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
        ptrace.set_regset(task.pid, nt, buf, len(data))


# -- extended state: a blob of regsets ---------------------------------------
# xstate.bin is a sequence of records "<IiI": note type, status (0 =
# present, else the errno the read failed with: the feature is absent),
# length; then `length` bytes of the regset as PTRACE_GETREGSET returned it.
# NT_ARM_SVE/SSVE/ZA are recorded for their headers only (liveness, vector
# length): their contents are never written back (FPSIMD-only restore).
EXTRA_REGSETS: List[Tuple[str, int, int]] = [
    # name, note type, buffer size
    ("fpsimd", NT_PRFPREG, 528),
    ("tls", NT_ARM_TLS, 16),
    ("paca_keys", NT_ARM_PACA_KEYS, 64),
    ("pacg_keys", NT_ARM_PACG_KEYS, 16),
    ("pac_enabled_keys", NT_ARM_PAC_ENABLED_KEYS, 8),
    ("tagged_addr_ctrl", NT_ARM_TAGGED_ADDR_CTRL, 8),
    ("sve", NT_ARM_SVE, 16),
    ("ssve", NT_ARM_SSVE, 16),
    ("za", NT_ARM_ZA, 16),
]
# Written back at restore, in this order (the keys before the enabled-keys
# mask; all of them before the general registers).
WRITE_BACK = ("fpsimd", "tls", "paca_keys", "pacg_keys", "pac_enabled_keys", "tagged_addr_ctrl")
HEADER_ONLY = ("sve", "ssve", "za")
_REC = struct.Struct("<IiI")
# errnos meaning "this CPU/kernel has no such feature": EINVAL (unknown note
# type), ENODEV (regset's active() false / feature absent, e.g. pac_get_keys
# without system_supports_address_auth()), EIO/ENOENT seen on some builds.
_ABSENT = (22, 19, 5, 2)
SVE_PT_REGS_SVE = 1


def _read_regset(pid: int, nt: int, size: int) -> Tuple[int, bytes]:
    buf = (ctypes.c_char * size)()
    try:
        n = ptrace.get_regset(pid, nt, buf)
    except SysError as e:
        if e.errno in _ABSENT:
            return e.errno, b""
        raise
    return 0, bytes(buf[:n])


def get_xstate(pid: int, task=None) -> bytes:
    """All extra regsets as one blob (format above); the SVE/SSVE/ZA headers
    as captured at seize when `task` has them (capture_vector_state).
    Raises SysError on an unexpected failure."""
    heads = getattr(task, "vec_heads", None) or {}
    out = []
    for _, nt, size in EXTRA_REGSETS:
        status, data = heads[nt] if nt in heads else _read_regset(pid, nt, size)
        out.append(_REC.pack(nt, status, len(data)) + data)
    return b"".join(out)


def parse_xstate(blob: bytes) -> Dict[str, Tuple[int, bytes]]:
    """{name: (status, data)}; raises ValueError on a malformed blob."""
    names = {nt: name for name, nt, _ in EXTRA_REGSETS}
    out: Dict[str, Tuple[int, bytes]] = {}
    off = 0
    while off < len(blob):
        if off + _REC.size > len(blob):
            raise ValueError("truncated regset record")
        nt, status, n = _REC.unpack_from(blob, off)
        off += _REC.size
        if off + n > len(blob) or nt not in names:
            raise ValueError(f"bad regset record (note {nt:#x}, {n} bytes)")
        out[names[nt]] = (status, blob[off:off + n])
        off += n
    return out


def _vec_header(data: bytes) -> Optional[dict]:
    """struct user_sve_header / user_za_header: size, max_size, vl, max_vl, flags."""
    if len(data) < 16:
        return None
    size, max_size, vl, max_vl, flags = struct.unpack_from("<IIHHH", data)
    return {"size": size, "vl": vl, "flags": flags}


def xstate_features(blob: bytes) -> dict:
    """What the blob holds: {"regsets": {name: length or "absent"},
    "sve": {vl, flags}, "za": {...}} (the vector-length settings a restore
    must match). {} for an empty/malformed blob."""
    try:
        sets = parse_xstate(blob)
    except ValueError:
        return {}
    feats: dict = {"regsets": {n: (len(d) if st == 0 else "absent") for n, (st, d) in sets.items()}}
    for n in HEADER_ONLY:
        st, d = sets.get(n, (1, b""))
        h = _vec_header(d) if st == 0 else None
        if h:
            # SVE_PT_REGS_SVE is the liveness bit, not a setting.
            feats[n] = {"vl": h["vl"], "flags": h["flags"] & ~SVE_PT_REGS_SVE}
    return feats


def live_state_problem(blob: bytes) -> Optional[str]:
    """Why this register state cannot be restored exactly (live SVE or
    streaming-SVE registers, live ZA), or None."""
    sets = parse_xstate(blob)
    for n, what in (("sve", "SVE"), ("ssve", "streaming-mode SVE")):
        st, d = sets.get(n, (1, b""))
        h = _vec_header(d) if st == 0 else None
        if h and h["flags"] & SVE_PT_REGS_SVE:
            return f"live {what} register state (vector length {h['vl']}): only FP/SIMD state is restored"
    st, d = sets.get("za", (1, b""))
    h = _vec_header(d) if st == 0 else None
    if h and h["size"] > 16:
        return "SME ZA storage is enabled: not restored by this engine"
    return None


def describe_cpu_state(regs: Regs, blob: bytes) -> str:
    """One line for `ckpt check`; raises the unsupported-state Refusal for
    state that would not be restored exactly."""
    why = live_state_problem(blob)
    if why:
        raise Refusal("unsupported-state", why)
    sets = parse_xstate(blob)
    have = [n for n in WRITE_BACK if sets.get(n, (1, b""))[0] == 0]
    return f"pc {regs.raw.pc:#x}, regsets {', '.join(have)}"


def xstate_mismatch(mine: dict, theirs: dict) -> Optional[str]:
    """Why the saved extra state cannot go into a process on this CPU, or
    None: a regset the image has that this CPU lacks, a different size, or
    other vector-length settings (the new process would run with this
    restorer's)."""
    if not theirs:
        return None
    if not mine:
        return "this CPU's register sets could not be read"
    a, b = mine.get("regsets", {}), theirs.get("regsets", {})
    for n in WRITE_BACK:
        if b.get(n, "absent") != "absent" and a.get(n) != b.get(n):
            return f"register set {n}: saved {b.get(n)} bytes, this CPU {a.get(n)}"
    for n in HEADER_ONLY:
        if n in theirs and theirs[n] != mine.get(n):
            return f"{n} settings {theirs[n]} differ from this process's {mine.get(n)}"
    return None


def set_xstate(pid: int, blob: bytes) -> None:
    """Write back the restorable regsets of a blob from :func:`get_xstate`.
    Raises Refusal(unsupported-state) for live SVE/ZA state, SysError when
    the kernel rejects a regset, ValueError on a malformed blob."""
    why = live_state_problem(blob)
    if why:
        raise Refusal("unsupported-state", why, pid=pid)
    sets = parse_xstate(blob)
    for name in WRITE_BACK:
        st, data = sets.get(name, (1, b""))
        if st != 0:
            continue
        nt = {n: t for n, t, _ in EXTRA_REGSETS}[name]
        buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
        ptrace.set_regset(pid, nt, buf, len(data))


# -- clone3 trampoline -------------------------------------------------------
# long tramp(struct clone_args *args /* x0 */, size_t size /* x1 */)
# Parent: returns clone3's result (x0). Child: never returns to C or Python
# (its libc/Python state is a stale copy): PTRACE_TRACEME, then
# kill(getpid(), SIGSTOP) so the restorer (its parent and tracer) takes
# over; should it ever be resumed unchanged it exit_group(127)s. No stack is
# touched (clone3 without a stack: the child runs on a copy of ours), and
# the page is not PROT_BTI, so no landing pads are needed.


def movz(rd: int, imm16: int) -> int:
    """MOVZ Xd, #imm16 (64-bit, shift 0)."""
    assert 0 <= imm16 < 1 << 16 and 0 <= rd < 31
    return 0xD2800000 | (imm16 << 5) | rd


def cbnz(rt: int, offset: int) -> int:
    """CBNZ Xt, pc+offset."""
    assert offset % 4 == 0 and -(1 << 20) <= offset < 1 << 20
    return 0xB5000000 | (((offset >> 2) & 0x7FFFF) << 5) | rt


def _assemble(words: List[int]) -> bytes:
    return struct.pack(f"<{len(words)}I", *words)


_CHILD = [
    movz(0, 0), movz(1, 0), movz(2, 0), movz(3, 0),      # PTRACE_TRACEME, 0, 0, 0
    movz(8, SYS["ptrace"]), SVC0,
    movz(8, SYS["getpid"]), SVC0,                         # x0 = pid
    movz(1, 19), movz(8, SYS["kill"]), SVC0,              # kill(pid, SIGSTOP)
    movz(0, 127), movz(8, SYS["exit_group"]), SVC0,
    BRK0,
]
# movz x8, clone3; svc; cbnz x0 -> ret; child...; ret
CLONE3_TRAMPOLINE = _assemble([movz(8, SYS["clone3"]), SVC0, cbnz(0, 4 * (len(_CHILD) + 1))]
                              + _CHILD + [RET])
# Offset of an `svc #0` inside the trampoline: the first syscall the
# restorer injects into the stopped child goes through it.
TRAMPOLINE_SYSCALL_OFFSET = 4


class CloneArgs(ctypes.Structure):
    """struct clone_args (linux/sched.h), CLONE_ARGS_SIZE_VER2."""
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
        "stack_size", "tls", "set_tid", "set_tid_size", "cgroup")]
