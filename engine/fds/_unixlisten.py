"""Unix stream/seqpacket listeners, path-bound (absolute or relative) or
abstract, held only by the process; connections waiting in the accept
queue are restored waiting when the process holds their connecting ends
(_unixpending).

At dump: sock_diag UNIX_DIAG_RQLEN gives the pending connections (rqueue)
and the backlog (wqueue = sk_max_ack_backlog, net/unix/diag.c
sk_diag_show_rqlen); pending connections from outside the dump are
refused (they belong to clients that would be lost). A path-bound listener's file must still be
the bound inode (UNIX_DIAG_VFS), found through the path (relative names
through the process's cwd), or the one socket file of that inode in the
path's directory when it was renamed after bind (the JVM's attach
listener): the restore binds the name and renames the file the same way.
A listener bound by an absolute path whose file was unlinked or replaced
since (zdtm del_standalone_un: another listener's file renamed over it)
is a ghost: bound at restore with whatever socket file is at the path now
moved aside for the moment, its own file unlinked at once (it was
unreachable), before any other listener of that name binds the path for
good (_ghosts_first; _unixnamed.bind_ghost). One with connections waiting
is refused: they connect by the path.

At restore: a stale socket file left at the path (nobody unlinks it when
the old process dies) is removed only if it is a socket file no live
socket is bound to; anything else at the path is refused and left alone.
bind, the file's mode and owner put back, listen() with the backlog (made
by a helper with the pid and credentials of the original's listen() caller,
which SO_PEERCRED reports: _peercred), read back via sock_diag.
"""

from __future__ import annotations

import os
import socket as _socket
import stat
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Optional

from .. import netdiag
from ..errors import Refusal
from . import _peercred, _sockopts, _unixpending
from ._sockbase import (UNIX_TYPES as TYPES, building, check_options, dup_of, fresh_options, inode_of, options,
                        outside_holders, same_root, unix_diag as _diag)
from ._util import refuse, refuse_rec, with_status_flags


def _name_text(name: Optional[bytes]) -> str:
    if not name:
        return "(unnamed)"
    if name[:1] == b"\0":
        return "@" + name[1:].decode(errors="replace")
    return name.split(b"\0", 1)[0].decode(errors="replace")


def listener_classify(info, ctx, q: dict) -> dict:
    """The dump record of a unix listener; raises the `socket` refusal."""
    ino = inode_of(info.link)
    key = f"unix-listen:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    typ = q["type"]
    tname = TYPES[typ]
    d = _diag(info, ino)
    name = d["name"] or b""
    text = _name_text(name)
    head = f"unix {tname} listening {text}"
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    if (d["rqueue"] or 0) != len(d["icons"]):
        raise refuse(info, "socket", f"{head}: {max(d['rqueue'] or 0, len(d['icons']))} pending "
                     "connection(s) in the accept queue, not all of them listed by sock_diag")
    if d["shutdown"]:
        raise refuse(info, "socket", f"{head}: shut down ({d['shutdown']})")
    if not name:
        raise refuse(info, "socket", f"{head}: no address")
    waiting = _unixpending.pending(info, ctx, d, head) if d["icons"] else []
    rec: dict = {"sock": "unix-listen", "type": typ, "inode": ino, "backlog": d["wqueue"],
                 "name": name.hex(), "abstract": name[:1] == b"\0", "file": None, "pending": waiting}
    if not rec["abstract"]:
        path = name.split(b"\0", 1)[0]
        if not same_root(info.pid):
            raise refuse(info, "socket", f"{head}: the process has another root directory")
        path, base = absolute_bound_path(info, path, head)
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        renamed = None
        if st is None or not stat.S_ISSOCK(st.st_mode) or d["vfs"] != (st.st_dev, st.st_ino):
            renamed = _renamed(path, d["vfs"]) if base is None else None
            if renamed is None and base is None and not waiting and path == name.split(b"\0", 1)[0] and \
                    os.path.isdir(os.path.dirname(path) or b"/"):
                # unlinked or replaced since bind (zdtm del_standalone_un):
                # a ghost, bound at restore and unlinked at once (_unixnamed.bind_ghost)
                rec["file"] = {"path": os.fsdecode(path), "base": None, "ghost": True}
                st = None
            elif renamed is None:
                why = "the socket file was removed or replaced since bind" if base is None else \
                    "bound to a relative path that the working directory no longer leads to"
                if base is None and waiting:
                    why += ", with connections waiting (they connect by the path)"
                raise refuse(info, "socket", f"{head}: {why}")
            else:
                renamed, st = renamed
        if st is not None:
            rec["file"] = {"path": os.fsdecode(path), "base": base, "mode": stat.S_IMODE(st.st_mode),
                           "uid": st.st_uid, "gid": st.st_gid}
        if renamed is not None:
            rec["file"]["renamed"] = os.fsdecode(renamed)
    fresh = fresh_options(ctx, _socket.AF_UNIX, typ, 0)
    with dup_of(info) as mine:
        rec["opts"] = options(info, ctx, _socket.AF_UNIX, typ, 0, mine)
        rec["cred"] = _peercred.read(mine)        # the caller of listen() (_peercred)
    why = _peercred.dump_problem(rec["cred"], info.pid, getattr(ctx, "tree_pids", ()) or ())
    if why:
        raise refuse(info, "peer-pid-in-use", f"{head}: {why}")
    try:
        rec["set"] = check_options(info, rec["opts"], fresh)
    except Refusal as e:
        raise refuse(info, "socket", f"{head}: {e.detail}") from None
    ctx.shared[key] = rec
    return rec


