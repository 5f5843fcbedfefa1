"""``socket``: unix-pair, unix-named, unix-listen, unix-pending, unix-dgram,
tcp-listen, tcp-pending, tcp-established, udp, udp6, netlink-route, packet,
ping.

Queued bytes are seeded in BOTH directions of a connected pair (``data``
waits on ``fd``, ``peer_data`` on ``peer_fd``); the checker drains both
ends' queues without blocking and compares each, then proves the ends are
still connected by a marker each way. Listening sockets must accept, a
datagram socket keeps its datagram and its source (``sender: outside``: the
sending socket stays bound in a process outside the dump, so the datagram
cannot be re-sent from its source at restore). A unix-pending or
tcp-pending listener has one connection waiting in its accept queue (its
connecting end at ``peer_fd``, or ``sender: outside``). A unix-pair may
have files in flight at ``fd`` (``carry``: one message after ``data``
with a file of each kind listed, which the sender closed: the checker
receives them and compares name, flags, offset and contents) and
SCM_CREDENTIALS (``passcred``: SO_PASSCRED on at ``fd``, a child under
other credentials wrote first and exited; ``passcred_off``: and turned
off again after the writes, so the credentials stay hidden in the queue
until the checker turns it on to read them). Unix sockets report SO_PEERCRED as
made (``creator: exited-child``: a unix-pair made by a child under other
credentials that has exited; ``outside``: by a live process outside the
dump). A netlink-route socket keeps its port id and answers a request on it (``data``: a reply is left queued
before the dump; ``port``: bound to that port id, not the kernel's pick). A ping socket (ICMP datagram, bound
to 127.0.0.1) keeps its ident and gets the reply to an echo request. A packet socket is refused by name.

A unix-named connection is a client (``peer_fd``) connected to a listener
bound to ``path`` and the end that listener accepted (``fd``): the accepted
end's name is the listener's path, the client's peer name too. The
listener stays in the dump at ``listener_fd`` or, without it, was closed
and its file left behind. The checker compares each end's own name and
its peer's, the file at the path (a socket file either way; with the
listener, the listener's: a connection to the path reaches it).

A tcp-half-closed connection is a tcp-established one whose peer end
has shut down writing (``fd`` in CLOSE_WAIT, ``peer_fd`` in FIN_WAIT2, or
``sender: outside``: that end held by a process outside the dump).

With ``bind``/``peer_bind`` (a migrate scenario's ``segment`` addresses)
the workload's end is the server's, accepted on ``bind``, and the outside
peer is the client, connected from ``peer_bind``: it stays on the dump
guest while the server moves to the restore guest with its address.

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
import socket
import struct
import time

TYPE_CHECKING = False   # annotations only (typing: ~2 ms a workload start, x10 under TCG)
if TYPE_CHECKING:
    from typing import Any, List

from . import outside
from .core import MARKER, Ctx, Opened, bytes_check, check, drain, seeded_bytes, wait_readable, within

KIND = "socket"
TAGS = ("socket",)
SOCKETS = ("unix-pair", "unix-named", "unix-listen", "unix-pending", "unix-dgram", "tcp-listen", "tcp-pending", "tcp-established",
           "tcp-half-closed", "udp", "udp6", "netlink-route", "packet", "ping")
_NETLINK_ROUTE, _RTM_GETLINK, _NLM_F_REQUEST = 0, 18, 1
PAIRS = ("unix-pair", "unix-named", "tcp-established", "tcp-half-closed")


CARRY = ("file", "memfd", "eventfd", "pipe", "socket")


def fields(s) -> dict:
    return {"socket": s.Enum(SOCKETS), "peer_fd": s.FdNum(), "path": s.Path(), "data": s.Data(),
            "peer_data": s.Data(), "sender": s.Enum(("inside", "outside")),
            "creator": s.Enum(("self", "exited-child", "outside")),
            "carry": s.List_(s.Enum(CARRY)), "passcred": s.Bool(), "passcred_off": s.Bool(), "bind": s.Str(), "peer_bind": s.Str(),
            "options": s.Map({name: s.Int(0, 2**31 - 1) for name in OPTIONS}),
            "port": s.Int(1, 2**31 - 1), "listener_fd": s.FdNum()}


# Options a scenario can set on ``fd`` (setsockopt, int-valued): (level, option)
OPTIONS = {"SO_KEEPALIVE": (1, 9), "SO_PRIORITY": (1, 12), "SO_RCVLOWAT": (1, 18), "SO_MARK": (1, 36),
           "SO_RCVBUF": (1, 8), "SO_REUSEADDR": (1, 2), "TCP_NODELAY": (6, 1), "TCP_KEEPIDLE": (6, 4),
           "TCP_KEEPINTVL": (6, 5), "TCP_KEEPCNT": (6, 6), "TCP_USER_TIMEOUT": (6, 18), "IP_TOS": (0, 1),
           "IP_TTL": (0, 2)}


def finish(e: dict, fd: int) -> None:
    """The scenario's options on ``fd``, once it is in place."""
    if fd == e["fd"]:
        for name, value in (e.get("options") or {}).items():
            _sock_set(fd, name, value)


