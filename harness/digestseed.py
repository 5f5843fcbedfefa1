"""ckpt's digest cache of a guest image, kept on the host between runs.

Every guest's golden preparation filled ckpt's digest cache
(engine/digestcache.py) by one ``ckpt dump --leave-running`` of a python3
that loaded every extension module (harness/targets.py WARM_DIGESTS):
~5-10 s of TCG CPU per guest, idle to loaded, to hash the same image
files every time. The cache it leaves is kept here and given to the next
guest of the same image instead.

Nothing stale can be used, by the cache's own rule: an entry is found only
by the (dev, ino, generation, size, mtime, ctime) of the file as the guest
sees it at the dump, and any write to that file changes its ctime; a
different image, or the same image rebuilt, has other inodes, generations
or ctimes, and a file whose entry does not match is hashed again. The key
below (the image's files, the cache's code, the warm-up that fills it,
the guest's python3) only picks which file to give: one that misses costs
a re-hash at a dump, never a wrong digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from .targets import REPO

GUEST_PATH = "/var/cache/ckpt/digests.json"       # engine/digestcache.py DEFAULT_PATH


def key(image_files: Sequence[Path], *parts: str) -> str:
    """The seed's name: the identity of each image file (path, size, mtime,
    inode), engine/digestcache.py's source and ``parts`` (the warm-up's
    text, the guest's python3)."""
    h = hashlib.sha256()
    for p in image_files:
        st = Path(p).resolve().stat()
        h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
    h.update((REPO / "engine" / "digestcache.py").read_bytes())
    for part in parts:
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:32]


def load(root: Path, name: str) -> Optional[bytes]:
    """The seed kept under ``name`` (None: none, or not a JSON object)."""
    try:
        data = (Path(root) / f"{name}.json").read_bytes()
        return data if isinstance(json.loads(data), dict) else None
    except (OSError, ValueError):
        return None


def store(root: Path, name: str, data: bytes) -> bool:
    """Keep ``data`` (a guest's cache file) if it is a JSON object of
    entries; atomically. False when it is not one."""
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in obj.values()):
        return False
    Path(root).mkdir(parents=True, exist_ok=True)
    path = Path(root) / f"{name}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def place_line(path: str = GUEST_PATH) -> str:
    """The guest's sh line that puts a seed (stdin) where ckpt reads it, with
    the modes ckpt trusts (a root-owned 0600 file in a root-only directory)."""
    return (f"set -e; umask 077; mkdir -p {os.path.dirname(path)}; "
            f"cat > {path}.seed; mv {path}.seed {path}")
