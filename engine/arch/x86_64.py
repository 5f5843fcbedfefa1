"""x86_64: user_regs_struct, syscall numbers, instructions, xstate layout."""

from __future__ import annotations

import ctypes
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Optional

MACHINE = "x86_64"
PAGE = 4096
# Top of the user address space with 4-level paging (TASK_SIZE_MAX); with
# 5-level paging a process only gets more if it asks with a high hint.
TASK_SIZE = 0x7FFFFFFFF000

SYSCALL_INSN = b"\x0f\x05"
# The gadget written into a page of the process being restored:
# `syscall; int3` (int3 is a tripwire should execution ever fall through).
GADGET = b"\x0f\x05\xcc\xcc"

# -- batched syscalls (engine/batch.py) ----------------------------------------
# The runner, entered with rbx = the first table entry, r12 = the number of
# entries (> 0); an entry is nr, six args, result (8 u64). It makes each
# call and stores rax in the entry's result slot; at the first result in
# -4095..-1 it stops with rbx on that entry and r12 not yet counted down;
# else rbx goes one past the last, r12 to 0. It ends on `int3` followed by
# a `jmp` back to it (a SIGTRAP of someone else's merged with ours is
# resumed into a second breakpoint, engine/batch.py _await_trap). Only rbx,
# r12 and what the syscall ABI clobbers are used; no stack, no memory but
# the table.
BATCH_BLOB = bytes.fromhex(
    "488b03"          # 0  loop: mov rax, [rbx]
    "488b7b08"        # 3  mov rdi, [rbx+8]
    "488b7310"        # 7  mov rsi, [rbx+16]
    "488b5318"        # 11 mov rdx, [rbx+24]
    "4c8b5320"        # 15 mov r10, [rbx+32]
    "4c8b4328"        # 19 mov r8,  [rbx+40]
    "4c8b4b30"        # 23 mov r9,  [rbx+48]
    "0f05"            # 27 syscall
    "48894338"        # 29 mov [rbx+56], rax
    "483d01f0ffff"    # 33 cmp rax, -4095
    "7309"            # 39 jae trap (50)
    "4883c340"        # 41 add rbx, 64
    "49ffcc"          # 45 dec r12
    "75ce"            # 48 jnz loop (0)
    "cc"              # 50 trap: int3
    "ebfd")           # 51 jmp trap
# The dump's runner (engine/dumpbatch.py), entered as the batch runner is:
# it makes every call of the table, failing or not, storing each result,
# then the entry after them (rt_tgsigqueueinfo of a real-time signal to
# itself: its delivery stop, with rip at DUMP_DONE_PC, ends the run); if
# that call fails it falls to `int3` (rip DUMP_TRAP_PC at its SIGTRAP).
DUMP_BLOB = bytes.fromhex(
    "4d85e4"          # 0  loop: test r12, r12
    "742a"            # 3  jz term (47)
    "488b03"          # 5  mov rax, [rbx]
    "488b7b08"        # 8  mov rdi, [rbx+8]
    "488b7310"        # 12 mov rsi, [rbx+16]
    "488b5318"        # 16 mov rdx, [rbx+24]
    "4c8b5320"        # 20 mov r10, [rbx+32]
    "4c8b4328"        # 24 mov r8,  [rbx+40]
    "4c8b4b30"        # 28 mov r9,  [rbx+48]
    "0f05"            # 32 syscall
    "48894338"        # 34 mov [rbx+56], rax
    "4883c340"        # 38 add rbx, 64
    "49ffcc"          # 42 dec r12
    "ebd1"            # 45 jmp loop (0)
    "488b03"          # 47 term: mov rax, [rbx]
    "488b7b08"        # 50 mov rdi, [rbx+8]
    "488b7310"        # 54 mov rsi, [rbx+16]
    "488b5318"        # 58 mov rdx, [rbx+24]
    "4c8b5320"        # 62 mov r10, [rbx+32]
    "0f05"            # 66 syscall
    "48894338"        # 68 done: mov [rbx+56], rax
    "cc"              # 72 int3
    "ebfd")           # 73 jmp to the int3
DUMP_DONE_PC = 68
DUMP_TRAP_PC = 73
BATCH_TRAP_PC = 51      # rip at the breakpoint's SIGTRAP (int3 is a trap: rip is past it)
BATCH_SI_CODE = 0x80    # SI_KERNEL: arch/x86/kernel/traps.c do_int3_user -> do_trap -> force_sig


def set_batch(regs: Regs, blob: int, table: int, n: int) -> None:
    """Registers that enter the runner at `blob` on an `n`-entry table.
    orig_rax = -1: not in a syscall (no restart over our rip, see set_syscall)."""
    regs.rip, regs.rbx, regs.r12 = blob, table, n
    regs.orig_rax = u64(-1)


