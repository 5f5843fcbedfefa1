"""Unix sockets connected through a name, both ends held inside the dump:
a client connected to a named stream/seqpacket listener and the end
accept() gave back, a datagram socket connected to a bound one (both ways,
one way, or to itself).

What has to come back: each end's own name (getsockname) and its peer's
(getpeername), queued data both ways with message boundaries, files in
flight and credentials (_unixpair.end_state/fill_pair, as for
socketpairs), options, shutdown bits, SO_PEERCRED.

Stream/seqpacket. The accepted end has no file of its own: it carries its
listener's address (unix_stream_connect copies otheru->addr to the new
socket), the client carries its own (bound or not) and its peer is that
accepted end. So the restore binds a temporary listener to the accepted
end's name, listens (as the client's SO_PEERCRED pid: the client reports
who called listen()), connects the client (bound first to its own name if
it had one; as the accepted end's SO_PEERCRED pid: that end reports who
called connect()), accepts, closes the temporary listener and removes the
file it made. A socket file already at the path is moved aside in its
directory for that moment and put back (the same inode); the real
listener, when it is in the dump, is restored after its named pairs
(_unixlisten calls prebuild before its bind) and binds the path itself as
it always does. Shutdown bits the client had before connect(2) (zdtm
sockets03: shutdown(SHUT_RD) then connect) are set before the connect,
where they are not mirrored onto the peer; the rest after.

Datagram. connect(2) needs the peer bound: the bound receiver is built
first (its own record: a unix-named end, or a unix-dgram one when it is not
connected back, built early and kept for its own record), then the
sender binds its own name if any and connects. Queues are restored both
ways only when the two are connected to each other (each queue proven
complete against the other's charge); a sender connected to a socket not
connected back must have an empty queue (anybody may have sent to it),
and that socket's queue is its own record's (_unixdgram._queued: when one
sender of the dump is all that can have sent it, that sender is built by
the receiver's restore and sends it again: fill_bound). A receiver whose
file was unlinked since (a ghost) connects its senders while the restore
has its path bound, before unlinking it again (connect_senders). A
listener's ghost is bound the same way (bind_ghost).

Which end of a stream connection is the accepted one: the one with a name
when the other has none; when both are named, the one whose name and file
are a live listener's in the dump; otherwise refused (a closed listener
leaves nothing to tell a bound client from an accepted end).

Refused (`socket`): an end bound by itself (a client, a datagram socket
connected both ways) whose file was unlinked or replaced since bind,
either end held outside the dump, at restore a path that now names a
non-socket or a socket some live process is bound to (nothing is moved or
removed then), an abstract name some live socket holds.
"""

from __future__ import annotations

import errno as _errno
import os
import secrets
import socket as _socket
import stat
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from .. import netdiag, pidfd
from ..errors import EngineError, Refusal
from . import _peercred, _sockopts, _unixpair
from ._sockbase import (UNIX_TYPES as TYPES, held_here, inode_of, option_refusal, outside_holders, same_root,
                        unix_diag as _diag)
from ._unixlisten import _bind, _in_use, _name_text, absolute_bound_path, from_base
from ._util import failed, refuse, refuse_rec, with_status_flags

LISTEN = 10           # TCP_LISTEN, as sock_diag reports a listening unix socket's state
RCV, SEND = netdiag.RCV_SHUTDOWN, netdiag.SEND_SHUTDOWN
_FS_DENIED = (_errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.ENOSPC, _errno.EDQUOT)


def _mirror(bits: int) -> int:
    return (RCV if bits & SEND else 0) | (SEND if bits & RCV else 0)


# -- dump ---------------------------------------------------------------

def _holder(info, ctx, ino: int, what: str):
    """(pid, fd) of the dump's holder of socket `ino`; raises `socket`."""
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{what}: socket inode {ino} also held by pid {out[0][0]} (fd {out[0][1]}), "
                     "outside the dump")
    mine = held_here(ctx, ino)
    if mine:
        return info.pid, mine[0]
    pid, fds = _unixpair._in_tree(ctx, ino)
    if not fds:
        raise refuse(info, "socket", f"{what}: socket inode {ino} is held by no process of the dump "
                     "(in flight in an SCM_RIGHTS message?)")
    return pid, fds[0]


