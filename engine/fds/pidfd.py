"""pidfd: an fd naming a process (pidfd_open(2), clone(CLONE_PIDFD)).

What a program can see through one: which process it names (fdinfo
"Pid:", pidfd_send_signal, waitid(P_PIDFD)), PIDFD_NONBLOCK (the file's
O_NONBLOCK), on pidfs kernels (6.9+) its inode number, which every pidfd of
one process shares, and from 6.15 a dead process's wait status
(ioctl PIDFD_GET_INFO, PIDFD_INFO_EXIT). Three cases:

* **A process of the dump** (the holder itself, or another member of its
  tree, a zombie too): the restore names the same PID again, so the pidfd
  is opened anew once that process exists - injected into the holder
  (pidfd_open, then dup3 onto the fd and its dups; :func:`finish`), before
  any other kind's finish, so an epoll instance watching it registers the
  pidfd and not the placeholder that held its number until then.
* **A process that is dead and reaped** (fdinfo "Pid: -1"): ckpt forks a
  child that exits with the dumped wait status (0 when the kernel did not
  show it), opens one pidfd on it per fd while it is a zombie, and reaps
  it, all before the restored process exists. Pidfds that named one dead
  process (one pidfs inode) name one again, so they still compare equal;
  pidfds of two dead processes still differ. The child dies in ckpt's
  cgroup: PIDFD_INFO_CGROUPID of a dead process reports that one.
* Everything else is refused: a process outside the dump
  (``pidfd-outside``), a thread's pidfd (PIDFD_THREAD), a PID another pid
  namespace than ckpt's names, a dead process killed by a signal that
  dumps core (the child would have to dump one), a live process's pidfd
  that two members share (opened before a fork: each member's is opened
  anew in it, so they would no longer share one open file).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

from ..errors import EngineError
from ..procfs import parse_fdinfo
from . import fs_magic
from ._util import check_async, check_held_outside, failed, refuse, refuse_rec, tree_fds

KIND = "pidfd"
REASONS = ("unsupported-fd", "unsupported-state", "pidfd-outside", "image-invalid")

LINK = "anon_inode:[pidfd]"
PIDFD_THREAD = os.O_EXCL            # include/uapi/linux/pidfd.h
PIDFD_NONBLOCK = os.O_NONBLOCK
PIDFS_MAGIC = 0x50494446            # include/uapi/linux/magic.h PID_FS_MAGIC
# ioctl(PIDFD_GET_INFO) = _IOWR(0xFF, 11, struct pidfd_info), its first
# version (64 bytes: mask, cgroupid, 11 ids, exit_code); the kernel takes
# the size from the command (fs/pidfs.c pidfd_info).
PIDFD_GET_INFO = (3 << 30) | (64 << 16) | (0xFF << 8) | 11
PIDFD_INFO_EXIT = 8
_EXIT_CODE_AT = 60
# Flags a pidfd can carry: pidfd_open gives O_RDWR | O_CLOEXEC, F_SETFL
# changes O_NONBLOCK (O_ASYNC is check_async's); anything else was not made
# by a pidfd_open this restore can repeat.
_OWN_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_LARGEFILE", 0)
# Signals whose default action dumps core (signal(7)): a child killed by one
# would dump a core (or run core_pattern's helper) to die so.
_CORE_SIGNALS = frozenset(int(getattr(signal, n)) for n in (
    "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE", "SIGSEGV", "SIGXCPU", "SIGXFSZ", "SIGSYS"))
# Those whose default action ends the process without one: what a made
# child can die of by raising it (not one that stops it or is ignored).
_TERMINATING = frozenset([int(getattr(signal, n)) for n in (
    "SIGHUP", "SIGINT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM", "SIGVTALRM", "SIGPROF",
    "SIGIO", "SIGPWR") if hasattr(signal, n)] + list(range(signal.SIGRTMIN, signal.SIGRTMAX + 1)))


def _named(info) -> int:
    """The PID the pidfd names in ckpt's pid namespace; -1: dead and reaped."""
    try:
        pid = int(info.fdinfo["Pid"])
    except (KeyError, ValueError):
        raise refuse(info, "unsupported-fd", "pidfd without a Pid line in its fdinfo") from None
    ns = info.fdinfo.get("NSpid", "").split()
    if pid == 0 or len(ns) > 1:
        raise refuse(info, "unsupported-fd", f"pidfd of a process seen through another pid namespace "
                     f"(Pid {pid}, NSpid {' '.join(ns) or '-'}): its number there is not restored")
    return pid


def _members(ctx) -> set:
    return set(getattr(ctx, "tree_pids", None) or ()) | {ctx.pid}


