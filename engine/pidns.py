"""ckpt's own namespaces as an input of every dump and restore.

Every pid in an image (the process's, its threads', a tree's members',
sessions and groups, timer and owner tids, peer credentials) is a number
of one pid namespace: the dump's (ckpt's; a target in another one is
refused, engine/check.py). A restore makes them with clone3(set_tid) in
*its* pid namespace, and the process comes back in the restorer's other
namespaces too. So the image records the namespaces of the dump (the
manifest's meta "namespaces": kind -> inode) and a restore in others is
refused: on the same boot by identity; across boots only the initial
namespaces (fixed inodes, include/linux/proc_ns.h) can be told apart, so a
non-initial pid, user, uts, ipc, cgroup or time namespace on either side is
refused (a container's pid 40 is not the host's pid 40, nor another
container's). Images older than format 12 do not say: restored only in the
initial pid namespace, where the engine always assumed they were made.

ckpt's /proc must number processes as ckpt does: /proc mounted for an
ancestor pid namespace (`unshare --pid --fork` without --mount-proc, a
container given the host's /proc) shows other processes under the same
numbers (ckpt -t 43 read the host's pid 43, a kernel thread, while
ptrace would seize the namespace's). Seen in ckpt's NSpid: one level when
/proc is its own namespace's. And ckpt's children must be born in ckpt's
pid namespace (`unshare --pid` without --fork: the restorer would become
PID 1 of a new namespace and take the restored process down when it exits).
"""

from __future__ import annotations

import os

from .errors import Refusal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Optional

REASON = "namespaces"
KINDS = ("pid", "mnt", "net", "ipc", "uts", "user", "cgroup", "time")
INIT_INO = {"pid": 0xEFFFFFFC, "user": 0xEFFFFFFD, "uts": 0xEFFFFFFE, "ipc": 0xEFFFFFFF,
            "cgroup": 0xEFFFFFFB, "time": 0xEFFFFFFA}


def proc_problem(nspid: "Optional[str]", proc_self: "Optional[str]", pid: int) -> "Optional[str]":
    """Why ckpt's /proc does not number processes as ckpt's pid namespace
    does, or None. nspid: ckpt's NSpid line (None below Linux 4.1),
    proc_self: readlink("/proc/self") (None: it does not resolve)."""
    levels = (nspid or "").split()
    if proc_self == str(pid) and (nspid is None or levels == [str(pid)]):
        return None
    return (f"/proc is mounted for another pid namespace than ckpt's (ckpt is pid {pid}, /proc/self is "
            f"{proc_self or 'missing'}, NSpid {' '.join(levels) or '?'}): it would read other processes under "
            "the pids it is given; mount a /proc for ckpt's own pid namespace (unshare --mount-proc, "
            "a container's own /proc)")


def children_problem(mine: "Optional[str]", children: "Optional[str]") -> "Optional[str]":
    """mine, children: ckpt's ns/pid and ns/pid_for_children links (None:
    unreadable; pid_for_children is, ENOENT, while no process has entered
    the namespace ckpt unshared: Linux >= 4.12, below MIN_KERNEL)."""
    if mine is None or mine == children:
        return None
    return (f"ckpt's children would be born in another pid namespace ({children or 'a new one'}) than its own "
            f"({mine}): it runs after unshare(CLONE_NEWPID) without a fork; run it with unshare --fork")


def _link(path: str) -> "Optional[str]":
    try:
        return os.readlink(path)
    except OSError:
        return None


def check_not_init(ckpt_pid: int, what: str) -> None:
    why = init_problem(ckpt_pid, what)
    if why:
        raise Refusal(REASON, why)


def check_environment(status: "Dict[str, str]") -> None:
    """Raise Refusal(namespaces) when ckpt's /proc or its children's pid
    namespace are not its own pid namespace's. status: ckpt's parsed
    /proc/self/status."""
    why = proc_problem(status.get("NSpid"), _link("/proc/self"), os.getpid()) or \
        children_problem(_link("/proc/self/ns/pid"), _link("/proc/self/ns/pid_for_children"))
    if why:
        raise Refusal(REASON, why)


