"""A machine setting some tests need, set for as long as any test holds it
and put back after the last one (pytest-xdist workers run such tests side
by side, and a worker that put it back while another still used it would
break that one).

Each holder keeps a shared flock on LOCK for its test; whoever changes the
value does so under the exclusive lock and records the original in STATE.
On leaving, a holder converts to the exclusive lock - granted once no test
holds it - and puts the original back. A run killed midway leaves STATE
behind: the next holder keeps that original, not the widened value.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

LOCK = "/run/crucible-test-sysctl.lock"


@contextlib.contextmanager
def sysctl_held(path: str, ok, value: str, exclusive: bool = False):
    """`path` (a /proc/sys file) is `value` during the block unless its
    current value already satisfies ok(text). `exclusive`: the opposite
    need of other holders (ping sockets excluded where others need them
    allowed): the exclusive lock is kept for the whole block, so the two
    never overlap (each waits for the other)."""
    state = LOCK + "." + path.strip("/").replace("/", ".")
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(path) as f:
            cur = f.read().strip()
        if not ok(cur):
            if not os.path.exists(state):
                with open(state, "w") as f:
                    f.write(cur)
            with open(path, "w") as f:
                f.write(value)
        if not exclusive:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_EX)      # once no other test holds it
        try:
            with open(state) as f:
                orig = f.read()
            with open(path, "w") as f:
                f.write(orig)
            os.unlink(state)
        except FileNotFoundError:
            pass
        os.close(fd)


def _ping_allows_root(text: str) -> bool:
    lo, hi = map(int, text.split())
    return lo <= 0 <= hi


def ping_sockets_allowed():
    """ICMP datagram sockets for gid 0 (net.ipv4.ping_group_range): the
    kernel's default "1 0" lets no group; systemd's sysctl.d lets all."""
    return sysctl_held("/proc/sys/net/ipv4/ping_group_range", _ping_allows_root, "0 0")


def ping_sockets_excluded():
    """No ICMP datagram socket for gid 0 (the kernel's default "1 0"):
    ping(8) as root falls back to raw ICMP sockets."""
    return sysctl_held("/proc/sys/net/ipv4/ping_group_range", lambda t: not _ping_allows_root(t), "1 0",
                       exclusive=True)