def _sock_set(fd: int, name: str, value: int) -> None:
    s = _sock(fd)
    try:
        s.setsockopt(*OPTIONS[name], value)
    finally:
        s.close()



def fd_numbers(e: dict) -> List[int]:
    return [e["fd"]] + ([e["peer_fd"]] if "peer_fd" in e else []) + \
        ([e["listener_fd"]] if "listener_fd" in e else [])


def _outside_tcp(e: dict) -> bool:
    return e["socket"] == "tcp-established" and e.get("sender") == "outside"


def _outside_half(e: dict) -> bool:
    return e["socket"] == "tcp-half-closed" and e.get("sender") == "outside"


def validate(e: dict, fds: dict) -> List[tuple]:
    sock = e["socket"]
    if (_outside_tcp(e) or _outside_half(e)) and "peer_fd" in e:
        return [("peer_fd", f"a {sock} socket with sender: outside has its peer outside the dump")]
    if sock in PAIRS and "peer_fd" not in e and not (_outside_tcp(e) or _outside_half(e)):
        return [("peer_fd", f"a {sock} socket needs peer_fd")]
    if sock in ("unix-pending", "tcp-pending") and ("peer_fd" in e) == (e.get("sender") == "outside"):
        return [("peer_fd", f"a {sock} listener needs peer_fd (its connecting end), or sender: outside")]
    if sock not in PAIRS and "peer_data" in e:
        return [("peer_data", f"a {sock} socket has no peer")]
    if "listener_fd" in e and sock != "unix-named":
        return [("listener_fd", "only a unix-named connection has a listener")]
    if sock in ("unix-listen", "unix-pending", "unix-dgram", "unix-named") and "path" not in e:
        return [("path", f"a {sock} socket needs a path")]
    if e.get("creator", "self") != "self" and sock != "unix-pair":
        return [("creator", "only a unix-pair is made by another process")]
    if ("bind" in e or "peer_bind" in e) and not ((_outside_tcp(e) or _outside_half(e)) and "bind" in e
                                                  and "peer_bind" in e):
        return [("bind", "bind and peer_bind (both) are for a tcp-established or tcp-half-closed socket with "
                 "sender: outside")]
    if "port" in e and sock != "netlink-route":
        return [("port", "only a netlink-route socket is bound to a port id here")]
    if e.get("passcred_off") and not e.get("passcred"):
        return [("passcred_off", "only with passcred")]
    for k in ("carry", "passcred", "passcred_off"):
        if k in e and sock != "unix-pair":
            return [(k, "only a unix-pair has files or credentials in flight here")]
    if "sender" in e and sock not in ("udp", "udp6", "unix-pending", "tcp-pending", "tcp-established",
                                      "tcp-half-closed"):
        return [("sender", "only udp, unix-pending, tcp-pending and tcp-* sockets have a sender")]
    return []


