"""Files of /proc that a reopen gives back exactly: opened read-only and
not read yet (offset 0), naming either the process itself or the system.

A procfs file's contents are made when it is read, from the object it was
opened on: /proc/PID/stat is bound to that process (its struct pid), not
to the number, and /proc/meminfo to nothing but the kernel. So an fd that
has produced nothing yet is, after a restore under the same PID, the same
thing as a fresh open of the same name: its next read reports the
restored process (or the system) as the original's would have reported
itself. Programs hold such fds for an instant between open and read (a
key-value server sampling its RSS); a freeze there used to refuse them.

Deny by default, every other case stays `pseudo-file` (pseudo.py): an fd
that was read (the rest of what it would return was generated at its
first read and is not in any image), opened for writing, a file of
another process (reopened, it would name whatever holds that PID then),
a file outside the lists below (files whose open is a permission check,
a snapshot or a subscription: mem, environ, mountinfo, /proc/net/...), one
open file description shared with another member. (An epoll cannot watch
the process's own files: they have no poll, EPOLL_CTL_ADD says EPERM; the
system's are installed before the epoll kind re-adds its targets.)

The process's own files are reopened by the restored process itself
(finish), once it exists under its PID, over a stand-in; the system's by
the restorer like any file.
"""

from __future__ import annotations

import os

from ._util import refuse, refuse_rec, reopen_in_process, tree_fds

KIND = "procfile"
REASONS = ("pseudo-file", "image-invalid")

# Read-only views of the process that a reader of its own files may always read.
OWN = frozenset({"stat", "statm", "status", "cmdline", "comm", "io", "limits", "schedstat", "wchan",
                 "oom_score", "cgroup"})
# System-wide, the same for every opener in the namespace.
SYSTEM = frozenset({"stat", "meminfo", "loadavg", "uptime", "cpuinfo", "version", "vmstat"})

_patterns = None


def _res():
    """(own, system) patterns, compiled on first use: every restore imports
    this module (engine/imagecheck.py), few have a /proc fd, and re costs
    a run ~20 ms under TCG."""
    global _patterns
    if _patterns is None:
        import re
        _patterns = (re.compile(r"^/proc/(\d+)/([a-z_]+)$"), re.compile(r"^/proc/([a-z_]+)$"))
    return _patterns


def eligible(link: str) -> bool:
    """The name is one of the lists (the classifier's routing; the rules are classify's)."""
    own_re, system_re = _res()
    m = own_re.match(link)
    if m:
        return m.group(2) in OWN
    m = system_re.match(link)
    return bool(m) and m.group(1) in SYSTEM


def _what(link: str, pid: int):
    own_re, system_re = _res()
    m = own_re.match(link)
    if m:
        return ("own", m.group(2)) if int(m.group(1)) == pid else ("other", m.group(2))
    m = system_re.match(link)
    return ("system", m.group(1)) if m else (None, None)


def _shared_with_member(info, ctx):
    """(pid, fd) of another member holding this open file description."""
    from ..pidfd import KCMP_FILE, kcmp
    for pid, fd, link in tree_fds(ctx, info.pid):
        try:
            if link == info.link and kcmp(info.pid, pid, KCMP_FILE, info.fd, fd) == 0:
                return pid, fd
        except OSError:
            continue
    return None


def classify(info, ctx) -> str:
    where, name = _what(info.link, info.pid)
    why = None
    if where == "other":
        why = "a file of another process: reopened, it would name whatever holds that PID then"
    elif where is None or name not in (OWN if where == "own" else SYSTEM):
        why = "not one of the /proc files a reopen gives back exactly"
    elif info.flags & os.O_ACCMODE != os.O_RDONLY:
        why = "open for writing"
    elif info.pos != 0:
        why = (f"read up to offset {info.pos}: the rest it would return was made at its first read "
               "and is in no image")
    elif where == "own":
        other = _shared_with_member(info, ctx)
        if other:
            why = (f"one open file description with pid {other[0]} (fd {other[1]}): each process "
                   "reopens its own, which would make two")
    if why:
        raise refuse(info, "pseudo-file", f"{info.link} on proc: {why}")
    if where == "own":
        return f"{info.link} (its own, not read yet: reopened by the restored process)"
    return f"{info.link} (the system's, not read yet: reopened)"


def dump(info, ctx) -> dict:
    classify(info, ctx)
    where, name = _what(info.link, info.pid)
    return {"proc": where, "name": name}


def validate(rec: dict, ctx) -> None:
    where, name = rec.get("proc"), rec.get("name")
    if where not in ("own", "system") or name not in (OWN if where == "own" else SYSTEM) \
            or rec.get("pos") != 0 or rec.get("flags", -1) & os.O_ACCMODE != os.O_RDONLY:
        raise refuse_rec(rec, ctx, "image-invalid", f"procfile record names no reopenable file: {where!r} {name!r}")


def _flags(rec: dict) -> int:
    return rec["flags"] & (os.O_ACCMODE | os.O_NONBLOCK) | os.O_CLOEXEC


def restore(rec: dict, ctx) -> int:
    if rec["proc"] == "system":
        return os.open(f"/proc/{rec['name']}", _flags(rec))
    # A stand-in until the process opens its own (finish): its PID is not
    # its own yet here.
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


def finish(rec: dict, ctx, task) -> None:
    if rec["proc"] == "own":
        reopen_in_process(rec, ctx, task, f"/proc/{task.pid}/{rec['name']}", _flags(rec), "its own /proc file")
