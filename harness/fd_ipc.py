"""fd kinds that carry bytes between ends: named fifos, anonymous pipes, sockets.

Runs in the guest (stdlib only, Python >= 3.9). Buffered bytes are seeded;
a checker drains them without blocking and compares, then proves the ends
are still connected by sending a marker through.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, List, Optional

try:
    from . import seeded
    from .fdcore import (MARKER, Ctx, Opened, bytes_check, check, drain, wait_readable)
except ImportError:  # pragma: no cover - in the guest, run as a script
    import seeded  # type: ignore[no-redef]
    from fdcore import (MARKER, Ctx, Opened, bytes_check, check, drain, wait_readable)  # type: ignore[no-redef]


def fifo_expected(path: str, ctx: Ctx, own: Optional[dict]) -> bytes:
    """What a fifo's buffer must hold: the workload's own data, then what
    before_dump steps wrote into it."""
    out = b""
    if own:
        out += seeded.data(int(own.get("seed", 0)), 0, int(own["bytes"]))
    for seed, n in ctx.model.fifo_data(path):
        out += seeded.data(seed, 0, n)
    return out


def open_fifo(e: dict, ctx: Ctx) -> List[Opened]:
    end = e.get("end", "r")
    extra_flags = os.O_NONBLOCK if e.get("nonblock") else 0
    # Opening one end of a fifo blocks until the other end is open (fifo(7));
    # a temporary O_RDWR fd (never blocks on Linux) stands in for the peer.
    keep = os.open(e["fifo"], os.O_RDWR | os.O_NONBLOCK)
    try:
        fd = os.open(e["fifo"], {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[end] | extra_flags)
        if e.get("data"):
            os.write(keep, seeded.data(int(e["data"].get("seed", 0)), 0, int(e["data"]["bytes"])))
    finally:
        os.close(keep)
    return [Opened(fd, int(e["fd"]), "fifo-" + end)]


def _fifo_group(e: dict, ctx: Ctx, all_entries: List[dict]) -> dict:
    """The fifo's other entries in the workload (one fifo, several fds)."""
    return {x.get("end", "r"): x for x in all_entries if x.get("fifo") == e["fifo"]}


