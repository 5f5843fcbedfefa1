"""Copy a unix socket's receive queue without consuming it.

recv(MSG_PEEK) reads without dequeuing; SO_PEEK_OFF (socket(7)) makes the
next peek start that many bytes into the queue, which is how a peek walks
past the first chunk (stream) or the first message (datagram/seqpacket:
net/core/datagram.c __skb_try_recv_from_queue skips whole messages whose
length is below the offset). SO_PEEK_OFF belongs to the socket, shared
with the target, so its previous value (normally -1, "off") is put back
before returning, whatever happens.

Two traps of the datagram walk, both checked:

- A zero-length datagram that was peeked before (by the process, or by an
  earlier dump) carries skb->peeked and is *skipped* by every peek at an
  offset: the walk cannot see it. So the walk's result is checked against
  the kernel's own accounting: every queued message is charged to its
  sender's write allocation (SIOCOUTQ = sk_wmem_alloc, net/unix/af_unix.c
  unix_outq_len), and the same messages sent through a scratch socketpair
  here must produce exactly the same charge (skb truesize depends only on
  the length). Any difference is a refusal. Consequence: the first look
  at a queue with empty datagrams marks them peeked, so a second look
  (``ckpt check`` then ``ckpt dump``, or two ``--leave-running`` dumps)
  refuses; a restored process's queue is fresh and dumps again fine.
- A peek of a message carrying SCM_RIGHTS installs duplicates of the
  in-flight fds in *this* process (net/core/scm.c scm_detach_fds). peek_all
  closes them at once and refuses ancillary data of any kind;
  peek_ancillary keeps them (and each message's SCM_CREDENTIALS) for the
  caller to dump (engine/fds/_inflight.py).

A stream peek glues the bytes of consecutive writes together, but stops
after the first one that carries fds (net/unix/af_unix.c
unix_stream_read_generic: "if (UNIXCB(skb).fp) break"), and, with
SO_PASSCRED on, before a write of other credentials. peek_ancillary turns
SO_PASSCRED on for its walk (creds_shown, put back after): every message
keeps the credentials it was sent with even while the reader's flag is off,
and shows them, and the writes of different senders apart, only with it on. Where the write with
the fds begins inside such a chunk is found by peeking one byte at a time
(binary search): a one-byte peek returns the fds exactly when that byte
belongs to the write that carries them. The receiver gets the fds with
the first byte of that write it reads, so the boundary matters.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import socket as _socket
import struct
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

SO_PEEK_OFF = 42
SO_PASSCRED = 16
SIOCOUTQ = 0x5411
MSG_CMSG_CLOEXEC = 0x40000000
SO_PASSPIDFD = 76       # Linux 6.5: a peek also shows the sender's struct pid (SCM_PIDFD)
SCM_PIDFD = 0x04
_ANCBUF = (_socket.CMSG_SPACE(253 * 4) + _socket.CMSG_SPACE(12) + _socket.CMSG_SPACE(4)
           + _socket.CMSG_SPACE(256))
_STREAMISH = (_socket.SOCK_STREAM,)


class Unreadable(Exception):
    """The queue cannot be copied exactly; the message says why."""


def outq(fd: int) -> int:
    """Bytes charged to this socket's sends still queued somewhere (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQ, b"\0\0\0\0"))[0]


def _ancillary(anc, flags: int) -> str:
    """'' or a description of the ancillary data; closes any fds received."""
    what = []
    for level, typ, data in anc:
        if level == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            what.append(f"SCM_RIGHTS ({len(fds)} fds in flight)")
        elif level == _socket.SOL_SOCKET and typ == getattr(_socket, "SCM_CREDENTIALS", 2):
            what.append("SCM_CREDENTIALS (sender pid/uid/gid)")
        elif level == _socket.SOL_SOCKET and typ == SCM_PIDFD and len(data) >= 4:
            pidfd = struct.unpack("i", data[:4])[0]
            if pidfd >= 0:
                os.close(pidfd)
            what.append("SCM_PIDFD (sender pidfd)")
        else:
            what.append(f"ancillary level {level} type {typ}")
    if flags & _socket.MSG_CTRUNC:
        what.append("more ancillary data than fits a peek (MSG_CTRUNC)")
    return ", ".join(what)


