"""SO_PEERCRED exact: the pid, uid, gid and groups a unix socket reports
as its peer's.

The kernel records them once, from the calling task, when the socket is
made by socketpair(2) (both ends: the caller), listen(2) (the listener:
the caller) or connect(2) (the connecting end copies the listener's; the
server end the listener will hand out gets the caller's) - init_peercred
and copy_peercred in net/unix/af_unix.c: its tgid (a struct pid, shown by
number even after that process has exited) and its effective uid/gid and
supplementary groups (SO_PEERGROUPS).

So a restore that made those calls itself would report ckpt. Instead the
call is made by a short-lived helper process created with the recorded
pid (clone3 set_tid, from this process: the helper is a fork of ckpt, run
as os.fork runs one) and the recorded credentials (setgroups, setresgid,
setresuid); it makes the one call on fds it inherited or sends the new
ones back (SCM_RIGHTS), exits, and is reaped at once (and dies with ckpt:
PR_SET_PDEATHSIG, so a killed restore leaves no process with that pid), so its pid is free
again - for the restored process itself when the peer was the process.
A pid that another live process holds at restore cannot be given: the
restore is refused (`peer-pid-in-use`), and so is a dump whose peer pid
belongs to a live process other than the target (the restore would be).

Known limit: SO_PEERPIDFD (pidfd of the peer) names the helper, which has
exited, where the original named a live process (the same pid).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket as _socket
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Callable, List, Optional

from ..errors import EngineError, Refusal

SO_PEERCRED, SO_PEERGROUPS = 17, 59
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
HELPER_NAME = b"ckpt-peercred"      # its comm while it holds a pid


def read(fd: int) -> dict:
    """The peer credentials of the socket at fd (a duplicate). Raises OSError."""
    s = _socket.socket(fileno=os.dup(fd))
    try:
        pid, uid, gid = struct.unpack("iII", s.getsockopt(_socket.SOL_SOCKET, SO_PEERCRED, 12))
        try:
            raw = s.getsockopt(_socket.SOL_SOCKET, SO_PEERGROUPS, 1024)   # Python's cap: 256 groups
            groups = sorted(struct.unpack(f"{len(raw) // 4}I", raw))
        except OSError:
            groups = None
    finally:
        s.close()
    return {"pid": pid, "uid": uid, "gid": gid, "groups": groups}


def text(cred: dict) -> str:
    return f"pid {cred['pid']} uid {cred['uid']} gid {cred['gid']}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def dump_problem(cred: dict, target: int, inside=()) -> Optional[str]:
    """Why a restore could not reproduce `cred` (checked at dump, target
    frozen): its pid is a live process other than the target (or, `inside`,
    than the members of the dumped process tree: restored with their pids,
    so theirs are free when the helper takes them)."""
    pid = cred["pid"]
    if cred.get("groups") is None:
        return "its peer's supplementary groups cannot be read (more than 256?)"
    if pid <= 0 or pid == target or pid in inside:
        return None
    try:
        with open(f"/proc/{target}/task/{pid}/stat"):
            return None       # one of the target's threads: the same tgid
    except OSError:
        pass
    if _alive(pid):
        return (f"its peer credentials name pid {pid}, a live process outside the dump: a restore cannot "
                "make the socket report that pid")
    return None


def restore_problem(cred: dict) -> Optional[str]:
    """Why `cred` cannot be given here (restore pre-flight): its pid is taken."""
    pid = cred.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    from ..restore import _pid_free
    if not _pid_free(pid):
        return f"its peer credentials name pid {pid}, which another process holds now"
    return None


def check(cred: dict, got: dict) -> Optional[str]:
    """A difference between the recorded and the rebuilt credentials."""
    for k in ("pid", "uid", "gid", "groups"):
        if cred.get(k) is not None and got.get(k) != cred[k]:
            return f"peer {k} {got.get(k)} after restore, was {cred[k]}"
    return None


_pyapi = ctypes.pythonapi
_libc = ctypes.PyDLL(None, use_errno=True)      # PyDLL: the GIL stays held across clone3, as in os.fork


def _clone_with_pid(pid: int) -> int:
    """fork(2) with a chosen pid: clone3(set_tid) run the way os.fork runs
    fork (PyOS_BeforeFork / AfterFork_*). 0 in the child."""
    from ..arch import current
    arch = current()
    tid = (ctypes.c_int * 1)(pid)
    args = arch.CloneArgs(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tid), set_tid_size=1)
    _libc.syscall.restype = ctypes.c_long
    # The child starts with every signal blocked and keeps them so: it
    # holds the restored process's pid, and a signal meant for that
    # process (a kill by pid while ckpt dies) must not run Python's
    # handlers or end it as if the restored process had died of it. It
    # ends by exiting or by SIGKILL (ckpt gone), nothing else.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    _pyapi.PyOS_BeforeFork()
    ret = _libc.syscall(ctypes.c_long(arch.SYS["clone3"]), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if ret == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _pyapi.PyOS_AfterFork_Parent()
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if ret < 0:
        if err == 17:
            raise Refusal("peer-pid-in-use", f"pid {pid}, named by a socket's peer credentials, was taken "
                          "before it could be used")
        if err == 1:
            raise Refusal("capability", "clone3 set_tid needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")
        raise EngineError(f"clone3 (peer credentials helper, pid {pid}): {os.strerror(err)}", errno=err)
    return ret


def _die_with(parent: int) -> None:
    """The helper holds the restored process's pid: if ckpt dies (killed
    mid-restore) it must not outlive it, and it ends the one way a killed
    restore's processes end, by SIGKILL - also when ckpt died before the
    death signal was armed."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def run_as(cred: dict, fn: Callable[[], List[int]]) -> List[int]:
    """Run `fn` in a helper process with cred's pid and credentials; the
    fds it returns come back here (new fds), the helper is reaped. Raises
    Refusal (peer-pid-in-use, capability) or EngineError."""
    chan, far = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    parent = os.getpid()
    try:
        child = _clone_with_pid(cred["pid"])
        if child == 0:
            code = 0
            try:
                # Named, so that whoever looks at the pid while it is held
                # (ps, a test after killing ckpt) sees ckpt's helper and
                # not a half-built copy of the restored process.
                _libc.prctl(PR_SET_NAME, HELPER_NAME, 0, 0, 0)
                _die_with(parent)
                chan.close()
                groups = cred.get("groups")
                if groups is not None:
                    os.setgroups(groups)
                os.setresgid(cred["gid"], cred["gid"], cred["gid"])
                os.setresuid(cred["uid"], cred["uid"], cred["uid"])
                _die_with(parent)   # again: a change of ids clears the death signal
                fds = fn()
                _socket.send_fds(far, [b"ok"], fds)
            except BaseException as e:   # noqa: BLE001 - reported to the parent
                try:
                    far.send(f"error {e!r}".encode()[:4000])
                except OSError:
                    pass
                code = 1
            os._exit(code)
        far.close()
        try:
            msg, fds, _, _ = _socket.recv_fds(chan, 4096, 16)
        finally:
            _, status = os.waitpid(child, 0)
        if msg != b"ok":
            for fd in fds:
                os.close(fd)
            raise EngineError(f"peer credentials helper (pid {cred['pid']}): {msg.decode(errors='replace')}")
        for fd in fds:
            os.set_inheritable(fd, False)
        return list(fds)
    finally:
        chan.close()
        try:
            far.close()
        except OSError:
            pass


__all__ = ["read", "text", "dump_problem", "restore_problem", "check", "run_as"]
