"""The migrate guests' shared segment (harness/segment.py): the hold drops
the staying client's segments to the moving address until the unlock, and
the unlock removes it (and the engines' locks). Run in a private network
namespace of this host (unshare -n), with both addresses on its loopback."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys

import pytest

from harness import segment

PROBE = r'''
import socket
l = socket.socket(); l.bind(("10.77.0.1", 0)); l.listen(1)
c = socket.socket(); c.bind(("10.77.0.2", 0)); c.settimeout(1.0)
try:
    c.connect(l.getsockname()); print("connected")
except OSError as e:
    print(type(e).__name__)
'''


def _nft() -> bool:
    try:
        ctypes.CDLL("libnftables.so.1")
        return True
    except OSError:
        return False


def q(argv) -> str:
    return " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)


@pytest.mark.skipif(shutil.which("unshare") is None or not _nft(), reason="needs unshare(1) and libnftables")
def test_hold_drops_the_client_until_the_unlock():
    probe = q([sys.executable, "-c", PROBE])
    script = ("ip link set lo up && ip addr add 10.77.0.1/32 dev lo && ip addr add 10.77.0.2/32 dev lo && "
              f"{probe} && {q(segment.hold(sys.executable, '10.77.0.2/24', '10.77.0.1/24'))} && {probe} && "
              f"{q(segment.unlock(sys.executable))} && {probe}")
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["connected", "TimeoutError", '["crucible_hold"]', "connected"]