def batch_state(regs: Regs):
    """(the entry the runner stopped on or one past the last, entries not run)."""
    return regs.rbx, regs.r12


NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202

# asm/unistd_64.h
SYS: Dict[str, int] = {
    "read": 0, "write": 1, "close": 3, "ioctl": 16, "lseek": 8, "mmap": 9, "mprotect": 10,
    "munmap": 11, "brk": 12, "mlockall": 151, "rt_sigaction": 13, "rt_sigprocmask": 14, "mremap": 25,
    "madvise": 28, "getitimer": 36, "setitimer": 38, "getpid": 39, "kill": 62,
    "fcntl": 72, "fchdir": 81, "umask": 95, "ptrace": 101, "setpgid": 109,
    "getppid": 110, "setsid": 112, "setgroups": 116, "setresuid": 117,
    "setresgid": 119, "getpgid": 121, "getsid": 124, "sigaltstack": 131,
    "personality": 135, "prctl": 157, "gettid": 186, "set_tid_address": 218,
    "exit": 60, "exit_group": 231, "set_robust_list": 273, "get_robust_list": 274,
    "dup3": 292, "prlimit64": 302, "rseq": 334, "clone3": 435, "close_range": 436, "userfaultfd": 323,
    "timer_create": 222, "timer_settime": 223, "timer_gettime": 224, "timer_getoverrun": 225,
    "timer_delete": 226, "sched_setaffinity": 203, "sched_getaffinity": 204,
    "ioprio_set": 251, "ioprio_get": 252, "sched_setattr": 314, "sched_getattr": 315, "seccomp": 317,
    # interrupted-call recovery and pending signals (engine/restart.py, engine/signals.py)
    "nanosleep": 35, "futex": 202, "restart_syscall": 219, "clock_nanosleep": 230,
    "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239,   # engine/mempolicy.py
    "membarrier": 324,   # engine/membarrier.py
    "arch_prctl": 158,   # engine/procattrs.py: ARCH_GET_CPUID
    "kcmp": 312,   # engine/threads.py: what threads share
    "capset": 126, "setfsuid": 122, "setfsgid": 123, "openat": 257,   # engine/creds.py
    "chroot": 161,   # engine/fsroot.py
}


class Regs(ctypes.Structure):
    """struct user_regs_struct (asm/user_64.h), the NT_PRSTATUS regset."""
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
        "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
        "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]

    def copy(self) -> "Regs":
        r = Regs()
        ctypes.memmove(ctypes.addressof(r), ctypes.addressof(self), ctypes.sizeof(self))
        return r

    def to_dict(self) -> dict:
        return {n: getattr(self, n) for n, _ in self._fields_}

    @classmethod
    def from_dict(cls, d: dict) -> "Regs":
        """Raises KeyError/TypeError on a malformed record (callers turn that
        into image-invalid)."""
        r = cls()
        for n, _ in cls._fields_:
            v = d[n]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
                raise TypeError(f"register {n} is not a u64")
            setattr(r, n, v)
        return r


def s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def u64(v: int) -> int:
    return v & ((1 << 64) - 1)


def set_syscall(regs: Regs, ip: int, nr: int, args) -> None:
    """Point `regs` at a syscall instruction with nr/args (x86_64 ABI:
    rax, rdi, rsi, rdx, r10, r8, r9). orig_rax = -1 so that the kernel's
    signal-return path does not treat the stop we resume from as an
    interrupted syscall and "restart" it over our rip/rax
    (arch/x86/kernel/signal.c, arch_do_signal_or_restart)."""
    regs.rip = ip
    regs.rax = nr
    regs.orig_rax = u64(-1)
    a = [u64(x) for x in args] + [0] * (6 - len(args))
    regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = a[:6]


def retval(regs: Regs) -> int:
    return s64(regs.rax)


ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
EINTR = 4
NR_RESTART_SYSCALL = 219
# Calls restart_syscall(2) may be restarting (engine/restart.py); poll is
# x86_64-only, never injected, so it is not in SYS.
RESTARTED = dict(SYS, poll=7)
# Calls that fail with -EINTR when a freeze interrupts them, handler or not
# (signal(7) "Interruption of system calls ... by stop signals": a ptrace
# interrupt wakes them like one): epoll_wait, epoll_pwait, epoll_pwait2,
# rt_sigtimedwait, semop, semtimedop. A real signal with a handler that
# interrupted them is still pending at the stop (get_signal takes the
# ptrace trap first), so it is in the image and runs at restore.
FREEZE_EINTR = (232, 281, 441, 128, 65, 220)


