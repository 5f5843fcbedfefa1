"""Unix socketpairs held entirely by the process: queued data both ways,
shutdown state, options.

At dump (per end): the peer comes from sock_diag (UNIX_DIAG_PEER) and must
be held by the process and by nobody else; the end's receive queue is
peeked (see _sockpeek: never consumed, SO_PEEK_OFF put back); options are
read and compared with a fresh socket's (_sockopts).

At restore: socketpair() with the same type, options, then each queue is
refilled by sending its messages from the other end (with the sender's
buffer temporarily large enough: queued bytes are charged to the sender,
net/unix/af_unix.c), then SO_PASSCRED / SO_PEEK_OFF / SO_BUF_LOCK, then
shutdown(2) as recorded (for stream/seqpacket, unix_shutdown mirrors the
bits onto the peer, so the state is reproduced from the end's own bits);
then everything is read back and compared (options, shutdown bits, queue
lengths): any difference is a refusal, raised before the new process
exists.

SO_PEERCRED: the pair is made by a helper with the pid and credentials
its creator had (_peercred), also when that process has exited.

Ancillary data queued (files in flight in SCM_RIGHTS, the sender
credentials each message carries): _inflight, recorded per message in
rec["anc"] beside rec["lengths"] (a stream's lengths then split where a
write with fds begins and ends and where the senders' credentials change),
refilled in the same messages and peeked again after the refill. The
credentials are read with SO_PASSCRED turned on in the target's socket for
the peek (_sockpeek.creds_shown, put back on every path): a message keeps
what it was sent with whatever the receiver's flag, the process sees it
once it turns the flag on, and a stream read with the flag on stops where
the writer changes. Messages sent without credentials (neither end had
SO_PASSCRED on, none given) are refilled without; the others by a helper
with the sender's pid and ids, whatever the flag.

Known limit: a stream queue is refilled in fewer, larger buffers than
the original writes may have made, so the sender's charge (SIOCOUTQ, and
how much more it may write before blocking) can differ slightly; datagram
charges are identical.
"""

from __future__ import annotations

import os
import socket as _socket
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

from .. import faults, netdiag, pidfd
from ..errors import EngineError
from . import _inflight, _peercred, _sockopts, _sockpeek, _sys
from ._dups import is_follower
from ._sockbase import (UNIX_TYPES as TYPES, check_options, dup_of, fresh_options, held_here, inode_of,
                        option_refusal, options, outside_holders, unix_diag as _diag)
from ._util import failed, refuse, refuse_rec, with_status_flags

_BUFS = ("SO_SNDBUF", "SO_RCVBUF")


# -- dump ---------------------------------------------------------------

def pair_classify(info, ctx, q: dict) -> dict:
    """The dump record of one socketpair end (cached per inode); raises the
    `socket` refusal naming why it cannot be restored."""
    ino = inode_of(info.link)
    key = f"unix-pair:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    typ = q["type"]
    tname = TYPES[typ]
    d = _diag(info, ino)
    peer = d["peer"]
    if not peer:
        rec = _widowed_classify(info, ctx, q, ino, d)
        ctx.shared[key] = rec
        return rec
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"unix {tname} socketpair end also held by pid {out[0][0]} (fd {out[0][1]})")
    mine_peer = held_here(ctx, peer)
    peer_pid = info.pid
    if not mine_peer:
        peer_pid, mine_peer = _in_tree(ctx, peer)
    outp = outside_holders(info, ctx, peer)
    if outp:
        raise refuse(info, "socket", f"unix {tname} socketpair: peer held by pid {outp[0][0]} (fd {outp[0][1]})")
    if not mine_peer:
        raise refuse(info, "socket", f"unix {tname} socketpair: peer (socket inode {peer}) is held by no "
                     "process (in flight in an SCM_RIGHTS message?)")
    pd = _diag(info, peer)
    if d["name"] or pd["name"]:
        raise refuse(info, "socket", f"unix {tname} socketpair with a bound end")
    rec = end_state(info, ctx, q, ino, d, peer, peer_pid, mine_peer[0], f"unix {tname} socketpair")
    ctx.shared[key] = rec
    return rec