def _renamed(path: bytes, vfs):
    """(path, lstat) of the one socket file in the bound path's directory
    that is the bound inode, when the file was renamed after bind (the JVM's
    attach listener binds .java_pidN.tmp and renames it .java_pidN; jcmd
    and jstack make one in every JVM they look at), else None. The restore
    binds the recorded name and renames the file the same way: getsockname
    still shows the bound name, clients find the file where it was."""
    found = []
    try:
        with os.scandir(os.path.dirname(path) or b"/") as it:
            for e in it:
                if e.inode() == vfs[1]:
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == tuple(vfs):
                        found.append((e.path, st))
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def _renamed_path(rec: dict, ctx, text: str) -> Optional[str]:
    """The validated "renamed" path of a listener record: a plain name in
    the bound path's own directory. Raises image-invalid."""
    f = rec.get("file") or {}
    to = f.get("renamed")
    if to is None:
        return None
    leaf = os.path.basename(to) if isinstance(to, str) else ""
    if not isinstance(to, str) or "\0" in to or leaf in ("", ".", "..") or \
            os.path.dirname(to) != os.path.dirname(f["path"]) or to == f["path"]:
        raise refuse_rec(rec, ctx, "image-invalid", f"unix listener {text}: renamed path {to!r}")
    return to


def listener_text(rec: dict) -> str:
    n = len(rec.get("pending") or [])
    return (f"unix {TYPES[rec['type']]} listening {_name_text(bytes.fromhex(rec['name']))}, backlog {rec['backlog']}"
            + (f", {n} connection(s) waiting" if n else ""))


def _in_use(name: bytes, path: Optional[str]) -> bool:
    """Whether a live socket owns this address (bound to the file at
    `path`, or to this abstract name)."""
    if path is not None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        return bool(netdiag.unix_bound_to(st.st_dev, st.st_ino))
    # An end accept() gave back carries its listener's name without
    # holding it (connected, not datagram): only sockets that bound the
    # name themselves count. A client that bound the name and connected is
    # not told from one: its bind's EADDRINUSE says it then.
    return any(s["name"] == name and (s["state"] == 10 or not s["peer"] or s["type"] == _socket.SOCK_DGRAM)
               for s in netdiag.unix_sockets())