def syscall_site(regs: Regs) -> dict:
    """The call the registers are in, as /proc/PID/syscall shows it."""
    return {"nr": s64(regs.orig_rax), "args": [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9],
            "sp": regs.rsp, "pc": regs.rip}


def interrupted_call(task) -> bool:
    """At a freeze stop: returning from a call with -ERESTARTxxx, or with the
    -EINTR of a FREEZE_EINTR call. A pending signal with a handler is then
    taken at once (Task.settle), as on aarch64, where it must be: here the
    registers would carry the decision into an image too, but one path for
    both machines is one path tested on this one."""
    regs = task.orig_regs
    nr, err = s64(regs.orig_rax), -s64(regs.rax)
    return nr >= 0 and (err in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)
                        or (err == EINTR and nr in FREEZE_EINTR))


def image_regs(task) -> Regs:
    """The registers to save in an image. A task stopped inside
    restart_syscall(2) (orig_rax 219, -ERESTART_RESTARTBLOCK) gets the
    number of the call being restarted back in orig_rax (see
    engine/restart.py); raises ValueError when it cannot be known."""
    from .. import restart
    regs = task.orig_regs.copy()
    if s64(regs.orig_rax) == NR_RESTART_SYSCALL and -s64(regs.rax) == ERESTART_RESTARTBLOCK:
        name = restart.original_call(getattr(task, "pre_freeze", None), syscall_site(regs), NR_RESTART_SYSCALL)
        regs.orig_rax = RESTARTED[name]
    return regs


def after_seize(task) -> None:
    """Releasing the ORIGINAL process (check, --leave-running, a refused
    dump): a call that failed with -EINTR only because of the freeze
    (FREEZE_EINTR) is re-executed instead, as normalise_restart does for a
    restored one. Everything else goes back as it was: the kernel finishes
    its own restart (restart_block included) when the task is detached."""
    regs = task.orig_regs
    if s64(regs.orig_rax) in FREEZE_EINTR and s64(regs.rax) == -EINTR:
        r = regs.copy()
        r.rax = u64(-ERESTARTNOHAND)
        task.resume_regs = r


def normalise_restart(regs: Regs) -> str:
    """Make registers dumped inside an interrupted syscall resume it in a
    *new* process exactly as the kernel would have in the old one.

    They are left as "returning from syscall orig_rax with -ERESTARTxxx":
    PTRACE_DETACH wakes the task with TIF_SIGPENDING set (ptrace_signal_
    wake_up), so on its way to user space arch_do_signal_or_restart makes
    the kernel's own choice - re-execute the call (rip -= 2, rax = orig_rax)
    when no handler runs; when a pending signal's handler runs (one that
    arrived during the freeze, restored with the image), -EINTR for
    -ERESTARTNOHAND, and for -ERESTARTSYS unless SA_RESTART.

    -ERESTART_RESTARTBLOCK would become restart_syscall(2), whose
    restart_block only the dead process had (the new one would get -EINTR),
    so it is turned into -ERESTARTNOHAND, which has the same handler
    semantics and re-executes the ORIGINAL call with its arguments (still in
    rdi..r9): an absolute sleep ends at the same instant, a relative timeout
    (nanosleep, poll, futex) starts again in full - longer, never shorter,
    as these calls promise. The -EINTR a freeze causes in FREEZE_EINTR calls
    is turned into -ERESTARTNOHAND as well. A task stopped in
    restart_syscall itself was given its original call by image_regs();
    raises ValueError if one still is. Returns what was done."""
    nr = s64(regs.orig_rax)
    if nr < 0:
        return "none"
    err = -s64(regs.rax)
    if err == ERESTART_RESTARTBLOCK:
        if nr == NR_RESTART_SYSCALL:
            raise ValueError("registers inside restart_syscall: the restarted call is unknown")
        regs.rax = u64(-ERESTARTNOHAND)
        return "restart-original"
    if err in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
        return "kernel-restart"
    if err == EINTR and nr in FREEZE_EINTR:
        regs.rax = u64(-ERESTARTNOHAND)
        return "restart-after-freeze"
    # A finished call: nothing for the kernel to fix up.
    regs.orig_rax = u64(-1)
    return "none"


# -- xstate (the XSAVE area as PTRACE_GETREGSET NT_X86_XSTATE returns it) ----
# Bytes 464..511 are the software-reserved area, which the kernel fills with
# struct _fpx_sw_bytes (magic1, extended_size, xfeatures, xstate_size):
# arch/x86/include/uapi/asm/sigcontext.h.
FP_XSTATE_MAGIC1 = 0x46505853