def end_state(info, ctx, q: dict, ino: int, d: dict, peer: int, peer_pid: int, peer_fd: int, what: str,
              named: bool = False, peer_charge: bool = True) -> dict:
    """The record of one end of a connected pair whose peer (socket `peer`)
    is held by `peer_pid` at `peer_fd`: options, peer credentials (the
    same on both ends of a socketpair; per end, `named`, for ends joined by
    connect), shutdown bits, the receive queue peeked (proven complete
    against the peer's charge; without `peer_charge` - a datagram socket
    connected to one that is not connected back, whose charge may lie in
    other queues - the caller has proven the queue empty). Raises the
    `socket` refusal."""
    typ = q["type"]
    tname = TYPES[typ]
    fresh = fresh_options(ctx, _socket.AF_UNIX, typ, 0)
    with dup_of(info) as mine, pidfd.target_fd(peer_pid, peer_fd) as theirs:
        opts = options(info, ctx, _socket.AF_UNIX, typ, 0, mine)
        peer_opts = options(info, ctx, _socket.AF_UNIX, typ, 0, theirs)
        cred, peer_cred = _peercred.read(mine), _peercred.read(theirs)
        if not named and cred != peer_cred:
            raise refuse(info, "socket", f"unix {tname} socketpair whose ends report different peer credentials "
                         f"({_peercred.text(cred)}; {_peercred.text(peer_cred)})")
        if named and typ == _socket.SOCK_DGRAM:
            # connect(2) of a datagram socket sets no peer credentials
            # (only socketpair and a stream connect do): none to restore.
            if cred["pid"] or cred["groups"] is not None:
                raise refuse(info, "socket", f"{what}: a connected datagram socket reporting peer "
                             f"credentials ({_peercred.text(cred)}): not made by connect(2)")
            cred = None
        why = _peercred.dump_problem(cred, info.pid, getattr(ctx, "tree_pids", ()) or ()) if cred else None
        if why:
            raise refuse(info, "peer-pid-in-use", f"{what}: {why}")
        setnames = check_options(info, opts, fresh)
        charge = _sockpeek.outq(theirs) if peer_charge else 0
        queued = _sys.fionread(mine)
        msgs: List[bytes] = []
        anc: Optional[list] = None
        if charge or queued:
            if d["shutdown"] & netdiag.RCV_SHUTDOWN and typ != _socket.SOCK_STREAM:
                raise refuse(info, "socket", f"{what}: end shut down for reading "
                             "with messages queued")
            msgs, anc = _peek_queue(info, ctx, mine, typ, charge, queued, what)
        if typ != _socket.SOCK_STREAM and _sockopts.as_int(opts.get("SO_PEEK_OFF")) >= 0 and \
                any(not m for m in msgs):
            # The process peeks at offsets itself: which empty datagrams it
            # already saw (skb->peeked) decides what its next peek returns,
            # and fresh messages at restore would all be unseen.
            raise refuse(info, "socket", f"{what}: empty datagrams queued while the "
                         "process uses SO_PEEK_OFF")
    total = sum(len(m) for m in msgs)
    rec = {"sock": "unix-named" if named else "unix-pair", "type": typ, "inode": ino, "peer": peer, "opts": opts,
           "set": setnames, "cred": cred,
           "shutdown": d["shutdown"], "lengths": [len(m) for m in msgs], "fionread": queued,
           "data_len": total, "_data": b"".join(msgs)}
    if anc and any(anc):
        rec["anc"] = anc
    return rec


