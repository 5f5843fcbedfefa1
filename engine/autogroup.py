"""The nice value of a process's scheduling autogroup (/proc/PID/autogroup,
"/autogroup-N nice V"; sched(7)), which `renice -g`-like tools and a process
itself set by writing /proc/self/autogroup.

An autogroup is made by setsid(2) and inherited by fork: a restored session
leader (its setsid is injected by the restore) has a new one, at nice 0,
and gets the saved nice written from outside; any other restored process
shares the restorer's (it is a clone of ckpt), whose nice it cannot change
without changing ckpt's session's, so a non-leader whose autogroup nice
differs from the restorer's is refused (at dump and at restore:
`unsupported-state`). A tree member whose session leader is in the tree
shares that leader's (restored) autogroup. Without CONFIG_SCHED_AUTOGROUP
there is no file and nothing to carry.

A process that never passed a setsid (init's children, and everything a
service like this machine's init starts without one) is in the root task
group, not an autogroup: its file is empty. Its nice reads as 0, the only
value the root group has (writing it is EINVAL), so a target and a ckpt
that sit there compare as equal, and one at nice 0 in an autogroup too.
"""

from __future__ import annotations

from .errors import EngineError, Refusal


def read(pid) -> "int | None":
    """The autogroup nice of `pid` ("self" for ckpt), None without autogroups."""
    from .procfs import read_all    # no text file object: a tree's survey reads one per member
    try:
        text = read_all(f"/proc/{pid}/autogroup").decode()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parse(text)


def parse(text: str) -> int:
    """The nice of a /proc/PID/autogroup text; empty is the root group's 0."""
    if not text.strip():
        return 0
    _, sep, nice = text.partition(" nice ")
    if not sep:
        raise EngineError(f"unreadable /proc autogroup line {text.strip()!r}")
    return int(nice)


def refusal(nice, sid: int, pid: int, leader_restored: bool) -> "Refusal | None":
    """A process that is not its session leader comes back in the
    restorer's autogroup (or its restored leader's): refused when that
    one's nice is not the saved one."""
    if nice is None or sid == pid or leader_restored:
        return None
    mine = read("self")
    if mine is None or mine == nice:
        return None
    return Refusal("unsupported-state", f"its session's scheduling autogroup has nice {nice} and ckpt's has "
                   f"{mine}: a process that is not its session leader comes back in ckpt's autogroup",
                   pid=pid)


def restore(pid: int, nice) -> None:
    """From outside, once the restored process made its session (setsid):
    a leader's autogroup is its own, and gets the saved nice."""
    if nice is None:
        return
    import os
    if os.getsid(pid) != pid or read(pid) == nice:
        return
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except OSError as e:
        raise EngineError(f"setting the autogroup nice {nice}: {e.strerror or e}", pid=pid, errno=e.errno) from e
    if read(pid) != nice:
        raise EngineError(f"the autogroup nice {nice} reads back as {read(pid)}", pid=pid)
