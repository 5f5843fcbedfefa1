"""IPv6 flow label leases (IPV6_FLOWLABEL_MGR): detected, refused.

A socket's leases (its ipv6_fl_list: a label, its sharing mode, and the
extension headers given with it) cannot be read back: getsockopt
IPV6_FLOWLABEL_MGR answers only for the label the socket currently sends
with. The network namespace's leases are listed in /proc/PID/net/
ip6_flowlabel with a use count and an owner, but the owner is a pid only
for IPV6_FL_S_PROCESS leases (a uid for IPV6_FL_S_USER, 0 otherwise), so
a lease cannot be tied to a socket. Restoring a socket that held one would
drop it silently (sends naming the label then fail with EINVAL, another
socket may take it): so an IPv6 socket is refused while the namespace
lists any lease in use (Users > 0) other than a per-process one of
another pid. Leases are rare (nothing in the usual stack takes one).
"""

from __future__ import annotations

import socket as _socket

from ._util import refuse
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List

IPV6_FL_S_PROCESS = 2


def parse(text: str, pid: int) -> List[str]:
    """Labels (hex) of in-use leases that may be `pid`'s."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 4:
            continue
        try:
            share, owner, users = int(f[1]), int(f[2]), int(f[3])
        except ValueError:
            out.append(f[0])        # unreadable: counted, not skipped
            continue
        if users > 0 and not (share == IPV6_FL_S_PROCESS and owner != pid):
            out.append(f[0])
    return out


def leases(ctx, pid: int) -> List[str]:
    """Labels of in-use leases in `pid`'s network namespace that may be its
    own (cached per dump). Raises OSError when the list exists but cannot
    be read."""
    key = f"ip6-flowlabels:{pid}"
    if key not in ctx.shared:
        try:
            with open(f"/proc/{pid}/net/ip6_flowlabel", "rb") as f:
                text = f.read().decode("ascii", "replace")
        except FileNotFoundError:     # no IPv6: no lease
            text = ""
        ctx.shared[key] = parse(text, pid)
    return ctx.shared[key]


def check(info, ctx, family: int) -> None:
    """Raises the `socket` refusal for an IPv6 socket of `info` while its
    namespace lists a lease that may be the target's."""
    if family != _socket.AF_INET6:
        return
    held = leases(ctx, info.pid)
    if held:
        raise refuse(info, "socket", f"IPv6 flow label leases ({', '.join(held[:4])}) are held in its network "
                     "namespace (IPV6_FLOWLABEL_MGR): which socket holds them cannot be read")