def _widowed_classify(info, ctx, q: dict, ino: int, d: dict) -> dict:
    """A stream socketpair end whose peer was closed (unix_release_sock: the
    survivor gets SHUTDOWN_MASK, and sk_err ECONNRESET if the closed end
    still had bytes to read): what the peer sent before it closed is read
    to the end, then EOF; writes get EPIPE. Rebuilt at restore by closing
    the new pair's other end the same way. The pending ECONNRESET is seen
    without consuming it (poll's POLLERR; SO_ERROR would clear it).
    Datagram and seqpacket ends are refused: their queue's completeness is
    proven against the sender's charge, which died with it."""
    typ = q["type"]
    tname = TYPES[typ]
    if typ != _socket.SOCK_STREAM:
        raise refuse(info, "socket", f"unix {tname} connected (socketpair) whose peer is closed")
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"unix {tname} socketpair end also held by pid {out[0][0]} (fd {out[0][1]})")
    if d["name"]:
        raise refuse(info, "socket", f"unix {tname} socketpair with a bound end")
    if d["shutdown"] != netdiag.RCV_SHUTDOWN | netdiag.SEND_SHUTDOWN:
        raise refuse(info, "socket", f"unix {tname} end whose peer is closed, with shutdown state "
                     f"{d['shutdown']} (a closed peer leaves both)")
    import select
    fresh = fresh_options(ctx, _socket.AF_UNIX, typ, 0)
    with dup_of(info) as mine:
        opts = options(info, ctx, _socket.AF_UNIX, typ, 0, mine)
        cred = _peercred.read(mine)
        why = _peercred.dump_problem(cred, info.pid, getattr(ctx, "tree_pids", ()) or ())
        if why:
            raise refuse(info, "peer-pid-in-use", f"unix {tname} socketpair: {why}")
        setnames = check_options(info, opts, fresh)
        p = select.poll()
        p.register(mine, select.POLLIN)
        reset = any(ev & select.POLLERR for _, ev in p.poll(0))
        queued = _sys.fionread(mine)
        msgs: List[bytes] = []
        anc: Optional[list] = None
        if queued:
            msgs, anc = _peek_queue(info, ctx, mine, typ, queued + 4096, queued,
                                    f"unix {tname} end whose peer is closed", limit=queued)
    rec = {"sock": "unix-pair", "type": typ, "inode": ino, "peer": 0, "widowed": True, "reset": reset,
           "opts": opts, "set": setnames, "cred": cred, "shutdown": d["shutdown"],
           "lengths": [len(m) for m in msgs], "fionread": queued, "data_len": sum(len(m) for m in msgs),
           "_data": b"".join(msgs)}
    if anc and any(anc):
        rec["anc"] = anc
    return rec


def _peek_queue(info, ctx, mine: int, typ: int, charge: int, queued: int, what: str, limit: Optional[int] = None):
    """(messages, ancillary records or None) of the receive queue of the
    target's socket (duplicate `mine`), left in place. Files in flight are
    described (check) or dumped (dump: ctx.image) by their kinds' modules
    and credentials checked (_inflight); raises the `socket` refusal naming
    what cannot be restored, EngineError when the queue cannot be read."""
    held: List[int] = []
    try:
        try:
            msgs, anc = _sockpeek.peek_ancillary(mine, typ, _sockpeek.max_messages(charge), held,
                                                 _passcred_fault, limit)
            if typ == _socket.SOCK_STREAM:
                got = sum(len(m) for m in msgs)
                if got != queued:
                    raise _sockpeek.Unreadable(f"peeked {got} bytes of {queued} queued")
            else:
                _sockpeek.check_messages(typ, msgs, charge, [len((a or {}).get("fds") or []) for a in anc])
        except _sockpeek.Unreadable as e:
            raise refuse(info, "socket", f"{what}: {e}") from None
        except OSError as e:
            raise EngineError(f"peeking pid {info.pid} fd {info.fd}: {e.strerror}", pid=info.pid,
                              errno=e.errno) from e
        out = []
        for i, a in enumerate(anc):
            if a is None:
                out.append(None)
                continue
            where = f"{what}: queued message {i + 1} of {len(msgs)}"
            rec = {}
            if a.get("fds"):
                rec["fds"] = _inflight.dump_fds(info, ctx, a["fds"], where) if ctx.image is not None else \
                    _inflight.classify_fds(info, ctx, a["fds"], where)
            if a.get("cred"):
                _inflight.check_cred(info, ctx, a["cred"], where)
                rec["cred"] = a["cred"]
            out.append(rec)
        return msgs, out
    finally:
        _inflight.close_all(held)


def _passcred_fault() -> None:
    # reached with SO_PASSCRED turned on in the target's socket for the peek
    faults.point("dump.passcred")