def peek_all(dup: int, typ: int, max_msgs: int) -> List[bytes]:
    """The receive queue of the socket `dup` (a duplicate of the target's),
    left in place: one bytes per message for datagram/seqpacket, chunks for
    stream (join them). `max_msgs` bounds the walk (a datagram queue cannot
    hold more messages than its sender's charge allows).

    Raises Unreadable (ancillary data queued, walk did not end) or OSError."""
    s = _socket.socket(fileno=os.dup(dup))
    try:
        prev = s.getsockopt(_socket.SOL_SOCKET, SO_PEEK_OFF)
        try:
            return _walk(s, typ, max_msgs)
        finally:
            s.setsockopt(_socket.SOL_SOCKET, SO_PEEK_OFF, prev)
    finally:
        s.close()


def _walk(s: _socket.socket, typ: int, max_msgs: int) -> List[bytes]:
    msgs: List[bytes] = []
    off = 0
    bufsize = 1 << 16
    flags = _socket.MSG_PEEK | _socket.MSG_DONTWAIT | MSG_CMSG_CLOEXEC
    while True:
        if len(msgs) > max_msgs:
            raise Unreadable(f"the queue walk found more than {max_msgs} messages")
        s.setsockopt(_socket.SOL_SOCKET, SO_PEEK_OFF, off)
        try:
            data, anc, mflags, _ = s.recvmsg(bufsize, _ANCBUF, flags)
        except BlockingIOError:
            return msgs
        why = _ancillary(anc, mflags)
        if why:
            raise Unreadable(f"ancillary data queued: {why}")
        if typ in _STREAMISH:
            if not data:             # end of stream (the peer shut down)
                return msgs
        elif mflags & _socket.MSG_TRUNC:
            bufsize *= 4             # a bigger message: peek it again, whole
            continue
        msgs.append(data)
        off += len(data)


def peek_ancillary(dup: int, typ: int, max_msgs: int, held: List[int], fault=None, limit: Optional[int] = None):
    """(messages, ancillary) of the socket `dup`'s receive queue, left in
    place: ancillary[i] is None or {"fds": [fds installed here], "cred":
    {"pid", "uid", "gid"}} of message i (stream: of segment i, split where
    a write with fds begins and ends, and where the senders' credentials
    change). Credentials are read with SO_PASSCRED on for the peek
    (creds_shown; `fault` is its fault point), so they are the ones each
    message carries whatever the process's flag. Every fd installed here
    is also appended to `held`: the caller closes them, whatever happens.

    Raises Unreadable (other ancillary data, truncated ancillary data, the
    walk did not end) or OSError."""
    s = _socket.socket(fileno=os.dup(dup))
    try:
        prev = s.getsockopt(_socket.SOL_SOCKET, SO_PEEK_OFF)
        try:
            with creds_shown(s.fileno(), fault):
                return _walk_ancillary(s, typ, max_msgs, held, limit)
        finally:
            s.setsockopt(_socket.SOL_SOCKET, SO_PEEK_OFF, prev)
    finally:
        s.close()


_CREDS = getattr(_socket, "SCM_CREDENTIALS", 2)


def _initial_pidns() -> bool:
    from ..pidns import in_initial
    return in_initial()