def listener_validate(rec: dict, ctx) -> None:
    """Raises socket (address in use, path occupied by a non-socket, no
    directory) or image-invalid."""
    if rec.get("type") not in (_socket.SOCK_STREAM, _socket.SOCK_SEQPACKET) or not rec.get("name"):
        raise refuse_rec(rec, ctx, "image-invalid", "unix listener record malformed")
    name = bytes.fromhex(rec["name"])
    path = rec["file"]["path"] if rec.get("file") else None
    text = _name_text(name)
    if (rec.get("file") or {}).get("ghost") and (rec["file"].get("base") is not None or rec["file"].get("renamed")
                                                  or os.fsencode(path) != name.split(b"\0", 1)[0]
                                                  or rec.get("pending")):
        raise refuse_rec(rec, ctx, "image-invalid", f"unix listener {text}: a ghost's record is inconsistent")
    renamed = _renamed_path(rec, ctx, text)
    for at in [path, renamed] if path is not None else []:
        if at is None:
            continue
        if not os.path.isdir(os.path.dirname(at) or "/"):
            raise refuse_rec(rec, ctx, "socket", f"unix listener {text}: its directory is gone")
        try:
            st = os.lstat(at)
            if not stat.S_ISSOCK(st.st_mode):
                raise refuse_rec(rec, ctx, "socket", f"unix listener {text}: the path {at} is now a "
                                 f"{stat.filemode(st.st_mode)[0]!r} file, not a socket; not removed")
        except FileNotFoundError:
            pass
    try:
        busy = _in_use(name, path) or (renamed is not None and _in_use(name, renamed))
    except OSError as e:
        raise refuse_rec(rec, ctx, "socket", f"unix listener {text}: cannot check the address ({e.strerror})") from e
    if busy:
        raise refuse_rec(rec, ctx, "socket", f"unix listener {text}: address in use")
    for cred in [rec.get("cred")] + [p.get("connector") for p in rec.get("pending") or []]:
        why = _peercred.restore_problem(cred) if cred else None
        if why:
            raise refuse_rec(rec, ctx, "peer-pid-in-use", f"unix listener {text}: {why}")


def _bind(s: _socket.socket, name: bytes, f: Optional[dict]) -> None:
    """bind to the recorded name; a relative one from its base directory
    (chdir and back: the restorer is single-threaded here). Raises OSError."""
    if f is None:
        s.bind(name)                                  # abstract: the exact bytes
        return
    rel = name.split(b"\0", 1)[0]
    if not f.get("base"):
        s.bind(rel)
        return
    from_base(f["base"], lambda: s.bind(rel))


def from_base(base: str, fn) -> None:
    """fn() run with `base` as the working directory, then back (the
    restorer, or the peer-credentials helper, is single-threaded here):
    how a relative socket name is bound or connected to as it was."""
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(base)
        try:
            fn()
        finally:
            os.fchdir(here)
    finally:
        os.close(here)


