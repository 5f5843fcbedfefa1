"""Seeded file contents: the one generator the setup step and the workload share.

Runs in the guest (stdlib only, Python >= 3.9). The byte at position ``p`` of
seed ``s`` is a pure function of ``(s, p)``, so the workload can derive what a
file must contain from the scenario's setup alone, never from the engine's
image: the engine cannot grade its own homework.

A file's content is a list of :class:`Segment`\\ s (data runs or holes), so
sparse files of a GiB cost nothing to describe and a region can be computed
without materialising the file.
"""

from __future__ import annotations

TYPE_CHECKING = False   # annotations only: typing is ~2 ms of imports (x10 under TCG)
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence, Tuple

try:
    from . import records
except ImportError:  # pragma: no cover - in the guest, run as a script
    import records  # type: ignore[no-redef]

BLOCK = 4096
#: each block: a 16-byte head unique to (seed, block) and a window of the
#: seed's pad (:func:`_pad`), the window moving by a block's tail each block
HEAD = 16
PAD = 1 << 16
_TAIL = BLOCK - HEAD
_pads = {}      # type: Dict[int, bytes]


def _pad(seed: int) -> bytes:
    """The seed's 64 KiB pad: SHAKE-128 of the seed (one C call)."""
    pad = _pads.get(seed)
    if pad is None:
        try:
            from _sha3 import shake_128     # built in: hashlib would load OpenSSL's libcrypto
        except ImportError:     # pragma: no cover - a Python without it
            from hashlib import shake_128
        if len(_pads) >= 8:
            _pads.clear()
        pad = _pads[seed] = shake_128(b"crucible-seeded:%d" % seed).digest(PAD)
    return pad


def _block(seed: int, index: int) -> bytes:
    """Block ``index`` of the stream for ``seed``: its BLAKE2b head, then
    the pad from ``index * _TAIL`` on (wrapping).

    Standard hashes only, so the stream is the same on every Python; two
    C calls and a slice per block, where one ``random.Random`` per block
    (init_by_array and ``randbytes``, the ``random`` import on top) made a
    48 MiB file cost ~3 s of a TCG guest's setup. No two blocks are alike
    (the heads), nor is a block like itself shifted (the pad is random).
    """
    try:
        from _blake2 import blake2b
    except ImportError:     # pragma: no cover - a Python without it
        from hashlib import blake2b
    pad = _pad(seed)
    o = (index * _TAIL) % PAD
    tail = pad[o:o + _TAIL]
    if len(tail) < _TAIL:
        tail += pad[:_TAIL - len(tail)]
    return blake2b(b"%d:%d" % (seed, index), digest_size=HEAD).digest() + tail


def data(seed: int, start: int, length: int) -> bytes:
    """Bytes ``[start, start+length)`` of the seeded stream ``seed``."""
    if length <= 0:
        return b""
    first, last = start // BLOCK, (start + length - 1) // BLOCK
    blob = b"".join([_block(seed, i) for i in range(first, last + 1)])
    off = start - first * BLOCK
    return blob[off:off + length]


class Segment(records.Record):
    """``length`` bytes: a hole (``seed is None``) or ``data(seed, origin...)``."""

    FIELDS = ("length", "seed", "origin")

    def __init__(self, length: int, seed: Optional[int] = None, origin: int = 0):
        self.length = length
        self.seed = seed
        self.origin = origin

    def read(self, start: int, n: int) -> bytes:
        if self.seed is None:
            return bytes(n)
        return data(self.seed, self.origin + start, n)


class Content(records.Record):
    """What a regular file holds, as segments in file order."""

    FIELDS = ("segments",)

    def __init__(self, segments: Optional[List[Segment]] = None):
        self.segments = [] if segments is None else segments

    @classmethod
    def seeded(cls, size: int, seed: int, holes: Sequence[Tuple[int, int]] = (),
               extents: Optional[Sequence[Tuple[int, int]]] = None) -> "Content":
        """A file of ``size`` bytes where byte ``p`` is ``data(seed, p)``.

        ``holes`` lists ``(offset, length)`` ranges left as holes; alternatively
        ``extents`` lists the only ranges that hold data (everything else is a
        hole). Data is position-aligned: the byte at ``p`` never depends on
        where the holes are.
        """
        if extents is not None:
            runs = sorted((o, min(o + n, size)) for o, n in extents if o < size)
        else:
            runs, pos = [], 0
            for o, n in sorted(holes):
                if o > pos:
                    runs.append((pos, min(o, size)))
                pos = max(pos, o + n)
            if pos < size:
                runs.append((pos, size))
        segs: List[Segment] = []
        pos = 0
        for a, b in runs:
            if a > pos:
                segs.append(Segment(a - pos))
            if b > a:
                segs.append(Segment(b - a, seed, a))
            pos = max(pos, b)
        if size > pos:
            segs.append(Segment(size - pos))
        return cls(segs)

    @property
    def size(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def data_bytes(self) -> int:
        """Bytes that are not holes (what a sparse-aware copy must store)."""
        return sum(s.length for s in self.segments if s.seed is not None)

    def data_ranges(self) -> List[Tuple[int, int]]:
        """``(start, end)`` of every data segment, merged."""
        out: List[Tuple[int, int]] = []
        pos = 0
        for s in self.segments:
            if s.seed is not None and s.length:
                if out and out[-1][1] == pos:
                    out[-1] = (out[-1][0], pos + s.length)
                else:
                    out.append((pos, pos + s.length))
            pos += s.length
        return out

    def read(self, start: int, n: int) -> bytes:
        """Bytes ``[start, start+n)``, clipped at the end of the file."""
        out, pos = [], 0
        end = min(start + n, self.size)
        for s in self.segments:
            a, b = max(start, pos), min(end, pos + s.length)
            if a < b:
                out.append(s.read(a - pos, b - a))
            pos += s.length
            if pos >= end:
                break
        return b"".join(out)

    def append(self, n: int, seed: int) -> None:
        """What ``write(O_APPEND)`` of ``data(seed, 0, n)`` does."""
        self.segments.append(Segment(n, seed, 0))

    def truncate(self, size: int) -> None:
        """What ``ftruncate(size)`` does: cut, or extend with a hole."""
        cur = self.size
        if size >= cur:
            if size > cur:
                self.segments.append(Segment(size - cur))
            return
        segs, pos = [], 0
        for s in self.segments:
            if pos + s.length <= size:
                segs.append(s)
            elif pos < size:
                segs.append(Segment(size - pos, s.seed, s.origin))
            pos += s.length
        self.segments = segs

    def rewrite(self, seed: int) -> None:
        """Same size, every byte rewritten from ``seed`` (holes filled)."""
        self.segments = [Segment(self.size, seed, 0)] if self.size else []

    def copy(self) -> "Content":
        return Content([Segment(s.length, s.seed, s.origin) for s in self.segments])