def opener(e: dict, ctx: Ctx) -> List[Opened]:
    kind = e["socket"]
    payload = seeded_bytes(e.get("data"))
    back = seeded_bytes(e.get("peer_data"))
    me = {"peercred": _own_cred()}
    if kind == "unix-pair":
        if e.get("creator") == "exited-child":
            a, b, cred = _pair_from_exited_child()
        elif e.get("creator") == "outside":
            a, b, cred = _pair_from_outside(ctx)
        else:
            (a, b), cred = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM), _own_cred()
        a.sendall(back)
        extra = {"peercred": cred}
        if e.get("passcred"):
            # on before the sends: newer kernels attach credentials only
            # while one end has it (and `a` sends no more: a sender with
            # SO_PASSCRED is autobound to a name)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            extra["child_cred"] = _send_from_child(b)
        b.sendall(payload)
        if e.get("carry"):
            extra["carried"] = _send_carried(b, e["carry"], ctx)
        if e.get("passcred_off"):
            a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
        return [Opened(a.detach(), int(e["fd"]), "sock", extra),
                Opened(b.detach(), int(e["peer_fd"]), "peer", {"peercred": cred})]
    if kind == "unix-named":
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(e["path"])
        lst.listen(8)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(e["path"])
        a, _ = lst.accept()
        c.sendall(payload)
        a.sendall(back)
        # both ends report this process: the listen() and the connect() caller
        out = [Opened(a.detach(), int(e["fd"]), "sock", dict(me)),
               Opened(c.detach(), int(e["peer_fd"]), "peer", dict(me))]
        if "listener_fd" in e:
            out.append(Opened(lst.detach(), int(e["listener_fd"]), "listener"))
        else:
            lst.close()          # its file stays behind, as a closed listener's does
        return out
    if kind == "unix-listen":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(e["path"])
        s.listen(8)
        return [Opened(s.detach(), int(e["fd"]), "sock", me)]
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
            return [Opened(s.detach(), int(e["fd"]), "sock", me)]
        # the connecting end reports the listener's credentials (copy_peercred)
        return [Opened(s.detach(), int(e["fd"]), "sock", me), Opened(c.detach(), int(e["peer_fd"]), "peer", me)]
    if kind == "tcp-listen":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    if kind == "tcp-pending":
        # a listener with one connection waiting in its accept queue; the
        # connecting end is peer_fd, or held by a process outside the dump
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        c = socket.create_connection(s.getsockname())
        if e.get("sender") == "outside":
            from .pipe import _spawn_holder
            ctx.helpers.append(_spawn_holder(c.fileno()))
            c.close()
            return [Opened(s.detach(), int(e["fd"]), "sock")]
        return [Opened(s.detach(), int(e["fd"]), "sock"), Opened(c.detach(), int(e["peer_fd"]), "peer")]
    if kind in ("tcp-established", "tcp-half-closed"):
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.bind((e.get("bind", "127.0.0.1"), 0))
        lst.listen(1)
        if "bind" in e:
            # a server on the segment's moving address (harness/segment.py): the
            # workload keeps the accepted end, the client (the echo peer, on
            # the staying address) stays outside the dump
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind((e["peer_bind"], 0))
            srv.connect(lst.getsockname())
            c, _ = lst.accept()
        else:
            c = socket.create_connection(lst.getsockname())
            srv, _ = lst.accept()
        lst.close()
        srv.sendall(payload)
        c.sendall(back)
        if kind == "tcp-half-closed":
            srv.shutdown(socket.SHUT_WR)     # fd: CLOSE_WAIT, peer_fd: FIN_WAIT2
            wait_readable(c.fileno(), 2)
            if _outside_half(e):
                from .pipe import _spawn_holder
                ctx.helpers.append(_spawn_holder(srv.fileno()))
                srv.close()
                return [Opened(c.detach(), int(e["fd"]), "sock")]
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
        s.bind((int(e.get("port", 0)), 0))     # 0: the kernel's pick (the pid, when free)
        if e.get("data"):
            s.send(_getlink(1))
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    if kind == "packet":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    if kind == "ping":      # as ping(8) runs unprivileged (net.ipv4.ping_group_range)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        except PermissionError:
            # the kernel's default range "1 0" lets no group (a guest without
            # systemd's sysctl.d, which allows every group): let root's alone,
            # the original recorded (a host has no snapshot to revert it:
            # the local target's last holder puts it back, hostsysctl.py)
            try:
                from .. import hostsysctl
            except ImportError:     # in the guest, next to the kinds package
                import hostsysctl  # type: ignore[no-redef]
            hostsysctl.widen(hostsysctl.PING_RANGE, hostsysctl.ping_allows_root, "0 0")
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        s.bind(("127.0.0.1", 0))        # the kernel picks its ident (the echo id)
        return [Opened(s.detach(), int(e["fd"]), "sock")]
    raise ValueError(f"unknown socket kind {kind}")