@functools.lru_cache(maxsize=1)
def _credless_ids():
    """(pid 0, overflowuid, overflowgid): what a peek shows for a message
    that carries no credentials (no pid; INVALID_UID munged). Outside the
    initial pid namespace a sender whose pid ckpt cannot see, running as
    the overflow ids, peeks the same: there only a peek with SO_PASSPIDFD
    tells them apart (creds_shown): the kernel adds SCM_PIDFD for every
    message with a sender pid, visible or not, live or dead (a negative
    value when no pidfd could be made), none for a message without
    (net/core/scm.c scm_pidfd_recv: "if (!scm->pid) return")."""
    out = [0]
    for name in ("overflowuid", "overflowgid"):
        try:
            with open(f"/proc/sys/kernel/{name}") as f:
                out.append(int(f.read()))
        except (OSError, ValueError):
            out.append(65534)
    return tuple(out)


@contextlib.contextmanager
def creds_shown(fd: int, fault=None):
    """SO_PASSCRED on for the socket at `fd` (a duplicate: the flag is the
    socket's, so the target's too) while the caller peeks, the previous
    value put back whatever happens. A peek shows SCM_CREDENTIALS only while
    the reader has SO_PASSCRED on (scm_recv_unix), yet a message carries the
    credentials it was sent with (explicit SCM_CREDENTIALS, or SO_PASSCRED
    on at either end when it was sent: unix_maybe_add_creds) whatever the
    reader's flag: hidden, until the process turns the flag on, and they
    decide where its stream reads stop (unix_skb_scm_eq). `fault`, called
    with the flag on, is the caller's fault point."""
    s = _socket.socket(fileno=os.dup(fd))
    try:
        prev = s.getsockopt(_socket.SOL_SOCKET, SO_PASSCRED)
        pidfd_prev = None
        if not _initial_pidns():
            # (outside the initial pid namespace only: there pid 0 is ambiguous, _credless_ids)
            try:
                pidfd_prev = s.getsockopt(_socket.SOL_SOCKET, SO_PASSPIDFD)
            except OSError:
                pass        # below Linux 6.5: pid 0 stays ambiguous, refused
        if not prev:
            s.setsockopt(_socket.SOL_SOCKET, SO_PASSCRED, 1)
        try:
            if pidfd_prev == 0:
                s.setsockopt(_socket.SOL_SOCKET, SO_PASSPIDFD, 1)
            if fault is not None:
                fault()
            yield
        finally:
            try:
                if pidfd_prev == 0:
                    s.setsockopt(_socket.SOL_SOCKET, SO_PASSPIDFD, 0)
            finally:
                if not prev:
                    s.setsockopt(_socket.SOL_SOCKET, SO_PASSCRED, 0)
    finally:
        s.close()