def _exit_status(info):
    """The dead process's wait status through PIDFD_GET_INFO, or None where
    the kernel does not show it (before 6.15: nor can the program see it)."""
    from .. import pidfd as sysfd
    buf = bytearray(64)
    struct.pack_into("Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        import fcntl
        with sysfd.target_fd(info.pid, info.fd) as d:
            fcntl.ioctl(d, PIDFD_GET_INFO, buf)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL, errno.ESRCH):
            return None
        raise EngineError(f"pid {info.pid} fd {info.fd}: PIDFD_GET_INFO: {e.strerror}", pid=info.pid,
                          errno=e.errno) from e
    mask, = struct.unpack_from("Q", buf, 0)
    if not mask & PIDFD_INFO_EXIT:
        return None
    return struct.unpack_from("i", buf, _EXIT_CODE_AT)[0]


def _state(info, ctx) -> dict:
    key = f"pidfd:{info.pid}:{info.fd}"
    if key in ctx.shared:
        return ctx.shared[key]
    check_async(info, ctx)
    if info.flags & PIDFD_THREAD:
        raise refuse(info, "unsupported-fd", "a thread's pidfd (PIDFD_THREAD): not restored")
    if info.flags & ~_OWN_FLAGS:
        raise refuse(info, "unsupported-fd", f"pidfd with file flags {info.flags:#o}: pidfd_open makes "
                     "O_RDWR, with O_NONBLOCK at most")
    pid = _named(info)
    st = {"pid": pid}
    if pid == -1:
        status = _exit_status(info)
        if status is not None and not _exit_makeable(status):
            raise refuse(info, "unsupported-fd", f"pidfd of a process killed by signal {status & 0x7f} "
                         f"(wait status {status:#x}, a signal that dumps core): a restore would have to dump "
                         "a core to make that death again")
        st["exit"] = status
        # One dead process: one pidfs inode, whoever holds its pidfds.
        # Before pidfs every pidfd is the one anon inode: nothing groups them.
        st["dead"] = info.ino if fs_magic(info) == PIDFS_MAGIC else f"{info.pid}:{info.fd}"
        check_held_outside(info, ctx, "pidfd")
    else:
        if pid not in _members(ctx):
            raise refuse(info, "pidfd-outside", f"pidfd of pid {pid}, a process outside the dump: "
                         "a restore makes pidfds only of the processes it restores")
        check_held_outside(info, ctx, "pidfd")
        _not_shared_in_tree(info, ctx)
    ctx.shared[key] = st
    return st


def _not_shared_in_tree(info, ctx) -> None:
    """A live process's pidfd is opened anew in its holder: one another
    member holds too (the same open file, from before a fork) would be
    two files after the restore."""
    from .. import pidfd as sysfd
    for pid, fd, link in tree_fds(ctx, info.pid):
        if link == LINK and sysfd.same_file(info.pid, info.fd, pid, fd):
            raise refuse(info, "unsupported-fd", f"pidfd shared with member {pid} (its fd {fd}, one open file "
                         "from before a fork): a live process's pidfd is opened anew in each holder")


def classify(info, ctx) -> str:
    st = _state(info, ctx)
    nb = " PIDFD_NONBLOCK" if info.flags & os.O_NONBLOCK else ""
    if st["pid"] == -1:
        how = f", exit status {st['exit']:#x}" if st["exit"] is not None else ""
        return f"pidfd of a dead, reaped process{how}{nb}"
    who = "itself" if st["pid"] == info.pid else f"pid {st['pid']} of the dump"
    return f"pidfd of {who}{nb}"


def dump(info, ctx) -> dict:
    st = _state(info, ctx)
    rec = {"pid": st["pid"]}
    if st["pid"] == -1:
        rec["dead"] = st["dead"]
        rec["exit"] = st["exit"]
    return rec


def validate(rec: dict, ctx) -> None:
    """The record's shape, and that a live one names a process this restore
    makes (a hostile image could name any process on the machine)."""
    pid = rec.get("pid")
    ok = isinstance(pid, int) and not isinstance(pid, bool) and (pid == -1 or 0 < pid < (1 << 22))
    if ok and pid == -1:
        d, x = rec.get("dead"), rec.get("exit")
        ok = (isinstance(d, str) and 0 < len(d) < 64 or isinstance(d, int) and not isinstance(d, bool) and d >= 0) \
            and (x is None or isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 0xffff
                 and _exit_makeable(x))
    elif ok:
        ok = "dead" not in rec and "exit" not in rec
    if not ok:
        raise refuse_rec(rec, ctx, "image-invalid", f"pidfd record {_shape(rec)}")
    if pid != -1 and pid not in _members(ctx):
        raise refuse_rec(rec, ctx, "image-invalid", f"pidfd of pid {pid}, which this restore does not make")
    if rec.get("flags", 0) & ~_OWN_FLAGS:
        raise refuse_rec(rec, ctx, "image-invalid", f"pidfd with file flags {rec['flags']:#o}")


def _shape(rec: dict) -> str:
    return repr({k: rec.get(k) for k in ("pid", "dead", "exit")})[:120]


