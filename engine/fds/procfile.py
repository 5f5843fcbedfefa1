"""Files of /proc that a reopen gives back exactly: opened read-only,
naming either the process itself or the system, not read yet (offset 0)
or read to their end (a monitor's fd: top, vmstat and free keep
/proc/stat, /proc/meminfo and /proc/vmstat open and rewind them before
every read).

A procfs file's contents are made when it is read, from the object it was
opened on: /proc/PID/stat is bound to that process (its struct pid), not
to the number, and /proc/meminfo to nothing but the kernel. So an fd that
has produced nothing yet is, after a restore under the same PID, the same
thing as a fresh open of the same name: its next read reports the
restored process (or the system) as the original's would have reported
itself. Programs hold such fds for an instant between open and read (a
key-value server sampling its RSS); a freeze there used to refuse them.

Read to its end. All but cmdline are seq_files (fs/seq_file.c): a read
generates the whole snapshot (single_open: one record; vmstat and
cpuinfo: one record per item, made as the reader gets to it) into a
buffer the open file keeps, and hands it out across reads. An fd at
offset N > 0 is either at the end of its snapshot (buffer empty, no
record left: its next read returns 0, and a rewind or any seek makes a
new snapshot) or part-way (the rest of an old snapshot is buffered, in no
image). Nothing in /proc or fdinfo tells them apart, so the dump asks the
open file itself (a pidfd_getfd duplicate shares it) with a read into an
unmapped buffer (NULL): seq_read_iter copies the buffered rest first and,
when the copy faults, returns EFAULT leaving the buffer as it was; with
nothing buffered it asks for the next record, and at the end there is
none, so it returns 0 and changes nothing. 0 is the end: restorable; EFAULT
is part-way: refused. (For vmstat and cpuinfo an fd that stopped exactly
between two records has an empty buffer but a next record: the probe
makes that record, so the original, refused, reads values a few
milliseconds older than it would have.) The process's own files are
reopened by injection while the restore traces it, so their snapshot
then is not the one an untraced process makes (TracerPid, state): at an
offset they stay refused. The restore opens the file again
and seeks to N, which makes a snapshot and skips N bytes of it
(traverse): when the snapshot now is no longer than N, nothing is
buffered and the new fd is at its end too, the same state - the same
probe confirms it; a snapshot that grew past N (a counter gained a digit)
would hand out its tail: the length moves with the counters' digits, so
the restore tries again for a while, then refuses (`pseudo-file`). cmdline is no seq_file: each read copies from the
process's argument area at the offset, which the restored memory holds
as it was, so any offset is exact.

Deny by default, every other case stays `pseudo-file` (pseudo.py): an fd
read part-way (the rest of what it would return was generated at its
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

from ..errors import EngineError
from ._util import refuse, refuse_rec, reopen_in_process, tree_fds

KIND = "procfile"
REASONS = ("pseudo-file", "image-invalid")

# Read-only views of the process that a reader of its own files may always read.
OWN = frozenset({"stat", "statm", "status", "cmdline", "comm", "io", "limits", "schedstat", "wchan",
                 "oom_score", "cgroup"})
# System-wide, the same for every opener in the namespace.
SYSTEM = frozenset({"stat", "meminfo", "loadavg", "uptime", "cpuinfo", "version", "vmstat"})
# Made one record at a time: a probe can make the next one (see above).
MULTI_RECORD = frozenset({"cpuinfo", "vmstat"})
# No snapshot: a read at any offset copies from the process's memory.
STATELESS = frozenset({"cmdline"})
# How long a restore waits for a snapshot no longer than the offset
# (counters that lost a digit since come back within moments: vmstat's
# nr_dirty 10 -> 9), trying every RESTORE_PAUSE seconds.
RESTORE_PATIENCE = 2.0
RESTORE_PAUSE = 0.02
_PROBE_LEN = 4096

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


def _probe_raw(fd: int) -> int:
    """read(fd, NULL, _PROBE_LEN) in this process: 0 at the end of the
    snapshot, -EFAULT with bytes still to hand out (nothing consumed)."""
    from .. import libc
    from ..arch import current
    try:
        return libc.syscall(current().SYS["read"], fd, None, _PROBE_LEN, name="read (probe)")
    except libc.SysError as e:
        return -e.errno


def at_end(pid: int, fd: int) -> bool:
    """Whether the target's open file (a seq_file of /proc) is at the end of
    its snapshot, asked through a duplicate (module doc). Raises EngineError."""
    from ..pidfd import target_fd
    with target_fd(pid, fd) as dup:
        r = _probe_raw(dup)
    if r == 0:
        return True
    if r == -14:        # EFAULT: bytes buffered
        return False
    raise EngineError(f"probe read of pid {pid} fd {fd}: {os.strerror(-r)}", pid=pid, errno=-r)


def _why_not_at_end(info, ctx, where: str, name: str):
    if where == "own" and name in STATELESS:
        return None
    if where == "own":
        return (f"read up to offset {info.pos}: its own files are reopened while the restore traces "
                "it, whose snapshot then differs (TracerPid, state) from the one it read")
    if name in MULTI_RECORD and ctx.dry_run and not getattr(ctx.options, "probe", True):
        return (f"read up to offset {info.pos}: whether at its end is not looked at here (a probe could "
                "make its next record)")
    key = f"procfile-end:{info.pid}:{info.fd}"
    if key not in ctx.shared:       # classify and dump both ask: one probe
        try:
            ctx.shared[key] = at_end(info.pid, info.fd)
        except (OSError, EngineError) as e:
            return f"read up to offset {info.pos}: its end could not be probed: {e}"
    if ctx.shared[key]:
        return None
    return (f"read up to offset {info.pos}, not to its end: the rest it would return was made at an "
            "earlier read and is in no image")


def classify(info, ctx) -> str:
    where, name = _what(info.link, info.pid)
    why = None
    if where == "other":
        why = "a file of another process: reopened, it would name whatever holds that PID then"
    elif where is None or name not in (OWN if where == "own" else SYSTEM):
        why = "not one of the /proc files a reopen gives back exactly"
    elif info.flags & os.O_ACCMODE != os.O_RDONLY:
        why = "open for writing"
    elif info.pos != 0 and _why_not_at_end(info, ctx, where, name):
        why = _why_not_at_end(info, ctx, where, name)
    if why is None and where == "own":
        other = _shared_with_member(info, ctx)
        if other:
            why = (f"one open file description with pid {other[0]} (fd {other[1]}): each process "
                   "reopens its own, which would make two")
    if why:
        raise refuse(info, "pseudo-file", f"{info.link} on proc: {why}")
    state = "not read yet" if info.pos == 0 else f"read to its end, offset {info.pos}"
    if where == "own":
        return f"{info.link} (its own, {state}: reopened by the restored process)"
    return f"{info.link} (the system's, {state}: reopened)"


def dump(info, ctx) -> dict:
    classify(info, ctx)
    where, name = _what(info.link, info.pid)
    return {"proc": where, "name": name, "at_end": bool(info.pos)}


def validate(rec: dict, ctx) -> None:
    where, name = rec.get("proc"), rec.get("name")
    if where not in ("own", "system") or name not in (OWN if where == "own" else SYSTEM) \
            or not isinstance(rec.get("pos"), int) or rec["pos"] < 0 \
            or (rec["pos"] and not rec.get("at_end")) \
            or (rec["pos"] and where == "own" and name not in STATELESS) \
            or rec.get("flags", -1) & os.O_ACCMODE != os.O_RDONLY:
        raise refuse_rec(rec, ctx, "image-invalid", f"procfile record names no reopenable file: {where!r} {name!r}")


def _flags(rec: dict) -> int:
    return rec["flags"] & (os.O_ACCMODE | os.O_NONBLOCK) | os.O_CLOEXEC


def _grew(rec: dict, ctx, path: str) -> "Refusal":
    return refuse_rec(rec, ctx, "pseudo-file",
                      f"{path} on proc: read to its end at offset {rec['pos']}, but its contents now run "
                      f"past that offset (for {RESTORE_PATIENCE:g} s): a read would return bytes the "
                      "original's would not")


def _to_end(rec: dict, seek, probe) -> bool:
    """Seek to the record's offset (a fresh snapshot each try: from 0 first,
    since seq_lseek makes none when the offset is where it stands) until
    the probe finds the end there."""
    if not rec.get("pos") or (rec["proc"] == "own" and rec["name"] in STATELESS):
        if rec.get("pos"):
            seek(rec["pos"])
        return True
    import time
    deadline = time.monotonic() + RESTORE_PATIENCE
    while True:
        seek(0)
        seek(rec["pos"])
        if probe() == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(RESTORE_PAUSE)


def restore(rec: dict, ctx) -> int:
    if rec["proc"] == "system":
        path = f"/proc/{rec['name']}"
        fd = os.open(path, _flags(rec))
        try:
            if not _to_end(rec, lambda off: os.lseek(fd, off, os.SEEK_SET), lambda: _probe_raw(fd)):
                raise _grew(rec, ctx, path)
        except BaseException:
            os.close(fd)
            raise
        return fd
    # A stand-in until the process opens its own (finish): its PID is not
    # its own yet here.
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


def finish(rec: dict, ctx, task) -> None:
    if rec["proc"] == "own":
        path = f"/proc/{task.pid}/{rec['name']}"
        reopen_in_process(rec, ctx, task, path, _flags(rec), "its own /proc file")
        if rec.get("pos"):
            # The offset is the open file's: set and probed on the restored fd by injection.
            fd = rec["fd"]
            if not _to_end(rec, lambda off: task.call("lseek", fd, off, os.SEEK_SET),
                           lambda: task.syscall(task.arch.SYS["read"], fd, 0, _PROBE_LEN)):
                raise _grew(rec, ctx, path)
