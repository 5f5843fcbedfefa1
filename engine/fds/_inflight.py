"""Ancillary data queued in a unix socket: the fds in flight in SCM_RIGHTS
messages and the sender credentials of SCM_CREDENTIALS.

Dump. A peek (_sockpeek) of a message carrying SCM_RIGHTS installs
duplicates of the carried files in ckpt itself (net/core/scm.c
scm_detach_fds; unix_peek_fds takes new references): each is then an
ordinary open file of ckpt, described from /proc/self like any fd of the
target (engine/check.py fd_info) and dumped by its own kind's module, its
record kept inside the socket's record at the message's position. This
is how fds no process holds any more are saved: the message is their only
holder. A carried file is refused (`socket`, naming the message, the
kind and why) when:

- its kind is not one of IN_FLIGHT_KINDS: a unix socket in flight could
  itself carry messages with fds (the kernel's garbage collector exists
  for those cycles), a pipe's other end or an epoll's targets live
  elsewhere; only kinds whose record says everything about the file are
  carried;
- its open file description is also one of the target's fds, or another
  process's (kcmp KCMP_FILE): the restored message would carry a second
  file where there was one shared file (offset, flags);
- it holds a file lock.

A queued message carries the pid, uid and gid of its sender when it was
sent with SCM_CREDENTIALS or while either end had SO_PASSCRED on
(net/unix/af_unix.c unix_maybe_add_creds), whatever the receiver's flag
is now: hidden while it is off, shown (and splitting stream reads by
writer) once it is on. The peek turns SO_PASSCRED on for its walk
(_sockpeek.creds_shown, the previous value put back on every path), so
the credentials are recorded per message whatever the flag, and at
restore each run of messages with the same credentials is sent by a helper
created with that pid and those ids (_peercred.run_as), so the receiver
reads the same values, sees the same stream read boundaries, with the flag
on or off. A message without credentials (peeked as pid 0 with the
overflow uid and gid) is refilled by the restorer with both ends' flags
off: without credentials again. A pid that a live process outside the
dump holds is refused (`peer-pid-in-use`), at dump and at restore, and so
is a pid hidden from ckpt's pid namespace (pid 0 with other ids).

Restore: each carried record is validated and rebuilt by its kind's
module, sent in the same message (SCM_RIGHTS, the same number and order of
fds), and the restorer's copies are closed; the rebuilt queue is then
peeked again and must show the same messages, the same numbers of fds of
the same kinds and the same credentials, or the restore is refused.
"""

from __future__ import annotations

import array
import os
import socket as _socket
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional

from .. import pidfd
from ..errors import Refusal
from . import _peercred
from ._util import refuse, refuse_rec

# Kinds whose record is the whole file: restored anywhere, alone.
IN_FLIGHT_KINDS = ("regular", "ghost", "directory", "eventfd")
SCM_MAX_FD = 253          # include/net/scm.h: fds one SCM_RIGHTS message may carry
_CLOEXEC = os.O_CLOEXEC


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _here(fd: int):
    """FdInfo of ckpt's own fd `fd` (a duplicate a peek installed)."""
    from .. import procfs
    from ..check import fd_info
    return fd_info(procfs.Proc(os.getpid()), fd)


def _shared_with(info, ctx, carried) -> Optional[str]:
    """Who else holds the open file ckpt got at carried.fd, or None."""
    fd = carried.fd
    for tfd, t in sorted(ctx.all_fds.items()):
        if (t.dev, t.ino) == (carried.dev, carried.ino) and pidfd.same_file(os.getpid(), fd, info.pid, tfd):
            return f"fd {tfd} of the process"
    from . import _peers
    for pid, ofd in _peers.holders(ctx, carried.link, carried.dev, carried.ino):
        if pid == os.getpid():
            continue
        try:
            if pidfd.same_file(os.getpid(), fd, pid, ofd):
                return f"pid {pid} (fd {ofd})"
        except Exception:   # noqa: BLE001 - a process that went away shares nothing
            continue
    return None


