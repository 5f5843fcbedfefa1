"""engine/sha256.py: hashlib.sha256's digests whichever implementation a
hash ends in (the interpreter's _sha256 while the run's small budget
lasts, OpenSSL's past it), and OpenSSL loaded only when past it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _fresh(code: str) -> str:
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[0] = {str(REPO)!r}\n" + code],
                       capture_output=True, text=True, timeout=60, close_fds=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("sizes", [[], [0], [5], [100, 200], [1 << 17, 1 << 17], [1 << 17, (1 << 17) + 1],
                                   [1 << 20], [3, 1 << 20, 7], [(256 << 10) - 1, 1, 1]])
def test_same_digests_as_hashlib_in_a_fresh_run(sizes):
    # one fresh interpreter per case: the budget is the run's
    out = _fresh(f"""
import hashlib, os
from engine.sha256 import sha256
buf = bytearray(max({sizes} + [1]))
h, ref = sha256(), hashlib.sha256()
for i, n in enumerate({sizes}):
    buf[:n] = os.urandom(n)
    h.update(memoryview(buf)[:n])       # the caller's buffer, reused next round
    ref.update(bytes(buf[:n]))
    buf[:n] = bytes(n)
c, rc = h.copy(), ref.copy()
c.update(b"more"); rc.update(b"more")
print(h.hexdigest() == ref.hexdigest(), h.digest() == ref.digest(), c.hexdigest() == rc.hexdigest(),
      h.hexdigest() == ref.hexdigest())
""")
    assert out.split() == ["True"] * 4


def test_openssl_only_past_the_budget():
    out = _fresh("""
import sys
from engine import sha256
for i in range(20):
    sha256.sha256(b"x" * 10000).hexdigest()     # 200 KB in all: within the budget
print("_hashlib" in sys.modules, sha256._spent)
h = sha256.sha256(b"y" * 100000)                # past it
print("_hashlib" in sys.modules, h._held is None, sha256.sha256()._held is None)
""")
    assert out.split() == ["False", "200000", "True", "True", "True"]


def test_in_process_same_as_hashlib():
    from engine.sha256 import sha256
    for data in (b"", b"abc", os.urandom(70000), os.urandom(1 << 20)):
        assert sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
