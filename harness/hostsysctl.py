"""Host settings (/proc/sys) that tests and local scenario runs need, set
for as long as anybody holds them and put back after the last holder
(pytest-xdist workers run such tests side by side, and a worker that put
one back while another still used it would break that one).

Each holder keeps a shared flock on LOCK while it needs the setting;
whoever changes the value records the original in STATE first (one STATE
file per setting: the first change's original wins). On leaving, a holder
tries the exclusive lock - granted once nobody holds it - and puts every
recorded original back. A run killed midway leaves STATE behind: the next
holder keeps that original, not the widened value.

Guests revert such changes with their snapshot; the host has no snapshot,
so a local scenario run (harness/targets.py LocalTarget) holds LOCK for
each scenario, and a workload that widens a setting (harness/kinds/
sockets.py: ping sockets) records it with :func:`widen`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os

LOCK = "/run/crucible-test-sysctl.lock"
PING_RANGE = "/proc/sys/net/ipv4/ping_group_range"
SETTINGS = "/proc/sys/"     # what a record may name (a test points both at a directory of its own)


def _state(path: str) -> str:
    return LOCK + "." + path.strip("/").replace("/", ".")


def _record(path: str, cur: str) -> None:
    """The original value, unless one is recorded already (O_EXCL: of two
    that change it at once, the first's original is kept)."""
    try:
        fd = os.open(_state(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{path}\n{cur}")


def widen(path: str, ok, value: str) -> None:
    """`path` set to `value` unless it already satisfies ok(text), its
    original recorded for the last holder to put back. For a process that
    runs while somebody holds LOCK (a local scenario's workload)."""
    with open(path) as f:
        cur = f.read().strip()
    if not ok(cur):
        _record(path, cur)
        with open(path, "w") as f:
            f.write(value)


def _put_back() -> None:
    """Every recorded original back (the caller holds LOCK exclusively)."""
    for state in glob.glob(LOCK + ".*"):
        try:
            with open(state) as f:
                path, nl, orig = f.read().partition("\n")
            if not nl:      # an older record: the value alone, the path in its name
                path, orig = "/" + state[len(LOCK) + 1:].replace(".", "/"), path
            if not path.startswith(SETTINGS):
                raise OSError(f"{state}: not a setting's record")
            with open(path, "w") as f:
                f.write(orig)
        except OSError:
            continue
        os.unlink(state)


def hold() -> int:
    """A shared hold on LOCK (an fd for :func:`release`)."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def release(fd: int) -> None:
    """Let go of a :func:`hold`; the last holder puts the originals back. Never
    waits: if another holds LOCK, that one puts them back when it leaves."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _put_back()
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def sysctl_held(path: str, ok, value: str, exclusive: bool = False):
    """`path` (a /proc/sys file) is `value` during the block unless its
    current value already satisfies ok(text). `exclusive`: the opposite
    need of other holders (ping sockets excluded where others need them
    allowed): the exclusive lock is kept for the whole block, so the two
    never overlap (each waits for the other)."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        widen(path, ok, value)
        if not exclusive:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_EX)      # once no other test holds it
        _put_back()
        os.close(fd)


def ping_allows_root(text: str) -> bool:
    lo, hi = map(int, text.split())
    return lo <= 0 <= hi


def ping_sockets_allowed():
    """ICMP datagram sockets for gid 0 (net.ipv4.ping_group_range): the
    kernel's default "1 0" lets no group; systemd's sysctl.d lets all."""
    return sysctl_held(PING_RANGE, ping_allows_root, "0 0")


def ping_sockets_excluded():
    """No ICMP datagram socket for gid 0 (the kernel's default "1 0"):
    ping(8) as root falls back to raw ICMP sockets."""
    return sysctl_held(PING_RANGE, lambda t: not ping_allows_root(t), "1 0",
                       exclusive=True)
