"""``socket``: unix-pair, unix-listen, unix-pending, unix-dgram, tcp-listen,
tcp-established, udp, udp6, netlink-route, packet.

Queued bytes are seeded in BOTH directions of a connected pair (``data``
waits on ``fd``, ``peer_data`` on ``peer_fd``); the checker drains both
ends' queues without blocking and compares each, then proves the ends are
still connected by a marker each way. Listening sockets must accept, a
datagram socket keeps its datagram and its source (``sender: outside``: the
sending socket stays bound in a process outside the dump, so the datagram
cannot be re-sent from its source at restore). A unix-pending listener has one connection waiting in its accept queue
(its connecting end at ``peer_fd``, or ``sender: outside``). A netlink-route socket keeps
its port id and answers a request on it (``data``: a reply is left queued
before the dump). A packet socket is refused by name.

A tcp-established connection with ``sender: outside`` has its other end in
a process outside the dump (an echo peer) that keeps it open throughout:
``data`` is what the peer sent before the dump (it waits in the
workload's receive queue), ``peer_data`` what the workload sent the peer
before the dump; after the restore the workload sends the marker, and the
peer answers with every byte it received, once and in order (peer_data +
marker): nothing lost, duplicated or reset on either side.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from typing import Any, List

from .core import MARKER, Ctx, Opened, bytes_check, check, drain, seeded_bytes, wait_readable

KIND = "socket"
TAGS = ("socket",)
SOCKETS = ("unix-pair", "unix-listen", "unix-pending", "unix-dgram", "tcp-listen", "tcp-established", "udp", "udp6",
           "netlink-route", "packet")
_NETLINK_ROUTE, _RTM_GETLINK, _NLM_F_REQUEST = 0, 18, 1
PAIRS = ("unix-pair", "tcp-established")


def fields(s) -> dict:
    return {"socket": s.Enum(SOCKETS), "peer_fd": s.FdNum(), "path": s.Path(), "data": s.Data(),
            "peer_data": s.Data(), "sender": s.Enum(("inside", "outside"))}


def fd_numbers(e: dict) -> List[int]:
    return [e["fd"]] + ([e["peer_fd"]] if "peer_fd" in e else [])


def _outside_tcp(e: dict) -> bool:
    return e["socket"] == "tcp-established" and e.get("sender") == "outside"


def validate(e: dict, fds: dict) -> List[tuple]:
    sock = e["socket"]
    if _outside_tcp(e) and "peer_fd" in e:
        return [("peer_fd", "a tcp-established socket with sender: outside has its peer outside the dump")]
    if sock in PAIRS and "peer_fd" not in e and not _outside_tcp(e):
        return [("peer_fd", f"a {sock} socket needs peer_fd")]
    if sock == "unix-pending" and ("peer_fd" in e) == (e.get("sender") == "outside"):
        return [("peer_fd", "a unix-pending listener needs peer_fd (its connecting end), or sender: outside")]
    if sock not in PAIRS and "peer_data" in e:
        return [("peer_data", f"a {sock} socket has no peer")]
    if sock in ("unix-listen", "unix-pending", "unix-dgram") and "path" not in e:
        return [("path", f"a {sock} socket needs a path")]
    if "sender" in e and sock not in ("udp", "udp6", "unix-pending", "tcp-established"):
        return [("sender", "only udp, unix-pending and tcp-established sockets have a sender")]
    return []


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    kind = e["socket"]
    payload = seeded_bytes(e.get("data"))
    back = seeded_bytes(e.get("peer_data"))
    if kind == "unix-pair":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.sendall(payload)
        a.sendall(back)
        return [Opened(a.detach(), int(e["fd"]), "sock"), Opened(b.detach(), int(e["peer_fd"]), "peer")]
    if kind == "unix-listen":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(e["path"])
        s.listen(8)
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    if kind == "unix-dgram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(e["path"])
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    if kind == "unix-pending":
        # a listener with one connection waiting in its accept queue; the
        # connecting end is peer_fd, or held by a process outside the dump
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(e["path"])
        s.listen(8)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(e["path"])
        if e.get("sender") == "outside":
            from .pipe import _spawn_holder
            ctx.helpers.append(_spawn_holder(c.fileno()))
            c.close()
            return [Opened(s.detach(), int(e["fd"]), "sock")]
        return [Opened(s.detach(), int(e["fd"]), "sock"), Opened(c.detach(), int(e["peer_fd"]), "peer")]
    if kind == "tcp-listen":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    if kind == "tcp-established":
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        c = socket.create_connection(lst.getsockname())
        srv, _ = lst.accept()
        lst.close()
        srv.sendall(payload)
        c.sendall(back)
        if _outside_tcp(e):
            ctx.helpers.append(_spawn_echo_peer(srv.fileno()))
            srv.close()
            return [Opened(c.detach(), int(e["fd"]), "sock")]
        return [Opened(c.detach(), int(e["fd"]), "sock"), Opened(srv.detach(), int(e["peer_fd"]), "peer")]
    if kind in ("udp", "udp6"):
        fam, lo = (socket.AF_INET6, "::1") if kind == "udp6" else (socket.AF_INET, "127.0.0.1")
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((lo, 0))
        tx = socket.socket(fam, socket.SOCK_DGRAM)
        tx.bind((lo, 0))
        tx.sendto(payload, s.getsockname())
        sender = list(tx.getsockname())[:2]
        if e.get("sender") == "outside":
            from .pipe import _spawn_holder
            ctx.helpers.append(_spawn_holder(tx.fileno()))
        tx.close()
        return [Opened(s.detach(), int(e["fd"]), "sock", {"sender": sender})]
    if kind == "netlink-route":
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
        s.bind((0, 0))
        if e.get("data"):
            s.send(_getlink(1))
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    if kind == "packet":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    raise ValueError(f"unknown socket kind {kind}")


TICK, ANSWER = b".", b"|"


def _spawn_echo_peer(keep: int) -> int:
    """A process outside the workload's tree (double fork, re-parented to
    init) holding the connection ``keep``: it sends a tick every 20 ms (so
    packets arrive while the workload is an image: without a network lock
    they would meet a closed socket and be answered with a RST) and reads
    everything; once what it read ends with the marker it stops ticking and
    sends ANSWER + all it read. A reset or an EOF ends it. Its PID."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            grandchild = os.fork()
            if grandchild == 0:
                os.setsid()
                os.closerange(3, keep)
                os.closerange(keep + 1, 1024)
                got = b""
                try:
                    while True:
                        if wait_readable(keep, 0.02):
                            b = os.read(keep, 65536)
                            if not b:
                                break
                            got += b
                            if got.endswith(MARKER):
                                os.write(keep, ANSWER + got)
                                break
                        else:
                            os.write(keep, TICK)
                except OSError:
                    pass
                while True:
                    signal.pause()
            os.write(w, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(w)
    pid = int(os.read(r, 32))
    os.close(r)
    os.waitpid(child, 0)
    return pid


def _read_exactly(fd: int, n: int, seconds: float) -> bytes:
    """Up to n bytes arriving within `seconds` (the peer retransmits on its
    own timer after a checkpoint)."""
    deadline = time.monotonic() + seconds
    out = b""
    while len(out) < n and time.monotonic() < deadline:
        if wait_readable(fd, max(0.0, deadline - time.monotonic())):
            try:
                chunk = os.read(fd, n - len(out))
            except BlockingIOError:
                continue
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def _answer(fd: int, n: int, seconds: float) -> bytes:
    """The echo peer's answer (n bytes after ANSWER), its ticks skipped;
    anything else before ANSWER is returned as it is (a wrong byte)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        b = _read_exactly(fd, 1, deadline - time.monotonic())
        if b == ANSWER:
            return _read_exactly(fd, n, max(0.0, deadline - time.monotonic()))
        if b != TICK:
            return b
    return b""


def _getlink(seq: int) -> bytes:
    """An RTM_GETLINK request for the loopback device (one reply, no dump)."""
    body = struct.pack("=BBHiII", 0, 0, 0, 1, 0, 0)
    return struct.pack("=IHHII", 16 + len(body), _RTM_GETLINK, _NLM_F_REQUEST, seq, 0) + body


def extras(rec: dict) -> None:
    if rec["role"] == "sock":
        rec["extra"]["sockname"] = sockname_of(rec["fd"])


def _sock(fd: int) -> socket.socket:
    """A socket object on a dup of ``fd`` (closing it leaves ``fd`` alone)."""
    return socket.socket(fileno=os.dup(fd))


def _marker(to: int, frm: int, what: str) -> dict:
    os.write(frm, MARKER)
    return check(to, what, MARKER.decode(), drain(to).decode(errors="replace") if wait_readable(to, 2) else "")


def checker(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    kind = e["socket"]
    by_role = {r["role"]: r for r in recs}
    fd = by_role["sock"]["fd"]
    peer = by_role["peer"]["fd"] if "peer" in by_role else None
    s = _sock(fd)
    out = []
    try:
        if phase == "inspect":
            out.append(check(fd, "local address", by_role["sock"]["extra"].get("sockname"), _name(s.getsockname())))
        elif phase == "consume" and _outside_tcp(e):
            want = seeded_bytes(e.get("data"))
            out.append(bytes_check(fd, "queued stream bytes from the outside peer", want,
                                   _read_exactly(fd, len(want), 10)))
        elif phase == "mutate" and _outside_tcp(e):
            want = seeded_bytes(e.get("peer_data")) + MARKER
            os.write(fd, MARKER)
            out.append(bytes_check(fd, "the outside peer got every byte once, in order (its echo)", want,
                                   _answer(fd, len(want), 60)))
        elif phase == "consume" and kind in PAIRS:
            out.append(bytes_check(fd, "queued stream bytes", seeded_bytes(e.get("data")), drain(fd)))
            out.append(bytes_check(peer, "queued stream bytes (peer end)", seeded_bytes(e.get("peer_data")),
                                   drain(peer)))
        elif phase == "consume" and kind in ("udp", "udp6"):
            got = s.recvfrom(65536, socket.MSG_DONTWAIT) if wait_readable(fd, 0) else (b"", None)
            out.append(bytes_check(fd, "queued datagram", seeded_bytes(e.get("data")), got[0]))
            out.append(check(fd, "datagram source", by_role["sock"]["extra"]["sender"],
                             _name(got[1])[:2] if got[1] else None))
            out.append(check(fd, "nothing else queued", False, wait_readable(fd, 0)))
        elif phase == "consume" and kind == "netlink-route" and e.get("data"):
            ok = wait_readable(fd, 2)
            reply = s.recv(65536, socket.MSG_DONTWAIT) if ok else b""
            out.append(check(fd, "the queued reply", 1, struct.unpack_from("=I", reply, 8)[0] if reply else None))
        elif phase == "mutate" and kind == "netlink-route":
            s.send(_getlink(4242))
            ok = wait_readable(fd, 2)
            reply = s.recv(65536, socket.MSG_DONTWAIT) if ok else b""
            seq_port = list(struct.unpack_from("=II", reply, 8)) if len(reply) >= 16 else None
            out.append(check(fd, "a request is answered on the same port id",
                             [4242, by_role["sock"]["extra"]["sockname"][0]], seq_port))
        elif phase == "mutate" and kind in PAIRS:
            out.append(_marker(fd, peer, "peer's write arrives"))
            out.append(_marker(peer, fd, "write arrives at the peer"))
        elif phase == "mutate" and kind == "unix-dgram":
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
                tx.sendto(MARKER, s.getsockname())
            ok = wait_readable(fd, 2)
            got = s.recv(len(MARKER) + 10, socket.MSG_DONTWAIT).decode(errors="replace") if ok else ""
            out.append(check(fd, "a datagram sent to its name arrives", MARKER.decode(), got))
        elif phase == "mutate" and kind == "unix-pending" and peer is not None:
            os.write(peer, MARKER)
            ok = wait_readable(fd, 2)
            got = ""
            if ok:
                conn, _ = s.accept()
                conn.settimeout(2)
                got = conn.recv(len(MARKER)).decode(errors="replace")
                conn.close()
            out.append(check(fd, "the waiting connection is accepted and carries the marker", MARKER.decode(), got))
        elif phase == "mutate" and kind in ("unix-listen", "tcp-listen"):
            c = socket.socket(s.family, socket.SOCK_STREAM)
            try:
                c.settimeout(2)
                c.connect(s.getsockname())
                ok = wait_readable(fd, 2)
                if ok:
                    conn, _ = s.accept()
                    conn.close()
                out.append(check(fd, "accepts a connection", True, ok))
            finally:
                c.close()
    finally:
        s.close()
    return out


def _name(addr: Any) -> Any:
    if isinstance(addr, tuple):
        return [a.hex() if isinstance(a, bytes) else a for a in addr]     # AF_PACKET: the hardware address
    return addr


def sockname_of(fd: int) -> Any:
    s = _sock(fd)
    try:
        return _name(s.getsockname())
    finally:
        s.close()