def classify_fds(info, ctx, fds: List[int], where: str) -> List[dict]:
    """dump_fds for ``ckpt check``: every check, nothing written; the
    records hold only kind, flags, pos and link."""
    return dump_fds(info, ctx, fds, where, write=False)


def dump_fds(info, ctx, fds: List[int], where: str, write: bool = True) -> List[dict]:
    """The records of the files ckpt holds at `fds` (peeked from the
    target's socket at `info`, message `where`). Raises the `socket`
    refusal naming the message and the file (or the carried kind's own
    refusal, its detail naming the message)."""
    from . import handler_for
    out = []
    for n, fd in enumerate(fds):
        what = f"{where}: fd #{n + 1} of {len(fds)} in flight"
        try:
            carried = _here(fd)
        except Refusal as r:
            raise refuse(info, "socket", f"{what} cannot be read: {r.detail}") from None
        kind, mod = "unsupported", None
        try:
            kind, mod = handler_for(carried)
        except Refusal:
            pass
        if kind not in IN_FLIGHT_KINDS or mod is None:
            sub = ""
            if kind == "socket":
                sub = " (a socket in flight may carry messages of its own; not restored)"
            raise refuse(info, "socket", f"{what} is a {kind} ({carried.link}){sub}: only "
                         f"{', '.join(IN_FLIGHT_KINDS)} files are restored in flight")
        if "lock:" in carried.fdinfo_text:
            raise refuse(info, "socket", f"{what} ({carried.link}) holds a file lock")
        other = _shared_with(info, ctx, carried)
        if other:
            raise refuse(info, "socket", f"{what} ({carried.link}) is the open file of {other} too: a shared "
                         "open file in flight is not restored")
        try:
            mod.classify(carried, ctx)
            rec = mod.dump(carried, ctx) if write else {}
        except Refusal as r:
            raise refuse(info, r.reason, f"{what} ({carried.link}): {r.detail}") from None
        rec.update({"fd": info.fd, "kind": kind, "flags": carried.flags & ~_CLOEXEC, "pos": carried.pos,
                    "cloexec": False, "link": carried.link})
        out.append(rec)
    return out


def text(anc: Optional[list]) -> str:
    """', 2 fds in flight (regular, eventfd), credentials in 3 messages' or ''."""
    if not anc:
        return ""
    kinds = [r.get("kind") for a in anc if a for r in a.get("fds") or []]
    creds = sum(1 for a in anc if cred_of(a))
    out = f", {len(kinds)} fds in flight ({', '.join(sorted(set(kinds)))})" if kinds else ""
    return out + (f", sender credentials of {creds} messages" if creds else "")


def cred_of(anc) -> Optional[dict]:
    return anc.get("cred") if isinstance(anc, dict) else None


def check_cred(info, ctx, cred: dict, where: str) -> None:
    """Raises peer-pid-in-use when `cred`'s pid is a live process outside
    the dump (a restore could not give it)."""
    why = _peercred.dump_problem(dict(cred, groups=[]), info.pid, getattr(ctx, "tree_pids", ()) or ())
    if cred["pid"] <= 0:
        why = f"the sender's pid is not visible here (pid {cred['pid']})"
    if why:
        raise refuse(info, "peer-pid-in-use", f"{where}: SCM_CREDENTIALS: {why}")


# -- restore ------------------------------------------------------------------