def _peek_at(s: _socket.socket, off: int, size: int, held: List[int]):
    """(data, fds, cred, flags) of one peek at offset `off`."""
    s.setsockopt(_socket.SOL_SOCKET, SO_PEEK_OFF, off)
    data, anc, mflags, _ = s.recvmsg(size, _ANCBUF, _socket.MSG_PEEK | _socket.MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
    fds, cred, other = [], None, []
    sender = None       # SCM_PIDFD seen: the message has a sender pid
    for level, typ, raw in anc:
        if level == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(raw[:len(raw) - len(raw) % got.itemsize])
            held.extend(got)
            fds.extend(got)
        elif level == _socket.SOL_SOCKET and typ == _CREDS and len(raw) >= 12:
            cred = struct.unpack("iII", raw[:12])
        elif level == _socket.SOL_SOCKET and typ == SCM_PIDFD and len(raw) >= 4:
            pidfd = struct.unpack("i", raw[:4])[0]
            if pidfd >= 0:
                os.close(pidfd)
            sender = True
        else:
            other.append(f"ancillary level {level} type {typ}")
    if cred is not None:
        # pid 0 with the overflow ids: a message sent with no credentials
        # (no SO_PASSCRED at either end, none given), where that is certain;
        # any other pid 0 is kept, and refused (_inflight.check_cred)
        if cred != _credless_ids() or not (_initial_pidns() or (not sender and _pidfds_shown(s))):
            cred = {"pid": cred[0], "uid": cred[1], "gid": cred[2]}
        else:
            cred = None
    if mflags & _socket.MSG_CTRUNC:
        other.append("more ancillary data than fits a peek (MSG_CTRUNC)")
    if other:
        raise Unreadable("ancillary data queued: " + ", ".join(other))
    return data, fds, cred, mflags


def _pidfds_shown(s: _socket.socket) -> bool:
    """Whether this peek would have shown SCM_PIDFD (creds_shown turned
    SO_PASSPIDFD on: Linux >= 6.5, ckpt outside the initial pid namespace)."""
    try:
        return bool(s.getsockopt(_socket.SOL_SOCKET, SO_PASSPIDFD))
    except OSError:
        return False


def _close_now(fds: List[int], held: List[int]) -> None:
    for fd in fds:
        held.remove(fd)
        os.close(fd)


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.recvmsg.restype = ctypes.c_ssize_t
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _rights_in(raw: bytes) -> bool:
    """Whether raw control data holds SCM_RIGHTS (its fds are closed)."""
    hdr = struct.Struct("Nii")
    found, off = False, 0
    while off + hdr.size <= len(raw):
        n, level, typ = hdr.unpack_from(raw, off)
        if n < hdr.size:
            break
        if level == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS:
            found = True
            for fd in array.array("i", raw[off + hdr.size:off + n]):
                os.close(fd)
        elif level == _socket.SOL_SOCKET and typ == SCM_PIDFD and n >= hdr.size + 4:
            pidfd = struct.unpack_from("i", raw, off + hdr.size)[0]
            if pidfd >= 0:
                os.close(pidfd)
        off += _socket.CMSG_SPACE(n - hdr.size)
    return found


def _fd_write_start(s: _socket.socket, off: int, n: int, held: List[int]) -> int:
    """Offset (within a stream chunk of `n` bytes peeked at `off`, ending
    with the write that carries fds) where that write begins.

    A stream peek that runs out of buffer still walks on to the next write
    with fds and returns them (unix_stream_read_generic's peek branch goes
    on with a zero-byte chunk), so a short peek does not tell. A peek into
    a buffer whose first n - 1 bytes are mapped and the rest is not does:
    each write's bytes are copied whole or the copy faults and the peek
    stops there (copied so far, or EFAULT when nothing was), before the
    fds are taken. It returns the bytes of the writes before the last."""
    page = mmap.PAGESIZE
    m = n - 1
    size = (m + page - 1) // page * page + page
    area = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(area))
        guard = base + size - page
        if _libc.mprotect(ctypes.c_void_p(guard), page, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
        iov = (ctypes.c_void_p * 2)(guard - m, n)
        ctl = ctypes.create_string_buffer(_ANCBUF)
        hdr = _MsgHdr(None, 0, ctypes.addressof(iov), 1, ctypes.addressof(ctl), _ANCBUF, 0)
        s.setsockopt(_socket.SOL_SOCKET, SO_PEEK_OFF, off)
        got = _libc.recvmsg(s.fileno(), ctypes.byref(hdr),
                            _socket.MSG_PEEK | _socket.MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
        err = ctypes.get_errno()
        if got >= 0 and _rights_in(ctl.raw[:hdr.controllen]):
            raise Unreadable("a peek that stopped before the write with fds returned fds")
        del iov, hdr
    finally:
        try:
            area.close()
        except BufferError:
            pass
    if got < 0:
        if err == errno.EFAULT:
            return 0
        raise OSError(err, os.strerror(err))
    if not 0 <= got < n:
        raise Unreadable(f"the write with fds could not be told apart in a {n}-byte chunk")
    return got


def _walk_ancillary(s: _socket.socket, typ: int, max_msgs: int, held: List[int], limit: Optional[int] = None):
    """`limit`: a stream's queued bytes, known: the walk stops there. A peek
    that finds nothing left takes a pending socket error (sock_error in
    unix_stream_read_generic consumes sk_err): the ECONNRESET a closed peer
    may have left must stay for the process."""
    msgs: List[bytes] = []
    ancs: list = []
    off = 0
    bufsize = 1 << 16
    while True:
        if limit is not None and typ in _STREAMISH and off >= limit:
            return msgs, ancs
        if len(msgs) > max_msgs:
            raise Unreadable(f"the queue walk found more than {max_msgs} messages")
        try:
            data, fds, cred, mflags = _peek_at(s, off, bufsize, held)
        except BlockingIOError:
            return msgs, ancs
        if typ in _STREAMISH:
            if not data:
                _close_now(fds, held)
                return msgs, ancs
            if len(data) == bufsize and bufsize < (1 << 28):
                # The buffer, not a write with fds or other credentials,
                # ended this peek: fds it returned may be a later write's.
                _close_now(fds, held)
                bufsize *= 4
                continue
            if fds:
                start = _fd_write_start(s, off, len(data), held)
                if start:
                    msgs.append(data[:start])
                    ancs.append({"cred": cred} if cred else None)
                    data = data[start:]
                    off += start
        elif mflags & _socket.MSG_TRUNC:
            _close_now(fds, held)
            bufsize *= 4
            continue
        a = {}
        if fds:
            a["fds"] = fds
        if cred:
            a["cred"] = cred
        msgs.append(data)
        ancs.append(a or None)
        off += len(data)


def replica_charge(typ: int, msgs: List[bytes], nfds: Optional[List[int]] = None) -> int:
    """SIOCOUTQ of a scratch socketpair's sender after sending `msgs`
    (message i with nfds[i] fds in flight: copies of /dev/null)."""
    a, b = _socket.socketpair(_socket.AF_UNIX, typ | _socket.SOCK_CLOEXEC)
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) if nfds and any(nfds) else -1
    try:
        need = sum(len(m) for m in msgs) * 2 + 4096 * (len(msgs) + 1) + (1 << 20)
        a.setsockopt(_socket.SOL_SOCKET, 32, need // 2)   # SO_SNDBUFFORCE
        for i, m in enumerate(msgs):
            n = nfds[i] if nfds else 0
            anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [null] * n).tobytes())] if n else []
            a.sendmsg([m], anc, _socket.MSG_DONTWAIT)
        return outq(a.fileno())
    finally:
        if null >= 0:
            os.close(null)
        a.close()
        b.close()