CHILD_UID, CHILD_GID, CHILD_GROUPS = 1234, 4321, [4, 24]


def _own_cred() -> list:
    """What SO_PEERCRED reports for a socket this process made: its pid, euid, egid, groups."""
    return [os.getpid(), os.geteuid(), os.getegid(), sorted(os.getgroups())]


def peer_cred(fd: int) -> list:
    s = _sock(fd)
    try:
        pid, uid, gid = struct.unpack("iII", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        raw = s.getsockopt(socket.SOL_SOCKET, 59, 1024)           # SO_PEERGROUPS
        return [pid, uid, gid, sorted(struct.unpack(f"{len(raw) // 4}I", raw))]
    finally:
        s.close()


def _send_from_child(b: socket.socket) -> list:
    """A child under other credentials sends FROM_CHILD on `b` and exits
    (reaped here): its pid, uid and gid, as SCM_CREDENTIALS shows them."""
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            os.setresgid(CHILD_GID, CHILD_GID, CHILD_GID)
            os.setresuid(CHILD_UID, CHILD_UID, CHILD_UID)
            b.sendall(FROM_CHILD)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    return [child, CHILD_UID, CHILD_GID]


FROM_CHILD, CARRIED = b"from-a-child|", b"|carried"


def _send_carried(b: socket.socket, carry: List[str], ctx: Ctx) -> list:
    """One message CARRIED on `b` with a file of each kind in flight; the
    sender closes its copies (the message is their only holder). Returns
    their descriptions (_carried_text), in order."""
    fds, own = [], []
    for i, kind in enumerate(carry):
        if kind == "file":
            fd = os.open(os.path.join(ctx.workdir, f"carried-{i}"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, b"a file in flight %d" % i)
            os.lseek(fd, 2 + i, os.SEEK_SET)
        elif kind == "memfd":
            fd = os.memfd_create(f"carried-{i}")
            os.write(fd, b"a memfd in flight %d" % i)
            os.lseek(fd, 3 + i, os.SEEK_SET)
        elif kind == "eventfd":
            fd = os.eventfd(5 + i)
        elif kind == "pipe":
            fd, w = os.pipe()
            own.append(w)
        else:
            c, d = socket.socketpair()
            fd = c.detach()
            own.append(d.detach())
        fds.append(fd)
    texts = [_carried_text(fd) for fd in fds]
    b.sendmsg([CARRIED], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    for fd in fds + own:
        os.close(fd)
    return texts


def _carried_text(fd: int) -> list:
    """What a file in flight is: its name, offset, status flags and first
    bytes (an eventfd: its counter, from fdinfo: nothing consumed)."""
    import fcntl
    link = os.readlink(f"/proc/self/fd/{fd}")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL) & ~0o100000          # O_LARGEFILE: the opener's word size
    if link == "anon_inode:[eventfd]":     # (a path may hold the word: a mutant's scenario dir)
        with open(f"/proc/self/fdinfo/{fd}") as f:
            count = next(int(ln.split()[1], 16) for ln in f if ln.startswith("eventfd-count"))
        return [link, flags, count]
    if link.startswith("/"):
        return [link, flags, os.lseek(fd, 0, os.SEEK_CUR), os.pread(fd, 64, 0).decode(errors="replace")]
    return [link.split(":")[0], flags]


def _recv_all(fd: int) -> tuple:
    """(bytes, descriptions of the files received, credentials of each
    read) of everything queued at `fd`, read with recvmsg; never blocks."""
    import array
    s = _sock(fd)
    data, texts, creds = b"", [], []
    try:
        while wait_readable(fd, 0):
            try:
                m, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4) + socket.CMSG_SPACE(12),
                                         socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not m and not anc:
                break
            data += m
            for level, typ, raw in anc:
                if typ == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(raw)
                    for f in got:
                        texts.append(_carried_text(f))
                        os.close(f)
                elif typ == socket.SCM_CREDENTIALS:
                    c = list(struct.unpack("iII", raw[:12]))
                    if not creds or creds[-1] != c:
                        creds.append(c)
    finally:
        s.close()
    return data, texts, creds


def _pair_from_exited_child():
    """A socketpair made by a child under other credentials, handed back
    (SCM_RIGHTS); the child has exited (and been reaped) when this returns."""
    chan, far = socket.socketpair()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            os.setgroups(CHILD_GROUPS)
            os.setresgid(CHILD_GID, CHILD_GID, CHILD_GID)
            os.setresuid(CHILD_UID, CHILD_UID, CHILD_UID)
            c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            socket.send_fds(far, [b"x"], [c.fileno(), d.fileno()])
        finally:
            os._exit(0)
    far.close()
    _, fds, _, _ = socket.recv_fds(chan, 10, 2)
    chan.close()
    os.waitpid(child, 0)
    return (socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1]),
            [child, CHILD_UID, CHILD_GID, sorted(CHILD_GROUPS)])


