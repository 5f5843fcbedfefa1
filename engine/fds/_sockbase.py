"""Shared pieces of the socket handlers: what a socket is (asked on a
pidfd_getfd duplicate, read-only), who else holds it, its namespace, and
its options against a fresh socket's.

Everything here raises :class:`engine.errors.Refusal` (reason ``socket``)
for what cannot be restored exactly and :class:`engine.errors.EngineError`
when the target's fd cannot be inspected.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import socket as _socket
TYPE_CHECKING = False   # annotations only: importing typing costs every run ~3 ms
if TYPE_CHECKING:
    from typing import Dict, Iterator, List, Optional

from .. import netdiag, pidfd
from ..errors import Refusal
from . import _flowlabel, _peers, _sockopts
from ._util import failed, refuse, refuse_rec

KIND_KEY = "sock"          # restore records carry rec["sock"]: the sub-kind
UNIX_TYPES = {_socket.SOCK_STREAM: "stream", _socket.SOCK_DGRAM: "dgram", _socket.SOCK_SEQPACKET: "seqpacket"}


def inode_of(link: str) -> int:
    """'socket:[1234]' -> 1234."""
    return int(link[len("socket:["):-1])


def is_tcp(family: int, typ: int, proto: int) -> bool:
    return family in (_socket.AF_INET, _socket.AF_INET6) and typ == _socket.SOCK_STREAM and \
        proto in (0, _socket.IPPROTO_TCP)


def is_udp(family: int, typ: int, proto: int) -> bool:
    return family in (_socket.AF_INET, _socket.AF_INET6) and typ == _socket.SOCK_DGRAM and \
        proto in (0, _socket.IPPROTO_UDP)


def proto_key(family: int, typ: int, proto: int):
    """What _sockopts calls `proto_tcp`: True for TCP, "udp" for UDP
    (their protocol-level options), "ping" for ICMP datagram sockets,
    False otherwise."""
    if is_tcp(family, typ, proto):
        return True
    if typ == _socket.SOCK_DGRAM and (family, proto) in ((_socket.AF_INET, _socket.IPPROTO_ICMP),
                                                         (_socket.AF_INET6, 58)):
        return "ping"
    return "udp" if is_udp(family, typ, proto) else False


def same_netns(pid: int) -> bool:
    """Whether the target shares this process's network namespace: the only
    one sock_diag and a restore's socket() can speak for."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def same_root(pid: int) -> bool:
    """Whether the target sees the same filesystem root as the engine (a
    path-bound unix socket's path means the same file)."""
    try:
        return os.stat(f"/proc/{pid}/root").st_ino == os.stat("/").st_ino and \
            os.stat(f"/proc/{pid}/root").st_dev == os.stat("/").st_dev
    except OSError:
        return False


def shutdown_bits(fd: int, family: int, proto: int, inode: int) -> tuple:
    """(sk_shutdown, exact) of an inet socket: from sock_diag when it lists
    the socket (bound or connected), exact; else (an unbound socket, in no
    table) from poll, which shows the reading side only (RCV_SHUTDOWN:
    POLLRDHUP), not exact. Raises OSError."""
    bits = netdiag.inet_shutdown(family, proto, inode)
    if bits is not None:
        return bits, True
    return (netdiag.RCV_SHUTDOWN if shut_for_reading(fd) else 0), False


def shut_for_reading(fd: int) -> bool:
    """RCV_SHUTDOWN, as poll shows it (POLLRDHUP), on any socket."""
    import select
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLRDHUP)
    return bool(dict(p.poll(0)).get(fd, 0) & select.POLLRDHUP)


def shut_down(s: _socket.socket, bits: int) -> None:
    """shutdown(2) the rebuilt socket to `bits`. An unconnected socket
    takes the bits too and answers ENOTCONN (inet_shutdown): not an error
    here. Raises OSError."""
    how = {netdiag.RCV_SHUTDOWN: _socket.SHUT_RD, netdiag.SEND_SHUTDOWN: _socket.SHUT_WR,
           netdiag.RCV_SHUTDOWN | netdiag.SEND_SHUTDOWN: _socket.SHUT_RDWR}.get(bits)
    if how is None:
        return
    try:
        s.shutdown(how)
    except OSError as e:
        if e.errno != _errno.ENOTCONN:
            raise


def outside_holders(info, ctx, inode: int) -> List[tuple]:
    """(pid, fd) of processes other than the target holding socket `inode`
    (the socket's own sockfs dev is shared by every socket)."""
    return _peers.holders(ctx, f"socket:[{inode}]", info.dev, inode)


def held_here(ctx, inode: int) -> List[int]:
    """The target's fd numbers on socket `inode`."""
    link = f"socket:[{inode}]"
    return sorted(i.fd for i in ctx.all_fds.values() if i.link == link)


def options(info, ctx, family: int, typ: int, proto: int, dup: int) -> Dict[str, Optional[str]]:
    """Every known option of the target's socket (read on `dup`). Raises
    the `socket` refusal for an IPv6 socket whose namespace holds flow
    label leases (_flowlabel: not readable per socket)."""
    _flowlabel.check(info, ctx, family)
    s = _socket.socket(fileno=os.dup(dup))
    try:
        return _sockopts.read_all(s, family, proto_key(family, typ, proto))
    finally:
        s.close()


def fresh_options(ctx, family: int, typ: int, proto: int) -> Dict[str, Optional[str]]:
    """The options of a socket just made here: the defaults to compare with
    (measured, not assumed: several come from sysctls). Cached per kind."""
    key = f"sock-fresh:{family}:{typ}:{proto}"
    if key not in ctx.shared:
        with _socket.socket(family, typ | _socket.SOCK_CLOEXEC, proto) as s:
            ctx.shared[key] = _sockopts.read_all(s, family, proto_key(family, typ, proto))
    return ctx.shared[key]


def check_options(info, values: dict, fresh: dict) -> List[str]:
    """Names of the options the process set (to reproduce). Raises the
    `socket` refusal for set options the engine will not reproduce."""
    bad = _sockopts.refused(values, fresh)
    if bad:
        raise refuse(info, "socket", "options that cannot be restored are set: " + ", ".join(bad))
    return _sockopts.differing(values, fresh)


def option_refusal(rec: dict, ctx, e: _sockopts.OptionError) -> Refusal:
    return refuse_rec(rec, ctx, "socket", f"option {e.name} cannot be reproduced: {e.why}")


@contextlib.contextmanager
def building(s: _socket.socket, rec: dict, ctx, what: str) -> Iterator[None]:
    """``with building(s, rec, ctx, "recreating X"):`` closes the socket `s`
    being rebuilt if the block fails. Raises the `socket` refusal for an
    option that does not read back, EngineError (naming `what`) for other
    system errors; anything else propagates as it is."""
    try:
        yield
    except _sockopts.OptionError as e:
        s.close()
        raise option_refusal(rec, ctx, e) from None
    except OSError as e:
        s.close()
        raise failed(rec, ctx, what, e) from e
    except BaseException:
        s.close()
        raise


def dup_of(info):
    """``with dup_of(info) as d:`` a duplicate of the target's socket."""
    return pidfd.target_fd(info.pid, info.fd)


def unix_diag(info, ino: int) -> dict:
    """netdiag.unix_socket(ino), or the `socket` refusal when sock_diag
    cannot answer (no unix_diag module, another namespace)."""
    try:
        return netdiag.unix_socket(ino)
    except OSError as e:
        raise refuse(info, "socket", f"unix socket inode {ino}: sock_diag cannot describe it "
                     f"({e.strerror}); its peer and queues cannot be known") from e