def validate(rec: dict, ctx) -> None:
    """The ancillary records of `rec` ("anc", parallel to "lengths"):
    raises image-invalid, peer-pid-in-use or the carried kinds' refusals."""
    from . import handler
    anc = rec.get("anc")
    if anc is None:
        return
    if not isinstance(anc, list) or len(anc) != len(rec["lengths"]):
        raise refuse_rec(rec, ctx, "image-invalid", "ancillary records do not match the queued messages")
    for a in anc:
        if a is None:
            continue
        if not isinstance(a, dict) or set(a) - {"fds", "cred"}:
            raise refuse_rec(rec, ctx, "image-invalid", f"ancillary record {a!r}")
        fds = a.get("fds") or []
        if not isinstance(fds, list) or len(fds) > SCM_MAX_FD:
            raise refuse_rec(rec, ctx, "image-invalid", "SCM_RIGHTS record is not a list of at most 253 fds")
        for r in fds:
            if not isinstance(r, dict) or r.get("kind") not in IN_FLIGHT_KINDS:
                raise refuse_rec(rec, ctx, "image-invalid", f"fd in flight of kind {r.get('kind')!r}"
                                 if isinstance(r, dict) else "fd in flight record")
            handler(r["kind"]).validate(r, ctx)
        cred = a.get("cred")
        if cred is not None:
            if not (isinstance(cred, dict) and all(isinstance(cred.get(k), int) and cred[k] >= 0
                                                   for k in ("pid", "uid", "gid")) and cred["pid"] > 0):
                raise refuse_rec(rec, ctx, "image-invalid", f"SCM_CREDENTIALS record {cred!r}")
            why = _peercred.restore_problem(cred)
            if why:
                raise refuse_rec(rec, ctx, "peer-pid-in-use", f"queued message SCM_CREDENTIALS: {why}")


def _open(a, ctx) -> List[int]:
    from . import handler
    fds: List[int] = []
    try:
        for r in (a or {}).get("fds") or []:
            fds.append(handler(r["kind"]).restore(r, ctx))
    except BaseException:
        close_all(fds)
        raise
    return fds


def _send_one(sender: _socket.socket, typ: int, data: bytes, fds: List[int], cred: Optional[dict] = None) -> None:
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    if cred is not None:
        # Explicit: the kernel attaches credentials unasked only while the
        # sender or the receiver has SO_PASSCRED on (unix_maybe_add_creds),
        # and the receiver gets its options after the refill.
        anc.append((_socket.SOL_SOCKET, _socket.SCM_CREDENTIALS,
                    struct.pack("iII", os.getpid(), cred["uid"], cred["gid"])))
    view = memoryview(data)
    first = True
    while first or view:
        n = sender.sendmsg([view], anc if first else [], _socket.MSG_DONTWAIT)
        if typ != _socket.SOCK_STREAM and n != len(view):
            raise OSError(0, f"short datagram send {n} of {len(view)}")
        view = view[n:]
        first = False


def fill(sender: _socket.socket, typ: int, msgs: List[bytes], anc: Optional[list], ctx) -> None:
    """Send `msgs` from `sender`, each with its ancillary record: the
    carried files rebuilt and passed (SCM_RIGHTS), runs of messages with
    recorded credentials sent by a helper with that pid, uid and gid.
    Raises Refusal, EngineError or OSError."""
    anc = anc or [None] * len(msgs)
    i = 0
    while i < len(msgs):
        cred = cred_of(anc[i])
        j = i + 1
        while j < len(msgs) and cred is not None and cred_of(anc[j]) == cred:
            j += 1
        if cred is None:
            j = i + 1
        batch = [(msgs[k], _open(anc[k], ctx)) for k in range(i, j)]
        try:
            if cred is None:
                for data, fds in batch:
                    _send_one(sender, typ, data, fds)
            else:
                def send_all():
                    for data, fds in batch:
                        _send_one(sender, typ, data, fds, cred)
                    return []
                _peercred.run_as(dict(cred, groups=None), send_all)
        finally:
            for _, fds in batch:
                close_all(fds)
        i = j


def _restored_kind(r: dict) -> str:
    # a deleted file reached through a surviving hard link reopens as a regular file
    return "regular" if r.get("kind") == "ghost" and "file" in r else r.get("kind")


def shape(msgs: List[bytes], anc: Optional[list], kinds_of=None) -> list:
    """What a queue looks like, to compare the rebuilt one with the record:
    per message its length, the kinds of its fds in flight, its credentials."""
    anc = anc or [None] * len(msgs)
    out = []
    for m, a in zip(msgs, anc):
        fds = (a or {}).get("fds") or []
        kinds = [_restored_kind(r) if isinstance(r, dict) else kinds_of(r) for r in fds]
        out.append((len(m), kinds, cred_of(a)))
    return out
