"""The network lock: netfilter rules that hold a TCP connection still while
its socket is an image.

A connection whose peer is outside the dump keeps running on the peer's
side: the peer sends, retransmits, probes. Between the dump (the socket is
closed silently, in repair mode) and the restore, a segment from the peer
would find no socket and be answered with a RST, which resets the peer's
connection; a segment that arrives while the dump reads the queues would be
acknowledged and then lost with the original. So, like CRIU's network lock
(criu/netfilter.c, nftables mode), every packet of the connection's 4-tuple
is dropped in both directions from before the queues are read until the
restored socket exists. The peer sees silence, retransmits, and carries on
once the lock is gone.

One segment passes the input rule: one marked PASS_MARK, which only the
restore sets, on the segment it forges from the peer to put a half-closed
connection back in its state (engine/fds/_tcpforge.py).

One nftables table per connection (``inet ckpt_lock_<hash>``), so a lock
is taken and dropped atomically and the restore needs nothing but the
4-tuple from the image. Driven through libnftables (ctypes), as Debian's
criu does; no command-line tool is needed. A machine without libnftables
cannot hold a connection: :func:`available` says why, and such connections
are refused at dump.

The lock outlives a killed original on purpose: it is removed by the restore
that brings the socket back (or by :func:`unlock` with `--leave-running` or
a failed dump). A connection dumped and never restored stays silent for its
peer until someone removes the table (``nft delete table inet ckpt_lock_...``).
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
from typing import Optional, Tuple

_lib = None
_why: Optional[str] = None

# A segment carrying this mark passes the lock's input rule: the one the
# restore forges from the peer to settle a half-closed connection in its
# state (engine/fds/_tcpforge.py), while the real peer is still held off.
PASS_MARK = 0x636B7074      # "ckpt"

Endpoint = Tuple[str, int]


def _load():
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    try:
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
    except OSError:
        _why = "libnftables.so.1 is not installed (Debian: libnftables1)"
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    _lib = lib
    return lib


class LockError(Exception):
    """The lock could not be taken; the message says why."""


def _run(cmd: str, out: Optional[list] = None) -> Tuple[int, str]:
    """(return code, error text) of an nftables command; its output appended
    to `out` when given."""
    lib = _load()
    if lib is None:
        raise LockError(_why)
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise LockError("nft_ctx_new failed")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, cmd.encode())
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip()
        if out is not None:
            out.append((lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace"))
    finally:
        lib.nft_ctx_free(ctx)
    return rc, err


def available() -> Optional[str]:
    """None when connections can be locked here, else why not (one line)."""
    if _load() is None:
        return _why
    rc, err = _run("list tables")
    if rc != 0:
        return f"nftables does not answer: {err.splitlines()[0] if err else 'error'}"
    return None


def _v4(addr: str) -> Optional[str]:
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        return str(ip)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else None


def table_name(local: Endpoint, remote: Endpoint) -> str:
    key = f"{local[0]}|{local[1]}|{remote[0]}|{remote[1]}".encode()
    return "ckpt_lock_" + hashlib.sha256(key).hexdigest()[:16]


def _match(src: Endpoint, dst: Endpoint) -> str:
    v4s, v4d = _v4(src[0]), _v4(dst[0])
    if v4s and v4d:      # an IPv4-mapped IPv6 socket talks IPv4 on the wire
        fam = "ip"
        s, d = v4s, v4d
    else:
        fam, s, d = "ip6", src[0], dst[0]
    return f"{fam} saddr {s} {fam} daddr {d} tcp sport {src[1]} tcp dport {dst[1]}"


def lock(local: Endpoint, remote: Endpoint) -> str:
    """Drop every packet of the connection local<->remote, both ways.
    Returns the table name. Raises LockError."""
    name = table_name(local, remote)
    cmd = (f"table inet {name} {{\n"
           f" chain in {{\n  type filter hook input priority -150; policy accept;\n"
           f"  {_match(remote, local)} meta mark != {PASS_MARK:#x} drop\n }}\n"
           f" chain out {{\n  type filter hook output priority -150; policy accept;\n"
           f"  {_match(local, remote)} drop\n }}\n}}\n")
    rc, err = _run(cmd)
    if rc != 0:
        raise LockError(f"nftables refused the lock: {err.splitlines()[0] if err else 'error'}")
    return name


def unlock(name: str) -> None:
    """Remove a lock (a missing table is fine: another machine, or done)."""
    if _load() is None:
        return
    _run(f"delete table inet {name}")


def held() -> set:
    """The names of the locks this machine holds now (a connection dumped
    and not restored yet, or never to be: its table stays until removed)."""
    if _load() is None:
        return set()
    text: list = []
    if _run("list tables inet", text)[0] != 0:
        return set()
    return {w for line in text[0].splitlines() for w in line.split()[2:3] if w.startswith("ckpt_lock_")}


def locked(name: str) -> bool:
    if _load() is None:
        return False
    return _run(f"list table inet {name}")[0] == 0