def _path_file(info, name: bytes, vfs, head: str, own: bool, holder: int = 0,
               whose: str = "its own") -> Optional[dict]:
    """Where a path name lives: {path, base} (+ mode, uid, gid: `own`, a
    socket bound by itself, whose file must still be its bound inode).
    A relative name is resolved from the cwd of `holder` (default: the
    process at `info`). None for an abstract or no name. Raises `socket`."""
    if not name or name[:1] == b"\0":
        return None
    holder = holder or info.pid
    if not same_root(holder):
        raise refuse(info, "socket", f"{head}: the process has another root directory")
    from types import SimpleNamespace
    try:
        path, base = absolute_bound_path(SimpleNamespace(pid=holder, fd=info.fd, link=info.link),
                                         name.split(b"\0", 1)[0], head)
    except Refusal as e:
        raise refuse(info, e.reason, e.detail) from None
    f = {"path": os.fsdecode(path), "base": base}
    if own:
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISSOCK(st.st_mode) or vfs != (st.st_dev, st.st_ino):
            raise refuse(info, "socket", f"{head}: {whose} socket file {os.fsdecode(path)} was removed or "
                         "replaced since bind")
        f.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    return f


def _listener_of(d: dict) -> bool:
    """Whether a live listener has this end's name and file (then this is
    an end it accepted)."""
    for s in netdiag.unix_sockets():
        if s["state"] == LISTEN and s["name"] == d["name"] and s["vfs"] == d["vfs"] and s["type"] == d["type"]:
            return True
    return False


def _queue_empty(info, pid: int, fd: int) -> bool:
    from ._unixdgram import _queue_empty as empty
    with pidfd.target_fd(pid, fd) as dup:
        return empty(dup)


def classify(info, ctx, q: dict) -> dict:
    """The dump record of one end of a named connection; raises `socket`."""
    ino = inode_of(info.link)
    key = f"unix-named:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    typ = q["type"]
    tname = TYPES[typ]
    d = _diag(info, ino)
    name = d["name"] or b""
    peer = d["peer"]
    head = f"unix {tname} connected {_name_text(name)}"
    if not peer:
        raise refuse(info, "socket", f"{head}: its peer is closed")
    pd = _diag(info, peer)
    pname = pd["name"] or b""
    head = f"{head}->{_name_text(pname)}"
    _holder(info, ctx, ino, head)
    peer_pid, peer_fd = _holder(info, ctx, peer, head)
    rec_extra: dict = {"name": name.hex(), "peer_name": pname.hex()}
    if typ != _socket.SOCK_DGRAM:
        if pd["peer"] != ino:
            raise refuse(info, "socket", f"{head}: its peer is connected elsewhere")
        if name and pname:
            mine, theirs = _listener_of(d), _listener_of(pd)
            if mine == theirs:
                raise refuse(info, "socket", f"{head}: both ends are named and no listener in the dump tells "
                             "which one connected")
            accepted = mine
        else:
            accepted = bool(name)
        role = "accepted" if accepted else "client"
        # The accepted end's name is its listener's: a temporary name at
        # restore. A client's is its own bind: its file is put back.
        f = _path_file(info, name, d["vfs"], head, own=not accepted)
        _path_file(info, pname, pd["vfs"], head, own=accepted, holder=peer_pid,
                   whose="the peer's")     # the peer's own checks, early
        rec_extra.update(role=role, file=f)
        rec = _unixpair.end_state(info, ctx, q, ino, d, peer, peer_pid, peer_fd, head, named=True)
    else:
        mutual = pd["peer"] == ino
        if not pname:
            raise refuse(info, "socket", f"{head}: connected to an unnamed datagram socket")
        f = _path_file(info, name, d["vfs"], head, own=True)
        if mutual:
            _path_file(info, pname, pd["vfs"], head, own=True, holder=peer_pid, whose="the peer's")
        # (a sender's peer is its own record: bound, or a ghost, which
        # connects its senders before it unlinks its file again)
        if mutual:
            role = "self" if peer == ino else "dgram"
            rec = _unixpair.end_state(info, ctx, q, ino, d, peer, peer_pid, peer_fd, head, named=True)
            if role == "self" and rec["lengths"]:
                raise refuse(info, "socket", f"{head}: connected to itself with messages queued")
        else:
            if pd["peer"]:
                raise refuse(info, "socket", f"{head}: its peer is connected to another socket")
            if not _queue_empty(info, info.pid, info.fd):
                raise refuse(info, "socket", f"{head}: messages queued in a datagram socket whose peer is not "
                             "connected back (any socket may have sent them)")
            role = "sender"
            rec = _unixpair.end_state(info, ctx, q, ino, d, peer, peer_pid, peer_fd, head, named=True,
                                      peer_charge=False)
        rec_extra.update(role=role, file=f)
    rec.update(rec_extra)
    ctx.shared[key] = rec
    return rec


