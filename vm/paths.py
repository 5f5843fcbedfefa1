"""Where guest images, probe verdicts and per-guest files live on the host."""

from __future__ import annotations

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