def _in_tree(ctx, inode: int) -> Tuple[int, List[int]]:
    """(pid, fds) of another member of the dumped process tree holding
    socket `inode` (engine/tree.py), or (0, [])."""
    link = f"socket:[{inode}]"
    for pid in sorted(getattr(ctx, "tree_pids", ()) or ()):
        if pid == ctx.pid:
            continue
        try:
            fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd")
                         if os.readlink(f"/proc/{pid}/fd/{n}") == link)
        except OSError:
            continue
        if fds:
            return pid, fds
    return 0, []


def pair_text(rec: dict) -> str:
    if rec.get("widowed"):
        return (f"unix stream socketpair end whose peer is closed, {rec['data_len']} bytes queued"
                + (", ECONNRESET pending" if rec["reset"] else "") + _inflight.text(rec.get("anc")))
    n = len(rec["lengths"])
    what = f"{rec['data_len']} bytes queued" if rec["type"] == _socket.SOCK_STREAM else \
        f"{n} messages ({rec['data_len']} bytes) queued"
    sh = f", shutdown {rec['shutdown']}" if rec["shutdown"] else ""
    return f"unix {TYPES[rec['type']]} socketpair end (peer inode {rec['peer']}), {what}{sh}" + \
        _inflight.text(rec.get("anc"))


def pair_dump(info, ctx, q: dict) -> dict:
    return store(pair_classify(info, ctx, q), ctx)


def store(rec: dict, ctx) -> dict:
    """The restore record of a classified end: its queue's bytes written to
    the image (fds/sock-INODE)."""
    rec = dict(rec)
    data = rec.pop("_data")
    rec["data"] = None
    if data:
        rec["data"] = f"fds/sock-{rec['inode']}"
        ctx.image.write_bytes(rec["data"], data)
    if rec["type"] == _socket.SOCK_STREAM and not rec.get("anc"):
        rec["lengths"] = [rec["data_len"]] if rec["data_len"] else []
    return rec


# -- restore --------------------------------------------------------------

def _peer_rec(rec: dict, ctx) -> Optional[dict]:
    # In a process tree the peer may be another member's (engine/tree_restore.py).
    for r in getattr(ctx, "tree_records", None) or ctx.records or []:
        if r.get("sock") == "unix-pair" and r.get("inode") == rec["peer"] and not is_follower(r):
            return r
    return None


def pair_validate(rec: dict, ctx) -> None:
    """Raises image-invalid (peer record or data missing) or socket."""
    if rec.get("type") not in TYPES:
        raise refuse_rec(rec, ctx, "image-invalid", f"unix socket type {rec.get('type')!r}")
    if rec.get("widowed"):
        if rec["type"] != _socket.SOCK_STREAM or rec.get("peer") != 0 or not isinstance(rec.get("reset"), bool) \
                or rec.get("shutdown") != netdiag.RCV_SHUTDOWN | netdiag.SEND_SHUTDOWN:
            raise refuse_rec(rec, ctx, "image-invalid", "a socketpair end whose peer is closed: inconsistent record")
    else:
        peer = _peer_rec(rec, ctx)
        if peer is None or peer.get("peer") != rec["inode"] or peer.get("type") != rec["type"]:
            raise refuse_rec(rec, ctx, "image-invalid", f"the record of the peer socket {rec['peer']} is missing")
    if sum(rec["lengths"]) != rec["data_len"]:
        raise refuse_rec(rec, ctx, "image-invalid", "socket queue lengths do not add up")
    if rec.get("data"):
        ctx.image.path(rec["data"])
    _inflight.validate(rec, ctx)
    why = _peercred.restore_problem(rec["cred"]) if rec.get("cred") else None
    if why:
        raise refuse_rec(rec, ctx, "peer-pid-in-use", f"unix socketpair: {why}")


def _messages(rec: dict, ctx) -> List[bytes]:
    if not rec.get("data"):
        return []
    # Another member's end: its data is in that member's image directory.
    data = (rec.get("_image") or ctx.image).read_bytes(rec["data"])
    if len(data) != rec["data_len"]:
        raise refuse_rec(rec, ctx, "image-invalid", f"{rec['data']} holds {len(data)} bytes, not {rec['data_len']}")
    out, off = [], 0
    for n in rec["lengths"]:
        out.append(data[off:off + n])
        off += n
    return out