def text(rec: dict) -> str:
    n = len(rec["lengths"])
    what = f"{rec['data_len']} bytes queued" if rec["type"] == _socket.SOCK_STREAM else \
        f"{n} messages ({rec['data_len']} bytes) queued"
    return (f"unix {TYPES[rec['type']]} connected {_name_text(bytes.fromhex(rec['name']))}->"
            f"{_name_text(bytes.fromhex(rec['peer_name']))} ({rec['role']}), {what}"
            + (f", shutdown {rec['shutdown']}" if rec["shutdown"] else ""))


def dump(info, ctx, q: dict) -> dict:
    return _unixpair.store(classify(info, ctx, q), ctx)


# -- restore ------------------------------------------------------------

ROLES = ("accepted", "client", "dgram", "self", "sender")


def _all(ctx) -> list:
    return getattr(ctx, "tree_records", None) or ctx.records or []


def _rec_of(ctx, ino: int, kinds) -> Optional[dict]:
    from ._dups import is_follower
    for r in _all(ctx):
        if r.get("sock") in kinds and r.get("inode") == ino and not is_follower(r):
            return r
    return None


def _what(rec: dict) -> str:
    return (f"unix {TYPES.get(rec.get('type'), '?')} connected {_name_text(bytes.fromhex(rec['name']))}->"
            f"{_name_text(bytes.fromhex(rec['peer_name']))}")


def _check_path(rec: dict, ctx, f: dict, name: bytes, own: bool) -> None:
    """The path of a name to bind: its directory exists, and whatever is
    there is a socket file no live socket is bound to (moved aside, or for
    an end's own file replaced, as listeners' stale files are). Raises `socket`."""
    path = f["path"]
    what = _what(rec)
    if not os.path.isdir(os.path.dirname(path) or "/"):
        raise refuse_rec(rec, ctx, "socket", f"{what}: the directory of {path} is gone")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise refuse_rec(rec, ctx, "socket", f"{what}: {path} is now a {stat.filemode(st.st_mode)[0]!r} file, "
                         "not a socket; left alone")
    try:
        busy = _in_use(name, path)
    except OSError as e:
        raise refuse_rec(rec, ctx, "socket", f"{what}: cannot check {path} ({e.strerror})") from e
    if busy:
        raise refuse_rec(rec, ctx, "socket", f"{what}: {path} is the socket of a live process now; left alone")


def _check_abstract(rec: dict, ctx, name: bytes) -> None:
    # (bind's EADDRINUSE, at the build, is the last word)
    try:
        busy = _in_use(name, None)
    except OSError as e:
        raise refuse_rec(rec, ctx, "socket", f"{_what(rec)}: cannot check the address ({e.strerror})") from e
    if busy:
        raise refuse_rec(rec, ctx, "socket", f"{_what(rec)}: the abstract name {_name_text(name)} is held by "
                         "a live socket now")


def _check_name(rec: dict, ctx, name: bytes, f: Optional[dict], own: bool) -> None:
    if not name:
        return
    if f is not None:
        _check_path(rec, ctx, f, name, own)
    else:
        _check_abstract(rec, ctx, name)