def _exit_makeable(status: int) -> bool:
    """A wait status a child can die with: exited (code << 8), or killed by
    a signal whose default action terminates without a core."""
    sig = status & 0x7f
    if sig == 0:
        return status & 0xff == 0
    return status >> 8 == 0 and not status & 0x80 and sig in _TERMINATING


def restore(rec: dict, ctx) -> int:
    """A dead one: its pidfd, made with the rest of its dead process's
    (:func:`_make_dead`). A live one: a placeholder holding the number
    until :func:`finish` opens the pidfd in the new process."""
    if rec["pid"] != -1:
        try:
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise failed(rec, ctx, "opening a placeholder", e) from e
    made = ctx.shared.setdefault(f"pidfd:dead:{rec['dead']}", {})
    if not made:
        made.update(_make_dead(rec, ctx))
    return made.pop(id(rec))


def _records(ctx) -> list:
    every = getattr(ctx, "tree_records", None) or ctx.records or []
    return [r for r in every if r.get("kind") == KIND and "dup_of" not in r and "ofd_of" not in r]


def _make_dead(rec: dict, ctx) -> dict:
    """One child, dead with the recorded status, and a pidfd of it for every
    record naming that dead process: {id(record): fd}."""
    from .. import pidfd as sysfd
    group = [r for r in _records(ctx) if r.get("pid") == -1 and r.get("dead") == rec["dead"]] or [rec]
    statuses = {r.get("exit") for r in group}
    if len(statuses) != 1:
        raise refuse_rec(rec, ctx, "image-invalid", f"pidfds of one dead process with two exit statuses {statuses}")
    status = statuses.pop() or 0
    r, w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:      # pragma: no cover - the child; nothing but its death
        try:
            os.close(w)
            os.read(r, 1)       # until every pidfd is open: a zombie, not reaped yet, is enough
            sig = status & 0x7f
            if sig:
                if sig != signal.SIGKILL:       # (its action cannot be set: always the default)
                    signal.signal(sig, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
                os.kill(os.getpid(), sig)
            os._exit(status >> 8)
        finally:
            os._exit(127)
    os.close(r)
    out: dict = {}
    try:
        try:
            for g in group:
                nb = PIDFD_NONBLOCK if g.get("flags", 0) & os.O_NONBLOCK else 0
                out[id(g)] = sysfd.raw_syscall("pidfd_open", ctypes.c_int(child), ctypes.c_uint(nb))
        except OSError as e:
            raise failed(rec, ctx, "opening a pidfd of a process made to die", e) from e
        finally:
            os.close(w)
            _, got = os.waitpid(child, 0)
        if got != status:
            raise EngineError(f"fd {rec['fd']}: the process made to die for a dead pidfd ended with status "
                              f"{got:#x}, not {status:#x}", pid=ctx.pid)
    except BaseException:
        for fd in out.values():
            os.close(fd)
        raise
    return out


FINISH_FIRST = True     # engine/build.py finish_fds: before an epoll instance registers it


def finish(rec: dict, ctx, task) -> None:
    """A live one: pidfd_open in the new process (it names the same PID
    there), dup3 onto the record's fd and its dups, then read back."""
    if rec["pid"] == -1:
        return
    from .. import pidfd as sysfd
    nb = PIDFD_NONBLOCK if rec.get("flags", 0) & os.O_NONBLOCK else 0
    new = task.syscall(sysfd.syscall_nr("pidfd_open"), rec["pid"], nb)
    if new < 0:
        raise EngineError(f"fd {rec['fd']}: pidfd_open({rec['pid']}) in the new process: {os.strerror(-new)}",
                          pid=ctx.pid, errno=-new)
    dups = [(r["fd"], r["cloexec"]) for r in (ctx.records or []) if r.get("dup_of") == rec["fd"]]
    for fd, cloexec in [(rec["fd"], rec["cloexec"])] + dups:
        got = task.syscall(sysfd.syscall_nr("dup3"), new, fd, os.O_CLOEXEC if cloexec else 0)
        if got != fd:
            raise EngineError(f"fd {fd}: dup3 of the new pidfd in the new process: "
                              f"{os.strerror(-got) if got < 0 else got}", pid=ctx.pid)
    task.syscall(sysfd.syscall_nr("close"), new)
    holder = getattr(task, "pid", None) or ctx.pid
    try:
        with open(f"/proc/{holder}/fdinfo/{rec['fd']}") as f:
            text = f.read()
    except OSError as e:
        raise EngineError(f"cannot read back pidfd {rec['fd']}: {e.strerror}", pid=holder, errno=e.errno) from e
    named = parse_fdinfo(text).get("Pid", "?")
    if named != str(rec["pid"]):
        raise EngineError(f"pidfd {rec['fd']} restored naming pid {named}, not {rec['pid']}", pid=holder)