def check_messages(typ: int, msgs: List[bytes], sender_charge: int, nfds: Optional[List[int]] = None) -> None:
    """Raise Unreadable unless `msgs` account for exactly the sender's
    charge (datagram and seqpacket only)."""
    got = replica_charge(typ, msgs, nfds)
    if got != sender_charge:
        raise Unreadable(f"the peeked messages ({len(msgs)}, {sum(len(m) for m in msgs)} bytes) do not "
                         f"account for the queue (sender charge {sender_charge}, expected {got}): "
                         "a message is hidden from peeking or was sent elsewhere")


def fill(sender: _socket.socket, typ: int, msgs: List[bytes]) -> None:
    """Send `msgs` from `sender` in order, each datagram whole.

    Raises OSError (EAGAIN when the peer cannot take them)."""
    for m in msgs:
        if typ in _STREAMISH:
            view = memoryview(m)
            while view:
                n = sender.send(view, _socket.MSG_DONTWAIT)
                view = view[n:]
        else:
            n = sender.send(m, _socket.MSG_DONTWAIT)
            if n != len(m):
                raise OSError(0, f"short datagram send {n} of {len(m)}")


def max_messages(sender_charge: int) -> int:
    """Upper bound on queued messages: each skb costs more than 512 bytes of
    truesize (SKB_TRUESIZE(0) is 768 on x86_64)."""
    return sender_charge // 512 + 2


def split_stream(msgs: List[bytes]) -> Tuple[bytes, List[int]]:
    return b"".join(msgs), [len(m) for m in msgs]