def validate(rec: dict, ctx) -> None:
    """Raises image-invalid (a record or its peer's malformed or missing)
    or socket (a name the filesystem or a live socket holds now)."""
    if rec.get("type") not in TYPES or rec.get("role") not in ROLES or not isinstance(rec.get("name"), str) \
            or not isinstance(rec.get("peer_name"), str):
        raise refuse_rec(rec, ctx, "image-invalid", "named unix connection record malformed")
    role = rec["role"]
    name, pname = bytes.fromhex(rec["name"]), bytes.fromhex(rec["peer_name"])
    f = rec.get("file")
    if f is not None and (not isinstance(f.get("path"), str) or not f["path"].startswith("/") or "\0" in f["path"]
                          or not name or name[:1] == b"\0"):
        raise refuse_rec(rec, ctx, "image-invalid", "named unix connection record: file malformed")
    if role == "sender":
        peer = _rec_of(ctx, rec["peer"], ("unix-dgram",))
        if peer is None or bytes.fromhex(peer["name"]) != pname:
            raise refuse_rec(rec, ctx, "image-invalid", f"the record of the bound peer {rec['peer']} is missing")
    elif role == "self":
        if rec["peer"] != rec["inode"] or name != pname or not name:
            raise refuse_rec(rec, ctx, "image-invalid", "a self-connected socket record is inconsistent")
    else:
        peer = _rec_of(ctx, rec["peer"], ("unix-named",))
        pair = {"accepted": "client", "client": "accepted", "dgram": "dgram"}[role]
        if peer is None or peer.get("peer") != rec["inode"] or peer.get("type") != rec["type"] or \
                peer.get("role") != pair or peer.get("name") != rec["peer_name"] or \
                peer.get("peer_name") != rec["name"]:
            raise refuse_rec(rec, ctx, "image-invalid", f"the record of the peer socket {rec['peer']} is missing "
                             "or does not match")
        if role == "accepted" and not name:
            raise refuse_rec(rec, ctx, "image-invalid", "an accepted end without a name")
    if sum(rec["lengths"]) != rec["data_len"]:
        raise refuse_rec(rec, ctx, "image-invalid", "socket queue lengths do not add up")
    if rec.get("data"):
        (rec.get("_image") or ctx.image).path(rec["data"])
    from . import _inflight
    _inflight.validate(rec, ctx)
    why = _peercred.restore_problem(rec["cred"]) if rec.get("cred") else None
    if why:
        raise refuse_rec(rec, ctx, "peer-pid-in-use", f"{_what(rec)}: {why}")
    _check_name(rec, ctx, name, f, own=role != "accepted")


def _key(rec: dict) -> str:
    if rec["role"] in ("sender", "self"):
        return f"unix-named-built:{rec['inode']}"      # one end: its peer may have other senders
    return f"unix-named-built:{min(rec['inode'], rec['peer'])}"


def _own_bind(s: _socket.socket, rec: dict, ctx, name: bytes, f: Optional[dict]) -> None:
    """Bind `s` to its own recorded name, over a stale socket file (checked
    just before), its file's mode and owner put back."""
    if not name:
        return
    _check_name(rec, ctx, name, f, own=True)
    if f is not None and os.path.lexists(f["path"]):
        os.unlink(f["path"])          # a socket file nobody is bound to (just checked)
    try:
        _bind(s, name, f)
    except OSError as e:
        if e.errno == _errno.EADDRINUSE:
            raise refuse_rec(rec, ctx, "socket", f"{_what(rec)}: address {_name_text(name)} in use") from None
        if e.errno in _FS_DENIED:
            raise refuse_rec(rec, ctx, "socket", f"{_what(rec)}: cannot bind {_name_text(name)} "
                             f"({e.strerror})") from None
        raise
    if f is not None:
        os.chown(f["path"], f["uid"], f["gid"], follow_symlinks=False)
        os.chmod(f["path"], f["mode"])


def _connect(c: _socket.socket, name: bytes, f: Optional[dict]) -> None:
    """connect(2) by the exact name the peer was bound with (a relative one
    from its base directory)."""
    if f is not None and f.get("base"):
        from_base(f["base"], lambda: c.connect(name.split(b"\0", 1)[0]))
    elif f is not None:
        c.connect(name.split(b"\0", 1)[0])
    else:
        c.connect(name)


def _aside(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".ckpt-aside-{os.getpid()}-{secrets.token_hex(6)}")