def xstate_features(buf: bytes) -> dict:
    """{"xfeatures": XCR0 bits the layout holds, "size": its size}, from the
    sw_reserved bytes; {} when they are absent."""
    if len(buf) < 512:
        return {}
    magic, ext, xfeat, size = struct.unpack_from("<IIQI", buf, 464)
    if magic != FP_XSTATE_MAGIC1:
        return {}
    return {"xfeatures": xfeat, "size": size}


# -- clone3 trampoline ---------------------------------------------------------
# long tramp(struct clone_args *args /* rdi */, size_t size /* rsi */)
# Parent: returns clone3's result. Child: never returns to C or Python (its
# libc/Python state is a stale copy, see ENGINE-NOTES): PTRACE_TRACEME, then
# kill(getpid(), SIGSTOP) so the restorer (its parent and tracer) takes over;
# should it ever be resumed unchanged it exit_group(127)s.
_CHILD = bytes.fromhex(
    "31ff" "31f6" "31d2" "4531d2"     # edi=TRACEME(0), esi, edx, r10d = 0
    "b865000000" "0f05"               # ptrace
    "b827000000" "0f05"               # getpid
    "89c7" "be13000000"               # edi = pid, esi = SIGSTOP
    "b83e000000" "0f05"               # kill
    "bf7f000000" "b8e7000000" "0f05"  # exit_group(127)
    "cc")
CLONE3_TRAMPOLINE = (bytes.fromhex("b8b3010000" "0f05" "4885c0" "75") + bytes([len(_CHILD)])
                     + _CHILD + b"\xc3")
# Offset of a `syscall` instruction inside the trampoline: the first syscall
# the restorer injects into the stopped child goes through it.
TRAMPOLINE_SYSCALL_OFFSET = 5


class CloneArgs(ctypes.Structure):
    """struct clone_args (linux/sched.h), CLONE_ARGS_SIZE_VER2."""
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
        "stack_size", "tls", "set_tid", "set_tid_size", "cgroup")]


# -- the per-arch interface the rest of the engine calls ---------------------
# (aarch64.py has the same functions; engine/task.py, dump.py and build.py
# only go through these.)
RED_ZONE = 128    # x86_64 ABI 3.2.2
XSTATE_MAX = 16384


def get_regs(pid: int) -> Regs:
    """NT_PRSTATUS (fs_base/gs_base included). Raises SysError."""
    from .. import ptrace
    regs = Regs()
    ptrace.get_regset(pid, NT_PRSTATUS, regs)
    return regs


def set_regs(pid: int, regs: Regs) -> None:
    from .. import ptrace
    ptrace.set_regset(pid, NT_PRSTATUS, regs)


def stack_pointer(regs: Regs) -> int:
    return regs.rsp


def pc(regs: Regs) -> int:
    return regs.rip


def set_pc(regs: Regs, v: int) -> None:
    regs.rip = v


def in_call(regs: Regs) -> bool:
    """Stopped in a system call (a restart fix-up may follow), not in user code."""
    return s64(regs.orig_rax) >= 0


def find_syscall(code: bytes) -> int:
    """Offset of a `syscall` instruction in `code`, -1 if none."""
    return code.find(SYSCALL_INSN)


def get_xstate(pid: int, task=None) -> bytes:
    """The XSAVE area (NT_X86_XSTATE), as long as the kernel returns it."""
    from .. import ptrace
    buf = (ctypes.c_char * XSTATE_MAX)()
    n = ptrace.get_regset(pid, NT_X86_XSTATE, buf)
    return bytes(buf[:n])


def set_xstate(pid: int, data: bytes) -> None:
    """Raises SysError when the kernel rejects the area (another CPU)."""
    from .. import ptrace
    buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
    ptrace.set_regset(pid, NT_X86_XSTATE, buf, len(data))


def describe_cpu_state(regs: Regs, blob: bytes) -> str:
    """One line for `ckpt check` (nothing in x86_64 state is refused)."""
    f = xstate_features(blob)
    return f"rip {regs.rip:#x}" + (f", xstate {f['xfeatures']:#x} ({f['size']} bytes)" if f else "")


def xstate_mismatch(mine: dict, theirs: dict) -> Optional[str]:
    """Why a saved xstate cannot go into a process on this CPU, or None."""
    if theirs and mine and (theirs.get("xfeatures", 0) & ~mine["xfeatures"] or theirs.get("size") != mine["size"]):
        return (f"saved xstate features {theirs.get('xfeatures', 0):#x} size "
                f"{theirs.get('size')} vs this CPU's {mine['xfeatures']:#x} size {mine['size']}")
    return None
