"""Landlock (Linux 5.13, landlock_restrict_self(2)): a sandbox a process puts
itself in, kept in its credentials, shown by no /proc file and not
re-creatable from outside (its rulesets are gone once enforced). A restored
process is a clone of ckpt and would come back out of its sandbox: what it
was forbidden to open, it could. So a process in a Landlock domain is
refused (`unsupported-state`).

How it is seen: Landlock forbids a sandboxed process to ptrace - or to
kcmp(2), which asks the same PTRACE_MODE_READ question - any process
outside its domain (security/landlock/task.c hook_ptrace_access_check). The
dump injects kcmp(self, helper, KCMP_VM) into the frozen process, the helper
a short-lived fork of ckpt with no domain, the process's real uid and gid,
no capabilities and dumpable (or ckpt itself, for a process with CAP_SYS_PTRACE): every other
check of ptrace_may_access then passes (kernel/ptrace.c: same real ids, a dumpable mm, a permitted set that
is a subset of anyone's), so EPERM is Landlock's (or another LSM's: also
something a restore would not carry). Only when this kernel runs Landlock
(landlock_create_ruleset's version query answers).
"""

from __future__ import annotations

import ctypes
import os

from . import arch, libc
from .errors import Refusal

LANDLOCK_CREATE_RULESET_VERSION = 1
KCMP_VM = 1
SYS_LANDLOCK_CREATE_RULESET = {"x86_64": 444, "aarch64": 444}   # the same on both (asm-generic)
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
EPERM = 1
CAP_SYS_PTRACE = 19
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
_ON: list = []
_PRCTL = arch.current().SYS["prctl"]


def enabled() -> bool:
    """Whether this kernel runs Landlock (asked once)."""
    if not _ON:
        nr = SYS_LANDLOCK_CREATE_RULESET.get(os.uname().machine)
        try:
            _ON.append(nr is not None and libc.syscall(nr, 0, 0, LANDLOCK_CREATE_RULESET_VERSION) >= 1)
        except libc.SysError:
            _ON.append(False)
    return _ON[0]


def _helper(ruid: int, rgid: int) -> tuple:
    """A fork with those real (and effective, saved) ids, no capabilities,
    dumpable, gone with ckpt: (its pid, the fd whose closing ends it), once
    it is ready. (Nothing is imported in the fork: another thread of ckpt
    may hold the import lock.)"""
    r, w = os.pipe()
    hold_r, hold_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(hold_w)
            os.setgroups([])
            os.setresgid(rgid, rgid, rgid)
            os.setresuid(ruid, ruid, ruid)
            _drop_caps()
            libc.syscall(_PRCTL, PR_SET_DUMPABLE, 1, 0, 0, 0)
            libc.syscall(_PRCTL, PR_SET_PDEATHSIG, 9, 0, 0, 0)    # after the change of ids, which clears it
            if os.getppid() == parent:
                os.write(w, b"1")
                os.close(w)
                os.read(hold_r, 1)      # until ckpt closes hold_w (or dies)
        finally:
            os._exit(0)
    os.close(w)
    os.close(hold_r)
    try:
        ok = os.read(r, 1)
    finally:
        os.close(r)
    if ok != b"1":
        os.close(hold_w)
        os.waitpid(pid, 0)
        raise OSError("the Landlock probe's helper did not start")
    return pid, hold_w


def _drop_caps() -> None:
    # capset(2), _LINUX_CAPABILITY_VERSION_3: header, then two data words, all zero
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    libc.syscall(SYS_CAPSET[os.uname().machine], ctypes.addressof(hdr), ctypes.addressof(data))


def _against_ckpt(pid: int, status: dict) -> bool:
    """Whether the probe is kcmp against ckpt itself: CAP_SYS_PTRACE (in
    ckpt's user namespace) passes every other check of ptrace_may_access
    (ids, dumpable, the capability subset), so no helper is needed (a fork
    of ckpt costs ~12 ms)."""
    try:
        eff = int(status.get("CapEff", "0"), 16)
    except ValueError:
        return False
    return bool(eff >> CAP_SYS_PTRACE & 1) and _same_userns(pid)


def reads(pid: int, status: dict) -> list:
    """The probe as a step of the dump's batched reads (engine/dumpbatch.py,
    nbytes -1: the raw result, an error included), when it needs no helper:
    a tree's members make it in the run they make anyway, not in an
    injected call of its own each (a round trip: ~0.3 ms a member on a
    host). check() is then given its result."""
    if not enabled() or not _against_ckpt(pid, status):
        return []
    me = os.getpid()
    return [(PROBE_KEY, "kcmp", lambda out: (pid, me, KCMP_VM, 0, 0), -1, None)]


PROBE_KEY = "landlock_kcmp"


def check(task, status: dict, probed=None) -> None:
    """At the dump, the process frozen: Refusal(unsupported-state) when it
    is in a Landlock domain. `probed`: the result of reads()' kcmp, made by
    the batched reads (None: not made, injected here)."""
    if not enabled():
        return
    try:
        ruid = int(status["Uid"].split()[0])
        rgid = int(status["Gid"].split()[0])
    except (KeyError, ValueError, IndexError):
        return
    if _against_ckpt(task.pid, status):
        if probed is None:
            probed = task.syscall(arch.current().SYS["kcmp"], task.pid, os.getpid(), KCMP_VM, 0, 0)
        _deny(task, probed)
        return
    import _signal
    from . import guard
    # No SIGALRM (ckpt survey's deadline) or ^C between the fork and its
    # reaping: raised there, the helper would be left behind (and in
    # os.fork's own at-fork handlers it is swallowed).
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, guard.HELD | {_signal.SIGALRM})
    try:
        try:
            helper, hold = _helper(ruid, rgid)
        except OSError as e:
            raise Refusal("unsupported-state", f"whether it is sandboxed by Landlock cannot be told: {e}",
                          pid=task.pid) from None
        try:
            r = task.syscall(arch.current().SYS["kcmp"], task.pid, helper, KCMP_VM, 0, 0)
        finally:
            os.close(hold)
            os.waitpid(helper, 0)
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
    _deny(task, r)


def _same_userns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user")
    except OSError:
        return False


def _deny(task, r: int) -> None:
    if r == -EPERM:
        raise Refusal("unsupported-state", "it is sandboxed (a Landlock domain, or another security module "
                      "forbids it to inspect a process of its own uid): a restore would come back outside it",
                      pid=task.pid)
