"""A socket's classic BPF program (SO_ATTACH_FILTER), for every kind of
socket but raw ICMP (engine/fds/_raw.py reads and attaches its own).

Programs filter what a socket receives: tcpdump-like tools, DHCP and
LLDP daemons, and servers that drop what they do not serve attach one. The
kernel keeps the classic program as it was attached and gives it back
with getsockopt(SO_GET_FILTER) (net/core/filter.c sk_get_filter); the
dump records it (the socket's record: "sock_filter"), the restore attaches
the same instructions to the rebuilt socket, then SO_LOCK_FILTER if the
process had locked it, and reads both back. An eBPF program
(SO_ATTACH_BPF, or a classic one converted by the kernel and attached as
eBPF) has no classic form to read: refused (`socket`). The option table
(engine/fds/_sockopts.py) neither applies nor compares these two: done
here, once the kind's own restore has made the socket.
"""

from __future__ import annotations

import os
import socket as _socket

from . import _raw, _sockopts
from ._raw import SO_LOCK_FILTER
from ._sockbase import dup_of
from ._util import refuse, refuse_rec

EBPF = "an eBPF socket filter (SO_ATTACH_BPF) is attached: it cannot be read back"


def check(info, kind: str) -> None:
    """Raises the `socket` refusal for an eBPF program (classify time)."""
    if kind == "raw":
        return
    with dup_of(info) as fd:
        n = _sockopts._filter_len(fd)
    if n < 0:
        raise refuse(info, "socket", EBPF)


def dump(info, rec: dict, kind: str) -> dict:
    """`rec` with the program attached to the socket, if any. Raises as check."""
    if kind == "raw":
        return rec
    with dup_of(info) as fd:
        if _sockopts._filter_len(fd) < 0:
            raise refuse(info, "socket", EBPF)
        try:
            prog = _raw.read_filter(fd)
        except OSError as e:
            raise refuse(info, "socket", f"its socket filter cannot be read back ({e.strerror})") from None
        locked = _socket.socket(fileno=os.dup(fd))
        try:
            lock = locked.getsockopt(_socket.SOL_SOCKET, SO_LOCK_FILTER)
        finally:
            locked.close()
    if prog or lock:
        rec = dict(rec, sock_filter={"prog": prog, "locked": bool(lock)})
    return rec


def validate(rec: dict, ctx) -> None:
    f = rec.get("sock_filter")
    if f is None:
        return
    if not (isinstance(f, dict) and _raw.valid_program(f.get("prog")) and isinstance(f.get("locked"), bool)):
        raise refuse_rec(rec, ctx, "image-invalid", "socket filter record malformed")


def restore(rec: dict, ctx, fd: int) -> None:
    """The program attached to the rebuilt socket `fd`, locked if it was;
    both read back. Raises the `socket` refusal."""
    f = rec.get("sock_filter")
    if not f:
        return
    try:
        if f["prog"]:
            _raw.attach_filter(fd, f["prog"])
        s = _socket.socket(fileno=os.dup(fd))
        try:
            if f["locked"]:
                s.setsockopt(_socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
            lock = bool(s.getsockopt(_socket.SOL_SOCKET, SO_LOCK_FILTER))
        finally:
            s.close()
        back = _raw.read_filter(fd)
    except OSError as e:
        raise refuse_rec(rec, ctx, "socket", f"its socket filter is not accepted here ({e.strerror})") from None
    if back != f["prog"] or lock != f["locked"]:
        raise refuse_rec(rec, ctx, "socket", "its socket filter reads back differently here")