def _put_back(aside: str, path: str) -> None:
    """The file moved aside back at `path`, never over something that
    appeared there meanwhile (link fails EEXIST; rename only where the
    file system has no hard links, after a check). Raises OSError."""
    try:
        os.link(aside, path)
    except OSError as e:
        if e.errno not in (_errno.EPERM, _errno.EOPNOTSUPP, _errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise
        os.rename(aside, path)
        return
    os.unlink(aside)


def bind_ghost(s: _socket.socket, name: bytes, rec: dict, ctx) -> None:
    """Bind `s` to a path name whose file was unlinked or replaced since
    bind (a ghost listener): whatever socket file is at the path now is
    moved aside for the moment (checked: a socket no live socket is bound
    to), the new file unlinked, the other put back. Raises OSError or
    `socket`."""
    path = rec["file"]["path"]
    aside = None
    made = None
    try:
        if os.path.lexists(path):
            aside = _aside(path)
            os.rename(path, aside)
        _bind(s, name, rec["file"])
        made = netdiag.unix_socket(os.fstat(s.fileno()).st_ino)["vfs"]
    finally:
        if made is not None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == tuple(made):
                os.unlink(path)
        if aside is not None:
            _put_back(aside, path)


def _build_stream(acc: dict, cli: dict, ctx):
    """(accepted end, client) connected through a temporary listener bound
    to the accepted end's name. Raises Refusal, OSError, OptionError."""
    typ = acc["type"]
    lname = bytes.fromhex(acc["name"])
    lf = acc.get("file")
    _check_name(acc, ctx, lname, lf, own=False)
    c = _socket.socket(_socket.AF_UNIX, typ | _socket.SOCK_CLOEXEC)
    a = None
    aside = None
    made = None
    try:
        _sockopts.apply(c, cli["opts"], cli["set"])
        _own_bind(c, cli, ctx, bytes.fromhex(cli["name"]), cli.get("file"))
        # Bits the accepted end does not mirror were set before connect(2).
        pre = cli["shutdown"] & ~_mirror(acc["shutdown"])
        if _mirror(acc["shutdown"]) & ~cli["shutdown"]:
            raise refuse_rec(acc, ctx, "socket", f"{_what(acc)}: shutdown state {acc['shutdown']} with the "
                             f"client's {cli['shutdown']}: not reachable by shutdown(2) calls")
        if pre:
            from ._sockbase import shut_down
            shut_down(c, pre)
        t = _socket.socket(_socket.AF_UNIX, typ | _socket.SOCK_CLOEXEC)
        try:
            try:
                if lf is not None and os.path.lexists(lf["path"]):
                    aside = _aside(lf["path"])
                    os.rename(lf["path"], aside)
                _bind(t, lname, lf)
            except OSError as e:
                if e.errno == _errno.EADDRINUSE:
                    raise refuse_rec(acc, ctx, "socket", f"{_what(acc)}: the name {_name_text(lname)} is "
                                     "taken now") from None
                if e.errno in _FS_DENIED:
                    raise refuse_rec(acc, ctx, "socket", f"{_what(acc)}: cannot make a temporary socket file at "
                                     f"{lf['path'] if lf else _name_text(lname)} ({e.strerror})") from None
                raise
            ccred, acred = cli.get("cred"), acc.get("cred")
            if lf is not None:
                made = netdiag.unix_socket(os.fstat(t.fileno()).st_ino)["vfs"]     # the file bind made
                if acred and acred["pid"] > 0:
                    # connect(2) by the recorded caller needs write access to
                    # the file: only it (and root) get it, for this moment.
                    os.chown(lf["path"], acred["uid"], acred["gid"], follow_symlinks=False)
                    os.chmod(lf["path"], 0o600)
                # Reached through an O_PATH fd: the caller needs no search
                # right on the directories, nor a name short enough for
                # sun_path. The connected ends keep the listener's bound
                # name whatever address connect(2) was given.
                opath = os.open(lf["path"], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                st = os.fstat(opath)
                if (st.st_dev, st.st_ino) != tuple(made):
                    os.close(opath)
                    raise refuse_rec(acc, ctx, "socket", f"{_what(acc)}: {lf['path']} was replaced during "
                                     "the restore")
                target = f"/proc/self/fd/{opath}"
            else:
                target = lname
            # never waits: a queue some outside connect filled is an error
            c.setblocking(False)
            try:
                if ccred and ccred["pid"] > 0:
                    _peercred.run_as(ccred, lambda: [t.listen(1)] and [])   # the client reports listen()'s caller
                else:
                    t.listen(1)
                if acred and acred["pid"] > 0:
                    _peercred.run_as(acred, lambda: [c.connect(target)] and [])   # the accepted end: connect()'s
                else:
                    c.connect(target)
            finally:
                if lf is not None:
                    os.close(opath)
            t.setblocking(False)
            a, _ = t.accept()
            a.setblocking(True)
            c.setblocking(True)
            if netdiag.unix_socket(os.fstat(a.fileno()).st_ino)["peer"] != os.fstat(c.fileno()).st_ino:
                # another process connected to the temporary listener first
                raise refuse_rec(acc, ctx, "socket", f"{_what(acc)}: a process outside the dump connected to "
                                 f"{_name_text(lname)} during the restore")
        finally:
            t.close()
            if made is not None:
                try:
                    st = os.lstat(lf["path"])
                except FileNotFoundError:
                    st = None
                if st is not None and (st.st_dev, st.st_ino) == tuple(made):
                    os.unlink(lf["path"])
            if aside is not None:
                _put_back(aside, lf["path"])
                aside = None
        _sockopts.apply(a, acc["opts"], acc["set"])
        _unixpair.fill_pair(a, c, acc, cli, ctx, shutdowns=(acc["shutdown"], 0))
        _check_names(a, acc, ctx)
        _check_names(c, cli, ctx)
    except BaseException:
        c.close()
        if a is not None:
            a.close()
        raise
    finally:
        if aside is not None:
            try:
                _put_back(aside, lf["path"])
            except OSError as e:
                raise EngineError(f"could not put back the socket file {lf['path']} (left at {aside}): "
                                  f"{e.strerror}") from e
    return a, c


def _check_names(s: _socket.socket, rec: dict, ctx) -> None:
    """The rebuilt end's own name and its peer's (what getsockname and
    getpeername return) are the recorded ones; raises `socket`."""
    d = netdiag.unix_socket(os.fstat(s.fileno()).st_ino)
    got = d["name"] or b""
    pgot = (netdiag.unix_socket(d["peer"])["name"] or b"") if d["peer"] else None
    if got != bytes.fromhex(rec["name"]) or pgot != bytes.fromhex(rec["peer_name"]):
        raise refuse_rec(rec, ctx, "socket", f"{_what(rec)}: {_name_text(got)}->"
                         f"{_name_text(pgot) if pgot is not None else '(no peer)'} after restore")


def _build_dgram(a_rec: dict, b_rec: dict, ctx):
    """Two datagram sockets bound to their names and connected to each other."""
    a = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    b = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        for s, r in ((a, a_rec), (b, b_rec)):
            _sockopts.apply(s, r["opts"], r["set"])
            _own_bind(s, r, ctx, bytes.fromhex(r["name"]), r.get("file"))
        _connect(a, bytes.fromhex(b_rec["name"]), b_rec.get("file"))
        _connect(b, bytes.fromhex(a_rec["name"]), a_rec.get("file"))
        _unixpair.fill_pair(a, b, a_rec, b_rec, ctx)
        _check_names(a, a_rec, ctx)
        _check_names(b, b_rec, ctx)
    except BaseException:
        a.close()
        b.close()
        raise
    return a, b


def _build_one(rec: dict, ctx, fill: Optional[tuple] = None) -> _socket.socket:
    """A datagram socket connected to itself, or to a bound socket not
    connected back (that one bound already: _build). `fill`: (the bound
    socket, its record) whose queue this socket's messages make up, sent
    once connected and read back."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        _sockopts.apply(s, rec["opts"], rec["set"])
        name = bytes.fromhex(rec["name"])
        _own_bind(s, rec, ctx, name, rec.get("file"))
        if rec["role"] == "self":
            _connect(s, name, rec.get("file"))
        else:
            peer = _rec_of(ctx, rec["peer"], ("unix-dgram",))
            _connect(s, bytes.fromhex(peer["name"]), peer.get("file"))
        names = list(rec["set"])
        if fill is not None:
            r_sock, r_rec = fill
            msgs = _unixpair._messages(r_rec, ctx)
            # charged to the sender (as _unixpair.fill_pair): room for them,
            # the recorded size (and SO_BUF_LOCK) put back afterwards
            need = 2 * r_rec["data_len"] + 2048 * (len(msgs) + 1) + (1 << 17)
            if _unixpair._buf(s, "SO_SNDBUF") < need:
                _sockopts.set_buffer(s, "SO_SNDBUF", need)
                from . import _inflight
                _inflight.fill(s, _socket.SOCK_DGRAM, msgs, r_rec.get("anc"), ctx)
                _sockopts.set_buffer(s, "SO_SNDBUF", _sockopts.as_int(rec["opts"]["SO_SNDBUF"]))
                if rec["opts"].get("SO_BUF_LOCK") is not None:
                    names.append("SO_BUF_LOCK")
            else:
                from . import _inflight
                _inflight.fill(s, _socket.SOCK_DGRAM, msgs, r_rec.get("anc"), ctx)
            _unixpair._check_end(r_sock, dict(r_rec, cred=None, shutdown=0), ctx)    # (its shutdown comes after)
        _sockopts.apply_late(s, rec["opts"], names)
        from ._sockbase import shut_down
        shut_down(s, rec["shutdown"])
        _unixpair._check_end(s, rec, ctx)
        _check_names(s, rec, ctx)
    except BaseException:
        s.close()
        raise
    return s


def connect_senders(r_rec: dict, ctx) -> None:
    """Every sender of the dump connected to the bound datagram socket of
    `r_rec` (bound just now, a ghost whose file is unlinked next), built and
    kept for its own record, while the path still leads to it."""
    for srec in _all(ctx):
        if srec.get("sock") == "unix-named" and srec.get("role") == "sender" and \
                srec.get("peer") == r_rec["inode"] and _key(srec) not in ctx.shared:
            try:
                ctx.shared[_key(srec)] = {srec["inode"]: _build_one(srec, ctx)}
            except _sockopts.OptionError as e:
                raise option_refusal(srec, ctx, e) from None
            except OSError as e:
                raise failed(srec, ctx, f"rebuilding {_what(srec)}", e) from e


def fill_bound(r_sock: _socket.socket, r_rec: dict, ctx) -> None:
    """The queue of a bound datagram socket (just bound: _unixdgram) made
    up again by the one sender connected to it (its record's
    "queue_from"), which is built here and kept for its own record.
    Raises as restore."""
    srec = _rec_of(ctx, r_rec["queue_from"], ("unix-named",))
    try:
        ctx.shared[_key(srec)] = {srec["inode"]: _build_one(srec, ctx, fill=(r_sock, r_rec))}
    except _sockopts.OptionError as e:
        raise option_refusal(srec, ctx, e) from None
    except OSError as e:
        raise failed(srec, ctx, f"rebuilding {_what(srec)} and its peer's queue", e) from e


def built_key(ino: int) -> str:
    """ctx.shared key of the fd of a bound datagram socket built early, for
    a sender to connect to (its own record takes it: _unixdgram.restore)."""
    return f"unix-built:{ino}"


def restored_key(ino: int) -> str:
    """ctx.shared key set once a bound datagram socket's own record is restored."""
    return f"unix-dgram-restored:{ino}"


def _build(rec: dict, ctx) -> None:
    key = _key(rec)
    if key in ctx.shared:
        return
    if rec["role"] == "sender":
        from . import _unixdgram
        peer = _rec_of(ctx, rec["peer"], ("unix-dgram",))
        if built_key(peer["inode"]) not in ctx.shared and not ctx.shared.get(restored_key(peer["inode"])):
            # bound first, kept for its own record; when its queue came
            # from this socket, that builds this one too (fill_bound)
            ctx.shared[built_key(peer["inode"])] = _unixdgram.restore(peer, ctx)
        if key in ctx.shared:
            return
    if rec["role"] in ("self", "sender"):
        ctx.shared[key] = {rec["inode"]: _build_one(rec, ctx)}
        return
    peer = _rec_of(ctx, rec["peer"], ("unix-named",))
    if rec["role"] == "dgram":
        a, b = _build_dgram(rec, peer, ctx)
        ctx.shared[key] = {rec["inode"]: a, peer["inode"]: b}
        return
    acc, cli = (rec, peer) if rec["role"] == "accepted" else (peer, rec)
    a, c = _build_stream(acc, cli, ctx)
    ctx.shared[key] = {acc["inode"]: a, cli["inode"]: c}


def prebuild(name_hex: str, typ: int, ctx) -> None:
    """Build every named stream/seqpacket connection accepted under this
    listener name before the listener itself binds it (the temporary
    listener needs the name free). Raises as restore."""
    for r in _all(ctx):
        if r.get("sock") == "unix-named" and r.get("role") == "accepted" and r.get("name") == name_hex \
                and r.get("type") == typ:
            _guarded(r, ctx)


def _guarded(rec: dict, ctx) -> None:
    try:
        _build(rec, ctx)
    except _sockopts.OptionError as e:
        raise option_refusal(rec, ctx, e) from None
    except OSError as e:
        raise failed(rec, ctx, f"rebuilding {_what(rec)}", e) from e


def restore(rec: dict, ctx) -> int:
    """This end, both ends built on the first call. Raises Refusal
    (socket, image-invalid) or EngineError."""
    _guarded(rec, ctx)
    s = ctx.shared[_key(rec)].pop(rec["inode"])
    return with_status_flags(rec, ctx, s.detach())
