"""sha256 with hashlib.sha256's interface, without paying for OpenSSL when
little is hashed.

hashlib's import probes every algorithm it knows through OpenSSL and
imports _blake2 (~8 ms of a ckpt run in an x86_64 TCG guest); _hashlib
alone still loads and initialises libcrypto: ~2.1 ms of every run on the
host (issue 15). A run that hashes only small image files does not need
it: the interpreter's own _sha256 gives the same digests, ~5x slower per
byte but with nothing to load (~0.3 ms). So a hash keeps what it is given
while the run's small-data budget (:data:`SMALL`, over all hashes) lasts,
and only past it hands what it holds to OpenSSL's sha256 (imported at
that moment, once; from then on every new hash goes straight to it; :func:`load_large` loads
it ahead, where a run knows it will hash much at a worse moment). Large
data (a process's pages, a mapped library) is hashed by OpenSSL, which
releases the GIL (the engine hashes files in parallel threads).

OpenSSL's is taken when hashlib would take it (it answers), else hashlib's
own choice.
"""

from __future__ import annotations

try:
    from _sha256 import sha256 as _small_sha256
except ImportError:         # Python >= 3.12: _sha2
    try:
        from _sha2 import sha256 as _small_sha256
    except ImportError:     # pragma: no cover - built without them: OpenSSL's for all
        _small_sha256 = None

#: Bytes the run may hash with _sha256 before OpenSSL's is worth loading
#: (_sha256 hashes ~330 MB/s here, OpenSSL ~1.8 GB/s after ~2.1 ms of load).
SMALL = 256 << 10

_large = None           # OpenSSL's constructor, once loaded
_spent = 0              # bytes hashed with _sha256 so far in this run


def load_large():
    global _large
    if _large is None:
        try:
            from _hashlib import openssl_sha256 as large
            large(usedforsecurity=False)   # hashlib's probe (a FIPS OpenSSL may refuse: then hashlib picks)
        except (ImportError, AttributeError, ValueError):    # pragma: no cover - no usable OpenSSL
            from hashlib import sha256 as large
        _large = large
    return _large


class sha256:
    """hashlib.sha256(data) as used here: update, digest, hexdigest, copy."""

    __slots__ = ("_h", "_held")
    name = "sha256"
    digest_size = 32
    block_size = 64

    def __init__(self, data=b""):
        if _large is not None or _small_sha256 is None:
            self._h, self._held = load_large()(), None
        else:
            self._h, self._held = None, []
        if data:
            self.update(data)

    def update(self, data) -> None:
        global _spent
        if self._held is None:
            self._h.update(data)
            return
        n = data.nbytes if type(data) is memoryview else len(data)
        if _spent + n <= SMALL:
            self._held.append(bytes(data))      # a copy: callers reuse their buffers
            _spent += n
            return
        h = load_large()()
        for b in self._held:
            h.update(b)
        h.update(data)
        self._h, self._held = h, None

    def _final(self):
        if self._held is None:
            return self._h
        return _small_sha256(b"".join(self._held))

    def digest(self) -> bytes:
        return self._final().digest()

    def hexdigest(self) -> str:
        return self._final().hexdigest()

    def copy(self) -> "sha256":
        other = sha256.__new__(sha256)
        if self._held is None:
            other._h, other._held = self._h.copy(), None
        else:
            other._h, other._held = None, list(self._held)
        return other
