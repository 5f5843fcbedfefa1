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
names the block that is damaged.
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
            while pos < n:
                k = min(n - pos, BLOCK - self._fill)
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