def _buf(sock: _socket.socket, name: str) -> int:
    return sock.getsockopt(_socket.SOL_SOCKET, 7 if name == "SO_SNDBUF" else 8)


def _build_widowed(rec: dict, ctx) -> _socket.socket:
    """A new pair whose other end, after filling this end's queue, is closed
    the way the dumped peer was: with a byte of its own unread when the
    dumped end had ECONNRESET pending (unix_release_sock sets it then)."""
    closed = {"opts": {}, "set": [], "shutdown": 0, "fionread": 0, "lengths": [], "data_len": 0}
    a, b = _build_pair(rec, closed, ctx, check=False)
    try:
        if rec["reset"]:
            a.send(b"\0")
        b.close()
        d = netdiag.unix_socket(os.fstat(a.fileno()).st_ino)
        if d["peer"]:
            raise refuse_rec(rec, ctx, "socket", "the rebuilt end still has a peer")
        _check_end(a, rec, ctx)
        import select
        p = select.poll()
        p.register(a.fileno(), select.POLLIN)
        if any(ev & select.POLLERR for _, ev in p.poll(0)) != rec["reset"]:
            raise refuse_rec(rec, ctx, "socket", "the rebuilt end's pending ECONNRESET differs")
    except BaseException:
        a.close()
        b.close()
        raise
    return a


def _build_pair(a_rec: dict, b_rec: dict, ctx, check: bool = True) -> Tuple[_socket.socket, _socket.socket]:
    typ = a_rec["type"]
    cred = a_rec.get("cred")
    if cred and cred["pid"] > 0:
        # made by a helper with the creator's pid and credentials (_peercred)
        fa, fb = _peercred.run_as(cred, lambda: [s.detach() for s in _socket.socketpair(
            _socket.AF_UNIX, typ | _socket.SOCK_CLOEXEC)])
        a, b = _socket.socket(fileno=fa), _socket.socket(fileno=fb)
    else:
        a, b = _socket.socketpair(_socket.AF_UNIX, typ | _socket.SOCK_CLOEXEC)
    try:
        for s, r in ((a, a_rec), (b, b_rec)):
            _sockopts.apply(s, r["opts"], r["set"])
        fill_pair(a, b, a_rec, b_rec, ctx, check)
    except BaseException:
        a.close()
        b.close()
        raise
    return a, b


def fill_pair(a: _socket.socket, b: _socket.socket, a_rec: dict, b_rec: dict, ctx, check: bool = True,
              shutdowns: Optional[Tuple[int, int]] = None) -> None:
    """Connected ends `a` and `b`, made with their early options, given
    their queues, late options and shutdown bits (the records' own, or
    `shutdowns`: what is left to do once connected), then (`check`) read back
    against their records. Raises OSError, OptionError or the `socket`
    refusal; closes nothing."""
    typ = a_rec["type"]
    ends = ((a, a_rec), (b, b_rec))
    late_extra = set()
    for (recv, rrec), (send, srec) in ((ends[0], ends[1]), (ends[1], ends[0])):
        msgs = _messages(rrec, ctx)
        if not msgs:
            continue
        # The queued bytes are charged to the sender (its sk_wmem_alloc
        # against sk_sndbuf, net/unix/af_unix.c): make room for them,
        # put the recorded size back afterwards.
        need = 2 * rrec["data_len"] + 2048 * (len(msgs) + 1) + (1 << 17)
        if _buf(send, "SO_SNDBUF") < need:
            _sockopts.set_buffer(send, "SO_SNDBUF", need)
            late_extra.add((id(send), "SO_SNDBUF"))
        _inflight.fill(send, typ, msgs, rrec.get("anc"), ctx)
    for s, r in ends:
        for name in _BUFS:
            if (id(s), name) in late_extra:
                _sockopts.set_buffer(s, name, _sockopts.as_int(r["opts"][name]))
        names = list(r["set"]) + (["SO_BUF_LOCK"] if any(k[0] == id(s) for k in late_extra)
                                  and r["opts"].get("SO_BUF_LOCK") is not None else [])
        _sockopts.apply_late(s, r["opts"], names)
    for (s, r), bits in zip(ends, shutdowns or (a_rec["shutdown"], b_rec["shutdown"])):
        if r.get("widowed"):
            continue            # closing the other end shuts it down (_build_widowed)
        if bits & netdiag.RCV_SHUTDOWN and bits & netdiag.SEND_SHUTDOWN:
            s.shutdown(_socket.SHUT_RDWR)
        elif bits & netdiag.RCV_SHUTDOWN:
            s.shutdown(_socket.SHUT_RD)
        elif bits & netdiag.SEND_SHUTDOWN:
            s.shutdown(_socket.SHUT_WR)
    for s, r in ends if check else ():
        _check_end(s, r, ctx)


