"""The shared network of a migrate scenario's two guests (``segment:``).

Every guest has a second NIC on an L2 segment it shares with the other
guest of its worker (vm/argv.py: QEMU ``-netdev dgram`` between two unix
datagram sockets, unprivileged). A scenario with

    segment: {moves: 10.77.0.1/24, stays: 10.77.0.2/24}

gets, on the dump guest, both addresses on that NIC: ``moves`` is the
service address its workload listens on, ``stays`` the address of a client
outside the dump that stays on the dump guest throughout (the echo peer of
a ``tcp-established`` entry with ``bind``/``peer_bind``). After the dump
``moves`` leaves the dump guest and appears on the restore guest, where the
engine restores the connection; the client's next segments cross the
segment to the restore guest (ARP finds the address there). Last, the
dump's network lock is lifted on the dump guest, as a migration tool would
once the address is gone: only then can the client's segments leave it.

The hold. The dump's lock drops the connection's packets where the
server was (client to server on input, server to client on output); the
client's own segments leave its machine through the output hook, which
that lock does not match once the address is no longer local. Between the
address appearing on the restore guest and the restored socket existing
there, a client segment would find no socket and be answered with a RST.
So before the address leaves, the dump guest also holds the client's
segments to it (table ``inet crucible_hold``: output, stays -> moves,
dropped), lifted with the lock after the restore - what a migration tool
does for a client it must not lose (CRIU's restore locks the destination).
"""

from __future__ import annotations

from typing import List

#: the segment NIC's MAC on the first ("a") and second ("b") guest of a worker
MACS = {"a": "52:54:00:77:00:0a", "b": "52:54:00:77:00:0b"}

# The NIC is found by its MAC prefix (eth1 on today's guests, but never by name).
_NIC = ("nic=; for d in /sys/class/net/*; do case \"$(cat $d/address)\" in 52:54:00:77:00:*) "
        "nic=${d##*/};; esac; done; [ -n \"$nic\" ] || { echo 'no segment NIC (MAC 52:54:00:77:00:*)' >&2; exit 3; }; ")


def up(addresses: List[str]) -> List[str]:
    """argv: bring the segment NIC up with `addresses` (CIDR) added, in
    order: the first of a subnet is its primary address. Removing a primary
    address removes the secondaries with it unless promote_secondaries is
    on (it is turned on here too): so the staying address goes first."""
    adds = "".join(f"ip addr add {a} dev $nic && " for a in addresses)
    return ["sh", "-c", _NIC + "echo 1 > /proc/sys/net/ipv4/conf/$nic/promote_secondaries && "
            f"ip link set $nic up && {adds}true"]


def drop(address: str) -> List[str]:
    """argv: remove `address` from the segment NIC."""
    return ["sh", "-c", _NIC + f"ip addr del {address} dev $nic"]


# nftables through libnftables (the guest has no nft(8)).
_NFT = r'''
import ctypes, json, sys
lib = ctypes.CDLL("libnftables.so.1")
lib.nft_ctx_new.restype = ctypes.c_void_p
lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
def run(cmd):
    ctx = lib.nft_ctx_new(0)
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_output_set_flags(ctx, 1 << 4)          # NFT_CTX_OUTPUT_JSON
    rc = lib.nft_run_cmd_from_buffer(ctx, cmd.encode())
    return rc, (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
'''

# Every network-lock table of an engine (ckpt: inet ckpt_lock_*, criu:
# CRIU-*) and the hold, deleted.
_UNLOCK = _NFT + r'''
rc, out = run("list tables")
gone = []
for item in (json.loads(out).get("nftables", []) if rc == 0 and out else []):
    t = item.get("table")
    if t and (t["name"].startswith(("ckpt_lock_", "CRIU", "crucible_hold"))):
        run(f"delete table {t['family']} {t['name']}")
        gone.append(t["name"])
print(json.dumps(gone))
'''


_HOLD = _NFT + r'''
src, dst = sys.argv[1], sys.argv[2]
rc, _ = run("table inet crucible_hold {\n chain out {\n  type filter hook output priority -150; policy accept;\n"
            f"  ip saddr {src} ip daddr {dst} meta l4proto tcp drop\n }}\n}}\n")
sys.exit(rc)
'''


def hold(python: str, stays: str, moves: str) -> List[str]:
    """argv: drop the staying client's TCP segments to the moving address as
    they leave this guest (until :func:`unlock`)."""
    import ipaddress
    return [python, "-c", _HOLD, str(ipaddress.ip_interface(stays).ip), str(ipaddress.ip_interface(moves).ip)]


def unlock(python: str) -> List[str]:
    """argv: lift every engine network lock on the guest (prints the tables removed)."""
    return [python, "-c", _UNLOCK]