def _pair_from_outside(ctx: Ctx):
    """A socketpair made by a process that stays alive outside the dump (a
    double fork, as pipe._spawn_holder), handed back."""
    import _signal as signal
    chan, far = socket.socketpair()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            if os.fork() == 0:
                os.setsid()
                c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                socket.send_fds(far, [str(os.getpid()).encode()], [c.fileno(), d.fileno()])
                os.closerange(3, 1024)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
                while True:
                    signal.pause()
        finally:
            os._exit(0)
    far.close()
    msg, fds, _, _ = socket.recv_fds(chan, 32, 2)
    chan.close()
    os.waitpid(child, 0)
    ctx.helpers.append(int(msg))
    return (socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1]),
            [int(msg), os.geteuid(), os.getegid(), sorted(os.getgroups())])


TICK, ANSWER = b".", b"|"


def _spawn_echo_peer(keep: int) -> int:
    """A process outside the workload's tree holding the connection ``keep``: it sends a tick every 20 ms (so
    packets arrive while the workload is an image: without a network lock
    they would meet a closed socket and be answered with a RST) and reads
    everything; once what it read ends with the marker it stops ticking and
    sends ANSWER + all it read. A reset or an EOF ends it. Its PID."""
    def echo(ready):
        ready()
        got = b""
        while True:
            if wait_readable(keep, 0.02):
                b = os.read(keep, 65536)
                if not b:
                    return
                got += b
                if got.endswith(MARKER):
                    os.write(keep, ANSWER + got)
                    return
            else:
                os.write(keep, TICK)
    return outside.spawn(echo, keep=keep)


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
    if rec["role"] in ("sock", "peer") and rec["kind"] == KIND:
        with _sock(rec["fd"]) as s:
            if s.family == socket.AF_UNIX:
                rec["extra"]["names"] = _unix_names(rec["fd"])
    if rec["role"] == "sock":
        rec["extra"]["sockname"] = sockname_of(rec["fd"])
        with _sock(rec["fd"]) as s:
            if s.proto == socket.IPPROTO_TCP and s.type == socket.SOCK_STREAM and \
                    not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                rec["extra"]["mss"] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)


