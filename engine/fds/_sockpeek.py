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
  in-flight fds in *this* process (net/core/scm.c scm_detach_fds): they are
  closed at once. Ancillary data of any kind makes the queue unrestorable
  (the caller refuses).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket as _socket
import struct
from typing import List, Tuple

SO_PEEK_OFF = 42
SIOCOUTQ = 0x5411
MSG_CMSG_CLOEXEC = 0x40000000
_ANCBUF = _socket.CMSG_SPACE(253 * 4) + _socket.CMSG_SPACE(12) + _socket.CMSG_SPACE(256)
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


def replica_charge(typ: int, msgs: List[bytes]) -> int:
    """SIOCOUTQ of a scratch socketpair's sender after sending `msgs`."""
    a, b = _socket.socketpair(_socket.AF_UNIX, typ | _socket.SOCK_CLOEXEC)
    try:
        need = sum(len(m) for m in msgs) * 2 + 4096 * (len(msgs) + 1) + (1 << 20)
        a.setsockopt(_socket.SOL_SOCKET, 32, need // 2)   # SO_SNDBUFFORCE
        for m in msgs:
            a.send(m, _socket.MSG_DONTWAIT)
        return outq(a.fileno())
    finally:
        a.close()
        b.close()


def check_messages(typ: int, msgs: List[bytes], sender_charge: int) -> None:
    """Raise Unreadable unless `msgs` account for exactly the sender's
    charge (datagram and seqpacket only)."""
    got = replica_charge(typ, msgs)
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
