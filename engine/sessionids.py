"""Whether a restore can put a process back in its session and group.

A restored process is cloned by the restorer, so it starts in the
restorer's session and group; from there setsid() makes it a session
leader, setpgid(0, 0) a group leader, and setpgid(0, PGID) moves it into a
group that still has a member in that same session. Nothing else is
possible: a process can never enter another session.

Ids of 0: /proc/PID/stat and getsid(2) show 0 for a session or group whose
leader has no pid in the reader's pid namespace. In the initial pid
namespace that is one session and one group, the kernel's own
(init_struct_pid), which every process is in that descends from PID 1 or
a kernel thread without calling setsid() or setpgid(): a service manager or
CI runner that never did (the project's CI runs ckpt that way). setpgid()
cannot name group 0, so a restore puts a process there only by inheriting
it from a restorer in it. In a child pid namespace 0 stands for every
session and group outside, and two zeros need not be the same one: refused.
"""

from __future__ import annotations


TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

def zero_is_one() -> bool:
    """Whether an id of 0 names a single session/group: ckpt runs in the
    initial pid namespace."""
    from .pidns import in_initial
    return in_initial()


def _outside(sid: int) -> str:
    return (f"{'session' if sid == 0 else 'process group'} 0: its leader is outside ckpt's pid namespace, so "
            "a restore could not tell it from another; start it with setsid, or run ckpt where its leader is visible")


def dump_problem(pid: int, sid: int, pgid: int, ckpt_sid: int, getsid: "Callable[[int], int]",
                 zero_one: "Optional[bool]" = None) -> "Optional[str]":
    """Why a process (not a tree member, not a shell job restored with
    --tty) could not be put back in its session and group by a restore run
    from ckpt's session, or None."""
    if sid == pid:
        return None
    if sid != ckpt_sid:
        return (f"in session {sid}, neither its own nor ckpt's ({ckpt_sid}): a restore could not put it back "
                "there; start it with setsid, or run ckpt from its session")
    if 0 in (sid, pgid) and not (zero_is_one() if zero_one is None else zero_one):
        return _outside(sid)
    if pgid == pid or pgid == 0:
        return None     # its own group; or the kernel's, inherited by a restorer in it (restore_problem)
    # restore joins the group through a member (setpgid needs a live group
    # in the session): a group whose leader has exited would be gone once
    # the target is.
    try:
        ok = getsid(pgid) == sid
    except OSError:
        ok = False
    return None if ok else (f"its process group {pgid} has no leader in session {sid}: it would not exist for "
                            "the restore; start it with setsid")


def restore_problem(pid: int, sid: int, pgid: int, my_sid: int, my_pgid: int, getsid: "Callable[[int], int]",
                    zero_one: "Optional[bool]" = None) -> "Optional[str]":
    """Why this restorer (in session my_sid, group my_pgid) cannot put the
    process back in its session and group, or None."""
    if sid == pid:
        return None
    if sid != my_sid:
        return (f"was in session {sid} (not its own, not ckpt's {my_sid}); start it with setsid to make it "
                "restorable anywhere")
    if 0 in (sid, pgid) and not (zero_is_one() if zero_one is None else zero_one):
        return _outside(sid)
    if pgid == pid:
        return None
    if pgid == 0:
        return None if my_pgid == 0 else (
            "was in process group 0 (the kernel's, of processes that never called setsid or setpgid), which "
            "this restore is not in: run ckpt restore from there")
    try:
        ok = getsid(pgid) == my_sid
    except OSError:
        ok = False
    return None if ok else f"its process group {pgid} no longer exists in this session"
