"""Established TCP connections (IPv4 and IPv6), through TCP_REPAIR.

At dump the socket (a pidfd_getfd duplicate: the same socket) is put in
repair mode (TCP_REPAIR, CAP_NET_ADMIN). In repair mode the kernel lets the
queues be read without consuming them (recv with MSG_PEEK per
TCP_REPAIR_QUEUE: the receive queue from copied_seq, the send queue from
snd_una), hands out the sequence numbers (TCP_QUEUE_SEQ: rcv_nxt,
write_seq), the window (TCP_REPAIR_WINDOW) and the timestamp clock
(TCP_TIMESTAMP), and closing it sends nothing: tcp_close() of a socket in
repair disconnects without FIN or RST (net/ipv4/tcp.c). The original is
killed in repair mode. Like CRIU's soccr (soccr/soccr.c), which this
follows.

Who the peer is decides what else is needed:

- the peer socket is held by the target too (a loopback pair): both ends
  are put in repair and read together; the read is repeated until both
  ends' sequence numbers are unchanged over it (the kernel may still be
  delivering or acknowledging in flight), so the pair is one consistent
  snapshot. Nothing outside sees either end, no lock is needed.
- the peer is another process or machine: the connection is locked first
  (engine.netlock: its packets dropped both ways), so nothing the peer
  sends is acknowledged and lost, and nothing reaches a closed socket to
  be answered with a RST. The restore removes the lock once the process is
  back; the peer's retransmission carries on. Without nftables such a
  connection is refused (`tcp-lock`).

At restore: a socket in repair mode (which also lets bind reuse a port the
listener that accepted it holds: SK_FORCE_REUSE) is bound to the same local
address, given its sequence numbers (TCP_QUEUE_SEQ on each queue, before
connect), "connected" without a handshake, given its options
(TCP_REPAIR_OPTIONS: MSS, window scale, SACK, timestamps), timestamp
offset, queues (the receive queue and the sent-but-unacknowledged part of
the send queue written in repair mode, the unsent part sent after leaving
it) and window, then leaves repair mode. Both ends of a pair are built
before either leaves repair mode (a window probe to a missing socket would
be answered with a RST).

A half-closed connection (one end shut down writing and its FIN
acknowledged: FIN_WAIT2; the other end got it: CLOSE_WAIT) is rebuilt
established as it was before the FIN, then:

- both ends held by the process: once both are out of repair mode the
  first one shuts down writing again; the FIN crosses loopback and both
  settle in their states.
- the peer outside: still in repair mode, behind the network lock, the
  segment the peer sent is forged (engine/fds/_tcpforge.py, as CRIU's
  soccr does): a FIN from the peer for a close-wait end; for a fin-wait2
  end, its FIN queued again as sent (shutdown with the send queue under
  repair) and the peer's acknowledgement of it. The peer, which got or
  acknowledged that FIN long ago, sees nothing new. Our FIN not
  acknowledged yet is sent again after our bytes once repair mode is left
  (fin-wait1; last-ack after the forged FIN), or, in closing, queued again
  in repair mode before the peer's forged FIN.

Refused (`socket`, state named): every other state (SYN_SENT, TIME_WAIT,
closed), fin-wait1, last-ack and closing with both ends in the dump,
closing with bytes not sent yet (they would go after its FIN), a
half-closed pair in the dump whose ends are not in fin-wait2 and
close-wait, urgent data, ECN or
microsecond timestamps negotiated, SO_PEEK_OFF set, several connections or
bytes waiting in a listener's accept queue, a socket another process holds.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import socket as _socket
import struct
import time
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, List, Optional

from .. import netinfo, netlock
from ..errors import EngineError, Refusal
from . import _flowlabel, _sockopts, _tcpforge
from ._sockbase import building, check_options, dup_of, fresh_options, held_here, inode_of, outside_holders
from ._util import failed, refuse, refuse_rec, with_status_flags

SOL_TCP = _socket.IPPROTO_TCP
TCP_INFO = 11
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD, SIOCATMARK = 0x541B, 0x5411, 0x894B, 0x8905
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE, TCPI_OPT_ECN = 1, 2, 4, 8
TCPI_OPT_ECN_SEEN, TCPI_OPT_USEC_TS = 16, 64
ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING = 1, 4, 5, 8, 9, 11
# A half-closed pair held by the process: one end shut down writing, its FIN
# acknowledged (FIN_WAIT2), the other end got it (CLOSE_WAIT).
HALF = {FIN_WAIT2: CLOSE_WAIT, CLOSE_WAIT: FIN_WAIT2}
# With the peer outside, these too: our FIN not acknowledged yet (in the send
# queue, counted by SIOCOUTQ) after our data (fin-wait1), or after the
# peer's FIN (last-ack). The state each is rebuilt in, in repair mode.
FIN_UNACKED = (FIN_WAIT1, LAST_ACK)
# closing (both FINs sent, ours not acknowledged): our FIN is queued again
# in repair mode as gone out, before the peer's forged one
OUTSIDE_STATES = {FIN_WAIT2: FIN_WAIT2, CLOSE_WAIT: CLOSE_WAIT, FIN_WAIT1: ESTABLISHED, LAST_ACK: CLOSE_WAIT,
                  CLOSING: CLOSING}
FIN_IN_SENDQ = (FIN_WAIT1, LAST_ACK, CLOSING)     # counted by SIOCOUTQ: not acknowledged
FIN_RECEIVED = (CLOSE_WAIT, LAST_ACK, CLOSING)    # the peer's FIN took a sequence number
SEND_SHUTDOWN = 2
# Options the kernel itself moves on a live connection (buffer autotuning,
# the window clamp, the current MSS; an accepted socket's multicast TTL /
# hop limit and interface hold the SYN's TTL and incoming interface:
# tcp_v4_syn_recv_sock, tcp_v6_syn_recv_sock, and cannot be set on a stream
# socket): not "set by the process"; carried by the repair state or put
# back as they were without locking them (the multicast ones: not at all).
_KERNEL_MOVED = ("SO_SNDBUF", "SO_RCVBUF", "TCP_WINDOW_CLAMP", "TCP_MAXSEG", "IP_MULTICAST_TTL",
                 "IPV6_MULTICAST_HOPS", "IPV6_MULTICAST_IF")
SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK = 1, 2
RCV_SHUTDOWN = 1
TCP_MIN_MSS, MAX_USER_MSS = 88, 32767
_STABLE_TRIES = 20


def _v(family: int) -> str:
    return "6" if family == _socket.AF_INET6 else ""


def _ep(addr) -> list:
    return [addr[0], addr[1]]


def _ep_text(addr) -> str:
    return netinfo.endpoint_text((addr[0], addr[1]))


def _ioctl_int(fd: int, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0\0\0\0"))[0]


def _getint(s: _socket.socket, opt: int) -> int:
    return struct.unpack("i", s.getsockopt(SOL_TCP, opt, 4))[0]


def _setint(s: _socket.socket, opt: int, val: int) -> None:
    s.setsockopt(SOL_TCP, opt, struct.pack("i", val))


# -- who is the peer --------------------------------------------------------

def _row(pid: int, family: int, ino: int) -> dict:
    return netinfo.parse_inet(netinfo.read_table(pid, "tcp" + _v(family))).get(ino) or {}


def _rows(pid: int, family: int) -> List[dict]:
    """Every row of /proc/PID/net/tcp[6] (unaccepted children have inode 0,
    so they cannot be keyed by inode)."""
    out = []
    for line in netinfo.read_table(pid, "tcp" + _v(family)).splitlines()[1:]:
        one = netinfo.parse_inet("header\n" + line) if line.strip() else {}
        for ino, r in one.items():
            out.append(dict(r, inode=ino))
    return out


def peer_of(info, ctx, family: int, row: dict):
    """("dump", inode) when the target holds the other end, ("accept", 0)
    when it waits unaccepted in a listener's queue, ("outside", inode or 0)
    otherwise (another process; 0: not on this machine)."""
    for r in _rows(info.pid, family):
        if r["local"] == row["remote"] and r["remote"] == row["local"] and r["state"] != 10:
            if r["inode"] == 0:
                # No file: waiting in an accept queue (established), or an
                # orphan its process closed (closing states).
                return ("accept" if r["state"] == ESTABLISHED else "outside"), 0
            return ("dump" if held_here(ctx, r["inode"]) else "outside"), r["inode"]
    return "outside", 0


# -- dump ----------------------------------------------------------------------

def head_text(family: int, row: dict) -> str:
    state = netinfo.TCP_STATES.get(row.get("state"), f"state {row.get('state')}")
    return f"tcp{_v(family)} {state} {_ep_text(row['local'])}->{_ep_text(row['remote'])}"


def classify(info, ctx, q: dict) -> dict:
    """The facts of an established connection that need no repair mode
    (state, peer, options); raises the `socket` or `tcp-lock` refusal."""
    ino = inode_of(info.link)
    key = f"tcp-conn:{ino}"
    if key in ctx.shared:
        return ctx.shared[key]
    fam = q["family"]
    row = _row(info.pid, fam, ino)
    if not row:
        raise refuse(info, "socket", f"tcp{_v(fam)} socket inode {ino}: not in /proc/net/tcp{_v(fam)}")
    head = head_text(fam, row)
    state = row["state"]
    if state != ESTABLISHED and state not in OUTSIDE_STATES:
        raise refuse(info, "socket", f"{head}: only established and half-closed (fin-wait2, close-wait; "
                     "with a peer outside the dump also fin-wait1, last-ack, closing) connections are restored "
                     "(an opening or closed connection carries state this engine does not rebuild)")
    out = outside_holders(info, ctx, ino)
    if out:
        raise refuse(info, "socket", f"{head}: also held by pid {out[0][0]} (fd {out[0][1]})")
    where, peer_ino = peer_of(info, ctx, fam, row)
    if state in HALF and where == "dump" and _row(info.pid, fam, peer_ino).get("state") != HALF[state]:
        raise refuse(info, "socket", f"{head}: a half-closed pair held by the process is restored only "
                     "with one end in fin-wait2 (its FIN acknowledged), the other in close-wait")
    if state in FIN_IN_SENDQ and where != "outside":
        raise refuse(info, "socket", f"{head}: its FIN is not acknowledged yet by an end held by the process "
                     "(restored only with a peer outside the dump)")
    if state in HALF and where == "accept":
        raise refuse(info, "socket", f"{head}: half-closed while its peer waits in a listener's accept "
                     "queue (the FIN is not made again by connecting anew)")
    listener = None
    if where == "accept":
        listener = _waiting_for(info, ctx, fam, row, head)
    fresh = fresh_options(ctx, fam, _socket.SOCK_STREAM, _socket.IPPROTO_TCP)
    with dup_of(info) as mine:
        opts = options_of(mine, fam)
        s = _socket.socket(fileno=os.dup(mine))
        try:
            ti = s.getsockopt(SOL_TCP, TCP_INFO, 8)
            urgent = _ioctl_int(mine, SIOCATMARK)
        finally:
            s.close()
    shut = _shutdown_of(info, fam, ino, head, state)
    if shut & SEND_SHUTDOWN and state not in (FIN_WAIT2,) + FIN_IN_SENDQ:
        raise refuse(info, "socket", f"{head}: shut down for writing")
    tcpi_options = ti[5]
    if tcpi_options & (TCPI_OPT_ECN | TCPI_OPT_ECN_SEEN):
        raise refuse(info, "socket", f"{head}: ECN was negotiated; TCP_REPAIR_OPTIONS cannot restore it")
    if tcpi_options & TCPI_OPT_USEC_TS:
        raise refuse(info, "socket", f"{head}: microsecond TCP timestamps cannot be restored")
    if urgent:
        raise refuse(info, "socket", f"{head}: urgent (out-of-band) data is pending")
    # None: a kernel whose TCP has no SO_PEEK_OFF (before 6.10), so never set.
    if opts.get("SO_PEEK_OFF") is not None and _sockopts.as_int(opts["SO_PEEK_OFF"]) >= 0:
        raise refuse(info, "socket", f"{head}: the process peeks at an offset (SO_PEEK_OFF)")
    moved = {n: opts[n] for n in _KERNEL_MOVED if n in opts}
    compare = {n: v for n, v in opts.items() if n not in _KERNEL_MOVED}
    try:
        _flowlabel.check(info, ctx, fam)
        setnames = check_options(info, compare, fresh)
    except Refusal as e:
        raise refuse(info, "socket", f"{head}: {e.detail}") from None
    if where == "accept":
        with dup_of(info) as mine:
            inq, outq = _ioctl_int(mine, SIOCINQ), _ioctl_int(mine, SIOCOUTQ)
        if inq or outq:
            raise refuse(info, "socket", f"{head}: waits to be accepted with {inq} bytes to read and {outq} "
                         "to send")
    if where == "outside":
        why = netlock.available()
        if why:
            raise refuse(info, "tcp-lock", f"{head}: its peer is outside the dump and the connection cannot "
                         f"be held still meanwhile: {why}")
    rec = {"sock": "tcp-conn", "family": fam, "inode": ino, "local": _ep(row["local"]),
           "remote": _ep(row["remote"]), "peer": where, "peer_inode": peer_ino if where == "dump" else None,
           "opts": compare, "set": setnames, "moved": moved, "listener": listener,
           "state": state,
           # In close-wait, reads end at the FIN, which the restore sends again.
           "shut_rd": bool(shut & RCV_SHUTDOWN) and state not in (CLOSE_WAIT, LAST_ACK)}
    ctx.shared[key] = rec
    return rec


def _shutdown_of(info, fam: int, ino: int, head: str, state: int) -> int:
    """sk_shutdown of the socket (inet_diag): a shutdown(SHUT_RD) leaves an
    established connection established, but reads return EOF."""
    from .. import netdiag
    try:
        for r in netdiag.tcp_sockets(fam, 1 << state):
            if r["inode"] == ino:
                return r["shutdown"]
    except OSError as e:
        raise refuse(info, "socket", f"{head}: inet_diag cannot report its shutdown state ({e.strerror})") from e
    raise refuse(info, "socket", f"{head}: not found by inet_diag; its shutdown state cannot be known")


def _waiting_for(info, ctx, fam: int, row: dict, head: str) -> int:
    """The inode of the listener (held by the target) in whose accept queue
    this client's connection waits; raises the `socket` refusal otherwise.
    The listener's own classify decides whether the connection can be made
    again (one waiting, nothing sent: engine/fds/_inetsock.py)."""
    from ._inetsock import _serves
    for r in _rows(info.pid, fam):
        if r["state"] == 10 and _serves(r["local"], row["remote"]):
            if not held_here(ctx, r["inode"]):
                raise refuse(info, "socket", f"{head}: its peer waits unaccepted in the accept queue of a "
                             "listener outside the dump")
            return r["inode"]
    raise refuse(info, "socket", f"{head}: its peer waits unaccepted in a listener's accept queue")


def options_of(dup: int, family: int) -> Dict[str, Optional[str]]:
    s = _socket.socket(fileno=os.dup(dup))
    try:
        return _sockopts.read_all(s, family, True)
    finally:
        s.close()


def text(rec: dict) -> str:
    state = netinfo.TCP_STATES.get(rec.get("state", ESTABLISHED), "established")
    s = f"tcp{_v(rec['family'])} {state} {_ep_text(rec['local'])}->{_ep_text(rec['remote'])}"
    s += {"dump": ", peer in the dump", "outside": ", peer outside (network lock)",
          "accept": ", waiting to be accepted by a listener in the dump"}.get(rec["peer"], "")
    r = rec.get("repair")
    if r:
        s += f", {r['inq_len']} bytes to read, {r['outq_len']} to send"
    if rec.get("shut_rd"):
        s += ", shut down for reading"
    if rec["set"]:
        s += ", options " + ", ".join(rec["set"])
    return s


class _Repair:
    """A duplicate of the target's socket held in repair mode from the
    read until the dump ends: killed in repair, the original sends nothing;
    let go (`--leave-running`, a failed dump), it leaves repair mode with
    SO_REUSEADDR as it was (leaving repair clears sk_reuse)."""

    def __init__(self, dup: int, reuse: bytes):
        self.sock = _socket.socket(fileno=dup)
        self.reuse = reuse
        _setint(self.sock, TCP_REPAIR, TCP_REPAIR_ON)

    def release(self, killed: bool) -> None:
        try:
            if not killed:
                _setint(self.sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
                _setint(self.sock, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
                self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, self.reuse)
        finally:
            self.sock.close()


def _queue(s: _socket.socket, which: int, length: int) -> tuple:
    _setint(s, TCP_REPAIR_QUEUE, which)
    seq = struct.unpack("I", s.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0]
    data = b""
    if length:
        # One byte more than expected: a longer queue is caught, not truncated.
        data = s.recv(length + 1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
    return seq, data


def _seqs(s: _socket.socket) -> tuple:
    out = []
    for q in (TCP_RECV_QUEUE, TCP_SEND_QUEUE):
        _setint(s, TCP_REPAIR_QUEUE, q)
        out.append(struct.unpack("I", s.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0])
    fd = s.fileno()
    out += [_ioctl_int(fd, SIOCINQ), _ioctl_int(fd, SIOCOUTQ), _ioctl_int(fd, SIOCOUTQNSD)]
    out.append(s.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))
    _setint(s, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    return tuple(out)


def read_repair(s: _socket.socket, state: int = ESTABLISHED) -> tuple:
    """(facts, receive queue bytes, send queue bytes) of a socket in repair
    mode. Raises OSError, ValueError (a queue shorter or longer than its
    counter)."""
    fd = s.fileno()
    ti = s.getsockopt(SOL_TCP, TCP_INFO, 8)
    if ti[0] != state:
        raise ValueError(f"its state became {netinfo.TCP_STATES.get(ti[0], ti[0])}")
    inq, outq, unsq = _ioctl_int(fd, SIOCINQ), _ioctl_int(fd, SIOCOUTQ), _ioctl_int(fd, SIOCOUTQNSD)
    if state in FIN_IN_SENDQ:
        # the counters take in our FIN (one sequence number, no byte): data only
        # here; the restore queues or sends the FIN again
        if outq < 1:
            raise ValueError(f"{netinfo.TCP_STATES.get(state)} with no FIN in its send queue")
        if state == CLOSING and unsq > 1:
            raise ValueError("closing with bytes not sent yet (queued only after its FIN)")
        fin_sent = unsq == 0
        outq, unsq = outq - 1, max(unsq - 1, 0)
    r = {"opt_mask": ti[5], "snd_wscale": ti[6] & 0xF, "rcv_wscale": ti[6] >> 4,
         "mss": _getint(s, _socket.TCP_MAXSEG), "inq_len": inq, "outq_len": outq, "unsq_len": unsq,
         "timestamp": None}
    if state == CLOSING:
        r["fin_sent"] = fin_sent
    if ti[5] & TCPI_OPT_TIMESTAMPS:
        r["timestamp"] = struct.unpack("I", s.getsockopt(SOL_TCP, TCP_TIMESTAMP, 4))[0]
    w = struct.unpack("5I", s.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))
    r["window"] = dict(zip(("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"), w))
    r["inq_seq"], rq = _queue(s, TCP_RECV_QUEUE, inq)
    r["outq_seq"], sq = _queue(s, TCP_SEND_QUEUE, outq)
    _setint(s, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    if len(rq) != inq or len(sq) != outq:
        raise ValueError(f"its queues read {len(rq)}/{len(sq)} bytes, counted {inq}/{outq}")
    return r, rq, sq


def _on_release(ctx):
    hooks = ctx.shared.setdefault("_on_release", [])
    return hooks


def dump(info, ctx, q: dict) -> dict:
    """The restore record, after the repair-mode read (for a pair: of both
    ends at once). Raises the `socket` / `tcp-lock` refusal or EngineError."""
    rec = dict(classify(info, ctx, q))
    done = ctx.shared.get(f"tcp-conn-dumped:{rec['inode']}")
    if done is not None:
        return done
    if rec["peer"] == "accept":
        # Made again at restore by connecting to the rebuilt listener: both
        # ends are empty, no sequence number of theirs is visible.
        return rec
    ends = [(info, rec)]
    if rec["peer"] == "dump":
        pinfo = next(i for i in ctx.all_fds.values() if i.link == f"socket:[{rec['peer_inode']}]")
        prec = dict(classify(pinfo, ctx, q))
        ends.append((pinfo, prec))
    elif rec["peer"] == "outside":
        try:
            name = netlock.lock(tuple(rec["local"]), tuple(rec["remote"]))
        except netlock.LockError as e:
            raise refuse(info, "tcp-lock", f"{head_text(rec['family'], _fake_row(rec))}: {e}") from None
        rec["lock"] = name
        _on_release(ctx).append(lambda killed, n=name: None if killed else netlock.unlock(n))
    socks = []
    for i, r in ends:
        with dup_of(i) as d:
            dup = os.dup(d)
        reuse = _socket.socket(fileno=os.dup(dup))
        try:
            ra = reuse.getsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 4)
        finally:
            reuse.close()
        try:
            rp = _Repair(dup, ra)
        except OSError as e:
            os.close(dup)
            raise EngineError(f"pid {i.pid} fd {i.fd}: TCP_REPAIR: {e.strerror}", pid=i.pid, errno=e.errno) from e
        _on_release(ctx).append(rp.release)
        socks.append(rp.sock)
    # Read until the sequence numbers of every end stand still over a read.
    for attempt in range(_STABLE_TRIES):
        before = [_seqs(s) for s in socks]
        try:
            got = [read_repair(s, r.get("state", ESTABLISHED)) for s, (_, r) in zip(socks, ends)]
        except (ValueError, OSError) as e:
            raise refuse(info, "socket", f"{head_text(rec['family'], _fake_row(rec))}: "
                         f"the repair-mode read failed: {e}") from None
        if [_seqs(s) for s in socks] == before:
            break
        time.sleep(0.005 * (attempt + 1))
    else:
        raise refuse(info, "socket", f"{head_text(rec['family'], _fake_row(rec))}: its state kept moving "
                     "while being read")
    for (i, r), (facts, rq, sq) in zip(ends, got):
        if r.get("state") == FIN_WAIT2 and facts["outq_len"]:
            raise refuse(i, "socket", f"{head_text(r['family'], _fake_row(r))}: {facts['outq_len']} bytes "
                         "(or its FIN) not acknowledged yet")
        r["repair"] = facts
        r["data"] = f"fds/tcp-{r['inode']}"
        ctx.image.write_bytes(r["data"], rq + sq)
        ctx.shared[f"tcp-conn-dumped:{r['inode']}"] = r
    return rec


def _fake_row(rec: dict) -> dict:
    return {"state": rec.get("state", ESTABLISHED), "local": rec["local"], "remote": rec["remote"]}


# -- restore --------------------------------------------------------------------

def validate(rec: dict, ctx) -> None:
    """Raises image-invalid for a malformed record."""
    if rec.get("peer") == "accept":
        if not any(x.get("sock") == "tcp-listen" and x.get("inode") == rec.get("listener") and
                   any(w.get("client_inode") == rec.get("inode") for w in x.get("waiting") or [])
                   for x in ctx.records or []):
            raise refuse_rec(rec, ctx, "image-invalid", "tcp connection: the listener it waits in is missing")
        return
    r = rec.get("repair")
    fam = rec.get("family")
    ok = fam in (_socket.AF_INET, _socket.AF_INET6) and isinstance(r, dict) and \
        rec.get("peer") in ("dump", "outside") and isinstance(rec.get("local"), list) and \
        isinstance(rec.get("remote"), list) and isinstance(rec.get("data"), str)
    if ok:
        need = r["inq_len"] + r["outq_len"]
        ok = len(ctx.image.read_bytes(rec["data"])) == need and 0 <= r["unsq_len"] <= r["outq_len"] and \
            (rec.get("state", ESTABLISHED) == ESTABLISHED or rec.get("state") in OUTSIDE_STATES) and \
            not (rec.get("state") == FIN_WAIT2 and r["outq_len"]) and \
            not (rec.get("state") in FIN_IN_SENDQ and rec.get("peer") != "outside") and \
            not (rec.get("state") == CLOSING and r["unsq_len"])
    if not ok:
        raise refuse_rec(rec, ctx, "image-invalid", "tcp connection record malformed")
    if rec["peer"] == "dump" and not any(x.get("sock") == "tcp-conn" and x.get("inode") == rec.get("peer_inode")
                                         for x in ctx.records or []):
        raise refuse_rec(rec, ctx, "image-invalid", "tcp connection: its peer's record is missing")
    if rec["peer"] == "outside" and not ctx.same_node and _loopback(rec["remote"][0]):
        # The peer is a process of the machine the dump was made on, reached
        # over its loopback: on another machine that address is this one,
        # where no such peer holds the connection.
        raise refuse_rec(rec, ctx, "socket", f"tcp connection {_ep_text(rec['local'])}->{_ep_text(rec['remote'])} "
                         "to a peer outside the dump over loopback, restored on another machine: the peer is "
                         "not here (move the connection with an address both machines' networks reach)")


def _loopback(addr: str) -> bool:
    import ipaddress
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _send_all(s: _socket.socket, data: bytes, flags: int = 0) -> None:
    off, chunk = 0, len(data)
    while off < len(data):
        try:
            n = s.send(data[off:off + chunk], flags)
        except OSError as e:
            # Repair-mode writes are one linear buffer: the kernel may refuse a
            # big one (ENOMEM); smaller pieces do (as soccr does).
            if e.errno in (_errno.ENOMEM, _errno.EAGAIN, _errno.ENOBUFS) and chunk > 1024:
                chunk //= 2
                continue
            raise
        off += n


def _bind_addr(rec: dict) -> tuple:
    """Where to bind: the recorded local address, but for an IPv6 socket
    that was not IPV6_V6ONLY the wildcard with the recorded port, since
    binding a specific IPv6 address sets IPV6_V6ONLY (__inet6_bind), which
    cannot be cleared once bound; connect then picks the same source
    address (checked by _check_local)."""
    local = tuple(rec["local"])
    if rec["family"] == _socket.AF_INET6 and rec["opts"].get("IPV6_V6ONLY") == "00000000" and \
            not local[0].startswith("::ffff:"):
        return ("::", local[1])
    return local


def _bind(s: _socket.socket, rec: dict, ctx) -> None:
    try:
        s.bind(_bind_addr(rec))
    except OSError as e:
        if e.errno in (_errno.EADDRINUSE, _errno.EADDRNOTAVAIL):
            why = "address in use" if e.errno == _errno.EADDRINUSE else "address not available here"
            raise refuse_rec(rec, ctx, "socket", f"tcp connection {_ep_text(rec['local'])}->"
                             f"{_ep_text(rec['remote'])}: {why}") from None
        raise


def _check_local(s: _socket.socket, rec: dict, ctx) -> None:
    got = list(s.getsockname()[:2])
    if got != rec["local"]:
        raise refuse_rec(rec, ctx, "socket", f"tcp connection {_ep_text(rec['local'])}->"
                         f"{_ep_text(rec['remote'])}: its source address would be {_ep_text(got)} here")


def _build(ends: List[dict], ctx) -> list:
    """[(rec, socket in repair mode with everything but its unsent bytes,
    unsent bytes)] for one connection's ends held by the process (one, or
    both of a loopback pair), built side by side in phases: every end
    exists (bound, connected, its sequence numbers and options) before any
    is given a queue, and every receive queue is in before any send queue.
    A send queue written in repair mode arms the retransmission timer; on a
    slow machine it fires while the restore goes on, and a segment the
    other end is not there for yet is answered with a RST (the restore
    failed: ECONNRESET), one it is there for but has not its receive queue
    yet would land in it out of order. Once both ends have their receive
    queues, a retransmission is what TCP would do: the other end takes
    what it lacks, or acknowledges what it has. Closes what it made if a
    step fails."""
    built = []
    try:
        for rec in ends:
            s = _socket.socket(rec["family"], _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC, _socket.IPPROTO_TCP)
            built.append((rec, s, None))
            with building(s, rec, ctx, _what(rec)):
                _start(s, rec, ctx)
        queues = []
        for rec, s, _ in built:
            r = rec["repair"]
            data = ctx.image.read_bytes(rec["data"])
            rq, sq = data[:r["inq_len"]], data[r["inq_len"]:]
            queues.append((rq, sq[:r["outq_len"] - r["unsq_len"]], sq[r["outq_len"] - r["unsq_len"]:]))
        for (rec, s, _), (rq, _, _) in zip(built, queues):
            if rq:
                with building(s, rec, ctx, _what(rec)):
                    _setint(s, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
                    _send_all(s, rq)
        for (rec, s, _), (_, sent, _) in zip(built, queues):
            if sent:
                with building(s, rec, ctx, _what(rec)):
                    _setint(s, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
                    _send_all(s, sent)
        for rec, s, _ in built:
            with building(s, rec, ctx, _what(rec)):
                _setint(s, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
                _window(s, rec)
                if rec["peer"] == "outside" and OUTSIDE_STATES.get(rec.get("state"), ESTABLISHED) != ESTABLISHED:
                    _peer_closed(s, rec)
        return [(rec, s, unsent) for (rec, s, _), (_, _, unsent) in zip(built, queues)]
    except BaseException:
        for _, s, _ in built:
            s.close()
        raise


def _what(rec: dict) -> str:
    return f"rebuilding tcp connection {_ep_text(rec['local'])}->{_ep_text(rec['remote'])}"


def _start(s: _socket.socket, rec: dict, ctx) -> None:
    """Repair mode, options, address, sequence numbers, connected (no
    handshake), TCP options and timestamp: the end exists, no queue yet."""
    r = rec["repair"]
    _setint(s, TCP_REPAIR, TCP_REPAIR_ON)
    # Not SO_REUSEADDR: repair mode forces reuse (sk_reuse =
    # SK_FORCE_REUSE), which lets the connection bind beside a listener
    # on its port (a server's accepted connection), and setting
    # SO_REUSEADDR would overwrite it; finish() sets it as recorded.
    _sockopts.apply(s, rec["opts"], [n for n in rec["set"] if n != "SO_REUSEADDR"])
    _bind(s, rec, ctx)
    # A FIN takes a sequence number: the half-closed pair is rebuilt
    # established, before the FIN, and the FIN sent again (finish()).
    fin_in = 1 if rec.get("state") in FIN_RECEIVED else 0
    fin_out = 1 if rec.get("state") in (FIN_WAIT2,) + FIN_IN_SENDQ else 0
    _setint(s, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", (r["inq_seq"] - fin_in - r["inq_len"]) & 0xFFFFFFFF))
    _setint(s, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", (r["outq_seq"] - fin_out - r["outq_len"]) &
                                                      0xFFFFFFFF))
    # The segment size is computed once, at connect, from the MSS clamp then
    # in force (tcp_connect_init, tcp_sync_mss); TCP_REPAIR_OPTIONS sets the
    # clamp later without computing it again. Left alone, every restored
    # connection sends 524-byte segments for good (TCP's default 536): on
    # loopback each carries 2-3 times its size in buffer memory, a receive
    # buffer full at the dump then drops what its window let in, and a
    # loaded pair stalled (zdtm socket-tcpbuf-local). A user MSS (at most
    # 32767, MAX_TCP_WINDOW) makes connect compute it from the recorded
    # clamp, exactly below 32767 (every real network); it is cleared after.
    user_mss = min(r["mss"], MAX_USER_MSS) if r["mss"] >= TCP_MIN_MSS else 0
    if user_mss:
        s.setsockopt(SOL_TCP, _socket.TCP_MAXSEG, user_mss)
    s.connect(tuple(rec["remote"]))
    if user_mss:
        s.setsockopt(SOL_TCP, _socket.TCP_MAXSEG, 0)
    _check_local(s, rec, ctx)
    opts = []
    if r["opt_mask"] & TCPI_OPT_SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if r["opt_mask"] & TCPI_OPT_WSCALE:
        opts.append((TCPOPT_WINDOW, r["snd_wscale"] + (r["rcv_wscale"] << 16)))
    if r["opt_mask"] & TCPI_OPT_TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    opts.append((TCPOPT_MAXSEG, r["mss"]))
    s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", c, v) for c, v in opts))
    if r["timestamp"] is not None:
        s.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("I", r["timestamp"]))


def _window(s: _socket.socket, rec: dict) -> None:
    r = rec["repair"]
    w = dict(r["window"])
    if rec.get("state") in FIN_RECEIVED and w["rcv_wup"] == r["inq_seq"]:
        # The last window update was sent past the FIN (soccr does the same).
        w["rcv_wup"] = (w["rcv_wup"] - 1) & 0xFFFFFFFF
        w["rcv_wnd"] += 1
    s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("5I", w["snd_wl1"], w["snd_wnd"], w["max_window"],
                                                         w["rcv_wnd"], w["rcv_wup"]))


def _peer_closed(s: _socket.socket, rec: dict) -> None:
    """A half-closed end whose peer is outside, rebuilt established in
    repair mode, is given the segment that closed it, forged from the peer
    (module docstring), and waits until it reads back in its recorded state
    (loopback delivers in softirq, as good as at once): fin-wait2 and
    close-wait, closing (our FIN queued first, as gone out), and last-ack
    as close-wait (its own FIN goes in finish()). Raises OSError."""
    r = rec["repair"]
    w = r["window"]
    # the peer's advertised window, as it would put it in the segment
    win = w["snd_wnd"] >> r["snd_wscale"] if r["opt_mask"] & TCPI_OPT_WSCALE else w["snd_wnd"]
    if rec["state"] in (FIN_WAIT2, CLOSING):
        # sent, not sent again: a FIN queued under TCP_SEND_QUEUE counts as gone
        # out (closing: its retransmission timer sends it again once repair mode
        # is left). One the original had not sent yet (a full window, or
        # dropped on its way out) is queued as not sent: sent when it can be.
        sent = rec["state"] == FIN_WAIT2 or r.get("fin_sent", True)
        _setint(s, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE if sent else TCP_NO_QUEUE)
        s.shutdown(_socket.SHUT_WR)
        _setint(s, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    if rec["state"] == FIN_WAIT2:
        _tcpforge.send(rec["remote"], rec["local"], r["inq_seq"], r["outq_seq"], _tcpforge.ACK, win)
    else:
        # acknowledging what the rebuilt end has sent but not its FIN
        snd_una = r["outq_seq"] - (1 if rec["state"] in FIN_IN_SENDQ else 0) - r["outq_len"]
        _tcpforge.send(rec["remote"], rec["local"], r["inq_seq"] - 1, snd_una, _tcpforge.FIN | _tcpforge.ACK, win)
    want = OUTSIDE_STATES[rec["state"]]
    deadline = time.monotonic() + 5
    while True:
        now = s.getsockopt(SOL_TCP, TCP_INFO, 1)[0]
        if now == want:
            return
        if time.monotonic() > deadline:
            raise OSError(_errno.ETIMEDOUT, f"the forged segment from the peer left the connection in state "
                          f"{netinfo.TCP_STATES.get(now, now)}, not {netinfo.TCP_STATES.get(want)}")
        time.sleep(0.001)


def _check_built(s: _socket.socket, rec: dict, ctx) -> None:
    """Options and queues read back as recorded (still in repair mode, where
    SO_REUSEADDR reads as forced: compared once repair mode is left)."""
    r = rec["repair"]
    what = f"checking tcp connection {_ep_text(rec['local'])}->{_ep_text(rec['remote'])}"
    with building(s, rec, ctx, what):
        if rec.get("shut_rd"):
            s.shutdown(_socket.SHUT_RD)
        _put_back_moved(s, rec)
        _sockopts.apply_late(s, rec["opts"], rec["set"])
        _sockopts.verify(s, rec["family"], True, {n: v for n, v in rec["opts"].items() if n != "SO_REUSEADDR"})
        ti = s.getsockopt(SOL_TCP, TCP_INFO, 8)
        inq = _ioctl_int(s.fileno(), SIOCINQ)
        outq = _ioctl_int(s.fileno(), SIOCOUTQ)
    state = OUTSIDE_STATES.get(rec.get("state"), ESTABLISHED) if rec["peer"] == "outside" else ESTABLISHED
    # closing: our FIN, queued again, is counted too
    fin = 1 if rec.get("state") == CLOSING and rec["peer"] == "outside" else 0
    if ti[0] != state or inq != r["inq_len"] or outq != r["outq_len"] - r["unsq_len"] + fin:
        s.close()
        raise refuse_rec(rec, ctx, "socket", f"tcp connection {_ep_text(rec['local'])}->"
                         f"{_ep_text(rec['remote'])}: reads back as state {ti[0]}, {inq} bytes to read "
                         f"(was {r['inq_len']}), {outq} sent and unacknowledged "
                         f"(was {r['outq_len'] - r['unsq_len']})")


def _put_back_moved(s: _socket.socket, rec: dict) -> None:
    """Buffer sizes as they were, locked only if the process locked them
    (SO_BUF_LOCK as recorded); the window clamp as it was."""
    moved = rec.get("moved") or {}
    for name in ("SO_SNDBUF", "SO_RCVBUF"):
        if moved.get(name):
            _sockopts.set_buffer(s, name, _sockopts.as_int(moved[name]))
    lock = rec["opts"].get("SO_BUF_LOCK")
    if lock is not None:
        s.setsockopt(_socket.SOL_SOCKET, 72, bytes.fromhex(lock))
    if moved.get("TCP_WINDOW_CLAMP"):
        _setint(s, 10, _sockopts.as_int(moved["TCP_WINDOW_CLAMP"]))


def _listeners_first(rec: dict, ctx) -> None:
    """The dump's listeners on the ports of this connection (or its peer's)
    are built before it: a listener cannot bind beside a connection already
    on its port, while the connection binds beside the listener (repair
    mode forces reuse). In a process tree the accepted connection may be
    restored first (the parent accepted, the child kept the listener): the
    restore was refused "address in use" after the dump had killed the tree."""
    from . import _inetsock
    from ._inetsock import _serves
    ports = [tuple(rec["local"][:2])]
    if rec["peer"] == "dump":
        ports += [tuple(rec["remote"][:2])]
    for x in getattr(ctx, "tree_records", None) or ctx.records or []:
        if x.get("sock") == "tcp-listen" and x.get("family") == rec["family"] and \
                any(_serves(x["addr"], p) for p in ports):
            _inetsock.ensure_listener(x, ctx)


def restore(rec: dict, ctx) -> int:
    """The rebuilt connection's fd, still in repair mode (a pair is built on
    its first end's call): it leaves repair mode in finish(), once the new
    process holds it, so a restore that fails before closes it silently.
    Raises Refusal (socket) or EngineError."""
    if rec["peer"] == "accept":
        return _reconnect(rec, ctx)
    key = f"tcp-conn-built:{rec['inode']}"
    s = ctx.shared.pop(key, None)
    if s is None:
        _listeners_first(rec, ctx)
        try:
            ends = [rec]
            if rec["peer"] == "dump":
                ends.append(next(x for x in ctx.records if x.get("sock") == "tcp-conn"
                                 and x.get("inode") == rec["peer_inode"]))
            made = _build(ends, ctx)
            built = [(e, sk) for e, sk, _ in made]
            try:
                for e, sk, unsent in made:
                    _check_built(sk, e, ctx)
                    ctx.shared[f"tcp-conn-unsent:{e['inode']}"] = unsent
            except BaseException:
                for _, sk in built:
                    sk.close()
                raise
        except _sockopts.OptionError as e:
            raise refuse_rec(rec, ctx, "socket", f"option {e.name} cannot be reproduced: {e.why}") from None
        except OSError as e:
            raise failed(rec, ctx, "rebuilding a tcp connection", e) from e
        for e, sk in built[1:]:
            ctx.shared[f"tcp-conn-built:{e['inode']}"] = sk
        s = built[0][1]
    # The restorer's own handle on the socket, for finish(); the engine's
    # copy is closed once the process is back.
    live = os.dup(s.fileno())
    ctx.shared[f"tcp-conn-live:{rec['inode']}"] = live
    ctx.shared.setdefault("_close_after_restore", []).append(live)
    if rec.get("lock"):
        ctx.shared.setdefault("_after_restore", []).append(lambda n=rec["lock"]: netlock.unlock(n))
    return with_status_flags(rec, ctx, s.detach())


def _reconnect(rec: dict, ctx) -> int:
    """A client whose connection waits in the accept queue of a listener in
    the dump: connected again, from the same address and port, to the
    rebuilt listener, where it waits once more. Raises Refusal or
    EngineError."""
    from . import _inetsock
    lrec = next((x for x in ctx.records if x.get("sock") == "tcp-listen" and x.get("inode") == rec["listener"]),
                None)
    if lrec is None:
        raise refuse_rec(rec, ctx, "image-invalid", "tcp connection: the listener it waits in is missing")
    lino = _inetsock.ensure_listener(lrec, ctx)
    fam = rec["family"]
    what = f"tcp connection {_ep_text(rec['local'])}->{_ep_text(rec['remote'])}"
    s = _socket.socket(fam, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC, _socket.IPPROTO_TCP)
    with building(s, rec, ctx, f"reconnecting {what}"):
        _sockopts.apply(s, rec["opts"], rec["set"])
        _bind(s, rec, ctx)
        s.settimeout(10)
        s.connect(tuple(rec["remote"]))
        s.settimeout(None)
        _check_local(s, rec, ctx)
        if rec.get("shut_rd"):
            s.shutdown(_socket.SHUT_RD)
        _put_back_moved(s, rec)
        _sockopts.apply_late(s, rec["opts"], rec["set"])
        _sockopts.verify(s, fam, True, rec["opts"])
        from .. import netdiag
        got = netdiag.tcp_listener(lrec["family"], lino)
        want = len(lrec.get("waiting") or [])
        if got is None or got[0] != want:
            raise refuse_rec(rec, ctx, "socket", f"{what}: the rebuilt listener has {got[0] if got else '?'} "
                             f"connection(s) waiting, not {want}")
        fd = s.detach()
    return with_status_flags(rec, ctx, fd)


def _half_close(rec: dict, ctx) -> None:
    """Once both ends of a half-closed pair are out of repair mode, the one
    that had shut down writing does so again: its FIN goes to the other
    end over loopback, and both settle in their recorded states."""
    pair = ctx.shared.setdefault(f"tcp-half:{min(rec['inode'], rec['peer_inode'])}", [])
    pair.append(rec)
    if len(pair) < 2:
        return
    socks = [(r, _socket.socket(fileno=os.dup(ctx.shared[f"tcp-conn-live:{r['inode']}"]))) for r in pair]
    try:
        for r, sk in socks:
            if r["state"] == FIN_WAIT2:
                sk.shutdown(_socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while True:
            now = [sk.getsockopt(SOL_TCP, TCP_INFO, 1)[0] for _, sk in socks]
            if now == [r["state"] for r, _ in socks]:
                return
            if time.monotonic() > deadline:
                raise OSError(_errno.ETIMEDOUT, f"the half-closed pair reached states {now}, not "
                              f"{[r['state'] for r, _ in socks]}")
            time.sleep(0.002)
    finally:
        for _, sk in socks:
            sk.close()


def _send_unsent(s: _socket.socket, rec: dict, unsent: bytes) -> None:
    """The bytes never sent, queued again behind the rebuilt send queue.
    The rebuilt queue is charged by its own skbs, not the original's (other
    sizes, the repair-mode writes' linear buffers), so a queue that filled
    the send buffer may not fit it again: a non-blocking send then fails
    with EAGAIN (zdtm socket-tcpbuf*, the process lost after the dump). The
    buffer is widened for the refill and put back to its recorded size and
    lock bits (SO_BUF_LOCK), as a process that filled it sees them."""
    # MSG_DONTWAIT, not O_NONBLOCK: the open file is the restored
    # process's own, its status flags already set as recorded
    size = _sockopts.as_int((rec.get("moved") or {}).get("SO_SNDBUF"))
    lock = rec["opts"].get("SO_BUF_LOCK")
    if not size or lock is None:
        _send_all(s, unsent, _socket.MSG_DONTWAIT)   # no recorded size or lock to put back (before 5.16)
        return
    now = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF)
    _sockopts.set_buffer(s, "SO_SNDBUF", now + 4 * len(unsent) + (1 << 20))
    try:
        _send_all(s, unsent, _socket.MSG_DONTWAIT)
    except OSError as e:
        raise OSError(e.errno, f"sending the {len(unsent)} unsent bytes: {e.strerror} (send buffer "
                      f"{s.getsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF)}, was {size})") from e
    finally:
        _sockopts.set_buffer(s, "SO_SNDBUF", size)
        s.setsockopt(_socket.SOL_SOCKET, _sockopts.SO_BUF_LOCK, bytes.fromhex(lock))


def finish(rec: dict, ctx, task) -> None:
    """In the restorer, the new process holding the socket and not running
    yet: leave repair mode (a window probe tells the peer where we are),
    send what was never sent, SO_REUSEADDR as recorded (leaving repair mode
    cleared it). Raises EngineError."""
    fd = ctx.shared.get(f"tcp-conn-live:{rec['inode']}")
    if fd is None:
        return
    s = _socket.socket(fileno=os.dup(fd))
    try:
        _setint(s, TCP_REPAIR, TCP_REPAIR_OFF)
        unsent = ctx.shared.get(f"tcp-conn-unsent:{rec['inode']}") or b""
        if unsent:
            _send_unsent(s, rec, unsent)
        if "SO_REUSEADDR" in rec["set"]:
            _sockopts.apply(s, rec["opts"], ["SO_REUSEADDR"])
        want = {"SO_REUSEADDR": rec["opts"].get("SO_REUSEADDR")}
        if unsent and rec["opts"].get("SO_BUF_LOCK") is not None:
            # _send_unsent put these back; a send buffer the kernel may still
            # tune (not locked: SOCK_SNDBUF_LOCK) is not compared
            want["SO_BUF_LOCK"] = rec["opts"]["SO_BUF_LOCK"]
            if _sockopts.as_int(want["SO_BUF_LOCK"]) & SOCK_SNDBUF_LOCK and (rec.get("moved") or {}).get("SO_SNDBUF"):
                want["SO_SNDBUF"] = rec["moved"]["SO_SNDBUF"]
        for name, value in want.items():
            got = s.getsockopt(_socket.SOL_SOCKET, _sockopts.number(name), 4).hex()
            if got != value:
                raise OSError(_errno.EINVAL, f"{name} does not read back ({got}, was {value})")
        if rec.get("state") in HALF and rec["peer"] == "dump":
            _half_close(rec, ctx)
        if rec.get("state") in FIN_UNACKED:
            # Our FIN again, after every byte: the same sequence number as the
            # original's. A peer that had it acknowledges it again, one that
            # had not takes it; the lock holds it back until the process runs,
            # then retransmission carries it.
            s.shutdown(_socket.SHUT_WR)
            now = s.getsockopt(SOL_TCP, TCP_INFO, 1)[0]
            if now != rec["state"]:
                raise OSError(_errno.EPROTO, f"shut down for writing again, it is in state "
                              f"{netinfo.TCP_STATES.get(now, now)}, not {netinfo.TCP_STATES.get(rec['state'])}")
    except OSError as e:
        raise failed(rec, ctx, "leaving tcp repair mode", e) from e
    finally:
        s.close()