def init_problem(ckpt_pid: int, what: str) -> "Optional[str]":
    """Why ckpt (pid `ckpt_pid`) cannot leave a process behind: it is PID 1,
    the init of its pid namespace, so the namespace ends with it and the
    kernel kills every process in it (`unshare --pid --fork ckpt restore`:
    "restored", and gone the moment ckpt exited)."""
    if ckpt_pid != 1:
        return None
    return (f"ckpt is PID 1 of its pid namespace (its init): the process it {what} would be killed with the "
            "namespace when ckpt exits; run ckpt under the namespace's init")


_initial = None


def in_initial() -> bool:
    """Whether ckpt runs in the initial pid namespace (by its fixed inode;
    not NSpid: a /proc mounted inside a child namespace lists only the
    levels from there down). A kernel without pid namespaces: yes; a
    /proc that cannot say: no."""
    global _initial
    if _initial is None:
        try:
            _initial = os.stat("/proc/self/ns/pid").st_ino == INIT_INO["pid"]
        except FileNotFoundError:
            _initial = True
        except OSError:
            _initial = False
    return _initial


def record() -> "Dict[str, int]":
    """ckpt's namespaces, kind -> inode (the dump's record: the target's are
    the same ones, or it is refused)."""
    out = {}
    for kind in KINDS:
        try:
            out[kind] = os.stat(f"/proc/self/ns/{kind}").st_ino
        except OSError:
            pass    # a kernel without that kind
    return out


def restore_problem(rec: "Optional[dict]", mine: "Dict[str, int]", same_boot: bool) -> "Optional[str]":
    """Why a restorer in namespaces `mine` cannot bring back an image
    dumped in `rec` (None: an image older than format 12), or None."""
    if rec is None:
        if mine.get("pid", INIT_INO["pid"]) != INIT_INO["pid"]:
            return ("the image (older than format 12) does not say in which pid namespace its pids are numbers: "
                    "restored only in the initial pid namespace")
        return None
    if same_boot:
        differ = [k for k in KINDS if k in rec and k in mine and rec[k] != mine[k]]
        if not differ:
            return None
        what = ", ".join(f"{k}:[{rec[k]}] (here {k}:[{mine[k]}])" for k in differ)
        return (f"dumped in other namespaces than this restore runs in: {what}; the process would come back in "
                "these (its pids numbered in another pid namespace): run ckpt restore where ckpt dump ran")
    odd = [k for k in INIT_INO if k in rec and k in mine
           and (rec[k] != INIT_INO[k] or mine[k] != INIT_INO[k])]
    if not odd:
        return None
    return ("dumped on another boot, and a namespace on either side is not the initial one: "
            + ", ".join(f"{k} ({'initial' if rec[k] == INIT_INO[k] else 'child'} at dump, "
                        f"{'initial' if mine[k] == INIT_INO[k] else 'child'} here)" for k in odd)
            + ": whether it is the same namespace cannot be told")


def check_record(meta: dict) -> "Optional[dict]":
    """The image's record (meta "namespaces"), its types checked; None when
    absent (an older image). Raises Refusal(image-invalid)."""
    if "namespaces" not in meta:
        return None
    rec = meta["namespaces"]
    if not (isinstance(rec, dict) and "pid" in rec
            and all(k in KINDS and type(v) is int and v > 0 for k, v in rec.items())):
        raise Refusal("image-invalid", f"manifest meta namespaces: {rec!r}")
    return rec


def check_restore(meta: dict, fmt: "Optional[int]", same_boot: bool) -> None:
    """Raise Refusal(namespaces | image-invalid) unless this restore runs
    in the image's namespaces (restore_problem)."""
    rec = check_record(meta if isinstance(meta, dict) else {})
    if rec is None and isinstance(fmt, int) and fmt >= 12:
        raise Refusal("image-invalid", "manifest meta: no namespaces record (format 12 has one)")
    why = restore_problem(rec, record(), same_boot)
    if why:
        raise Refusal(REASON, why)
