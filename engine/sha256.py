"""sha256, the constructor hashlib.sha256 is, without importing hashlib.

hashlib's import probes every algorithm it knows through OpenSSL (a dozen
constructors called) and imports _blake2: ~8 ms of every ckpt run in an
x86_64 TCG guest (issue 15), for the one algorithm the engine uses. This
takes _hashlib.openssl_sha256 when hashlib would (it answers), else
hashlib's own choice."""

from __future__ import annotations

try:
    from _hashlib import openssl_sha256 as sha256
    sha256(usedforsecurity=False)   # hashlib's probe (a FIPS OpenSSL may refuse: then hashlib picks)
except (ImportError, AttributeError, ValueError):    # pragma: no cover - no usable OpenSSL
    from hashlib import sha256      # noqa: F401