def check_fifo(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    fd = recs[0]["fd"]
    end = e.get("end", "r")
    group = _fifo_group(e, ctx, ctx.entries)
    data_entry = next((x for x in group.values() if x.get("data")), None)
    expected = fifo_expected(e["fifo"], ctx, data_entry.get("data") if data_entry else None)
    reader = group.get("r") or group.get("rw")
    out = []
    if phase == "consume" and reader is e:
        out.append(bytes_check(fd, "fifo buffered bytes, in order, nothing more", expected, drain(fd)))
    elif phase == "consume" and reader is None and (group.get("w") is e):
        # only the write end is ours: read the buffer through a new read end
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
        try:
            out.append(bytes_check(fd, "fifo buffered bytes, in order, nothing more", expected, drain(rfd)))
        finally:
            os.close(rfd)
    elif phase == "mutate" and end in ("w", "rw") and reader is not None:
        os.write(fd, MARKER)
        rfd = ctx.fd_of(reader)
        out.append(check(fd, "write reaches our read end", MARKER.decode(),
                         drain(rfd).decode(errors="replace")))
    return out


def _spawn_holder(keep: int) -> int:
    """A process outside the workload's tree holding ``keep`` (double fork:
    the holder is re-parented to init, so the workload has no children)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            grandchild = os.fork()
            if grandchild == 0:
                os.setsid()
                for fd in range(3, 1024):
                    if fd != keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
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


def open_pipe(e: dict, ctx: Ctx) -> List[Opened]:
    r, w = os.pipe()
    if e.get("data"):
        os.write(w, seeded.data(int(e["data"].get("seed", 0)), 0, int(e["data"]["bytes"])))
    ends = e["pipe"]
    out = []
    for role, fd in (("read", r), ("write", w)):
        if role in ends:
            out.append(Opened(fd, int(ends[role]), "pipe-" + role))
        else:
            ctx.helpers.append(_spawn_holder(fd))
            os.close(fd)
    return out


def check_pipe(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    by_role = {r["role"]: r["fd"] for r in recs}
    rfd, wfd = by_role.get("pipe-read"), by_role.get("pipe-write")
    expected = seeded.data(int(e["data"].get("seed", 0)), 0, int(e["data"]["bytes"])) if e.get("data") else b""
    out = []
    if phase == "inspect" and rfd is not None and wfd is not None:
        out.append(check(rfd, "both ends are one pipe", os.fstat(rfd).st_ino, os.fstat(wfd).st_ino))
    elif phase == "consume" and rfd is not None:
        out.append(bytes_check(rfd, "pipe buffered bytes, in order, nothing more", expected, drain(rfd)))
    elif phase == "mutate" and wfd is not None:
        n = os.write(wfd, MARKER)
        if rfd is not None:
            out.append(check(wfd, "write reaches our read end", MARKER.decode(), drain(rfd).decode(errors="replace")))
        else:
            out.append(check(wfd, "write accepted", len(MARKER), n))
    return out


def open_socket(e: dict, ctx: Ctx) -> List[Opened]:
    kind = e["socket"]
    payload = seeded.data(int(e["data"].get("seed", 0)), 0, int(e["data"]["bytes"])) if e.get("data") else b""
    if kind == "unix-pair":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.sendall(payload)
        return [Opened(a.detach(), int(e["fd"]), "sock"), Opened(b.detach(), int(e["peer_fd"]), "peer")]
    if kind == "unix-listen":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(e["path"])
        s.listen(8)
        return [Opened(s.detach(), int(e["fd"]), "sock")]
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
        return [Opened(c.detach(), int(e["fd"]), "sock"), Opened(srv.detach(), int(e["peer_fd"]), "peer")]
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        tx.sendto(payload, s.getsockname())
        sender = list(tx.getsockname())
        tx.close()
        return [Opened(s.detach(), int(e["fd"]), "sock", {"sender": sender})]
    raise ValueError(f"unknown socket kind {kind}")


def _sock(fd: int) -> socket.socket:
    """A socket object on a dup of ``fd`` (closing it leaves ``fd`` alone)."""
    return socket.socket(fileno=os.dup(fd))


def check_socket(e: dict, recs: List[dict], ctx: Ctx, phase: str) -> List[dict]:
    kind = e["socket"]
    by_role = {r["role"]: r for r in recs}
    fd = by_role["sock"]["fd"]
    s = _sock(fd)
    payload = seeded.data(int(e["data"].get("seed", 0)), 0, int(e["data"]["bytes"])) if e.get("data") else b""
    out = []
    try:
        if phase == "inspect":
            out.append(check(fd, "local address", by_role["sock"]["extra"].get("sockname"), _name(s.getsockname())))
        elif phase == "consume" and kind in ("unix-pair", "tcp-established"):
            out.append(bytes_check(fd, "queued stream bytes", payload, drain(fd)))
        elif phase == "consume" and kind == "udp":
            got = s.recvfrom(65536, socket.MSG_DONTWAIT) if wait_readable(fd, 0) else (b"", None)
            out.append(bytes_check(fd, "queued datagram", payload, got[0]))
            out.append(check(fd, "datagram source", by_role["sock"]["extra"]["sender"], _name(got[1])))
        elif phase == "mutate" and kind in ("unix-pair", "tcp-established"):
            peer = by_role["peer"]["fd"]
            os.write(peer, MARKER)
            out.append(check(fd, "peer's write arrives", MARKER.decode(),
                             drain(fd).decode(errors="replace") if wait_readable(fd, 2) else ""))
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
    return list(addr) if isinstance(addr, tuple) else addr


def sockname_of(fd: int) -> Any:
    s = _sock(fd)
    try:
        return _name(s.getsockname())
    finally:
        s.close()