def listener_restore(rec: dict, ctx) -> int:
    """A listening socket at the recorded address and backlog, with its
    waiting connections (_unixpending). Raises the `socket` refusal
    (address in use, backlog or options differ) or EngineError."""
    built = ctx.shared.get(_unixpending.build_key(rec["inode"]))
    if built is not None and "listener_fd" in built:
        return built.pop("listener_fd")       # built for a connecting end's record already
    from . import _unixnamed
    _unixnamed.prebuild(rec["name"], rec["type"], ctx)    # its accepted connections, while the name is free
    ghost = bool((rec.get("file") or {}).get("ghost"))
    if not ghost:
        _ghosts_first(rec, ctx)
    listener_validate(rec, ctx)        # again: the world may have moved since the pre-flight
    name = bytes.fromhex(rec["name"])
    text = _name_text(name)
    path = rec["file"]["path"] if rec.get("file") else None
    s = _socket.socket(_socket.AF_UNIX, rec["type"] | _socket.SOCK_CLOEXEC)
    with building(s, rec, ctx, f"recreating unix listener {text}"):
        _sockopts.apply(s, rec["opts"], rec["set"])
        if path is not None and os.path.lexists(path) and not ghost:
            # A stale socket file (checked just above: a socket nobody is
            # bound to). bind(2) would fail EADDRINUSE on it.
            os.unlink(path)
        try:
            if ghost:
                _unixnamed.bind_ghost(s, name, rec, ctx)
            else:
                _bind(s, name, rec.get("file"))
        except OSError as e:
            if e.errno == 98:      # EADDRINUSE
                raise refuse_rec(rec, ctx, "socket", f"unix listener {text}: address in use") from None
            raise
        if path is not None and not ghost:
            f = rec["file"]
            os.chown(path, f["uid"], f["gid"], follow_symlinks=False)
            os.chmod(path, f["mode"])
        cred = rec.get("cred")
        if cred and cred["pid"] > 0:
            _peercred.run_as(cred, lambda: [s.listen(rec["backlog"])] and [])
        else:
            s.listen(rec["backlog"])
        got = netdiag.unix_socket(os.fstat(s.fileno()).st_ino)["wqueue"]
        if got != rec["backlog"]:
            raise refuse_rec(rec, ctx, "socket", f"unix listener {text}: backlog {rec['backlog']} "
                             f"becomes {got} here (net.core.somaxconn?)")
        _sockopts.apply_late(s, rec["opts"], rec["set"])
        _sockopts.verify(s, _socket.AF_UNIX, False, rec["opts"])
        why = _peercred.check(cred, _peercred.read(s.fileno())) if cred else None
        if why:
            raise refuse_rec(rec, ctx, "socket", f"unix listener {text}: {why}")
        ctx.shared[_unixpending.build_key(rec["inode"])] = {"clients": _unixpending.connect_all(s, rec, ctx)}
        renamed = _renamed_path(rec, ctx, text)
        if renamed is not None:
            # As the program did after its bind; over a stale socket file
            # only (listener_validate, just above).
            os.rename(path, renamed)
        fd = s.detach()
    return with_status_flags(rec, ctx, fd)


def _ghosts_first(rec: dict, ctx) -> None:
    """Listeners whose file was unlinked or replaced since bind, under this
    listener's name, are bound (and their file unlinked) before this one
    binds the path for good; each is kept for its own record."""
    for r in getattr(ctx, "tree_records", None) or ctx.records or []:
        if r is rec or r.get("sock") != "unix-listen" or r.get("name") != rec["name"] or \
                not (r.get("file") or {}).get("ghost"):
            continue
        key = _unixpending.build_key(r["inode"])
        if key in ctx.shared:
            continue
        fd = listener_restore(r, ctx)
        ctx.shared[key]["listener_fd"] = fd


def absolute_bound_path(info, path: bytes, head: str):
    """(absolute path, base) of a socket bound by `path`. Bound by a relative
    name, it resolved against the cwd of that moment: the process's cwd now
    is taken as that base (the callers check it still leads to the bound
    inode) and the restore binds the same relative name from there
    (getsockname keeps showing it). `base` is None for an absolute name.
    A name with "." or ".." components or doubled slashes ("./agent.sock",
    as `ssh-agent -a ./agent.sock` binds) is made plain by resolving its
    directory as the kernel does now (the image holds plain paths only)."""
    base = None
    if not path.startswith(b"/"):
        try:
            base = os.readlink(f"/proc/{info.pid}/cwd")
        except OSError:
            base = None
        if not base or not base.startswith("/"):
            raise refuse(info, "socket", f"{head}: bound to a relative path and the working directory is unknown")
        path = os.path.join(os.fsencode(base), path)
    head_dir, leaf = os.path.split(path)
    if leaf in (b"", b".", b".."):
        raise refuse(info, "socket", f"{head}: bound to a name whose last component is not a file name")
    if any(c in (b"", b".", b"..") for c in head_dir.split(b"/")[1:]):
        path = os.path.join(os.fsencode(os.path.realpath(head_dir)), leaf)
    return path, base
