"""Where guest images, probe verdicts and per-guest files live on the host."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """``${CRUCIBLE_CACHE:-~/.cache/crucible}``, created if missing."""
    root = os.environ.get("CRUCIBLE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crucible")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_dir() -> Path:
    """The directory that holds one sub-directory per built image."""
    path = cache_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def rootfs_cache_dir() -> Path:
    """The directory that holds cached mmdebstrap tarballs (the slow stage)."""
    path = cache_dir() / "rootfs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_json_object(path: Path) -> dict:
    """The JSON object stored at ``path``; {} when the file is missing,
    unreadable, not JSON or not an object (a cache or results file is
    rebuilt rather than trusted). Never raises."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a per-process temporary file
    beside it, then rename(2) over it, so a concurrent reader sees the old
    file or the new one, never half of one. Raises OSError."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