def _check_end(s: _socket.socket, r: dict, ctx) -> None:
    """The rebuilt end reads back as dumped; raises the `socket` refusal."""
    try:
        _sockopts.verify(s, _socket.AF_UNIX, False, r["opts"])
    except _sockopts.OptionError as e:
        raise option_refusal(r, ctx, e) from None
    if r.get("cred"):
        why = _peercred.check(r["cred"], _peercred.read(s.fileno()))
        if why:
            raise refuse_rec(r, ctx, "socket", f"unix socketpair: {why}")
    d = netdiag.unix_socket(os.fstat(s.fileno()).st_ino)
    if d["shutdown"] != r["shutdown"]:
        raise refuse_rec(r, ctx, "socket", f"shutdown state {d['shutdown']} after restore, was {r['shutdown']}")
    if _sys.fionread(s.fileno()) != r["fionread"]:
        raise refuse_rec(r, ctx, "socket", f"{_sys.fionread(s.fileno())} bytes readable after the refill, "
                         f"was {r['fionread']}")
    if r.get("anc"):
        _check_ancillary(s, r, ctx)


def _check_ancillary(s: _socket.socket, r: dict, ctx) -> None:
    """The rebuilt queue peeks as recorded: the same messages (stream: the
    same writes with fds), the same numbers and kinds of fds in flight,
    the same credentials. Raises the `socket` refusal."""
    from . import classify_kind
    from ._inflight import _here
    held: List[int] = []
    try:
        msgs, anc = _sockpeek.peek_ancillary(s.fileno(), r["type"], len(r["lengths"]) + 2, held,
                                             limit=r["fionread"] if r.get("widowed") else None)
        got = _inflight.shape(msgs, anc, lambda fd: classify_kind(_here(fd)))
    except (_sockpeek.Unreadable, OSError) as e:
        raise refuse_rec(r, ctx, "socket", f"the rebuilt queue cannot be peeked: {e}") from None
    finally:
        _inflight.close_all(held)
    want = _inflight.shape([b"x" * n for n in r["lengths"]], r["anc"])
    if got != want:
        raise refuse_rec(r, ctx, "socket", f"the rebuilt queue (length, fds in flight, credentials per "
                         f"message) is {got[:4]}..., was {want[:4]}...")


def pair_restore(rec: dict, ctx) -> int:
    """This end of the rebuilt socketpair (both are built on the first call).
    Raises Refusal (socket, image-invalid) or EngineError."""
    if rec.get("widowed"):
        try:
            s = _build_widowed(rec, ctx)
        except _sockopts.OptionError as e:
            raise option_refusal(rec, ctx, e) from None
        except OSError as e:
            raise failed(rec, ctx, "rebuilding the socketpair end whose peer is closed", e) from e
        return with_status_flags(rec, ctx, s.detach())
    key = f"unix-pair:{min(rec['inode'], rec['peer'])}"
    st: Dict[int, _socket.socket] = ctx.shared.get(key)
    if st is None:
        peer = _peer_rec(rec, ctx)
        try:
            a, b = _build_pair(rec, peer, ctx)
        except _sockopts.OptionError as e:
            raise option_refusal(rec, ctx, e) from None
        except OSError as e:
            raise failed(rec, ctx, "rebuilding the socketpair", e) from e
        st = {rec["inode"]: a, rec["peer"]: b}
        ctx.shared[key] = st
    s = st.pop(rec["inode"])
    return with_status_flags(rec, ctx, s.detach())


