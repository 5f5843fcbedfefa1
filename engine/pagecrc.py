"""The integrity record of a pages file (image format 6): a CRC-32 of every
BLOCK bytes, kept in the manifest as one string of 8 hex digits per block.

Why not sha256, as every other image file has: the manifest's digest lives
next to the data it covers, so it never protected against someone who can
write the image (they rewrite the manifest too); what it does is detect
damage. A CRC-32 per 1 MiB block detects every burst of up to 32 bits and
random damage with a ~2^-32 chance of a miss per block, at 2.4 times
sha256's speed on the x86_64 host we measure on (zlib.crc32 3.9 GiB/s,
OpenSSL's SHA-NI sha256 1.65 GiB/s; both release the GIL), and each block
is checked on its own: the verification can be shared out by block and
names the block that is damaged. The CRC is zlib's; libdeflate computes
the same one three times faster where it is installed (fast_crc32).
"""

from __future__ import annotations

BLOCK = 1 << 20
KEY = "crc32"       # the manifest entry's field: {"size": N, "crc32": "<8 hex digits per block>"}


def nblocks(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK


def is_pages_file(name: str) -> bool:
    """The files that carry a block CRC instead of a sha256: the pages files
    (memory.page_file_name), at the top of the image or of a tree member's
    directory."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith("pages-") and base.endswith(".img")


FAST_MIN = 64 << 10     # pieces at least this long go to libdeflate (below: a ctypes call costs more than it saves)
_fast = None            # libdeflate_crc32, or False: see fast_crc32()


def fast_crc32():
    """libdeflate's libdeflate_crc32(crc, address, length), the same CRC-32
    as zlib.crc32 (same polynomial, same chaining from 0), when the library
    is installed (libdeflate0: Debian and Fedora ship it with libtiff); else
    None. Why: it folds with PCLMULQDQ, 78 ms of CPU per GiB against zlib
    1.2/1.3's 258 ms on the x86_64 host we measure on, and hashing was a
    quarter of the CPU of dumping or restoring a large process. Used only
    once it gave zlib's answers on a test vector, whole and chained; the
    image format does not change (the figures are zlib's CRC-32's)."""
    global _fast
    if _fast is None:
        _fast = False
        try:
            import ctypes
            import zlib
            f = ctypes.CDLL("libdeflate.so.0").libdeflate_crc32
            f.restype = ctypes.c_uint32
            f.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
            probe = _probe()
            buf = ctypes.create_string_buffer(probe, len(probe))
            a = ctypes.addressof(buf)
            if f(0, a, len(probe)) == zlib.crc32(probe) and \
                    f(f(0, a, 4096 + 5), a + 4096 + 5, len(probe) - 4096 - 5) == zlib.crc32(probe) and \
                    f(0, a, 0) == 0:
                _fast = f
        except (OSError, AttributeError):
            pass    # no libdeflate here: zlib
    return _fast or None


def _probe() -> bytes:
    """The test vector (i * 131 + (i >> 9)) & 0xFF for i < 3 * 4096 + 17,
    made at C speed: byte by byte in Python it cost ~0.9 ms of every run
    that checks a pages file (issue 15). Within each 512 bytes i >> 9 is
    a constant k and i * 131 & 0xFF repeats (512 * 131 is a multiple of
    256): the first 512 bytes, each added k (a rotated translate table)."""
    first = bytes((i * 131) & 0xFF for i in range(512))
    ident = bytes(range(256))
    n = 3 * 4096 + 17
    return b"".join(first.translate(ident[k:] + ident[:k]) for k in range(n // 512 + 1))[:n]


class BlockCRC:
    """CRC-32 of every BLOCK bytes of a stream given in pieces of any size
    (the interface of a hashlib object: update(), hexdigest())."""

    def __init__(self) -> None:
        import zlib     # here, not at import: a process without pages never pays for it
        self._crc32 = zlib.crc32
        self._done: list = []
        self._crc = 0
        self._fill = 0      # bytes of the current block seen

    def update(self, data) -> None:
        view = memoryview(data)
        try:
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            pos, n = 0, len(view)
            fast = base = None
            if n >= FAST_MIN and not view.readonly:
                fast = fast_crc32()
                if fast is not None:
                    import ctypes
                    # the address of the caller's own buffer (no copy); a
                    # ctypes call releases the GIL, as zlib does
                    base = ctypes.addressof(ctypes.c_char.from_buffer(view))
            while pos < n:
                k = min(n - pos, BLOCK - self._fill)
                if base is not None and k >= FAST_MIN:
                    self._crc = fast(self._crc, base + pos, k)
                else:
                    self._crc = self._crc32(view[pos:pos + k], self._crc)   # releases the GIL past 5 KiB
                self._fill += k
                pos += k
                if self._fill == BLOCK:
                    self._done.append(self._crc)
                    self._crc = self._fill = 0
        finally:
            view.release()

    def hexdigest(self) -> str:
        crcs = self._done + ([self._crc] if self._fill else [])
        return "".join(f"{c:08x}" for c in crcs)


def first_bad_block(got: str, want: str) -> int:
    """The index of the first block whose CRC differs (-1: none)."""
    for i in range(0, max(len(got), len(want)), 8):
        if got[i:i + 8] != want[i:i + 8]:
            return i // 8
    return -1