# A restored connection may send smaller segments than the original only
# down to the largest MSS a user may set (32767, less header options): a
# restore that left TCP's default (536) made every segment cost 2-3 times
# its size in the peer's receive buffer, and a loaded pair stalled for good.
MSS_FLOOR_CAP = 32767 - 40
IP_MTU = 14          # a connected socket's path MTU (ip(7)); headers and options take at most 80 of it


def _unix_names(fd: int) -> list:
    """[own name, peer's name] of a unix socket (None: no peer)."""
    with _sock(fd) as s:
        try:
            peer = _name(s.getpeername())
        except OSError:
            peer = None
        own = _name(s.getsockname())
    return [x.hex() if isinstance(x, bytes) else x for x in (own, peer)]


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
            # (every option, set or not, is compared from outside: procstate._sockopts)
            for n, v in sorted((e.get("options") or {}).items()):
                want = 2 * v if n == "SO_RCVBUF" else v      # the kernel doubles it (socket(7))
                out.append(check(fd, f"socket option {n} as set", want, s.getsockopt(*OPTIONS[n])))
            was = by_role["sock"]["extra"].get("mss")
            if was and kind in ("tcp-established", "tcp-half-closed"):
                # nor above what the path takes now (a connection moved to
                # another machine may cross a network: 1500-byte frames)
                path = s.getsockopt(socket.IPPROTO_IP, IP_MTU) - 80
                out.append(within(fd, "segment size (TCP_MAXSEG) not below the original's or the path's",
                                  min(was, MSS_FLOOR_CAP, path), 65535,
                                  s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)))
            if kind == "unix-named":
                for r in recs:
                    if "names" in r["extra"]:
                        out.append(check(r["fd"], "own name and peer's name (getsockname, getpeername)",
                                         r["extra"]["names"], _unix_names(r["fd"])))
                import stat as _stat
                st = os.lstat(e["path"]) if os.path.lexists(e["path"]) else None
                out.append(check(fd, f"{e['path']} is a socket file", True,
                                 st is not None and _stat.S_ISSOCK(st.st_mode)))
            for r in recs:
                if "peercred" in r["extra"]:
                    out.append(check(r["fd"], "SO_PEERCRED pid, uid, gid, groups", r["extra"]["peercred"],
                                     peer_cred(r["fd"])))
        elif phase == "consume" and _outside_half(e):
            out.append(bytes_check(fd, "queued stream bytes", seeded_bytes(e.get("data")), drain(fd)))
            eof = wait_readable(fd, 2) and os.read(fd, 1) == b""
            out.append(check(fd, "the peer's FIN: end of stream after the data", True, eof))
        elif phase == "mutate" and _outside_half(e):
            # the holder reads nothing, but this end's side is open: a reset
            # or lost connection fails the write
            out.append(check(fd, "a write is taken (this side is still open)", len(MARKER), os.write(fd, MARKER)))
        elif phase == "consume" and _outside_tcp(e):
            want = seeded_bytes(e.get("data"))
            out.append(bytes_check(fd, "queued stream bytes from the outside peer", want,
                                   _read_exactly(fd, len(want), 10)))
        elif phase == "mutate" and _outside_tcp(e):
            want = seeded_bytes(e.get("peer_data")) + MARKER
            os.write(fd, MARKER)
            out.append(bytes_check(fd, "the outside peer got every byte once, in order (its echo)", want,
                                   _answer(fd, len(want), 60)))
        elif phase == "consume" and kind == "unix-pair" and (e.get("carry") or e.get("passcred")):
            x = by_role["sock"]["extra"]
            if e.get("passcred_off"):
                with _sock(fd) as on:       # hidden in the queue until now
                    on.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            data, texts, creds = _recv_all(fd)
            want = (FROM_CHILD if e.get("passcred") else b"") + seeded_bytes(e.get("data")) + \
                (CARRIED if e.get("carry") else b"")
            out.append(bytes_check(fd, "queued stream bytes", want, data))
            if e.get("carry"):
                out.append(check(fd, "files in flight: name, status flags, offset, contents",
                                 x["carried"], texts))
            if e.get("passcred"):
                out.append(check(fd, "SCM_CREDENTIALS of the queued writes (the exited child's, then ours)",
                                 [x["child_cred"], [os.getpid(), os.getuid(), os.getgid()]], creds))
            out.append(bytes_check(peer, "queued stream bytes (peer end)", seeded_bytes(e.get("peer_data")),
                                   drain(peer)))
        elif phase == "consume" and kind in PAIRS:
            out.append(bytes_check(fd, "queued stream bytes", seeded_bytes(e.get("data")), drain(fd)))
            out.append(bytes_check(peer, "queued stream bytes (peer end)", seeded_bytes(e.get("peer_data")),
                                   drain(peer)))
            if kind == "tcp-half-closed":
                eof = wait_readable(fd, 2) and os.read(fd, 1) == b""
                out.append(check(fd, "the peer's FIN: end of stream after the data", True, eof))
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
        elif phase == "mutate" and kind == "ping":
            # an echo request: the kernel puts the socket's ident in it and
            # hands the reply to the socket with that ident
            s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 7) + MARKER, ("127.0.0.1", 0))
            ok = wait_readable(fd, 2)
            reply = s.recv(65536, socket.MSG_DONTWAIT) if ok else b""
            got = list(struct.unpack_from("!BBHHH", reply)) if len(reply) >= 8 else None
            out.append(check(fd, "an echo request is answered on the same ident (type, ident, sequence)",
                             [0, by_role["sock"]["extra"]["sockname"][1], 7],
                             [got[0], got[3], got[4]] if got else None))
        elif phase == "mutate" and kind == "netlink-route":
            s.send(_getlink(4242))
            ok = wait_readable(fd, 2)
            reply = s.recv(65536, socket.MSG_DONTWAIT) if ok else b""
            seq_port = list(struct.unpack_from("=II", reply, 8)) if len(reply) >= 16 else None
            out.append(check(fd, "a request is answered on the same port id",
                             [4242, by_role["sock"]["extra"]["sockname"][0]], seq_port))
        elif phase == "mutate" and kind == "tcp-half-closed":
            out.append(_marker(peer, fd, "write arrives at the peer (the peer's side is shut down)"))
        elif phase == "mutate" and kind in PAIRS:
            out.append(_marker(fd, peer, "peer's write arrives"))
            out.append(_marker(peer, fd, "write arrives at the peer"))
            if kind == "unix-named" and "listener" in by_role:
                lfd = by_role["listener"]["fd"]
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    c.settimeout(2)
                    c.connect(e["path"])
                    ok = wait_readable(lfd, 2)
                    if ok:
                        with _sock(lfd) as ls:
                            ls.accept()[0].close()
                    out.append(check(lfd, "the listener accepts a connection to its path", True, ok))
                finally:
                    c.close()
        elif phase == "mutate" and kind == "unix-dgram":
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
                tx.sendto(MARKER, s.getsockname())
            ok = wait_readable(fd, 2)
            got = s.recv(len(MARKER) + 10, socket.MSG_DONTWAIT).decode(errors="replace") if ok else ""
            out.append(check(fd, "a datagram sent to its name arrives", MARKER.decode(), got))
        elif phase == "mutate" and kind in ("unix-pending", "tcp-pending") and peer is not None:
            os.write(peer, MARKER)
            ok = wait_readable(fd, 2)
            got = ""
            cred = None
            if ok:
                conn, _ = s.accept()
                conn.settimeout(2)
                got = conn.recv(len(MARKER)).decode(errors="replace")
                # SO_PEERCRED is a unix socket's (a TCP socket has none:
                # ENODATA on newer kernels, pid 0 on older ones)
                cred = peer_cred(conn.fileno()) if kind == "unix-pending" else None
                conn.close()
            out.append(check(fd, "the waiting connection is accepted and carries the marker", MARKER.decode(), got))
            if kind == "unix-pending":
                out.append(check(fd, "the accepted connection's SO_PEERCRED (the connecting process)",
                                 by_role["sock"]["extra"]["peercred"], cred))
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
